"""Benchmark: ``kaapcli modify`` vs DCMTK ``dcmodify``, and ``kaapcli sort`` vs ``cp -r``, on one CT series.

    python benchmarks/bench_modify.py [--slices 300] [--size 512] [--workers N] [--repeat 3]

Generates the data with ``kaapcli mock`` and runs every tool on the same files in one run
(best of --repeat), then prints wall times and ratios kaapcli / anchor.  dcmodify gets all
files in one invocation and edits them in place (``-nb``: no backups), which is its fastest
use; kaapcli is timed both writing a new tree (-o) and in place.  ``cp -r`` / ``cp -al`` are
the floors for sort (a plain copy / hard-link of the same bytes without reading any header).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

EDITS = ["-m", "PatientName=Bench^Mark", "-i", "PatientComments=benchmark", "-e", "InstitutionName"]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def best(repeat: int, prepare: Callable[[], None], action: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        prepare()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="kaapcli workers (default: all cores)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    kaapcli = [sys.executable, "-m", "kaapcli"]
    workers = ["--workers", str(args.workers)] if args.workers else []
    with tempfile.TemporaryDirectory(prefix="bench-modify-") as tmp:
        root = Path(tmp)
        src = root / "ct"
        run([*kaapcli, "mock", "-o", str(src), "--slices", str(args.slices), "--rows", str(args.size),
             "--columns", str(args.size), "-q"])
        files = sorted(src.rglob("*.dcm"))
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"data: {len(files)} files, {mb:.0f} MB ({args.slices} x {args.size}x{args.size} CT)")
        work, out = root / "work", root / "out"

        def fresh_copy() -> None:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)

        def clear_out() -> None:
            shutil.rmtree(out, ignore_errors=True)

        t_dcmodify = best(args.repeat, fresh_copy,
                          lambda: run(["/usr/bin/dcmodify", "-nb", *EDITS, *map(str, sorted(work.rglob("*.dcm")))]))
        t_new_tree = best(args.repeat, clear_out,
                          lambda: run([*kaapcli, "modify", str(src), "-o", str(out), *EDITS, "-q", *workers]))
        t_in_place = best(args.repeat, fresh_copy,
                          lambda: run([*kaapcli, "modify", str(work), "--in-place", *EDITS, "-q", *workers]))
        t_cp = best(args.repeat, clear_out, lambda: run(["cp", "-r", str(src), str(out)]))
        t_sort = best(args.repeat, clear_out, lambda: run([*kaapcli, "sort", str(src), "-o", str(out), "-q",
                                                           *workers]))
        t_cp_link = best(args.repeat, clear_out, lambda: run(["cp", "-al", str(src), str(out)]))
        t_sort_link = best(args.repeat, clear_out, lambda: run([*kaapcli, "sort", str(src), "-o", str(out),
                                                                "--link", "-q", *workers]))

    print(f"dcmodify (one call, in place)  {t_dcmodify:7.2f} s")
    print(f"kaapcli modify -o              {t_new_tree:7.2f} s   ratio {t_new_tree / t_dcmodify:.2f}")
    print(f"kaapcli modify --in-place      {t_in_place:7.2f} s   ratio {t_in_place / t_dcmodify:.2f}")
    print(f"cp -r                          {t_cp:7.2f} s")
    print(f"kaapcli sort                   {t_sort:7.2f} s   ratio {t_sort / t_cp:.2f}")
    print(f"cp -al                         {t_cp_link:7.2f} s")
    print(f"kaapcli sort --link            {t_sort_link:7.2f} s   ratio {t_sort_link / t_cp_link:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
