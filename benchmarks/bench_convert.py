"""Benchmark: ``kaapcli convert`` vs ``dcm2niix`` on the same data, equal work, in one run.

    python benchmarks/bench_convert.py [--quick] [--json] [--only ct|mr] [--repeat 5] [--workdir DIR]

Data (generated or copied in the work directory, reused when present):

- ct: a 300-slice 512x512 CT series from ``kaapcli mock`` (--quick: 100 slices);
- mr: a real Siemens multiband diffusion series: ``--volumes`` MOSAIC files (150x152x81 each, 60 volumes; --quick:
  12) made from heudiconv's three real E11 mosaics (installed by ``make venv``) by renumbering them.

Equal work: both tools write one NIfTI (plus a JSON sidecar; bval/bvec for the MR) from the same files, at the same
gzip level (dcm2niix ``-z y -N``, which runs pigz when installed, as Debian's package recommends, else its internal
zlib; kaapcli ``--level N``) or uncompressed (``-z n`` / ``--to nii``).  Each pair runs ``--repeat`` times,
interleaved (anchor, kaapcli, anchor, ...), each into a fresh output directory; the figure is the ratio of the
median wall times, and of the peak RSS (max over the runs of each command's process tree, from ``wait4``).

Human text goes to stderr; ``--json`` prints one JSON object per figure on stdout
(``benchmark, figure, value, target, met``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli  # noqa: E402

TIME_TARGETS = {"gzip level 1": 1.0, "gzip level 6": 1.0, "uncompressed": 1.5}
RSS_TARGET = 1.5


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, the largest process of its tree) of one command; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return elapsed, usage.ru_maxrss * 1024


def pairs(cases: list[tuple[str, list[str], list[str]]], work: Path, repeat: int) -> list[dict[str, object]]:
    """Each (label, anchor, kaapcli) pair ``repeat`` times, interleaved, into fresh ``{out}`` directories."""
    results = []
    for label, anchor, ours in cases:
        times: dict[str, list[float]] = {"dcm2niix": [], "kaapcli": []}
        rss: dict[str, int] = {"dcm2niix": 0, "kaapcli": 0}
        sizes: dict[str, float] = {}
        for _ in range(repeat):
            for tool, cmd in (("dcm2niix", anchor), ("kaapcli", ours)):
                out = work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                seconds, peak = run([c.replace("{out}", str(out)) for c in cmd])
                times[tool].append(seconds)
                rss[tool] = max(rss[tool], peak)
                volumes = sorted(out.glob("*.nii*"))
                if len(volumes) != 1:
                    sys.exit(f"{label}: {tool} wrote {len(volumes)} volumes, expected 1: not equal work")
                sizes[tool] = volumes[0].stat().st_size / 1e6
        theirs, ours_s = statistics.median(times["dcm2niix"]), statistics.median(times["kaapcli"])
        results.append({"label": label, "dcm2niix": theirs, "kaapcli": ours_s, "ratio": ours_s / theirs,
                        "rss": rss, "sizes": sizes, "runs": times})
    return results


def mosaic_series(work: Path, volumes: int) -> Path:
    """``volumes`` renumbered copies of heudiconv's 3-file Siemens multiband DWI mosaic series."""
    import importlib.util

    spec = importlib.util.find_spec("heudiconv")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("heudiconv not installed: make venv installs it (--no-deps) for its real mosaic files")
    src = sorted((Path(next(iter(spec.submodule_search_locations))) / "tests" / "data" / "b0dwiForFmap").glob("*.dcm"))
    dest = work / f"mr-{volumes}"
    if dest.exists() and len(list(dest.glob("*.dcm"))) == volumes:
        return dest
    import pydicom

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    originals = [pydicom.dcmread(p) for p in src]
    for v in range(volumes):
        ds = originals[v % len(originals)]
        ds.AcquisitionNumber = ds.InstanceNumber = v + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{4242000000 + v}"
        ds.save_as(dest / f"vol{v + 1:04d}.dcm")
    return dest


def ct_series(work: Path, slices: int) -> Path:
    data = work / f"ct-{slices}"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "kaapcli", "mock", "-o", str(data), "--slices", str(slices), "--rows",
                        "512", "--columns", "512", "-q"], check=True, stdout=subprocess.DEVNULL)
    return next(p.parent for p in data.rglob("*.dcm"))


