#!/usr/bin/env python3
"""Benchmark the embedded index: indexing throughput and keyword-field search latency.

Data: ``kaapcli mock`` + ``kaapcli dcm2json`` give one real series document; it is cloned into N
documents with distinct UIDs and varied Modality/Rows/StudyDate/SeriesDescription.

1. ``kaapcli index`` of 10,000 ``<SeriesInstanceUID>.json`` files (dcm2json's layout), end to end.
   Target: >= 5,000 documents/s.  Anchor: ``jq -c .`` reading the same files into one stream (just
   parsing and printing JSON, no index) — the ratio shows what indexing costs on top of reading.  Floors: the same
   ratio for a Python process that only reads and parses the files, and for one that also stores them in SQLite
   without any field index (``FLOORS``): no index can beat them.
2. ``Modality:XA`` (a selective value: 0.1 % of the documents) over 100,000 documents: median
   latency of the library search (parse + SQL + decode the hits), target < 50 ms; also the CLI
   end to end (``kaapcli search``, including Python start-up).  Anchor: ``jq`` selecting the same
   documents from a JSONL file of the 100,000 documents.

3. Linearity: per-instance documents (``dcm2json --per-instance``: 100 per series, so most writes merge into a
   stored series document) at ``--docs`` and 5x as many; the cost per 1,000 documents at 5x must stay within
   1.2x of the cost at 1x, and the peak RSS flat (GNU time, largest process).

Figures: one JSON object per line on stdout (benchmarks/report.py reads them); text on stderr.

Usage: python benchmarks/bench_index.py [--docs 10000] [--big 100000] [--repeat 3] [--keep DIR] [--quick]
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli, figure, peak_rss_kib, quick_parser, say  # noqa: E402

SERIES, MOD, ROWS, DATE, DESC = ("0020000E SeriesInstanceUID_keyword", "00080060 Modality_keyword",
                                 "00280010 Rows_integer", "00080020 StudyDate_date",
                                 "0008103E SeriesDescription_keyword")
MODALITIES = ["CT", "MR", "PT", "CR", "SEG", "US", "DX", "MG"]


# What indexing costs at least, in one Python process as `kaapcli index` runs (interpreter start-up included):
# reading and parsing every file, then also storing each document as it is in one SQLite table (WAL, as the
# index) with no field index and no full text.  The jq ratio of an index cannot exceed these.
_READ = ("import os, sys, orjson\n"
         "docs = []\n"
         "for entry in os.scandir(sys.argv[1]):\n"
         "    with open(entry.path, 'rb') as fh:\n"
         "        raw = fh.read()\n"
         "    docs.append((orjson.loads(raw)['0020000E SeriesInstanceUID_keyword'], raw))\n")
FLOORS = {
    "read + parse": _READ,
    "read + parse + store the documents": _READ + (
        "import sqlite3, pathlib\n"
        "db_path = pathlib.Path(sys.argv[2]) / 'floor.db'\n"
        "db_path.unlink(missing_ok=True)\n"
        "db = sqlite3.connect(db_path, isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL'); db.execute('PRAGMA synchronous=NORMAL')\n"
        "db.execute('CREATE TABLE docs(id INTEGER PRIMARY KEY, uid TEXT UNIQUE, doc BLOB)')\n"
        "db.execute('BEGIN'); db.executemany('INSERT INTO docs(uid, doc) VALUES (?, ?)', docs)\n"
        "db.execute('COMMIT'); db.close()\n"),
}


def run(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kwargs)


def template(work: Path) -> dict[str, Any]:
    kaapcli = [sys.executable, "-m", "kaapcli"]
    run(*kaapcli, "mock", "-o", work / "mock", "--slices", "2", "--rows", "32", "--columns", "32", "-q")
    run(*kaapcli, "dcm2json", work / "mock", "-o", work / "json1", "-q")
    return json.loads(next((work / "json1").glob("*.json")).read_text())


def clone(base: dict[str, Any], i: int) -> dict[str, Any]:
    doc = dict(base)
    doc[SERIES] = f"1.2.826.0.1.3680043.10.{i}"
    doc["0020000D StudyInstanceUID_keyword"] = f"1.2.826.0.1.3680043.11.{i // 3}"
    doc["00100020 PatientID_keyword"] = f"PAT-{i // 9:06d}"
    doc[MOD] = "XA" if i % 1000 == 7 else MODALITIES[i % len(MODALITIES)]
    doc[ROWS] = [256, 512, 1024][i % 3]
    doc[DATE] = f"20{10 + i % 14}-{i % 12 + 1:02d}-{i % 28 + 1:02d}"
    doc[DESC] = f"{['LUNG1', 'HEAD', 'ABDOMEN', 'PELVIS'][i % 4]}-{i:06d} series"
    return doc


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Any, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def linearity(base: dict[str, Any], work: Path, docs: int, per_series: int = 100) -> None:
    """Index ``docs`` and 5x ``docs`` per-instance documents (fresh index each); cost per 1,000 and peak RSS."""
    per_1000, rss = {}, {}
    for n in (docs, 5 * docs):
        src = work / f"instances-{n}"
        src.mkdir(exist_ok=True)
        for i in range(n):
            doc = dict(base)
            doc[SERIES] = f"1.2.826.0.1.3680043.12.{i // per_series}"
            doc["00080018 SOPInstanceUID_keyword"] = f"1.2.826.0.1.3680043.13.{i}"
            doc["00200013 InstanceNumber_integer"] = i % per_series
            (src / f"{doc['00080018 SOPInstanceUID_keyword']}.json").write_text(json.dumps(doc))
        db = work / f"instances-{n}.db"
        db.unlink(missing_ok=True)
        wall, kib = peak_rss_kib([sys.executable, "-m", "kaapcli", "index", str(src), "--index", str(db), "-q"])
        per_1000[n], rss[n] = 1000 * wall / n, kib / 1024
        say(f"index {n} per-instance documents ({per_series} per series): {wall:.2f} s = {per_1000[n]:.3f} s "
              f"per 1,000, peak RSS {rss[n]:.0f} MiB")
        shutil.rmtree(src)
    big, small = 5 * docs, docs
    figure("index", f"per-1,000 cost at {big} / at {small} per-instance documents", per_1000[big] / per_1000[small],
           "<= 1.2")
    figure("index", f"peak RSS at {big} / at {small} per-instance documents", rss[big] / rss[small], "<= 1.2",
           note=f"{rss[small]:.0f} -> {rss[big]:.0f} MiB")


def main() -> None:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the indexing step (the median counts)")
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.docs, args.big, args.repeat = 2_000, 10_000, 1
    compile_kaapcli()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_index-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = template(work)
        say(f"document template: {len(base)} keys, {len(json.dumps(base))} bytes (from kaapcli mock + dcm2json)")

        # 1. indexing throughput, end to end through the CLI
        src = work / "json"
        src.mkdir(exist_ok=True)
        for i in range(args.docs):
            doc = clone(base, i)
            (src / f"{doc[SERIES]}.json").write_text(json.dumps(doc))
        db = work / "small.db"
        runs = []
        for _ in range(args.repeat):  # a fresh index each time
            db.unlink(missing_ok=True)
            cpu0 = _child_cpu()
            start = time.perf_counter()
            run(sys.executable, "-m", "kaapcli", "index", src, "--index", db, "-q")
            runs.append((time.perf_counter() - start, _child_cpu() - cpu0))
        t_index, cpu_index = statistics.median(runs)
        say("  runs: " + ", ".join(f"{t:.2f} s" for t, _ in runs))
        jq = shutil.which("jq")
        t_jq = None
        if jq:
            files = sorted(str(p) for p in src.glob("*.json"))
            start = time.perf_counter()
            subprocess.run([jq, "-c", "."] + files, check=True, stdout=subprocess.DEVNULL)
            t_jq = time.perf_counter() - start
        rate = args.docs / t_index
        say(f"index {args.docs} JSON files: {t_index:.2f} s = {rate:,.0f} documents/s (target >= 5,000), "
              f"CPU {cpu_index:.2f} s = {args.docs / cpu_index:,.0f} documents per CPU second"
              + (f"; jq -c . over the same files: {t_jq:.2f} s; ratio kaapcli/jq = {t_index / t_jq:.2f}"
                 if t_jq else ""))

        figure("index", f"index {args.docs} series documents: documents/s", rate, ">= 5000")
        if t_jq:
            figure("index", "index speed / jq -c . speed (same files)", t_jq / t_index, ">= 2.5")
            floors = {name: statistics.median(timed(lambda code=code: run(sys.executable, "-c", code, src, work),
                                                    args.repeat))
                      for name, code in FLOORS.items()}
            for name, seconds in floors.items():
                say(f"  floor, {name}: {seconds:.2f} s")
                figure("index", f"floor ({name}) speed / jq -c . speed", t_jq / seconds,
                       note="no index: what any index made by Python costs at least")
        linearity(base, work, args.docs)

        # 2. search latency over a big index (built through the library: the CLI path is timed above)
        from kaapcli.core.index.base import Sort, open_index
        from kaapcli.core.index.query import field_keys, parse

        big = work / "big.db"
        big.unlink(missing_ok=True)
        jsonl = work / "big.jsonl"
        start = time.perf_counter()
        with open_index(str(big), create=True) as ix, open(jsonl, "w") as out:
            batch = []
            for i in range(args.big):
                doc = clone(base, i)
                out.write(json.dumps(doc) + "\n")
                batch.append(doc)
                if len(batch) == 5000:
                    ix.write(batch, replace=False)
                    batch.clear()
            ix.write(batch, replace=False)
        t_build = time.perf_counter() - start
        say(f"built {args.big:,} document index in {t_build:.1f} s ({args.big / t_build:,.0f} documents/s, "
              f"{big.stat().st_size / 1e6:.0f} MB)")
        with open_index(str(big)) as ix:
            hits = 0

            def query() -> None:
                nonlocal hits
                hits = len(list(ix.search(parse("Modality:XA"))))

            lib = timed(query, 21)
            ranged = timed(lambda: ix.count(parse("Modality:XA AND Rows:>=512 AND StudyDate:[2015-01-01 TO *]")), 21)
            by_rows = timed(lambda: list(ix.search(parse("Modality:XA"), sort=Sort(field_keys("Rows")))), 5)
        say(f"search Modality:XA over {args.big:,} documents ({hits} hits): library median "
              f"{statistics.median(lib) * 1000:.1f} ms (target < 50 ms); combined term+range count median "
              f"{statistics.median(ranged) * 1000:.1f} ms")
        say(f"  Modality:XA sorted by Rows: median {statistics.median(by_rows) * 1000:.1f} ms")
        cli = timed(lambda: run(sys.executable, "-m", "kaapcli", "search", "Modality:XA", "--index", big), 5)
        floor = timed(lambda: run(sys.executable, "-m", "kaapcli", "--version"), 5)
        say(f"  kaapcli search CLI end to end (incl. Python start-up): median {statistics.median(cli) * 1000:.0f} "
              f"ms; kaapcli --version (start-up alone): median {statistics.median(floor) * 1000:.0f} ms")
        figure("search", f"search Modality:XA over {args.big} documents: library ms", statistics.median(lib) * 1000,
               "<= 50")
        if jq:
            anchor = timed(lambda: subprocess.run(
                [jq, "-c", 'select(.["00080060 Modality_keyword"] == "XA")', str(jsonl)], check=True,
                stdout=subprocess.DEVNULL), 3)
            say(f"  anchor jq select over the JSONL: median {statistics.median(anchor) * 1000:.0f} ms; "
                  f"ratio library/jq = {statistics.median(lib) / statistics.median(anchor):.4f}, "
                  f"CLI/jq = {statistics.median(cli) / statistics.median(anchor):.3f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
