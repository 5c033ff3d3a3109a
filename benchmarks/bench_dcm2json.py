#!/usr/bin/env python3
"""Benchmark ``kaapcli dcm2json`` against DCMTK's dcm2json and a plain pydicom loop, on the same data.

Workload: 10 CT series x 300 slices of 512x512 (3,000 files) from ``kaapcli mock``, generated once
into benchmarks/out/dcm2json/data (git-ignored).  Three contenders, each a fresh process so all pay
their start-up:

(a) DCMTK ``/usr/bin/dcm2json FILE OUT.json`` run once per file (how Kaapana used to do it);
(b) a plain single-process pydicom loop doing the same job: dcmread every file headers-only, group
    by SeriesInstanceUID, pick the first instance, build its document with kaapcli's
    ``instance_document`` and write ``<SeriesInstanceUID>.json``;
(c) ``kaapcli dcm2json DATA -o OUT --force`` with the default workers.

Prints the best of ``--repeat`` runs (wall and CPU seconds, CPU summed over all processes) and the
ratios kaapcli / anchor (< 1 = kaapcli faster).  On a busy machine trust the CPU column more.

    python benchmarks/bench_dcm2json.py [--series 10] [--slices 300] [--repeat 3] [--dcmtk-files N] [--quick]

Figures: one JSON object per line on stdout (benchmarks/report.py reads them); text on stderr.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "dcm2json"
sys.path.insert(0, str(HERE))
from common import compile_kaapcli, figure, quick_parser, say  # noqa: E402

DCMTK_DCM2JSON = "/usr/bin/dcm2json"  # pynetdicom's scripts shadow some DCMTK names on PATH: be explicit


def plain_loop(data: Path, out: Path) -> None:
    """(b): the straightforward single-process way to the same documents."""
    import pydicom

    from kaapcli.core import fsio
    from kaapcli.core.meta import arrival_time, instance_document

    series: dict[str, list[tuple[int, str, pydicom.Dataset, Path]]] = {}
    for path in fsio.walk_files(data):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append((int(ds.InstanceNumber), str(path), ds, path))
    out.mkdir(parents=True, exist_ok=True)
    for uid, members in series.items():
        _, _, ds, _ = min(members, key=lambda m: (m[0], m[1]))
        doc, _ = instance_document(ds, arrived=arrival_time([m[3] for m in members]))
        fsio.write_json(out / f"{uid}.json", doc)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU counts every process, so it is robust to a busy machine."""
    start, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_seconds() - cpu


def dcmtk_loop(files: list[Path], out: Path) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    for i, path in enumerate(files):
        subprocess.run([DCMTK_DCM2JSON, str(path), str(out / f"{i}.json")], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="best of N for (b) and (c)")
    parser.add_argument("--dcmtk-files", type=int, default=0,
                        help="time DCMTK on the first N files only and scale up (0 = all files)")
    parser.add_argument("--plain", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_loop(Path(args.plain[0]), Path(args.plain[1]))
        return
    if args.quick:
        args.series, args.slices, args.repeat = 2, 30, 1
    compile_kaapcli()

    data = OUT / f"data-{args.series}x{args.slices}"
    if not data.is_dir():
        say(f"generating {args.series} x {args.slices} slices of 512x512 CT into {data} ...")
        subprocess.run([sys.executable, "-m", "kaapcli", "mock", "-o", str(data) + ".part", "--series",
                        str(args.series), "--slices", str(args.slices), "--seed", "1", "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        (Path(str(data) + ".part")).rename(data)
    files = sorted(data.rglob("*.dcm"))
    say(f"{len(files)} files in {len(list(data.glob('*/*/*')))} series, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.0f} MB")

    for f in files:  # warm the page cache so every contender reads from memory
        f.read_bytes()
    load = os.getloadavg()[0]

    dcmtk_files = files[:args.dcmtk_files] if args.dcmtk_files else files
    shutil.rmtree(OUT / "dcmtk", ignore_errors=True)
    scale = len(files) / len(dcmtk_files)
    dcmtk = tuple(t * scale for t in dcmtk_loop(dcmtk_files, OUT / "dcmtk"))
    shutil.rmtree(OUT / "dcmtk", ignore_errors=True)

    plain = min(timed([sys.executable, __file__, "--plain", str(data), str(OUT / "plain")])
                for _ in range(args.repeat))
    kaapcli = min(timed([sys.executable, "-m", "kaapcli", "dcm2json", str(data), "-o", str(OUT / "kaapcli"),
                         "--force", "-q"]) for _ in range(args.repeat))

    scaled = "" if dcmtk_files is files else f" (scaled from {len(dcmtk_files)} files)"
    say(f"load average before the runs: {load:.1f} on {os.cpu_count()} cores")
    say("                                          wall s    CPU s")
    say(f"(a) DCMTK dcm2json, one process per file: {dcmtk[0]:7.2f}  {dcmtk[1]:7.2f}{scaled}")
    say(f"(b) plain pydicom loop, 1 process:        {plain[0]:7.2f}  {plain[1]:7.2f}")
    say(f"(c) kaapcli dcm2json, default workers:    {kaapcli[0]:7.2f}  {kaapcli[1]:7.2f}")
    for name, anchor, target in (("DCMTK", dcmtk, 5), ("plain", plain, 1.5)):
        say(f"ratio kaapcli/{name} = {kaapcli[0] / anchor[0]:.3f} wall ({anchor[0] / kaapcli[0]:.1f}x faster, "
            f"target >= {target}x), {kaapcli[1] / anchor[1]:.3f} CPU")
        figure("dcm2json", f"speed-up over {'a DCMTK dcm2json loop' if name == 'DCMTK' else 'a plain pydicom loop'}",
               anchor[0] / kaapcli[0], f">= {target}", note=f"{len(files)} files{scaled if name == 'DCMTK' else ''}")


if __name__ == "__main__":
    main()