def dcm2niix_gzip() -> str:
    pigz = shutil.which("pigz")
    if pigz is None:
        return "its internal zlib (pigz not installed)"
    version = subprocess.run([pigz, "--version"], capture_output=True, text=True)
    return f"{(version.stdout or version.stderr).strip()} (2 threads on this machine)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller series, 3 pairs each: for make bench")
    parser.add_argument("--json", action="store_true", help="one JSON object per figure on stdout")
    parser.add_argument("--only", choices=("ct", "mr"), default=None)
    parser.add_argument("--repeat", type=int, default=None, help="pairs per setting (default 5, --quick 3)")
    parser.add_argument("--slices", type=int, default=None, help="CT slices (default 300, --quick 100)")
    parser.add_argument("--volumes", type=int, default=None, help="MR mosaic volumes (default 60, --quick 12)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix is None:
        sys.exit("dcm2niix not installed (apt-get install dcm2niix)")
    compile_kaapcli()
    repeat = args.repeat or (3 if args.quick else 5)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    datasets = []
    if args.only != "mr":
        slices = args.slices or (100 if args.quick else 300)
        series = ct_series(work, slices)
        datasets.append((f"CT {slices}x512x512 (kaapcli mock)", series))
    if args.only != "ct":
        volumes = args.volumes or (12 if args.quick else 60)
        # made in a child: a child's ru_maxrss starts from the RSS of the process it was forked from (Linux keeps the
        # replaced mm's high-water mark at exec), so this process stays small (no pydicom) for the RSS figures to hold
        made = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                               f"from bench_convert import mosaic_series; from pathlib import Path; "
                               f"print(mosaic_series(Path({str(work)!r}), {volumes}))"],
                              capture_output=True, text=True)
        if made.returncode != 0:
            sys.exit(made.stderr.strip())
        datasets.append((f"MR Siemens mosaic 150x152x81x{volumes} (real E11 DWI)", Path(made.stdout.strip())))
    say(f"dcm2niix {subprocess.run([dcm2niix, '--version'], capture_output=True, text=True).stdout.split()[-1]}"
        f" -z y compresses with {dcm2niix_gzip()}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"{repeat} interleaved pairs per setting, medians")
    figures = []
    for name, series in datasets:
        mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        ours = [sys.executable, "-m", "kaapcli", "convert", str(series), "-o", "{out}", "-q"]
        anchor = [dcm2niix, "-f", "%j", "-o", "{out}"]
        cases = [("gzip level 1", [*anchor, "-z", "y", "-1", str(series)], [*ours, "--level", "1"]),
                 ("gzip level 6", [*anchor, "-z", "y", "-6", str(series)], [*ours, "--level", "6"]),
                 ("uncompressed", [*anchor, "-z", "n", str(series)], [*ours, "--to", "nii"])]
        say(f"{name}: {len(list(series.iterdir()))} files, {mb:.0f} MB ({series})")
        for r in pairs(cases, work, repeat):
            label = str(r["label"])
            rss = r["rss"]
            assert isinstance(rss, dict)
            sizes = r["sizes"]
            assert isinstance(sizes, dict)
            time_target = TIME_TARGETS[label]
            rss_ratio = rss["kaapcli"] / rss["dcm2niix"]
            ratio = float(r["ratio"])  # type: ignore[arg-type]
            say(f"  {label:13s} dcm2niix {r['dcm2niix']:.2f} s, kaapcli {r['kaapcli']:.2f} s: ratio {ratio:.2f} "
                f"(target <= {time_target}: {'met' if ratio <= time_target else 'NOT met'}); peak RSS "
                f"{rss['dcm2niix'] / 2**20:.0f} / {rss['kaapcli'] / 2**20:.0f} MiB: {rss_ratio:.2f} "
                f"(target <= {RSS_TARGET}: {'met' if rss_ratio <= RSS_TARGET else 'NOT met'}); "
                f"output {sizes['dcm2niix']:.1f} / {sizes['kaapcli']:.1f} MB")
            figures.append({"benchmark": "convert", "figure": f"{name}, {label}: time kaapcli / dcm2niix",
                            "value": round(ratio, 3), "target": f"<= {time_target}", "met": ratio <= time_target})
            figures.append({"benchmark": "convert", "figure": f"{name}, {label}: peak RSS kaapcli / dcm2niix",
                            "value": round(rss_ratio, 3), "target": f"<= {RSS_TARGET}", "met": rss_ratio <= RSS_TARGET})
    if args.json:
        for figure in figures:
            print(json.dumps(figure))


if __name__ == "__main__":
    main()
