"""Benchmark: which deflate ``convert`` uses for each gzip level (the choice in ``core.volume.deflater``).

    python benchmarks/bench_deflate.py [--quick] [--json] [--slices 300] [--workdir DIR]

Each candidate compresses the same voxels (a ``kaapcli mock`` CT converted to NIfTI: 300x512x512 int16 noise,
the hard case; --quick: 60 slices) plane by plane, single-threaded, as ``convert`` feeds its threads: Python's
zlib (what pigz and dcm2niix's internal writer use), ISA-L (``isal``) at its levels 0-3 and zlib-ng at 1-9.  For
each zlib level the figure is the chosen candidate's time against zlib's at that level, and its output size
against zlib's (target: faster, and at most 1 % larger).  Human text on stderr; ``--json``: one JSON object per
figure on stdout (``benchmark, figure, value, target, met``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def voxels(work: Path, slices: int) -> list[bytes]:
    import numpy as np

    data = work / f"ct-{slices}"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "kaapcli", "mock", "-o", str(data), "--slices", str(slices), "--rows",
                        "512", "--columns", "512", "-q"], check=True, stdout=subprocess.DEVNULL)
    from kaapcli.core import volume

    (vol,) = volume.load_series(sorted(next(data.rglob("*.dcm")).parent.iterdir()))
    return [np.ascontiguousarray(plane).tobytes() for plane in vol.voxels]


def measure(compress, planes: list[bytes]) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    start = time.process_time()
    size = sum(len(compress(p)) for p in planes)
    return time.process_time() - start, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from isal import isal_zlib
    from zlib_ng import zlib_ng

    from kaapcli.core.volume import deflater

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-deflate-"))
    work.mkdir(parents=True, exist_ok=True)
    planes = voxels(work, args.slices or (60 if args.quick else 300))
    raw = sum(map(len, planes))
    say(f"{len(planes)} planes, {raw / 1e6:.0f} MB; CPU seconds, one thread")
    import functools

    candidates = {f"zlib {n}": functools.partial(zlib.compress, level=n, wbits=31) for n in range(1, 10)}
    candidates |= {f"isal {n}": functools.partial(isal_zlib.compress, level=n, wbits=31) for n in range(4)}
    candidates |= {f"zlib-ng {n}": functools.partial(zlib_ng.compress, level=n, wbits=31) for n in range(1, 10)}
    results = {}
    for name, compress in candidates.items():
        results[name] = measure(compress, planes)
        seconds, size = results[name]
        say(f"  {name:10s} {seconds:6.2f} s  {raw / seconds / 1e6:6.0f} MB/s  {size / 1e6:7.1f} MB ({size / raw:.3f})")
    figures = []
    for level in (1, 6, 9):
        ours = measure(deflater(level), planes)
        zlib_s, zlib_size = results[f"zlib {level}"]
        time_ratio, size_ratio = ours[0] / zlib_s, ours[1] / zlib_size
        say(f"level {level}: kaapcli's deflate {time_ratio:.2f}x zlib's time, {size_ratio:.3f}x its size "
            f"(targets < 1.0, <= 1.01: {'met' if time_ratio < 1 and size_ratio <= 1.01 else 'NOT met'})")
        figures.append({"benchmark": "deflate", "figure": f"gzip level {level}: CPU time kaapcli's deflate / zlib",
                        "value": round(time_ratio, 3), "target": "< 1.0", "met": time_ratio < 1.0})
        figures.append({"benchmark": "deflate", "figure": f"gzip level {level}: size kaapcli's deflate / zlib",
                        "value": round(size_ratio, 4), "target": "<= 1.01", "met": size_ratio <= 1.01})
    if args.json:
        for f in figures:
            print(json.dumps(f))


if __name__ == "__main__":
    main()
