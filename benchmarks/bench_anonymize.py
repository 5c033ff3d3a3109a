"""Benchmark: ``kaapcli anonymize`` vs dicognito, and Kaapana's way (dcmodify per file); ``kaapcli phi-scan``.

    python benchmarks/bench_anonymize.py [--slices 300] [--size 512] [--workers N] [--repeat 5]
                                         [--baseline DIR] [--phi-files 10000]

Generates the data with ``kaapcli mock``, runs every tool on the same files in one run and prints wall times,
CPU seconds (user + sys of the tool and its workers: steadier than wall time on a busy machine) and the ratio
kaapcli / dicognito (target: <= 0.5).  ``--repeat N`` runs kaapcli and dicognito (and, with ``--baseline DIR``,
the kaapcli checkout in DIR, e.g. an unpacked ``git archive`` of main) N times, interleaved, and reports the
medians.  ``--phi-files N`` then de-identifies N small CT slices and times ``phi-scan OUT --originals IN`` over
them, against DCMTK's ``dcmdump`` reading every header of the same tree once (equal reading, much less work).
dicognito comes with the bench extras (``pip install -e '.[bench]'``, which ``make bench`` runs).
Figures: one JSON object per line on stdout (benchmarks/report.py reads them); text on stderr.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli, figure, quick_parser, say  # noqa: E402

KAAPANA_TAGS = Path(__file__).resolve().parent.parent / "kaapcli" / "data" / "kaapana_anonymize_tags.tsv"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], out: Path | None, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,),
          cwd: Path | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``cmd`` (into a fresh ``out`` when given)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
    os.sync()  # start each tool with no dirty pages left over from the previous one
    cpu, start = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd[:4]}... failed ({proc.returncode}): {proc.stderr.decode()[-400:]}")
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


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def mock(dest: Path, slices: int, size: int) -> list[Path]:
    subprocess.run([sys.executable, "-m", "kaapcli", "mock", "-o", str(dest), "--slices", str(slices), "--rows",
                    str(size), "--columns", str(size), "-q"], check=True, stdout=subprocess.DEVNULL)
    return list(dest.rglob("*.dcm"))


def bench_phi_scan(root: Path, nfiles: int, workers: list[str], cwd: Path) -> None:
    src = root / "phi-in"
    files = mock(src, nfiles, 16)
    out = root / "phi-out"
    subprocess.run([sys.executable, "-m", "kaapcli", "anonymize", str(src), "-o", str(out), "--key", "bench-key",
                    "-q", *workers], check=True, stdout=subprocess.DEVNULL, cwd=cwd)
    shutil.rmtree(out / ".kaapcli", ignore_errors=True)  # the batch engine's manifest names the inputs
    t_scan, c_scan = timed([sys.executable, "-m", "kaapcli", "phi-scan", str(out), "--originals", str(src), "-q",
                            *workers], None, cwd=cwd)
    t_tree, c_tree = timed([sys.executable, "-m", "kaapcli", "phi-scan", str(out), "-q", *workers], None, cwd=cwd)
    t_dump, c_dump = timed(["dcmdump", "-q", "+sd", "+r", "-M", str(out)], None)
    say(f"phi-scan, {len(files)} files of {nfiles} x 16x16 CT")
    say(f"  phi-scan OUT --originals IN {t_scan:7.2f} s  ({c_scan:.2f} CPU s, {len(files) / t_scan:.0f} files/s; "
          "reads both trees)")
    say(f"  phi-scan OUT                {t_tree:7.2f} s  ({c_tree:.2f} CPU s, {len(files) / t_tree:.0f} files/s)")
    say(f"  dcmdump +sd +r OUT          {t_dump:7.2f} s  ({c_dump:.2f} CPU s)")
    figure("phi-scan", "phi-scan OUT / dcmdump +sd +r OUT time", t_tree / t_dump)


def main() -> int:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="kaapcli workers (default: all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each tool (medians reported)")
    parser.add_argument("--baseline", type=Path, default=None, help="another kaapcli checkout to time as well")
    parser.add_argument("--phi-files", type=int, default=0, help="also time phi-scan over this many small files")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.size, args.repeat = 40, 256, 1
    try:
        import dicognito  # noqa: F401
    except ImportError:
        raise SystemExit("dicognito is not installed: pip install -e '.[bench]' (make bench does)") from None
    compile_kaapcli()
    with tempfile.TemporaryDirectory(prefix="bench-anon-") as tmp:
        root = Path(tmp)
        cwd = root  # `python -m kaapcli` puts the working directory first on sys.path: not a checkout
        src = root / "ct"
        files = mock(src, args.slices, args.size)
        mb = sum(p.stat().st_size for p in files) / 1e6
        say(f"data: {len(files)} files, {mb:.0f} MB ({args.slices} x {args.size}x{args.size} CT)")

        workers = ["--workers", str(args.workers)] if args.workers else []
        kaapcli = [sys.executable, "-m", "kaapcli", "anonymize", str(src), "-o", str(root / "k"),
                   "--key", "bench-key", "-q", *workers]
        dicognito = [sys.executable, "-m", "dicognito", "--output-directory", str(root / "d"), "--seed", "bench",
                     str(src)]
        base_env = None
        if args.baseline is not None:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(args.baseline / "kaapcli")], check=True,
                           stdout=subprocess.DEVNULL)
            base_env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
        runs: dict[str, list[tuple[float, float]]] = {"kaapcli": [], "dicognito": [], "baseline": []}
        for _ in range(max(1, args.repeat)):
            runs["kaapcli"].append(timed(kaapcli, root / "k", cwd=cwd))
            runs["dicognito"].append(timed(dicognito, root / "d", cwd=cwd))
            if base_env is not None:
                runs["baseline"].append(timed(kaapcli, root / "k", env=base_env, cwd=cwd))
        (t_kaapcli, c_kaapcli), (t_dicognito, c_dicognito) = median(runs["kaapcli"]), median(runs["dicognito"])
        (root / "kp").mkdir()
        t_kaapana = kaapana_way(src, root / "kp")
        n = max(1, args.repeat)
        say(f"medians of {n} interleaved runs")
        say(f"kaapcli anonymize        {t_kaapcli:7.2f} s  ({c_kaapcli:.2f} CPU s)")
        if runs["baseline"]:
            t_base, c_base = median(runs["baseline"])
            say(f"baseline {args.baseline}  {t_base:7.2f} s  ({c_base:.2f} CPU s)")
        say(f"dicognito                {t_dicognito:7.2f} s  ({c_dicognito:.2f} CPU s)")
        say(f"kaapana (dcmodify/file)  {t_kaapana:7.2f} s")
        say(f"ratio kaapcli/dicognito  {t_kaapcli / t_dicognito:7.2f}  (target <= 0.5; CPU ratio "
            f"{c_kaapcli / c_dicognito:.2f})")
        figure("anonymize", "anonymize: kaapcli / dicognito time", t_kaapcli / t_dicognito, "<= 0.5",
               note=f"{len(files)} files, CPU ratio {c_kaapcli / c_dicognito:.2f}")
        figure("anonymize", "anonymize: kaapcli / Kaapana's dcmodify per file", t_kaapcli / t_kaapana)
        if runs["baseline"]:
            say(f"ratio baseline/dicognito {t_base / t_dicognito:7.2f}  (CPU ratio {c_base / c_dicognito:.2f})")
            say(f"ratio kaapcli/baseline   {t_kaapcli / t_base:7.2f}")
        say(f"ratio kaapcli/kaapana    {t_kaapcli / t_kaapana:7.2f}")
        if args.phi_files:
            bench_phi_scan(root, args.phi_files, workers, cwd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
