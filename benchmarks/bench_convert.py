"""Benchmark: ``kaapcli convert`` vs ``dcm2niix`` on the same data, in one run.

    python benchmarks/bench_convert.py [--only ct|mosaic] [--slices 300] [--size 512] [--volumes 60]
                                       [--repeat 3] [--workdir DIR]

- ct: a 300-slice 512x512 CT series from ``kaapcli mock``; dcm2niix at its default gzip level (6)
  against kaapcli at its default (1) and at 6.
- mosaic: a Siemens multiband diffusion series of ``--volumes`` MOSAIC files (150x152x81 per volume),
  made from heudiconv's three real E11 mosaics (installed by ``make venv``) by renumbering them.
  Both tools at equal gzip levels (dcm2niix -1 / -6 vs kaapcli --level 1 / 6) and uncompressed.

Best of --repeat, fresh output directories each time; prints times and ratios kaapcli / dcm2niix.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return elapsed


def best(cases: list[tuple[str, list[str]]], work: Path, repeat: int) -> dict[str, list[float]]:
    """Each command ``repeat`` times, interleaved, each into a fresh output directory ``{out}``."""
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for i in range(repeat):
        for name, cmd in cases:
            out = work / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            times[name].append(timed([c.replace("{out}", str(out)) for c in cmd]))
    return times


def mosaic_series(work: Path, volumes: int) -> Path:
    """``volumes`` renumbered copies of heudiconv's 3-file Siemens multiband DWI mosaic series."""
    import importlib.util

    import pydicom

    spec = importlib.util.find_spec("heudiconv")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("heudiconv not installed: make venv installs it (--no-deps) for its real mosaic files")
    src = sorted((Path(next(iter(spec.submodule_search_locations))) / "tests" / "data" / "b0dwiForFmap").glob("*.dcm"))
    dest = work / f"mosaic-{volumes}"
    if dest.exists() and len(list(dest.glob("*.dcm"))) == volumes:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    originals = [pydicom.dcmread(p) for p in src]
    for v in range(volumes):
        ds = originals[v % len(originals)]
        ds.AcquisitionNumber = ds.InstanceNumber = v + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{4242000000 + v}"
        ds.save_as(dest / f"vol{v + 1:04d}.dcm")
    return dest


def bench_mosaic(dcm2niix: str, work: Path, volumes: int, repeat: int) -> None:
    series = mosaic_series(work, volumes)
    mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
    convert = [sys.executable, "-m", "kaapcli", "convert", str(series), "-o", "{out}", "-q"]
    anchor = [dcm2niix, "-f", "%j", "-o", "{out}", str(series)]
    pairs = [("gzip level 1", [*anchor[:1], "-z", "y", "-1", *anchor[1:]], [*convert, "--level", "1"]),
             ("gzip level 6", [*anchor[:1], "-z", "y", "-6", *anchor[1:]], [*convert, "--level", "6"]),
             ("uncompressed", [*anchor[:1], "-z", "n", *anchor[1:]], [*convert, "--to", "nii"])]
    cases = [(f"m-{kind}-{n}", cmd) for n, (_, a, k) in enumerate(pairs) for kind, cmd in (("dcm2niix", a),
                                                                                           ("kaapcli", k))]
    times = best(cases, work, repeat)
    print(f"mosaic: {volumes} Siemens MOSAIC files -> 150x152x81x{volumes}, {mb:.0f} MB ({series})")
    for n, (label, _, _) in enumerate(pairs):
        theirs, ours = min(times[f"m-dcm2niix-{n}"]), min(times[f"m-kaapcli-{n}"])
        size = {kind: sum(p.stat().st_size for p in (work / f"m-{kind}-{n}-0").glob("*.nii*")) / 1e6
                for kind in ("dcm2niix", "kaapcli")}
        print(f"  {label}: dcm2niix {theirs:.2f} s ({size['dcm2niix']:.1f} MB), kaapcli {ours:.2f} s "
              f"({size['kaapcli']:.1f} MB), ratio {ours / theirs:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("ct", "mosaic"), default=None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--volumes", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix is None:
        sys.exit("dcm2niix not installed (apt-get install dcm2niix)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    if args.only != "ct":
        bench_mosaic(dcm2niix, work, args.volumes, args.repeat)
    if args.only == "mosaic":
        return
    data = work / "ct"
    if not data.exists():
        timed([sys.executable, "-m", "kaapcli", "mock", "-o", str(data), "--slices", str(args.slices),
               "--rows", str(args.size), "--columns", str(args.size), "-q"])
    series = next(p.parent for p in data.rglob("*.dcm"))
    mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
    anchor, ours, ours6 = [], [], []  # kaapcli at its default gzip level 1, and at dcm2niix's level 6
    convert = [sys.executable, "-m", "kaapcli", "convert", str(series), "-o", "{out}", "-q"]
    for i in range(args.repeat):
        for name, times, cmd in (
            ("dcm2niix", anchor, [dcm2niix, "-z", "y", "-f", "%j", "-o", "{out}", str(series)]),
            ("kaapcli", ours, convert),
            ("kaapcli-level6", ours6, [*convert, "--level", "6"]),
        ):
            out = work / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            times.append(timed([c.replace("{out}", str(out)) for c in cmd]))
    best_anchor, best_ours = min(anchor), min(ours)
    print(f"series: {args.slices} slices {args.size}x{args.size}, {mb:.0f} MB ({series})")
    print(f"dcm2niix -z y : {best_anchor:.2f} s (best of {args.repeat}: {', '.join(f'{t:.2f}' for t in anchor)})")
    print(f"kaapcli convert: {best_ours:.2f} s (best of {args.repeat}: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"kaapcli convert --level 6: {min(ours6):.2f} s (ratio {min(ours6) / best_anchor:.2f})")
    sizes = {name: sum(p.stat().st_size for p in (work / f"{name}-0").glob("*.nii.gz")) / 1e6
             for name in ("dcm2niix", "kaapcli", "kaapcli-level6")}
    print(f"output .nii.gz: dcm2niix {sizes['dcm2niix']:.1f} MB, kaapcli {sizes['kaapcli']:.1f} MB, "
          f"kaapcli --level 6 {sizes['kaapcli-level6']:.1f} MB")
    print(f"ratio kaapcli / dcm2niix: {best_ours / best_anchor:.2f}")


if __name__ == "__main__":
    main()
