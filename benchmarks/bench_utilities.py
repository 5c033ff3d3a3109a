#!/usr/bin/env python3
"""Benchmark kaapcli's encapsulation and archive utilities against their everyday anchors, on the same data.

Workloads (generated once under benchmarks/out/utilities, git-ignored):

* pdf2dcm: N PDFs of ~1 MB each.  Anchor: DCMTK ``/usr/bin/pdf2dcm IN OUT`` once per file.
* bin2dcm + dcm2bin: one file of M MB (seeded random bytes) at 100 MiB parts.  Anchor: the I/O
  floor of the same job, ``sha256sum`` of the file plus ``cp`` of it, twice (in and out).
* zip / unzip: a ``kaapcli mock`` CT series (512x512xS).  Anchors: Info-ZIP ``zip -r -X -q`` and
  ``unzip -q``.

Every contender is a fresh process.  Prints the best of ``--repeat`` wall times and the ratio
kaapcli / anchor (< 1 = kaapcli faster).

    python benchmarks/bench_utilities.py [--pdfs 100] [--binary-mb 1000] [--slices 300] [--repeat 3]
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import figure, quick_parser, say  # noqa: E402

OUT = HERE / "out" / "utilities"
KAAPCLI = [sys.executable, "-m", "kaapcli"]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def best(fn: Callable[[], None], repeat: int, before: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fresh(*dirs: Path) -> Callable[[], None]:
    def clear() -> None:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
    return clear


def make_pdfs(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    files = []
    for i in range(n):
        path = root / f"report{i:04d}.pdf"
        if not path.exists():
            filler = b"%" + bytes(rng.randrange(65, 91) for _ in range(99)) + b"\n"
            body = b"1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
            path.write_bytes(b"%PDF-1.4\n" + body + filler * 10_000 + b"trailer<</Root 1 0 R>>\n%%EOF\n")
        files.append(path)
    return files


def report(name: str, ours: float, anchor: float, anchor_name: str) -> None:
    say(f"{name:<18} kaapcli {ours:7.2f} s   {anchor_name:<28} {anchor:7.2f} s   ratio {ours / anchor:5.2f}")
    figure("utilities", f"{name}: kaapcli / {anchor_name} time", ours / anchor)


def main() -> None:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--pdfs", type=int, default=100)
    parser.add_argument("--binary-mb", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.pdfs, args.binary_mb, args.slices, args.repeat = 10, 50, 30, 1
    work = OUT / "work"

    # pdf2dcm vs DCMTK pdf2dcm
    pdfs = make_pdfs(OUT / "pdfs", args.pdfs)
    ours = best(lambda: run([*KAAPCLI, "pdf2dcm", str(OUT / "pdfs"), "-o", str(work / "k"), "-q", "--force"]),
                args.repeat, fresh(work))
    anchor = best(lambda: [run(["/usr/bin/pdf2dcm", str(p), str(work / f"{p.stem}.dcm")]) for p in pdfs],
                  args.repeat, fresh(work))
    report(f"pdf2dcm x{len(pdfs)}", ours, anchor, "DCMTK pdf2dcm per file")

    # bin2dcm + dcm2bin vs sha256sum + cp (in and out)
    blob = OUT / "blob.bin"
    if not blob.exists() or blob.stat().st_size != args.binary_mb * 1_000_000:
        with open(blob, "wb") as fh:
            rng = random.Random(2)
            for _ in range(args.binary_mb):
                fh.write(rng.randbytes(1_000_000))

    def ours_bin() -> None:
        run([*KAAPCLI, "bin2dcm", str(blob), "-o", str(work / "dcm"), "-q", "--force"])
        run([*KAAPCLI, "dcm2bin", str(work / "dcm"), "-o", str(work / "back"), "-q", "--force"])

    def floor_bin() -> None:
        for _ in range(2):
            run(["sha256sum", str(blob)])
        run(["cp", str(blob), str(work / "copy1")])
        run(["cp", str(work / "copy1"), str(work / "copy2")])

    report(f"bin2dcm+dcm2bin {args.binary_mb} MB", best(ours_bin, args.repeat, fresh(work)),
           best(floor_bin, args.repeat, fresh(work)), "2x sha256sum + 2x cp")

    # zip / unzip vs Info-ZIP
    series = OUT / f"ct{args.slices}"
    if not series.exists():
        run([*KAAPCLI, "mock", "-o", str(series), "--slices", str(args.slices), "-q"])
    ours = best(lambda: run([*KAAPCLI, "zip", str(series), "-o", str(work / "k.zip"), "-q"]), args.repeat,
                fresh(work))
    anchor = best(lambda: subprocess.run(["zip", "-r", "-X", "-q", str(work / "i.zip"), "."], cwd=series,
                                         check=True), args.repeat, fresh(work))
    report(f"zip {args.slices} slices", ours, anchor, "Info-ZIP zip -r -X")
    archive = OUT / "series.zip"
    run([*KAAPCLI, "zip", str(series), "-o", str(archive), "-q"])
    ours = best(lambda: run([*KAAPCLI, "unzip", str(archive), "-o", str(work / "k"), "-q"]), args.repeat,
                fresh(work))
    anchor = best(lambda: run(["unzip", "-q", str(archive), "-d", str(work / "i")]), args.repeat, fresh(work))
    report(f"unzip {args.slices} slices", ours, anchor, "Info-ZIP unzip -q")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
