"""Benchmark: ``kaapcli convert`` vs ``dcm2niix -z y`` on the same 300-slice 512x512 CT series.

    python benchmarks/bench_convert.py [--slices 300] [--size 512] [--repeat 3] [--workdir DIR]

Generates the series with ``kaapcli mock``, runs both converters (best of --repeat, fresh
output directories each time) and prints the times and the ratio kaapcli / dcm2niix.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix is None:
        sys.exit("dcm2niix not installed (apt-get install dcm2niix)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
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
