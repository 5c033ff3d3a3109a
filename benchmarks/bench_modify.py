"""Benchmark: ``kaapcli modify`` vs one DCMTK ``dcmodify`` call, and ``kaapcli sort`` vs ``cp``, on one CT series.

    python benchmarks/bench_modify.py [--slices 300] [--size 512] [--workers N] [--repeat 3] [--quick]

Generates the data with ``kaapcli mock`` and runs every tool on the same files in one run, interleaved,
``--repeat`` times (medians).  Equal work: dcmodify gets all files in one invocation and edits them in place
(``-nb``: no backups), its fastest use; kaapcli is timed editing in place too (the target figure) and
writing a new tree (-o, which also has to create it).  The same three edits (-m, -i, -e) for both.

The no-op re-run (every output up to date) of modify is compared with the no-op re-run of sort over the same
files ("as cheap as the other commands"), and a re-run from another working directory with absolute paths
must be a no-op too (every file reported up to date).  ``cp -r`` / ``cp -al`` are the floors for sort.
Figures: one JSON object per line on stdout; text on stderr.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli, figure, quick_parser, say  # noqa: E402

EDITS = ["-m", "PatientName=Bench^Mark", "-i", "PatientComments=benchmark", "-e", "InstitutionName"]
DCMODIFY = "/usr/bin/dcmodify"  # pynetdicom's scripts shadow some DCMTK names on PATH: be explicit


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])}... failed ({proc.returncode}): {proc.stderr[-400:]}")
    return time.perf_counter() - start, proc.stderr


def main() -> int:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="kaapcli workers (default: all cores)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.slices, args.size, args.repeat = 60, 256, 1
    compile_kaapcli()
    kaapcli = [sys.executable, "-m", "kaapcli"]
    workers = ["--workers", str(args.workers)] if args.workers else []
    with tempfile.TemporaryDirectory(prefix="bench-modify-") as tmp:
        root = Path(tmp)
        cwd = root  # `python -m kaapcli` puts the working directory first on sys.path: not a checkout
        src = root / "ct"
        subprocess.run([*kaapcli, "mock", "-o", str(src), "--slices", str(args.slices), "--rows", str(args.size),
                        "--columns", str(args.size), "-q"], check=True, stdout=subprocess.DEVNULL, cwd=cwd)
        files = sorted(src.rglob("*.dcm"))
        mb = sum(p.stat().st_size for p in files) / 1e6
        say(f"data: {len(files)} files, {mb:.0f} MB ({args.slices} x {args.size}x{args.size} CT)")
        work, out, tree = root / "work", root / "out", root / "tree"
        times: dict[str, list[float]] = {}

        def run(name: str, cmd: list[str], before: str = "", in_dir: Path = cwd) -> str:
            if before == "copy":
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(src, work)
            elif before == "clear":
                shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            seconds, stderr = timed(cmd, in_dir)
            times.setdefault(name, []).append(seconds)
            return stderr

        for _ in range(args.repeat):
            run("dcmodify", [DCMODIFY, "-nb", *EDITS, *(str(work / p.relative_to(src)) for p in files)], "copy")
            run("modify --in-place", [*kaapcli, "modify", str(work), "--in-place", *EDITS, "-q", *workers], "copy")
            run("modify -o", [*kaapcli, "modify", str(src), "-o", str(out), *EDITS, "-q", *workers], "clear")
            run("modify -o, no-op re-run", [*kaapcli, "modify", str(src), "-o", str(out), *EDITS, "-q", *workers])
            run("cp -r", ["cp", "-r", str(src), str(out)], "clear")
            shutil.rmtree(tree, ignore_errors=True)
            run("sort", [*kaapcli, "sort", str(src), "-o", str(tree), "-q", *workers])
            run("sort, no-op re-run", [*kaapcli, "sort", str(src), "-o", str(tree), "-q", *workers])
            run("cp -al", ["cp", "-al", str(src), str(out)], "clear")
            run("sort --link", [*kaapcli, "sort", str(src), "-o", str(out), "--link", "-q", *workers], "clear")
        # The same modify re-run, typed differently: relative paths, from another working directory.
        (root / "elsewhere").mkdir()
        run("modify -o", [*kaapcli, "modify", str(src), "-o", str(out), *EDITS, "-q", *workers], "clear")
        relative = run("modify -o, re-run from elsewhere", [*kaapcli, "modify", "../ct", "-o", "../out", *EDITS,
                                                            *workers], in_dir=root / "elsewhere")

    med = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in med.items():
        say(f"{name:<36} {seconds:7.2f} s (median of {len(times[name])})")
    figure("modify", "modify --in-place / one dcmodify call", med["modify --in-place"] / med["dcmodify"], "<= 1.0")
    figure("modify", "modify -o (new tree) / one dcmodify call", med["modify -o"] / med["dcmodify"])
    figure("modify", "modify no-op re-run / sort no-op re-run", med["modify -o, no-op re-run"]
           / med["sort, no-op re-run"], "<= 1.2")
    up_to_date = f"{len(files)} up to date" in relative
    figure("modify", "re-run from another directory, relative paths: all up to date", float(up_to_date), ">= 1",
           note=relative.strip().splitlines()[-1] if relative.strip() else "")
    figure("sort", "sort / cp -r", med["sort"] / med["cp -r"])
    figure("sort", "sort --link / cp -al", med["sort --link"] / med["cp -al"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
