#!/usr/bin/env python3
"""Send → receive of a CT series on loopback: DCMTK vs pynetdicom's apps vs kaapcli, in one run.

    python benchmarks/bench_net.py [--slices 300] [--size 512] [--repeat 3] [--keep DIR]

(a) DCMTK ``storescu`` → ``storescp`` (both with TCP_NODELAY=1), (b) ``python -m pynetdicom storescu`` →
``storescp``, (c) ``kaapcli send`` → ``kaapcli receive``, (d) 4 concurrent ``kaapcli send`` (one series
each) → one ``kaapcli receive``. Each time is from starting the sender(s) to their exit, the receiver
already listening; every run checks that all files arrived. Prints times, the CPU seconds the senders and
the receiver used for the transfer (receiver start-up excluded; Linux /proc), and ratios of the median times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import compile_kaapcli

KAAPCLI = [sys.executable, "-m", "kaapcli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"receiver on port {port} did not start")


def count(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
               and ".kaapcli" not in p.parts)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(name: str, receiver: list[str], senders: list[list[str]], port: int, out: Path, expected: int,
        env: dict[str, str] | None = None) -> float:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rx = subprocess.Popen(receiver, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})
    try:
        wait_port(port)
        time.sleep(0.2)  # let the receiver finish its start-up before counting its CPU time
        os.sync()  # no dirty pages of the previous case written back during this one
        rx_cpu = cpu_seconds(rx.pid)
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env={**os.environ, **(env or {})}) for cmd in senders]
        tx_cpu = 0.0
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            tx_cpu += usage.ru_utime + usage.ru_stime
            err = proc.stderr.read() if proc.stderr else b""
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{name}: sender failed ({status}): {err.decode()[-500:]}")
        seconds = time.perf_counter() - start
        time.sleep(0.5)
        rx_cpu = cpu_seconds(rx.pid) - rx_cpu
    finally:
        rx.terminate()
        rx.wait(30)
    got = count(out)
    print(f"{name:<44} {seconds:7.2f} s  {got}/{expected} files  cpu: senders {tx_cpu:5.2f} s, "
          f"receiver {rx_cpu:5.2f} s", flush=True)
    if got != expected:
        raise SystemExit(f"{name}: {expected - got} files lost")
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case (ratios use the medians)")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    compile_kaapcli()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_net_"))
    work.mkdir(parents=True, exist_ok=True)
    data, data4 = work / "ct", work / "ct4"
    size = ["--rows", str(args.size), "--columns", str(args.size)]
    if not data.exists():
        subprocess.run([*KAAPCLI, "mock", "-o", data, "--slices", str(args.slices), *size, "-q"], check=True,
                       stdout=subprocess.DEVNULL)
    if not data4.exists():
        subprocess.run([*KAAPCLI, "mock", "-o", data4, "--studies", "4", "--slices", str(args.slices // 4), *size,
                        "--seed", "4", "-q"], check=True, stdout=subprocess.DEVNULL)
    n = args.slices
    mb = sum(p.stat().st_size for p in data.rglob("*.dcm")) / 1e6
    print(f"{n} slices {args.size}x{args.size}, {mb:.0f} MB, loopback\n")
    times: dict[str, list[float]] = {"dcmtk": [], "pynetdicom": [], "kaapcli": [], "kaapcli4": []}
    try:
        for _ in range(args.repeat):  # the cases interleaved, so that a noisy moment hits them alike
            port = free_port()
            times["dcmtk"].append(run(
                "(a) DCMTK storescu -> storescp",
                ["/usr/bin/storescp", "-od", str(work / "a"), "-aet", "STORESCP", str(port)],
                [["/usr/bin/storescu", "-aec", "STORESCP", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port),
                  str(data)]], port, work / "a", n, env={"TCP_NODELAY": "1"}))
            port = free_port()
            times["pynetdicom"].append(run(
                "(b) pynetdicom storescu -> storescp",
                [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(work / "b"), "-q"],
                [[sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), str(data), "-r", "-cx",
                  "-q"]], port, work / "b", n))
            port = free_port()
            times["kaapcli"].append(run(
                "(c) kaapcli send -> kaapcli receive",
                [*KAAPCLI, "receive", "-o", str(work / "c"), "--port", str(port), "-q"],
                [[*KAAPCLI, "send", str(data), "--to", f"RX@127.0.0.1:{port}", "-q"]], port, work / "c", n))
            port = free_port()
            senders = [[*KAAPCLI, "send", str(study), "--to", f"RX@127.0.0.1:{port}", "-q"]
                       for study in sorted(p for p in data4.iterdir() if p.is_dir() and not p.name.startswith("."))]
            times["kaapcli4"].append(run(
                "(d) 4 x kaapcli send -> kaapcli receive",
                [*KAAPCLI, "receive", "-o", str(work / "d"), "--port", str(port), "-q"],
                senders, port, work / "d", 4 * (n // 4)))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for sub in "abcd":
                shutil.rmtree(work / sub, ignore_errors=True)
    median = {case: statistics.median(values) for case, values in times.items()}
    print()
    if args.repeat > 1:
        print("medians: " + ", ".join(f"{case} {value:.2f} s" for case, value in median.items()))
    print(f"kaapcli / DCMTK time:       {median['kaapcli'] / median['dcmtk']:.2f}x  (target <= 1.0)")
    print(f"pynetdicom apps / kaapcli:  {median['pynetdicom'] / median['kaapcli']:.2f}x faster  (target >= 3)")
    files4 = 4 * (n // 4)
    print(f"receiver, 4 senders:        {mb / median['kaapcli4']:.0f} MB/s, {files4 / median['kaapcli4']:.0f} files/s")


if __name__ == "__main__":
    main()
