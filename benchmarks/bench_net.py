#!/usr/bin/env python3
"""Send → receive of a CT series on loopback: DCMTK vs pynetdicom's apps vs kaapcli, in one run, plain and over TLS.

    python benchmarks/bench_net.py [--slices 300] [--size 512] [--repeat 2] [--keep DIR] [--no-tls] [--quick]

(a) DCMTK ``storescu`` → ``storescp`` (both with TCP_NODELAY=1), (b) ``python -m pynetdicom storescu`` →
``storescp``, (c) ``kaapcli send`` → ``kaapcli receive``, (d) 4 concurrent ``kaapcli send`` (one series
each) → one ``kaapcli receive``; over DICOM TLS with mutual authentication (certificates made with ``openssl``
for the run: a CA, a server and a client certificate, RSA 2048): (e) DCMTK ``storescu +tls`` → ``storescp +tls``,
(f) ``kaapcli send --tls`` → ``kaapcli receive --tls``. Each time is from starting the sender(s) to their exit, the
receiver already listening; every run checks that all files arrived. The cases run in turn, each run into a
directory of its own (removed at the end: a case is slower right after another's output was deleted). Prints
times, the CPU seconds the senders and the receiver used for the transfer (receiver start-up excluded; Linux
/proc), and ratios of the median times.
Figures: one JSON object per line on stdout (benchmarks/report.py reads them); text on stderr.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli, figure, quick_parser, say  # noqa: E402

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


class FilesLost(SystemExit):
    """A case lost files: the benchmark ends, unless the case is an anchor that does so under load (pynetdicom's
    apps time out when the machine is busy; that run is then reported and not counted)."""


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
    say(f"{name:<44} {seconds:7.2f} s  {got}/{expected} files  cpu: senders {tx_cpu:5.2f} s, "
          f"receiver {rx_cpu:5.2f} s")
    if got != expected:
        raise FilesLost(f"{name}: {expected - got} files lost")
    return seconds


def make_certificates(root: Path) -> dict[str, Path]:
    """A CA and a server and a client certificate signed by it (PEM, RSA 2048), for 127.0.0.1."""
    root.mkdir(parents=True, exist_ok=True)
    names = {name: root / name for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")}

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA",
            "-keyout", names["ca.key"], "-out", names["ca.pem"])
    for who in ("server", "client"):
        csr = root / f"{who}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=bench {who}", "-keyout", names[f"{who}.key"],
                "-out", csr)
        ext = root / f"{who}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("x509", "-req", "-in", csr, "-CA", names["ca.pem"], "-CAkey", names["ca.key"], "-CAcreateserial",
                "-days", "2", "-extfile", ext, "-out", names[f"{who}.pem"])
    return names


def main() -> None:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each case (ratios use the medians)")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS cases (e) and (f)")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.size, args.repeat = 40, 256, 1
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
    say(f"{n} slices {args.size}x{args.size}, {mb:.0f} MB, loopback\n")
    times: dict[str, list[float]] = {"dcmtk": [], "pynetdicom": [], "kaapcli": [], "kaapcli4": []}
    pem = {} if args.no_tls else make_certificates(work / "pki")
    if pem:
        times.update({"dcmtk_tls": [], "kaapcli_tls": []})
    def out(case: str, repeat: int) -> Path:
        return work / "runs" / f"{case}{repeat}"

    try:
        def case_a(repeat: int) -> None:
            port = free_port()
            times["dcmtk"].append(run(
                "(a) DCMTK storescu -> storescp",
                ["/usr/bin/storescp", "-od", str(out("a", repeat)), "-aet", "STORESCP", str(port)],
                [["/usr/bin/storescu", "-aec", "STORESCP", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port),
                  str(data)]], port, out("a", repeat), n, env={"TCP_NODELAY": "1"}))

        def case_b(repeat: int) -> None:
            port = free_port()
            try:
                times["pynetdicom"].append(run(
                    "(b) pynetdicom storescu -> storescp",
                    [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-od", str(out("b", repeat)), "-q"],
                    [[sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), str(data), "-r", "-cx",
                      "-q"]], port, out("b", repeat), n))
            except FilesLost as lost:
                say(f"{lost}: this run is not counted")

        def case_c(repeat: int) -> None:
            port = free_port()
            times["kaapcli"].append(run(
                "(c) kaapcli send -> kaapcli receive",
                [*KAAPCLI, "receive", "-o", str(out("c", repeat)), "--port", str(port), "-q"],
                [[*KAAPCLI, "send", str(data), "--to", f"RX@127.0.0.1:{port}", "-q"]], port, out("c", repeat), n))

        def case_d(repeat: int) -> None:
            port = free_port()
            senders = [[*KAAPCLI, "send", str(study), "--to", f"RX@127.0.0.1:{port}", "-q"]
                       for study in sorted(p for p in data4.iterdir() if p.is_dir() and not p.name.startswith("."))]
            times["kaapcli4"].append(run(
                "(d) 4 x kaapcli send -> kaapcli receive",
                [*KAAPCLI, "receive", "-o", str(out("d", repeat)), "--port", str(port), "-q"],
                senders, port, out("d", repeat), 4 * (n // 4)))

        def case_e(repeat: int) -> None:
            port = free_port()
            times["dcmtk_tls"].append(run(
                "(e) DCMTK storescu +tls -> storescp +tls",
                ["/usr/bin/storescp", "+tls", str(pem["server.key"]), str(pem["server.pem"]), "+cf",
                 str(pem["ca.pem"]), "-od", str(out("e", repeat)), "-aet", "STORESCP", str(port)],
                [["/usr/bin/storescu", "+tls", str(pem["client.key"]), str(pem["client.pem"]), "+cf",
                  str(pem["ca.pem"]), "-aec", "STORESCP", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port),
                  str(data)]], port, out("e", repeat), n, env={"TCP_NODELAY": "1"}))

        def case_f(repeat: int) -> None:
            port = free_port()
            times["kaapcli_tls"].append(run(
                "(f) kaapcli send --tls -> kaapcli receive --tls",
                [*KAAPCLI, "receive", "-o", str(out("f", repeat)), "--port", str(port), "-q", "--tls", "--tls-cert",
                 str(pem["server.pem"]), "--tls-key", str(pem["server.key"]), "--tls-ca", str(pem["ca.pem"])],
                [[*KAAPCLI, "send", str(data), "--to", f"RX@127.0.0.1:{port}", "-q", "--tls", "--tls-cert",
                  str(pem["client.pem"]), "--tls-key", str(pem["client.key"]), "--tls-ca", str(pem["ca.pem"])]],
                port, out("f", repeat), n))

        # The cases interleaved, so that a noisy moment hits them alike.  Each run writes a directory of its own,
        # all removed at the end: a case ran slower right after another one's files were deleted (ext4 skips
        # recently freed inodes when it creates files), which made the order decide the ratios.
        cases = [case_a, case_b, case_c, case_d] + ([case_e, case_f] if pem else [])
        for repeat in range(args.repeat):
            for case in cases:
                case(repeat)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "runs", ignore_errors=True)
    median = {case: statistics.median(values) if values else float("nan") for case, values in times.items()}
    say("")
    if args.repeat > 1:
        say("medians: " + ", ".join(f"{case} {value:.2f} s" for case, value in median.items()))
    figure("net", "send -> receive: kaapcli / DCMTK time", median["kaapcli"] / median["dcmtk"], "<= 1.0")
    figure("net", "send -> receive: pynetdicom apps / kaapcli time", median["pynetdicom"] / median["kaapcli"], ">= 3")
    if pem:
        figure("net", "send -> receive over TLS: kaapcli / DCMTK time", median["kaapcli_tls"] / median["dcmtk_tls"],
               "<= 1.0")
    files4 = 4 * (n // 4)
    say(f"receiver, 4 senders:        {mb / median['kaapcli4']:.0f} MB/s, {files4 / median['kaapcli4']:.0f} files/s")


if __name__ == "__main__":
    main()
