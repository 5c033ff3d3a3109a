"""Shared by the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any


def compile_kaapcli() -> None:
    """Byte-compile kaapcli's modules, as pip does when it installs a package.  An editable checkout under
    PYTHONDONTWRITEBYTECODE (set on our build machines) would otherwise recompile them at every start, ~70 ms
    that an installed kaapcli never spends, and the benchmarks time many starts."""
    package = Path(__file__).resolve().parent.parent / "kaapcli"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------- figures (the output contract)
# Every benchmark prints one JSON object per figure on stdout and its human text on stderr, so
# benchmarks/report.py can regenerate the README's performance table from what was measured:
#   {"benchmark": "modify", "figure": "modify -o / dcmodify", "value": 0.8, "target": "<= 1.0", "met": true}
# ``target`` is "<= X", ">= X" or "" (a figure shown for information, always met).

def quick_parser(description: str) -> Any:
    """An argument parser with the ``--quick`` flag every benchmark has (small data, one repeat)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small data and one repeat (a smoke run, for CI)")
    return parser


def meets(value: float, target: str) -> bool:
    if not target:
        return True
    op, _, bound = target.partition(" ")
    limit = float(bound.split()[0])  # a unit may follow: "<= 2.0 GiB"
    return value <= limit if op == "<=" else value >= limit


def figure(benchmark: str, name: str, value: float, target: str = "", note: str = "") -> bool:
    """Print one figure as a JSON line on stdout (and as text on stderr); returns whether it meets its target."""
    import json

    met = meets(value, target)
    record = {"benchmark": benchmark, "figure": name, "value": round(value, 4), "target": target, "met": met}
    if note:
        record["note"] = note
    print(json.dumps(record), flush=True)
    verdict = "" if not target else ("  ok" if met else "  MISSED")
    say(f"{name:<48} {value:10.3f}  target {target or '-':<8}{verdict}")
    return met


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def peak_rss_kib(cmd: list[str], **kwargs: Any) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB of the largest process) of one command, measured by GNU time."""
    import tempfile
    import time

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        wall = time.perf_counter() - start
        return wall, int(report.read().split()[-1])
