#!/usr/bin/env python3
"""Send → receive of a CT series on loopback: DCMTK vs pynetdicom's apps vs kaapcli, in one run.

    python benchmarks/bench_net.py [--slices 300] [--size 512] [--keep DIR]

(a) DCMTK ``storescu`` → ``storescp`` (TCP_NODELAY=1), (b) ``python -m pynetdicom storescu`` →
``storescp``, (c) ``kaapcli send`` → ``kaapcli receive``, (d) 4 concurrent ``kaapcli send`` (one series
each) → one ``kaapcli receive``. Each time is from starting the sender(s) to their exit, the receiver
already listening; every run checks that all files arrived. Prints times and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run(name: str, receiver: list[str], senders: list[list[str]], port: int, out: Path, expected: int,
        env: dict[str, str] | None = None) -> float:
    out.mkdir(parents=True)
    rx = subprocess.Popen(receiver, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})
    try:
        wait_port(port)
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for cmd in senders]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{name}: sender failed ({proc.returncode}): {err.decode()[-500:]}")
        seconds = time.perf_counter() - start
        time.sleep(0.5)
    finally:
        rx.terminate()
        rx.wait(30)
    got = count(out)
    print(f"{name:<44} {seconds:7.2f} s  {got}/{expected} files", flush=True)
    if got != expected:
        raise SystemExit(f"{name}: {expected - got} files lost")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
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
    times: dict[str, float] = {}
    try:
        port = free_port()
        times["dcmtk"] = run("(a) DCMTK storescu -> storescp", ["/usr/bin/storescp", "-od", str(work / "a"),
                             "-aet", "STORESCP", str(port)],
                             [["/usr/bin/storescu", "-aec", "STORESCP", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
                               str(port), str(data)]], port, work / "a", n, env={"TCP_NODELAY": "1"})
        port = free_port()
        times["pynetdicom"] = run(
            "(b) pynetdicom storescu -> storescp",
            [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(work / "b"), "-q"],
            [[sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), str(data), "-r", "-cx", "-q"]],
            port, work / "b", n)
        port = free_port()
        times["kaapcli"] = run("(c) kaapcli send -> kaapcli receive",
                               [*KAAPCLI, "receive", "-o", str(work / "c"), "--port", str(port), "-q"],
                               [[*KAAPCLI, "send", str(data), "--to", f"RX@127.0.0.1:{port}", "-q"]],
                               port, work / "c", n)
        port = free_port()
        senders = [[*KAAPCLI, "send", str(study), "--to", f"RX@127.0.0.1:{port}", "-q"]
                   for study in sorted(p for p in data4.iterdir() if p.is_dir() and not p.name.startswith("."))]
        times["kaapcli4"] = run("(d) 4 x kaapcli send -> kaapcli receive",
                                [*KAAPCLI, "receive", "-o", str(work / "d"), "--port", str(port), "-q"],
                                senders, port, work / "d", 4 * (n // 4))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for sub in "abcd":
                shutil.rmtree(work / sub, ignore_errors=True)
    print()
    print(f"kaapcli / DCMTK time:       {times['kaapcli'] / times['dcmtk']:.2f}x  (target <= 1.0)")
    print(f"pynetdicom apps / kaapcli:  {times['pynetdicom'] / times['kaapcli']:.2f}x faster  (target >= 3)")
    files4 = 4 * (n // 4)
    print(f"receiver, 4 senders:        {mb / times['kaapcli4']:.0f} MB/s, {files4 / times['kaapcli4']:.0f} files/s")


if __name__ == "__main__":
    main()
