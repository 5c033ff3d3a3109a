"""Benchmark: ``kaapcli anonymize`` vs dicognito, and Kaapana's way (dcmodify per file), on one 300-slice CT.

    python benchmarks/bench_anonymize.py [--slices 300] [--size 512] [--workers N]

Generates the data with ``kaapcli mock``, runs every tool on the same files in one run and prints wall times,
CPU seconds (user + sys of the tool and its workers: steadier than wall time on a busy machine) and the ratio
kaapcli / dicognito (target: <= 0.5).  ``--repeat N`` runs kaapcli and dicognito N times, alternating, and
reports the best of each.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import compile_kaapcli

KAAPANA_TAGS = Path(__file__).resolve().parent.parent / "kaapcli" / "data" / "kaapana_anonymize_tags.tsv"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``cmd`` into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.sync()  # start each tool with no dirty pages left over from the previous one
    cpu, start = cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_seconds() - cpu


def kaapana_way(src: Path, out: Path) -> float:
    """Copy each file, then one ``dcmodify --erase-all`` per file over the 45 tags, as Kaapana's operator does."""
    tags = [line.split("\t")[0] for line in KAAPANA_TAGS.read_text().splitlines() if line and line[0] != "#"]
    erase = [arg for tag in tags for arg in ("--erase-all", f"({tag})")]
    os.sync()
    start = time.perf_counter()
    for n, path in enumerate(sorted(src.rglob("*.dcm"))):
        dest = out / f"{n:05d}.dcm"
        shutil.copyfile(path, dest)
        subprocess.run(["/usr/bin/dcmodify", "--no-backup", "--ignore-missing-tags", *erase, str(dest)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="kaapcli workers (default: all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of kaapcli and dicognito (best is kept)")
    args = parser.parse_args()
    compile_kaapcli()
    with tempfile.TemporaryDirectory(prefix="bench-anon-") as tmp:
        root = Path(tmp)
        src = root / "ct"
        subprocess.run([sys.executable, "-m", "kaapcli", "mock", "-o", str(src), "--slices", str(args.slices),
                        "--rows", str(args.size), "--columns", str(args.size), "-q"], check=True,
                       stdout=subprocess.DEVNULL)
        files = list(src.rglob("*.dcm"))
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"data: {len(files)} files, {mb:.0f} MB ({args.slices} x {args.size}x{args.size} CT)")

        workers = ["--workers", str(args.workers)] if args.workers else []
        kaapcli = [sys.executable, "-m", "kaapcli", "anonymize", str(src), "-o", str(root / "k"),
                   "--key", "bench-key", "-q", *workers]
        dicognito = [sys.executable, "-m", "dicognito", "--output-directory", str(root / "d"), "--seed", "bench",
                     str(src)]
        k_runs, d_runs = [], []
        for _ in range(max(1, args.repeat)):
            k_runs.append(timed(kaapcli, root / "k"))
            d_runs.append(timed(dicognito, root / "d"))
        (t_kaapcli, c_kaapcli), (t_dicognito, c_dicognito) = min(k_runs), min(d_runs)
        (root / "kp").mkdir()
        t_kaapana = kaapana_way(src, root / "kp")
        print(f"kaapcli anonymize        {t_kaapcli:7.2f} s  ({c_kaapcli:.2f} CPU s)")
        print(f"dicognito                {t_dicognito:7.2f} s  ({c_dicognito:.2f} CPU s)")
        print(f"kaapana (dcmodify/file)  {t_kaapana:7.2f} s")
        print(f"ratio kaapcli/dicognito  {t_kaapcli / t_dicognito:7.2f}  (target <= 0.5; CPU ratio "
              f"{c_kaapcli / c_dicognito:.2f})")
        print(f"ratio kaapcli/kaapana    {t_kaapcli / t_kaapana:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
