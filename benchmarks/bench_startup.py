#!/usr/bin/env python3
"""Start-up: how long kaapcli takes before and at its first work, next to ``python -c pass`` and DCMTK.

Each case is a fresh process, run ``--repeat`` times interleaved with the others (so a busy moment hits all
alike); printed: the median and fastest wall time, the median CPU time (user + system of the process, which
a busy machine hardly moves) and the wall median's ratio to DCMTK's ``storescu --version``.

- anchors: ``python -c pass`` (the interpreter of kaapcli's environment) and ``storescu --version``;
- ``kaapcli --version``, ``kaapcli --help``, ``kaapcli convert --help`` (one command's help);
- completion: what one Tab press runs (``_KAAPCLI_COMPLETE=complete_bash``) for a command name and for an
  option value;
- first work: ``kaapcli dcm2json FILE -o OUT --force -q`` on one 64x64 mock CT file, next to DCMTK's
  ``dcm2json FILE OUT.json`` on the same file, and ``kaapcli mock`` writing that one file.

The kaapcli measured is the one beside this interpreter (``--kaapcli PATH`` for another, e.g. one installed
from the wheel); the scripts byte-compile kaapcli first, as pip does on install.

    python benchmarks/bench_startup.py [--repeat 21] [--kaapcli PATH]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli, figure, quick_parser, say  # noqa: E402

DCMTK = Path("/usr/bin")  # pynetdicom's scripts shadow some DCMTK names on PATH: be explicit


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU (user + system of that process) hardly moves on a busy machine."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    return elapsed, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--kaapcli", default=str(Path(sys.executable).with_name("kaapcli")))
    args = parser.parse_args()
    if args.quick:
        args.repeat = 3
    kaapcli = args.kaapcli
    python = str(Path(kaapcli).with_name("python"))
    if not (DCMTK / "storescu").exists() or not (DCMTK / "dcm2json").exists():
        raise SystemExit("DCMTK not installed (apt-get install dcmtk)")
    compile_kaapcli()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAAPCLI_", "_KAAPCLI"))}
    with tempfile.TemporaryDirectory(prefix="kaapcli-bench-startup-") as tmp:
        work = Path(tmp)
        subprocess.run([kaapcli, "mock", "-o", str(work / "mock"), "--slices", "1", "--rows", "64", "--columns",
                        "64", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        one = next((work / "mock").rglob("*.dcm"))

        def tab(line: str) -> dict[str, str]:
            return {**env, "_KAAPCLI_COMPLETE": "complete_bash", "COMP_WORDS": line,
                    "COMP_CWORD": str(len(line.split(" ")) - 1)}

        cases: dict[str, tuple[list[str], dict[str, str]]] = {
            "python -c pass": ([python, "-c", "pass"], env),
            "storescu --version (DCMTK)": ([str(DCMTK / "storescu"), "--version"], env),
            "kaapcli --version": ([kaapcli, "--version"], env),
            "kaapcli --help": ([kaapcli, "--help"], env),
            "kaapcli convert --help": ([kaapcli, "convert", "--help"], env),
            "completion: kaapcli con<Tab>": ([kaapcli], tab("kaapcli con")),
            "completion: kaapcli convert --to <Tab>": ([kaapcli], tab("kaapcli convert --to ")),
            "first work: dcm2json FILE (DCMTK)": ([str(DCMTK / "dcm2json"), str(one), str(work / "d.json")], env),
            "first work: kaapcli dcm2json FILE": ([kaapcli, "dcm2json", str(one), "-o", str(work / "meta"),
                                                   "--force", "-q"], env),
            "first work: kaapcli mock (1 file)": ([kaapcli, "mock", "-o", str(work / "m2"), "--slices", "1", "--rows",
                                                   "64", "--columns", "64", "--force", "-q"], env),
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for cmd, case_env in cases.values():  # warm the page cache once
            timed(cmd, case_env)
        for _ in range(args.repeat):
            for name, (cmd, case_env) in cases.items():
                times[name].append(timed(cmd, case_env))
        shutil.rmtree(work / "m2", ignore_errors=True)

    anchor = statistics.median(wall for wall, _ in times["storescu --version (DCMTK)"])
    say(f"start-up, {args.repeat} runs each (interleaved), kaapcli = {kaapcli}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    say(f"{'case':42} {'wall median':>12} {'fastest':>9} {'CPU median':>11} {'wall / storescu':>16}")
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        fastest = min(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        say(f"{name:42} {wall * 1000:9.1f} ms {fastest * 1000:6.1f} ms {cpu * 1000:8.1f} ms {wall / anchor:15.1f}x")
        if name.startswith("kaapcli") or name.startswith("first work: kaapcli"):
            figure("startup", f"{name}: median ms", wall * 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
