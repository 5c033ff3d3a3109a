#!/usr/bin/env python3
"""Rule runs on RQ workers (Redis) vs the local runner, in one run.

    python benchmarks/bench_queue.py [--jobs 200] [--cpu-jobs 16] [--cpu-seconds 0.4] [--repeat 5]

(a) Overhead per job: the same N trivial runs (``true``, each a child process and journal records, as every
rule run) through the local runner (``run_batch``, one after another) and through the queue (submitted by
the dispatcher ``receive --queue`` uses, run by one idle ``kaapcli worker``; timed from the first submit to
the end of the last run, as the journal records it).  Prints both times, the ratio, and the queue's extra
milliseconds per job.
(b) Scale-out: M CPU-bound runs (a shell loop of about --cpu-seconds of CPU each) through one worker and
through two workers (two ``kaapcli worker`` processes; a queue only the first one listens to, and one both
do), interleaved; prints the throughput ratio, and as the ceiling the same runs through the local runner
one and two at a time.  The machine's cores and load average are printed
too: on a shared 2-core machine two workers cannot get two free cores.

Starts its own redis-server (Debian's, no persistence) on 127.0.0.1 and a free port.
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
from datetime import UTC, datetime
from pathlib import Path

from common import compile_kaapcli, figure, quick_parser, say

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kaapcli.core.queue import Dispatcher, QueueSettings  # noqa: E402
from kaapcli.core.runs import FINAL, Job, Journal, new_id, run_batch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(root), "--logfile", str(root / "redis.log")])
    from redis import Redis

    deadline = time.monotonic() + 15
    while True:
        try:
            Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


def start_worker(url: str, root: Path, name: str, *queues: str) -> subprocess.Popen[bytes]:
    listen = [arg for q in queues for arg in ("--listen", q)]
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "worker", "--queue", url, "--journal",
                             str(root / name / "runs.jsonl"), "--name", name, "-q", *listen],
                            stdout=subprocess.DEVNULL)
    from redis import Redis

    redis = Redis.from_url(url)
    deadline = time.monotonic() + 30
    while not any(m.decode().startswith(f"rq:worker:{name}.") for m in redis.smembers("rq:workers")):
        if time.monotonic() > deadline:
            raise SystemExit(f"worker {name} did not start: {(root / 'redis.log').read_text()[-800:]}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def jobs(n: int, argv: list[str], queue: str = "default") -> list[Job]:
    return [Job(id=new_id(), rule="bench", series_uid=f"series-{i}", argv=argv, description=f"rule bench, job {i}",
                queue=queue) for i in range(n)]


def local(root: Path, n: int, argv: list[str], at_once: int = 1) -> float:
    """The local runner: run_batch, or ``at_once`` of them side by side (receive --jobs N)."""
    from concurrent.futures import ThreadPoolExecutor

    journal = Journal(root / f"local-{new_id()}" / "runs.jsonl")
    batch = jobs(n, argv)
    start = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        records = [r for part in pool.map(lambda i: run_batch(batch[i::at_once], journal), range(at_once))
                   for r in part]
    seconds = time.perf_counter() - start
    assert all(r.status == "ok" for r in records), [r.message for r in records if r.status != "ok"][:3]
    return seconds


def queued(url: str, root: Path, n: int, argv: list[str], queue: str = "one") -> tuple[float, float]:
    """Submit n jobs, follow them (as receive does, every 0.5 s) until the journal has them all finished:
    (seconds from the first submit to the end of the last run, seconds submitting)."""
    dispatcher = Dispatcher(QueueSettings(url), Journal(root / f"queue-{new_id()}" / "runs.jsonl"))
    batch = jobs(n, argv, queue)
    start, started = time.perf_counter(), datetime.now(UTC)
    dispatcher.submit(batch)
    submitted = time.perf_counter() - start
    records = dispatcher.wait([j.id for j in batch], timeout=3600, interval=0.5)
    assert len(records) == n and all(r.status == "ok" for r in records), \
        [(r.status, r.message) for r in records if r.status != "ok"][:3]
    assert all(r.status in FINAL for r in records)
    last = max(datetime.fromisoformat(r.end) for r in records)  # the worker's clock: this machine's
    return (last - started).total_seconds(), submitted


def calibrate(seconds: float) -> list[str]:
    """A shell loop that takes about ``seconds`` of CPU time (dash: no interpreter start), measured as the child's
    CPU time, which other jobs on the machine do not change."""
    import resource

    count = 20000
    while True:
        argv = ["sh", "-c", f"i=0; while [ $i -lt {count} ]; do i=$((i+1)); done"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        took = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if took > 0.1:
            return ["sh", "-c", f"i=0; while [ $i -lt {int(count * seconds / took)} ]; do i=$((i+1)); done"]
        count *= 4


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def main() -> None:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="trivial runs for the overhead (a)")
    parser.add_argument("--cpu-jobs", type=int, default=16, help="CPU-bound runs for the scale-out (b)")
    parser.add_argument("--cpu-seconds", type=float, default=0.4, help="CPU seconds of one CPU-bound run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.cpu_jobs, args.repeat = 40, 4, 1
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    compile_kaapcli()
    cores = len(os.sched_getaffinity(0))
    say(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="kaapcli-bench-queue-") as tmp:
        root = Path(tmp)
        redis, url = start_redis(root)
        one = None
        try:
            one = start_worker(url, root, "w1", "one", "two")  # queue "one": w1 alone; "two": w1 and w2
            trivial = ["true"]
            local_t, queue_t, submit_t = [], [], []
            for _ in range(args.repeat):
                local_t.append(local(root, args.jobs, trivial))
                total, submitted = queued(url, root, args.jobs, trivial)
                queue_t.append(total)
                submit_t.append(submitted)
            lo, qu, su = (statistics.median(x) for x in (local_t, queue_t, submit_t))
            say(f"(a) {args.jobs} trivial runs, median of {args.repeat}:")
            say(f"    local runner      {lo:7.2f} s  {lo / args.jobs * 1000:6.1f} ms/job")
            say(f"    queue, 1 worker   {qu:7.2f} s  {qu / args.jobs * 1000:6.1f} ms/job "
                  f"(submitting: {su / args.jobs * 1000:.1f} ms/job)")
            say(f"    ratio queue/local {qu / lo:7.2f}    overhead {(qu - lo) / args.jobs * 1000:.1f} ms/job "
                  f"(target < 20 ms)")
            figure("queue", "queue overhead over the local runner, ms per job", (qu - lo) / args.jobs * 1000, "<= 20")

            cpu = calibrate(args.cpu_seconds)
            one_t, two_t, local1, local2 = [], [], [], []
            two = start_worker(url, root, "w2", "two")
            try:
                for _ in range(args.repeat):  # interleaved: the machine's load changes from minute to minute
                    one_t.append(queued(url, root, args.cpu_jobs, cpu, "one")[0])
                    two_t.append(queued(url, root, args.cpu_jobs, cpu, "two")[0])
                    local1.append(local(root, args.cpu_jobs, cpu))
                    local2.append(local(root, args.cpu_jobs, cpu, at_once=2))
            finally:
                stop(two)
            t1, t2 = statistics.median(one_t), statistics.median(two_t)
            pairs = statistics.median(a / b for a, b in zip(one_t, two_t, strict=True))
            ceiling = statistics.median(a / b for a, b in zip(local1, local2, strict=True))
            say(f"(b) {args.cpu_jobs} CPU-bound runs of ~{args.cpu_seconds:g} s, median of {args.repeat}:")
            say(f"    1 worker          {t1:7.2f} s  {args.cpu_jobs / t1:5.2f} runs/s   (runs: {fmt(one_t)})")
            say(f"    2 workers         {t2:7.2f} s  {args.cpu_jobs / t2:5.2f} runs/s   (runs: {fmt(two_t)})")
            say(f"    throughput 2 vs 1 {pairs:7.2f}x   (median of the {args.repeat} side-by-side pairs; of the "
                  f"medians: {t1 / t2:.2f}x; target >= 1.8x; load average now {os.getloadavg()[0]:.1f} on "
                  f"{cores} cores)")
            say(f"    the machine's own ceiling, local runner 2 at once vs 1: {ceiling:.2f}x "
                  f"(runs: {fmt(local1)} vs {fmt(local2)})")
            figure("queue", "2 workers vs 1: throughput on CPU-bound runs", pairs, ">= 1.8",
                   note=f"the machine's own 2-at-once ceiling in the same run {ceiling:.2f}x, load "
                        f"{os.getloadavg()[0]:.1f} on {cores} cores")
        finally:
            if one is not None:
                stop(one)
            stop(redis)


if __name__ == "__main__":
    main()
