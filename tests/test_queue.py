"""Rules on RQ workers: a real redis-server (no persistence) on 127.0.0.1, `kaapcli worker` processes, DCMTK storescu
feeding `kaapcli receive --queue`; worker SIGKILL, Redis restart, the RQ dashboard, staging through moto's S3."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, dcmtk, free_port, kaapcli, wait_for
from peers import receiver  # noqa: F401 - fixture
from test_s3 import endpoint  # noqa: F401 - fixture: moto's S3 server

from kaapcli.core.runs import FINAL, Journal, RunRecord

pytestmark = pytest.mark.network


def write_rules(path: Path, rules: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(rules))
    return path


def mark(name: str, marks: Path, extra: str = "") -> list[str]:
    """A command appending "<rule> <series uid>" to the marks file (O_APPEND: lines from two workers never mix)."""
    return ["sh", "-c", f'{extra}echo "{name} $KAAPCLI_SERIES_UID" >> "$1"', "sh", str(marks)]


class Worker:
    def __init__(self, redis: RedisServer, root: Path, name: str, *args: str):
        self.name, self.journal = name, root / name / "runs.jsonl"
        self.log = root / f"{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kaapcli", "worker", "--queue", redis.url, "--journal", str(self.journal),
                 "--name", name, "--heartbeat", "2", *args], stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "NO_COLOR": "1"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Any:
    started: list[Worker] = []

    def start(name: str, *args: str, wait: bool = True) -> Worker:
        worker = Worker(redis_server, tmp_path, name, *args)
        started.append(worker)
        if wait:
            assert wait_for(lambda: any(name in w for w in live_workers(redis_server)), 30), worker.log.read_text()
        return worker

    yield start
    for worker in started:
        worker.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.proc.pid, signal.SIGKILL)


def live_workers(redis: RedisServer) -> list[str]:
    return [m.decode() for m in redis.client().smembers("rq:workers")]


def latest(journal: Path) -> list[RunRecord]:
    return Journal(journal).records() if journal.exists() else []


def all_lines(journal: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in journal.read_text().splitlines()]


def marks_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def storescu(port: int, *dirs: Path) -> None:
    proc = subprocess.run([dcmtk("storescu"), "-aec", "KAAPCLI", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(port),
                           *map(str, dirs)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def series_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*.dcm")})


# --------------------------------------------------------------------------- across machines

def test_two_workers_run_every_rule_once_per_series_in_dependency_order(
        redis_server: RedisServer, workers: Any, receiver: Any, mock_ct: Path, mock_studies: Path,  # noqa: F811
        tmp_path: Path) -> None:
    marks, done = tmp_path / "marks.txt", tmp_path / "done"
    done.mkdir()
    rules = write_rules(tmp_path / "rules.json", [
        {"name": "convert", "search_tags": {"Modality": "CT"},
         "run": mark("convert", marks, f'sleep 0.4; touch "{done}/$KAAPCLI_SERIES_UID"; ')},
        {"name": "report", "depends_on": ["convert"], "priority": 5,  # the high queue, yet after its dependency
         "run": mark("report", marks, f'test -f "{done}/$KAAPCLI_SERIES_UID" || exit 9; ')},
        {"name": "mr-only", "search_tags": {"Modality": "MR"}, "run": ["false"]}])
    journal = tmp_path / "rx.jsonl"
    workers("w1")
    workers("w2")
    rx = receiver("--series-timeout", "0.5", "--rules", str(rules), "--journal", str(journal), "--queue",
                  redis_server.url)
    storescu(rx.port, mock_ct, mock_studies)
    series = {p.name for p in series_dirs(mock_ct) + series_dirs(mock_studies)}
    assert len(series) == 5
    assert wait_for(lambda: sum(r.status in FINAL for r in latest(journal)) == 10, 90), latest(journal)
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    runs = latest(journal)
    assert Counter((r.rule, r.status) for r in runs) == {("convert", "ok"): 5, ("report", "ok"): 5}
    assert Counter(marks_of(marks)) == Counter(f"{rule} {uid}" for uid in series for rule in ("convert", "report"))
    assert {r.worker.split(".")[0] for r in runs} == {"w1", "w2"}  # both took work, each run exactly once
    assert all(r.host and r.via == redis_server.url and r.log for r in runs)
    listed = [json.loads(line) for line in kaapcli("runs", "--journal", journal).stdout.splitlines()]
    assert {(r["rule"], r["status"]) for r in listed} == {("convert", "ok"), ("report", "ok")}


def test_priorities_select_queues_that_workers_take_in_order(redis_server: RedisServer, workers: Any,
                                                             mock_ct: Path, tmp_path: Path) -> None:
    marks, journal = tmp_path / "marks.txt", tmp_path / "j.jsonl"
    rules = write_rules(tmp_path / "rules.json", [
        {"name": "low", "priority": -3, "run": mark("low", marks)},
        {"name": "mid", "run": mark("mid", marks)},
        {"name": "high", "priority": 3, "run": mark("high", marks)},
        {"name": "gpu", "priority": "gpu", "run": mark("gpu", marks)}])  # dcm-processor: a queue by name
    proc = kaapcli("trigger", "--rules", rules, mock_ct, "--journal", journal, "--queue", redis_server.url)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 8  # the run ids
    assert {r.status for r in latest(journal)} == {"queued"}
    worker = workers("w1", "--burst", "--listen", "gpu", "--listen", "high,default,low", wait=False)
    assert worker.proc.wait(60) == 0, worker.log.read_text()
    assert [line.split()[0] for line in marks_of(marks)] == ["gpu"] * 2 + ["high"] * 2 + ["mid"] * 2 + ["low"] * 2
    listed = kaapcli("runs", "--journal", journal, "--queue", redis_server.url)
    runs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(r["queue"], r["status"]) for r in runs} == {("gpu", "ok"), ("high", "ok"), ("default", "ok"),
                                                        ("low", "ok")}, listed.stderr
    assert all(r["worker"].startswith("w1.") and r["host"] for r in runs)


def test_a_killed_workers_jobs_are_retried_elsewhere_or_failed_with_the_reason(
        redis_server: RedisServer, workers: Any, mock_ct: Path, tmp_path: Path) -> None:
    retried, once, journal = tmp_path / "retried.txt", tmp_path / "once.txt", tmp_path / "j.jsonl"
    slow = 'echo "start $KAAPCLI_RUN_ID" >> "$1"; sleep 3; echo end >> "$1"'  # killed before it ends, under load too
    rules = write_rules(tmp_path / "rules.json", [
        {"name": "retried", "retries": {"max": 1, "interval": 0}, "run": ["sh", "-c", slow, "sh", str(retried)]},
        {"name": "once", "run": ["sh", "-c", slow, "sh", str(once)]}])
    w1 = workers("w1", "--jobs", "2")
    trigger = subprocess.Popen([sys.executable, "-m", "kaapcli", "trigger", "--rules", str(rules),
                                str(series_dirs(mock_ct)[0]), "--journal", str(journal), "--queue", redis_server.url,
                                "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def running() -> list[int]:  # (the command may write its mark before its worker journals it running)
            return [r.pid for r in latest(w1.journal) if r.status == "running" and r.pid]

        assert wait_for(lambda: marks_of(retried) and marks_of(once) and len(running()) == 2, 60), w1.log.read_text()
        commands = running()
        os.killpg(w1.proc.pid, signal.SIGKILL)  # the worker and its worker processes: the machine is gone
        assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in commands), 10)  # died with them
        workers("w2")
        out, err = trigger.communicate(timeout=90)
    finally:
        trigger.kill()
    assert trigger.returncode == 1, err  # "once" failed: no retries left
    runs = {r.rule: r for r in latest(journal)}
    assert runs["retried"].status == "ok" and runs["retried"].attempt == 2 and runs["retried"].worker.startswith("w2.")
    assert runs["once"].status == "failed" and runs["once"].worker.startswith("w1.")
    assert "lost: no heartbeat from worker w1." in runs["once"].message
    history = [(r["status"], r["worker"].split(".")[0], r["attempt"]) for r in all_lines(journal)
               if r["rule"] == "retried"]
    assert history[0] == ("queued", "", 1) and history[-1] == ("ok", "w2", 2)
    assert ("running", "w1", 1) in history and ("running", "w2", 2) in history
    requeued = [r for r in all_lines(journal) if r["rule"] == "retried" and r["status"] == "queued" and r["message"]]
    assert requeued and "retrying after attempt 1: lost: no heartbeat from worker w1." in requeued[0]["message"]
    assert [line.split()[0] for line in marks_of(retried)] == ["start", "start", "end"]  # attempt 1 never ended
    assert [line.split()[0] for line in marks_of(once)] == ["start"]
    assert len(out.split()) == 2 and all(":" in line for line in out.split())  # host:log of each run


def test_redis_restarted_while_series_arrive_loses_no_run(redis_server: RedisServer, workers: Any, receiver: Any,  # noqa: F811
                                                          mock_studies: Path, tmp_path: Path) -> None:
    marks, journal = tmp_path / "marks.txt", tmp_path / "rx.jsonl"
    rules = write_rules(tmp_path / "rules.json", [
        {"name": "first", "run": mark("first", marks)},
        {"name": "second", "depends_on": "first", "run": mark("second", marks)}])
    studies = series_dirs(mock_studies)
    worker = workers("w1")
    rx = receiver("--series-timeout", "0.5", "--rules", str(rules), "--journal", str(journal), "--queue",
                  redis_server.url)

    def done(n: int) -> bool:
        return Counter(r.status for r in latest(journal))["ok"] == n

    storescu(rx.port, studies[0])
    assert wait_for(lambda: done(2), 60), latest(journal)
    redis_server.stop()  # down while a series arrives: the receiver keeps storing and journals the runs pending
    storescu(rx.port, studies[1])
    assert wait_for(lambda: Counter(r.status for r in latest(journal))["pending"] == 2, 30), latest(journal)
    redis_server.start()  # empty: no persistence
    assert wait_for(lambda: done(4), 60), (latest(journal), worker.log.read_text()[-2000:])
    worker.stop()  # queued with no worker, then Redis restarts and forgets the queue
    storescu(rx.port, studies[2])
    assert wait_for(lambda: Counter(r.status for r in latest(journal))["queued"] == 2, 30), latest(journal)
    redis_server.stop()
    redis_server.start()
    assert wait_for(lambda: any("enqueued again" in r.message for r in latest(journal)), 30), latest(journal)
    workers("w2")
    assert wait_for(lambda: done(6), 60), latest(journal)
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    assert "unreachable" in stderr and "reachable again" in stderr
    uids = [d.name for d in studies]
    assert Counter(marks_of(marks)) == Counter(f"{rule} {uid}" for uid in uids for rule in ("first", "second"))
    lines = all_lines(journal)
    assert {r["status"] for r in lines} <= {"queued", "pending", "running", "ok"}  # (running: if a sync saw it)
    assert all(r["attempt"] == 1 for r in lines)


SERVICE = """
import json, os, pathlib, socket

def wanted(headers, params):
    return headers["Modality"] == "CT", {"level": params["level"], "decided_on": socket.gethostname()}

def measure(jobName, headers, added_params, out, series_uid):
    pathlib.Path(out, series_uid + ".measure.json").write_text(json.dumps({"job": jobName, "added": added_params}))
    return True, {"slices": 8, "worker_pid": os.getpid()}

def crash(**kwargs):
    os.abort()
"""


def test_dcm_processor_callbacks_workers_and_added_params_work_the_same_on_the_queue(
        redis_server: RedisServer, workers: Any, mock_ct: Path, tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)  # the rules file's folder: the same path on the workers
    out, journal = tmp_path / "out", tmp_path / "j.jsonl"
    out.mkdir()
    rules = write_rules(tmp_path / "settings.json", [
        {"jobName": "measure", "callback": "svc:wanted", "worker": "svc:measure", "params": {"level": 3}},
        {"jobName": "report", "dependsOn": "measure", "priority": "default",
         "run": ["sh", "-c", 'cat "$KAAPCLI_ADDED_PARAMS_FILE" > "$1"', "sh", "{out}/{series_uid}.report.json"]},
        {"jobName": "crashes", "worker": "svc:crash"},
        {"jobName": "after-crash", "dependsOn": "crashes", "run": ["touch", "{out}/never"]}])
    workers("w1")
    workers("w2")
    proc = kaapcli("trigger", "--rules", rules, mock_ct, "-o", out, "--journal", journal, "--queue", redis_server.url,
                   "--wait", timeout=120)
    assert proc.returncode == 1, proc.stderr  # the crashing worker fails its runs; the rest ran
    assert "crashes" in proc.stderr and "Traceback" not in proc.stderr
    runs = latest(journal)
    assert Counter((r.rule, r.status) for r in runs) == {("measure", "ok"): 2, ("report", "ok"): 2,
                                                        ("crashes", "failed"): 2, ("after-crash", "skipped"): 2}
    assert all(r.worker.split(".")[0] in ("w1", "w2") for r in runs if r.status != "skipped")
    for series in series_dirs(mock_ct):
        measured = json.loads((out / f"{series.name}.measure.json").read_text())
        decided = {"level": 3, "decided_on": socket.gethostname()}  # the callback ran on the node, its dict travelled
        assert measured == {"job": "measure", "added": {"measure": decided}}
        report = json.loads((out / f"{series.name}.report.json").read_text())
        # the dependency's return value reached its dependent through Redis, on whichever worker ran it
        assert report["measure"]["level"] == 3 and report["measure"]["slices"] == 8
        assert isinstance(report["measure"]["worker_pid"], int)
    assert not (out / "never").exists()


def test_watch_hands_the_series_it_takes_to_the_queue(redis_server: RedisServer, workers: Any, mock_ct: Path,
                                                     tmp_path: Path) -> None:
    import shutil

    marks, journal, inbox = tmp_path / "marks.txt", tmp_path / "j.jsonl", tmp_path / "inbox"
    shutil.copytree(mock_ct, inbox)
    rules = write_rules(tmp_path / "rules.json", [{"name": "seen", "run": mark("seen", marks)}])
    proc = kaapcli("watch", inbox, "-o", tmp_path / "store", "--rules", rules, "--journal", journal, "--queue",
                   redis_server.url, "--once", "--stable", "0", "--series-timeout", "0", "--interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert Counter(r.status for r in latest(journal)) == {"queued": 2}
    worker = workers("w1", "--burst", wait=False)
    assert worker.proc.wait(60) == 0, worker.log.read_text()
    assert sorted(marks_of(marks)) == sorted(f"seen {d.name}" for d in series_dirs(mock_ct))
    series = {r.kwargs["series_dir"] for r in latest(journal)}
    assert all(Path(d).is_relative_to(tmp_path / "store") for d in series)  # the runs read the store


def test_the_rq_dashboard_shows_kaapcli_jobs_readably(redis_server: RedisServer, mock_ct: Path,
                                                      tmp_path: Path) -> None:
    import requests

    rules = write_rules(tmp_path / "rules.json", [{"name": "seg-to-nifti", "run": ["true"]}])
    proc = kaapcli("trigger", "--rules", rules, mock_ct, "--journal", tmp_path / "j.jsonl", "--queue",
                   redis_server.url)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).with_name("rq-dashboard")), "--redis-url",
                                  redis_server.url, "--bind", "127.0.0.1", "--port", str(port), "--json"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return requests.get(f"{base}/0/data/queues.json", timeout=2).ok
            except requests.RequestException:
                return False

        assert wait_for(up, 30)
        jobs = requests.get(f"{base}/0/data/jobs/default/queued/20/asc/1.json", timeout=10).json()["jobs"]
        page = requests.get(f"{base}/0/view/jobs/default/queued/20/asc/1", timeout=10)
    finally:
        dashboard.terminate()
        dashboard.wait(10)
    host = socket.gethostname()
    assert sorted(j["description"] for j in jobs) == sorted(
        f"rule seg-to-nifti, series {d.name}, node KAAPCLI@{host}" for d in series_dirs(mock_ct))
    assert page.status_code == 200


def test_a_worker_refuses_a_job_that_is_not_a_kaapcli_run(redis_server: RedisServer, workers: Any,
                                                          tmp_path: Path) -> None:
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    pwned = tmp_path / "PWNED"
    job = Queue("default", connection=redis_server.client(), serializer=JSONSerializer).enqueue(
        "os.system", f"touch {pwned}")
    worker = workers("w1", "--burst", wait=False)
    assert worker.proc.wait(60) == 0, worker.log.read_text()
    job = Job.fetch(job.id, connection=redis_server.client(), serializer=JSONSerializer)
    assert job.get_status() == "failed" and "refused" in job.latest_result().exc_string
    assert not pwned.exists()


def test_stage_ships_series_through_s3_to_a_worker_without_the_files(
        redis_server: RedisServer, workers: Any, endpoint: str, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    from minio import Minio

    env = {"KAAPCLI_S3_ENDPOINT": endpoint, "KAAPCLI_S3_ACCESS_KEY": "testing",
           "KAAPCLI_S3_SECRET_KEY": "not-a-real-secret-1234"}
    data, out = tmp_path / "node" / "data", tmp_path / "node" / "out"
    shutil.copytree(mock_ct, data)
    out.mkdir()
    rules = write_rules(tmp_path / "rules.json", [{"name": "count", "run": [
        "sh", "-c", 'ls "$1" | wc -l > "$2/$3.count"', "sh", "{series_dir}", "{out}", "{series_uid}"]}])
    proc = kaapcli("trigger", "--rules", rules, data, "-o", out, "--journal", tmp_path / "j.jsonl", "--queue",
                   redis_server.url, "--stage", "s3://stage/node1", env=env)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(data)  # the worker has no such file system: it must read the series from S3
    os.environ.update(env)
    try:
        worker = workers("w1", "--burst", wait=False)
        assert worker.proc.wait(60) == 0, worker.log.read_text()
    finally:
        for key in env:
            os.environ.pop(key)
    synced = kaapcli("runs", "--journal", tmp_path / "j.jsonl", "--queue", redis_server.url)
    runs = [json.loads(line) for line in synced.stdout.splitlines()]
    assert [r["status"] for r in runs] == ["ok", "ok"], synced.stderr
    client = Minio(endpoint.split("://")[1], access_key="testing", secret_key=env["KAAPCLI_S3_SECRET_KEY"],
                   secure=False, region="us-east-1")
    names = {o.object_name for o in client.list_objects("stage", prefix="node1/", recursive=True)}  # (moto: shared)
    for series in series_dirs(mock_ct):
        key = f"node1/out/{series.name}.count"
        assert key in names  # the output went back to the stage...
        assert client.get_object("stage", key).read().strip() == b"8"  # ...counted from the staged series
        assert not (out / f"{series.name}.count").exists()  # ...not to the enqueuing node's disk
    assert sum(n.endswith(".dcm") for n in names) == 16  # each series uploaded once
    assert not list((tmp_path / "w1" / "work").glob("*.stage"))  # the worker's copy is gone


def test_receive_stages_each_series_once_and_a_dependent_reads_its_dependencys_staged_output(
        redis_server: RedisServer, workers: Any, receiver: Any, endpoint: str, mock_ct: Path,  # noqa: F811
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from minio import Minio

    env = {"KAAPCLI_S3_ENDPOINT": endpoint, "KAAPCLI_S3_ACCESS_KEY": "testing",
           "KAAPCLI_S3_SECRET_KEY": "not-a-real-secret-1234"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the receiver's and the workers' environment
    journal = tmp_path / "rx.jsonl"
    rules = write_rules(tmp_path / "rules.json", [  # {out}: the study directory in the receiver's store
        {"name": "count", "run": ["sh", "-c", 'ls "$1" | wc -l > "$2/$3.count"', "sh", "{series_dir}", "{out}",
                                  "{series_uid}"]},
        {"name": "check", "depends_on": "count", "run": [
            "sh", "-c", 'read n < "$1/$2.count" && echo "checked $n" > "$1/$2.checked"', "sh", "{out}",
            "{series_uid}"]}])
    workers("w1")
    workers("w2")
    rx = receiver("--series-timeout", "0.5", "--rules", str(rules), "--journal", str(journal), "--queue",
                  redis_server.url, "--stage", "s3://stage/rx1")
    storescu(rx.port, mock_ct)
    assert wait_for(lambda: sum(r.status in FINAL for r in latest(journal)) == 4, 90), latest(journal)
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    assert Counter((r.rule, r.status) for r in latest(journal)) == {("count", "ok"): 2, ("check", "ok"): 2}
    client = Minio(endpoint.split("://")[1], access_key="testing", secret_key=env["KAAPCLI_S3_SECRET_KEY"],
                   secure=False, region="us-east-1")
    names = {o.object_name for o in client.list_objects("stage", prefix="rx1/", recursive=True)}  # (moto: shared)
    assert sum(n.endswith(".dcm") for n in names) == 16  # each received series uploaded once
    for series in series_dirs(rx.out):
        study = series.parent.relative_to(rx.out).as_posix()
        # the dependent ran on a worker's private copy, from the count its dependency uploaded
        assert client.get_object("stage", f"rx1/{study}/{series.name}.checked").read() == b"checked 8\n"
        assert not (series.parent / f"{series.name}.count").exists()  # outputs went to the stage, not the store


def test_cancel_stops_a_run_on_its_worker_and_a_backoff_retry_runs_later(
        redis_server: RedisServer, workers: Any, mock_ct: Path, tmp_path: Path) -> None:
    from kaapcli.core.queue import Dispatcher, QueueSettings

    marks, flag, journal = tmp_path / "marks.txt", tmp_path / "failed-once", tmp_path / "j.jsonl"
    rules = write_rules(tmp_path / "rules.json", [
        {"name": "slow", "run": ["sh", "-c", 'echo start >> "$1"; exec sleep 60', "sh", str(marks)]},
        {"name": "after-slow", "depends_on": "slow", "run": ["touch", str(tmp_path / "after")]},
        {"name": "flaky", "retries": {"max": 1, "interval": 1},
         "run": ["sh", "-c", 'test -f "$1" || { touch "$1"; exit 5; }', "sh", str(flag)]}])
    proc = kaapcli("trigger", "--rules", rules, series_dirs(mock_ct)[0], "--journal", journal, "--queue",
                   redis_server.url)
    assert proc.returncode == 0, proc.stderr
    workers("w1", "--jobs", "2")
    assert wait_for(lambda: marks_of(marks), 30)
    slow = next(r.id for r in latest(journal) if r.rule == "slow")
    cancelled = kaapcli("runs", "cancel", slow, "--journal", journal, "--queue", redis_server.url)
    assert cancelled.returncode == 0, cancelled.stderr
    follower = Dispatcher(QueueSettings(redis_server.url), Journal(journal))
    assert wait_for(lambda: not follower.sync() and not follower.open, 30), follower.open
    runs = {r.rule: r for r in latest(journal)}
    assert runs["slow"].status == "cancelled" and "stopped on request" in runs["slow"].message
    assert runs["after-slow"].status == "skipped" and not (tmp_path / "after").exists()
    assert (runs["flaky"].status, runs["flaky"].attempt) == ("ok", 2)  # retried after its 1 s back-off


def test_without_redis_a_trigger_keeps_its_runs_pending_until_sync(mock_ct: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # not started yet
    rules = write_rules(tmp_path / "rules.json", [{"name": "a", "run": ["true"]},
                                                  {"name": "b", "depends_on": "a", "run": ["true"]}])
    journal = tmp_path / "j.jsonl"
    proc = kaapcli("trigger", "--rules", rules, series_dirs(mock_ct)[0], "--journal", journal, "--queue", server.url)
    assert proc.returncode == 75, proc.stderr  # temporary failure: nothing lost, nothing ran
    assert "2 runs pending" in proc.stderr and "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert [r.status for r in latest(journal)] == ["pending", "pending"]
    worker = kaapcli("worker", "--queue", server.url, "--burst")
    assert worker.returncode == 69 and "unreachable" in worker.stderr and "Traceback" not in worker.stderr
    server.start()
    try:
        synced = kaapcli("runs", "sync", "--journal", journal, "--queue", server.url)
        assert synced.returncode == 0, synced.stderr
        assert [r.status for r in latest(journal)] == ["queued", "queued"]
        assert server.client().llen("rq:queue:default") == 1  # b waits for a (deferred)
    finally:
        server.stop()


# --------------------------------------------------------------------------- the pieces, without servers

def test_retries_key_forms_and_errors(tmp_path: Path) -> None:
    from kaapcli.core.rules import load_rules, queue_of

    ok = load_rules(write_rules(tmp_path / "ok.json", [
        {"name": "a", "run": ["true"], "retries": 2},
        {"name": "b", "run": ["true"], "retries": {"max": 3, "interval": ["5s", "1m"]}, "priority": 2},
        {"name": "c", "run": ["true"], "priority": -1},
        {"name": "d", "run": ["true"], "priority": "gpu"}]))
    assert [(r.retries, r.retry_intervals) for r in ok] == [(2, ()), (3, (5.0, 60.0)), (0, ()), (0, ())]
    assert [queue_of(r) for r in ok] == ["default", "high", "low", "gpu"]
    for bad in (-1, "x", True, {"max": 1, "backoff": 2}, {"max": 1, "interval": "soon"}):
        proc = kaapcli("rules", "check", write_rules(tmp_path / "bad.json", [{"name": "r", "run": ["true"],
                                                                                  "retries": bad}]))
        assert proc.returncode == 78 and "rule 1 ('r')" in proc.stderr and "retries" in proc.stderr, (bad, proc.stderr)


def test_local_runs_retry_after_a_failure_too(mock_ct: Path, tmp_path: Path) -> None:
    flag, journal = tmp_path / "failed-once", tmp_path / "j.jsonl"
    rules = write_rules(tmp_path / "rules.json", [{"name": "flaky", "retries": {"max": 1, "interval": 0}, "run": [
        "sh", "-c", 'test -f "$1" || { touch "$1"; echo first; exit 5; }; echo second', "sh", str(flag)]}])
    proc = kaapcli("trigger", "--rules", rules, series_dirs(mock_ct)[0], "--journal", journal)
    assert proc.returncode == 0, proc.stderr
    (run,) = latest(journal)
    assert (run.status, run.attempt, run.host) == ("ok", 2, socket.gethostname())
    assert Path(run.log).read_text() == "first\n\n--- attempt 2 ---\nsecond\n"  # both attempts' output kept


def test_remap_moves_directories_only_where_a_path_starts() -> None:
    from kaapcli.core.queue import remap
    from kaapcli.core.runs import Job

    job = Job(id="x", rule="r", series_uid="1", argv=["/data/in/s/1.dcm", "--out=/data/in", "/data/inx", "/o/data/in",
                                                       "/data/in"],
              env={"KAAPCLI_SERIES_DIR": "/data/in/s"}, kwargs={"headers": {"dcmpath": "/data/in/s"}, "n": 3},
              layout={"run_dir": "/j/work/x", "batch": {"1": ["/data/in/s/1.dcm"]}})
    moved = remap(job, {"/data/in": "/w/stage", "/j/work/x": "/w/work/x"})
    assert moved.argv == ["/w/stage/s/1.dcm", "--out=/w/stage", "/data/inx", "/o/data/in", "/w/stage"]
    assert moved.env == {"KAAPCLI_SERIES_DIR": "/w/stage/s"} and moved.kwargs["headers"]["dcmpath"] == "/w/stage/s"
    assert moved.layout == {"run_dir": "/w/work/x", "batch": {"1": ["/w/stage/s/1.dcm"]}} and moved.kwargs["n"] == 3


def test_queue_settings_from_a_url_or_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kaapcli.core.config import load_config
    from kaapcli.core.queue import resolve_queue
    from kaapcli.core.rules import Context, describe
    from kaapcli.exitcodes import ConfigError

    (tmp_path / "k.toml").write_text('[queue.cluster]\nurl = "redis://redis.example.org:6380/2"\n'
                                     'password_env = "TEST_REDIS_PASSWORD"\n')
    monkeypatch.setenv("TEST_REDIS_PASSWORD", "s3cret")
    settings = resolve_queue("cluster", load_config(tmp_path / "k.toml"))
    assert settings is not None and settings.password == "s3cret" and "s3cret" not in repr(settings)
    assert settings.label == "redis://redis.example.org:6380/2"
    assert resolve_queue("redis://:pw@h:1/0").label == "redis://h:1/0"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="no \\[queue.other\\] profile"):
        resolve_queue("other", load_config(tmp_path / "k.toml"))
    ctx = Context(Journal(tmp_path / "j.jsonl"), aet="KAAPCLI", host="rx01")
    text = describe("seg", '<img src=x onerror="alert(1)">', ctx)  # a header value, shown by a web dashboard
    assert text.startswith("rule seg, series ") and text.endswith(", node KAAPCLI@rx01")
    assert not set("<>\"'=") & set(text.split(", ")[1])
