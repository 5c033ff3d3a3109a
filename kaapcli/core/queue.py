"""Rule runs on an existing job queue: RQ workers on Redis (dcm-processor's engine), at least once.

A rule run is the :class:`~kaapcli.core.runs.Job` that a local run executes; here it travels as the one
argument of an RQ job whose function is :func:`perform`, and a worker runs it with the same
:func:`~kaapcli.core.runs.run_job`.  The enqueuing side (``receive``, ``watch``, ``trigger``, ``runs``) is a
:class:`Dispatcher`; the other side is ``kaapcli worker`` (:func:`serve`).

1. ``submit``: each job of a series is journalled and put on its queue (``high``/``default``/``low`` by
   priority, or dcm-processor's queue name) with the RQ job id = the run id, its dependencies as RQ
   dependencies (that also fire when a dependency failed: the job itself then records ``skipped``), its
   timeout and its retries (RQ's ``Retry``).  Redis unreachable: the run is journalled ``pending`` and
   enqueued when Redis is back.  With ``--stage s3://bucket/prefix`` the directories a run reads are
   uploaded once, and workers download them.
2. ``perform`` (on a worker): checks its dependencies' results, stages its inputs in, runs the job,
   publishes its record (``kaapcli:run:<id>``: running with pid and host, then finished) and uploads
   what it wrote; a run that did not succeed raises, so RQ retries it or marks it failed.
3. A worker heartbeats every job it runs; a job whose heartbeat expired (worker killed, machine gone) is
   found by any worker's or dispatcher's sweep and retried (when it has retries left) or failed.
4. ``sync`` (the dispatcher, every second while a receiver runs, and ``kaapcli runs --queue``): enqueues
   pending runs, copies what workers published into the journal, records lost and abandoned runs as
   failed with the reason, and enqueues again a run that Redis lost (restarted without persistence).

Semantics: at least once.  A run is never dropped (it is in the journal from the start) and never
recorded ok unless a worker finished it with exit 0; it may run more than once (a lost worker, a
Redis that lost its data).  Jobs are JSON (RQ's JSONSerializer), never pickle, and a kaapcli worker
runs no job function other than :func:`perform`.  This module imports ``rq`` and ``redis`` only in the
functions that talk to Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kaapcli.core.runs import FAILED, FINAL, Job, Journal, RunRecord, now, resolve_dependencies, run_job
from kaapcli.exitcodes import ConfigError, UnavailableError

PERFORM = "kaapcli.core.queue.perform"  # the one job function a kaapcli worker runs
QUEUES = ("high", "default", "low")  # what workers listen to, in this order
RESULT_TTL = 7 * 86400  # seconds Redis keeps a finished run's record: a dispatcher down that long re-runs it
TIMEOUT_GRACE = 30  # RQ's own timeout comes this long after the rule's, which run_job enforces (killing the group)
DEFAULT_HEARTBEAT = 30.0  # seconds without a heartbeat before a started job counts as abandoned
RUN_KEY = "kaapcli:run:{}"  # a list: every state a worker published for a run (running, finished), in order
CLAIM_KEY = "kaapcli:claim:{}"  # set when a run is put on the queue: two dispatchers never enqueue it twice
STATE = ("status", "exit_code", "start", "end", "pid", "host", "worker", "attempt", "log", "message", "result",
         "added_params")  # what a worker publishes about a run
_JOB_FIELDS = {f.name for f in fields(Job)}


@dataclass(frozen=True)
class QueueSettings:
    """Where the queue is: a redis:// (rediss://, unix://) URL, and a password kept out of messages."""

    url: str
    password: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The URL without credentials: what the journal and messages show."""
        parts = urlsplit(self.url)
        query = "&".join(q for q in parts.query.split("&") if q and not q.lower().startswith("password="))
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + (f"?{query}" if query else "")

    def connect(self, timeout: float = 3.0) -> Any:
        from redis import Redis

        try:
            return Redis.from_url(self.url, password=self.password or None, socket_connect_timeout=timeout,
                                  socket_timeout=timeout, health_check_interval=30)
        except ValueError as exc:
            raise ConfigError(f"queue {self.label}: {exc}",
                              hint="a queue is redis://[:PASSWORD@]HOST:PORT/DB (or a [queue.NAME] profile)") from None


def resolve_queue(value: str | None, config: Any = None) -> QueueSettings | None:
    """``--queue`` / ``KAAPCLI_QUEUE``: a Redis URL, or the name of a ``[queue.NAME]`` profile (``url``, and
    ``password`` or ``password_env``)."""
    if not value:
        return None
    if re.match(r"(rediss?|unix)://", value):
        return _checked(QueueSettings(value))
    profile = config.profile("queue", value) if config is not None else None
    if profile is None:
        raise ConfigError(f"--queue {value}: not a redis:// URL and no [queue.{value}] profile in the config file",
                          hint="give redis://HOST:6379/0, or add [queue.NAME] with url = \"redis://...\"")
    if not str(profile.get("url", "")).startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"[queue.{value}]: 'url' must be a redis://HOST:PORT/DB address")
    return _checked(QueueSettings(str(profile["url"]), profile.get("password")))


def _checked(settings: QueueSettings) -> QueueSettings:
    settings.connect()  # parses the URL (a bad one is a ConfigError now, not at the first series); no I/O
    return settings


def describe_redis_error(exc: BaseException, settings: QueueSettings) -> str:
    from redis.exceptions import AuthenticationError, ResponseError

    if isinstance(exc, AuthenticationError) or (isinstance(exc, ResponseError) and "AUTH" in str(exc).upper()):
        return f"Redis {settings.label} refused the credentials"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"Redis {settings.label} unreachable: {text}"


def rq_timeout(job: Job) -> int:
    """RQ's job timeout: after the rule's own (run_job kills the process group first); -1: none."""
    return int(job.timeout + TIMEOUT_GRACE) if job.timeout else -1


def _serializer() -> Any:
    from rq.serializers import JSONSerializer

    return JSONSerializer


# --------------------------------------------------------------------------- staging through S3

@dataclass
class Stage:
    """``--stage s3://bucket/prefix``: the directories under ``root`` that runs read are uploaded there once;
    workers download them to a private copy and upload what the run wrote."""

    url: str
    root: str
    settings: Any  # kaapcli.core.s3.Settings of the enqueuing side
    staged: set[str] = field(default_factory=set)

    def spec(self) -> dict[str, str]:
        return {"url": self.url, "root": self.root}

    def upload(self, job: Job) -> None:
        from kaapcli.core import s3

        store = s3.Store(self.settings)
        bucket, prefix = s3.parse_url(self.url)
        for directory in job.inputs:
            rel = _relative(directory, self.root)
            if rel is None or directory in self.staged or not Path(directory).is_dir():
                continue
            failed = [t for t in store.put(s3.plan_put([Path(directory)], s3.join(prefix, rel)), bucket)
                      if t.status == "failed"]
            if failed:
                raise UnavailableError(f"--stage {self.url}: {failed[0].message}")
            self.staged.add(directory)


def _relative(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` (POSIX), or None when it is not under it."""
    try:
        rel = Path(path).relative_to(root).as_posix()
    except ValueError:
        return None
    return "" if rel == "." else rel


def stage_settings(profile: dict[str, Any] | None) -> Any:
    """The S3 settings of --stage (and of a worker): ``KAAPCLI_S3_*`` over an ``[s3.NAME]`` profile."""
    from kaapcli.core import s3

    return s3.resolve_settings(os.environ.get("KAAPCLI_S3_ENDPOINT"), os.environ.get("KAAPCLI_S3_ACCESS_KEY"),
                               os.environ.get("KAAPCLI_S3_SECRET_KEY"), profile)


def parse_stage(url: str) -> str:
    from kaapcli.core import s3

    bucket, _ = s3.parse_url(url)
    if not bucket:
        from kaapcli.exitcodes import UsageError

        raise UsageError(f"--stage {url}: expected s3://bucket/prefix")
    return url.rstrip("/")


# --------------------------------------------------------------------------- the enqueuing side

class Dispatcher:
    """Hands jobs to the queue and keeps the journal up to date with what workers report.

    Thread-safe (receive's rule pool submits while the tracker thread syncs).  Every state is in the journal,
    so a dispatcher that restarts picks up the runs it left pending, queued or running.
    """

    def __init__(self, settings: QueueSettings, journal: Journal, stage: Stage | None = None,
                 log: Callable[[str], None] | None = None, *, follow: bool = True):
        self.settings = settings
        self.journal = journal
        self.stage = stage
        self.log = log or (lambda message: None)
        self.lock = threading.RLock()
        self._conn: Any = None
        self._down = ""  # why Redis is unreachable, while it is
        self._retry_at = 0.0
        self.open: dict[str, RunRecord] = {}
        self.done: dict[str, RunRecord] = {}  # recently finished runs (their dependents look them up)
        self.seen: dict[str, int] = {}  # how many published states of a run are journalled
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if follow:
            self.reload()

    # ---- connection, with a short back-off while Redis is down
    def connection(self) -> Any:
        if self._down and time.monotonic() < self._retry_at:
            raise UnavailableError(self._down)
        if self._conn is None:
            self._conn = self.settings.connect()
        try:
            self._conn.ping()
        except Exception as exc:  # noqa: BLE001 - redis raises many kinds; all mean "not now"
            self._mark_down(exc)
            raise UnavailableError(self._down) from exc
        if self._down:
            self.log(f"{self.settings.label} is reachable again: enqueuing pending runs")
            self._down = ""
        return self._conn

    def _mark_down(self, exc: BaseException) -> None:
        reason = describe_redis_error(exc, self.settings)
        if not self._down:
            self.log(f"{reason}: runs are kept as pending and enqueued when it is back")
        self._down = reason
        self._retry_at = time.monotonic() + 1.0

    def reload(self) -> None:
        """Take up the runs of this queue that the journal has not seen finish."""
        with self.lock:
            for record in self.journal.records():
                if record.via == self.settings.label and record.status not in FINAL:
                    self.open[record.id] = record

    # ---- submitting
    def submit(self, jobs: list[Job], decided: Iterable[RunRecord] = ()) -> list[RunRecord]:
        """Journal and enqueue jobs planned together (dependency order); ``decided`` are records settled while
        planning (skipped, a failed callback).  Returns the records journalled."""
        out = []
        with self.lock:
            known: dict[str, RunRecord] = {}
            for record in decided:
                self.journal.append(record)
                known[record.id] = record
                out.append(record)
            for job in jobs:
                if self.stage is not None:
                    job.stage = self.stage.spec()
                record = self._enqueue(job, known)
                known[job.id] = record
                out.append(record)
        return out

    def _enqueue(self, job: Job, known: dict[str, RunRecord], message: str = "") -> RunRecord:
        """Put one job on its queue (or journal it pending).  Dependencies that are over are settled here, as
        run_batch does; only those still open become RQ dependencies."""
        deps = {d: known.get(d) or self._record(d) for d in job.depends_on}
        over: list[RunRecord | None] = [r for r in deps.values() if r is None or r.status in FINAL]
        waiting = [d for d, r in deps.items() if r is not None and r.status not in FINAL]
        if over:
            skipped = resolve_dependencies(job, over)
            if skipped is not None:
                skipped.via = self.settings.label
                self.journal.append(skipped)
                self._close(skipped)
                return skipped
        record = RunRecord.of(job, start=now(), status="queued", via=self.settings.label, message=message)
        try:
            conn = self.connection()
            if self.stage is not None and job.stage:
                self.stage.upload(job)
            if conn.set(CLAIM_KEY.format(job.id), self.settings.label, nx=True, ex=RESULT_TTL):
                try:
                    self._rq_enqueue(conn, job, waiting)
                except BaseException:
                    conn.delete(CLAIM_KEY.format(job.id))
                    raise
        except UnavailableError as exc:  # Redis (or the stage's store) unreachable: keep it, enqueue it later
            record.status, record.message = "pending", f"{exc.message}: enqueued when it is back"
        except Exception as exc:  # noqa: BLE001 - redis raises many kinds; all mean "not now"
            if not _is_redis_error(exc):
                raise
            self._mark_down(exc)
            record.status, record.message = "pending", f"{self._down}: enqueued when it is back"
        previous = self.open.get(job.id)
        if not (record.status == "pending" and previous is not None and previous.status == "pending"):
            self.journal.append(record)  # (a run still pending is not journalled again at every attempt)
        self.open[job.id] = record
        return record

    def _rq_enqueue(self, conn: Any, job: Job, waiting: list[str]) -> None:
        from rq import Queue, Retry
        from rq.job import Dependency

        payload = {k: v for k, v in asdict(job).items() if k in _JOB_FIELDS}
        payload["depends_on"] = waiting  # those over were settled in added_params already
        retry = None
        if job.retries:
            intervals = [int(round(v)) for v in job.retry_intervals] or [0]
            retry = Retry(max=job.retries, interval=intervals)
        queue = Queue(job.queue or "default", connection=conn, serializer=_serializer())
        queue.enqueue_call(PERFORM, args=[payload], job_id=job.id, timeout=rq_timeout(job), result_ttl=RESULT_TTL,
                           failure_ttl=RESULT_TTL, description=job.description or f"{job.rule} {job.series_uid}",
                           depends_on=Dependency(jobs=waiting, allow_failure=True) if waiting else None,
                           retry=retry)

    # ---- following the queue
    def sync(self) -> list[RunRecord]:
        """One pass: enqueue pending runs, journal what workers published, settle lost and abandoned runs."""
        with self.lock:
            if not self.open:
                return []
            try:
                conn = self.connection()
            except UnavailableError:
                return []
            try:
                sweep(conn, {r.queue or "default" for r in self.open.values()})
                return self._follow(conn)
            except Exception as exc:  # noqa: BLE001 - Redis went away mid-pass: the next pass resumes
                if not _is_redis_error(exc):
                    raise
                self._mark_down(exc)
                return []

    def _follow(self, conn: Any) -> list[RunRecord]:
        from rq.job import Job as RQJob

        appended: list[RunRecord] = []
        for pending in [r for r in self.open.values() if r.status == "pending"]:
            appended.append(self._enqueue(_job_of(pending), {}))
        ids = [i for i, r in self.open.items() if r.status != "pending"]
        if not ids:
            return appended
        with conn.pipeline(transaction=True) as pipe:  # one snapshot: a state is published before RQ's status moves
            for run_id in ids:
                pipe.lrange(RUN_KEY.format(run_id), self.seen.get(run_id, 0), -1)
                pipe.hget(RQJob.key_for(run_id), "status")
                pipe.exists(CLAIM_KEY.format(run_id))
            answers = pipe.execute()
        for n, run_id in enumerate(ids):
            published, rq_status, claimed = answers[3 * n:3 * n + 3]
            status = rq_status.decode() if isinstance(rq_status, bytes) else rq_status
            self.seen[run_id] = self.seen.get(run_id, 0) + len(published)
            for state in map(json.loads, published):
                if run_id in self.open:
                    self._journal(self._published_state(self.open[run_id], state), appended)
            current = self.open.get(run_id)
            if current is None:
                continue
            if status is None and not claimed:  # Redis lost it (restarted without its data): at least once
                self.seen.pop(run_id, None)
                appended.append(self._enqueue(
                    _job_of(current), {}, "enqueued again: the queue had lost it (Redis restarted without its data?)"))
            elif status == "deferred":
                self._settle_deferred(conn, current, appended)
            else:
                self._journal(self._settled(conn, current, status), appended)
        return appended

    def _journal(self, record: RunRecord | None, appended: list[RunRecord]) -> None:
        if record is None:
            return
        self.journal.append(record)
        appended.append(record)
        if record.status in FINAL:
            self._close(record)
        else:
            self.open[record.id] = record

    def _published_state(self, current: RunRecord, state: dict[str, Any]) -> RunRecord | None:
        """The record to journal for a state a worker published: a failed attempt that RQ retries is ``queued``
        (the run is not over), and a new attempt after one that never finished says so first."""
        seen = replace(current, **{k: v for k, v in state.items() if k in STATE})
        if seen.attempt < current.attempt or (seen.attempt, seen.status) == (current.attempt, current.status):
            return None  # journalled already (a dispatcher that restarted reads the states from the start)
        if seen.status in ("failed", "timeout") and seen.attempt <= current.retries:
            return replace(seen, status="queued", pid=None, end="",
                           message=f"retrying after attempt {seen.attempt}: {seen.status}: {seen.message}")
        if seen.attempt > current.attempt and current.status == "running":
            self._journal(replace(current, status="queued", pid=None, message=f"retrying after attempt "
                                  f"{current.attempt}: {self._lost(current)}"), [])
        return seen

    def _settled(self, conn: Any, current: RunRecord, status: str | None) -> RunRecord | None:
        """What RQ's status of the job says that its worker could not publish (the worker was killed, the job was
        stopped or deleted); None when it says nothing new."""
        if status is None:
            return replace(current, status="failed", end=now(), message="the job was deleted from the queue")
        if status == "finished":  # the worker could not publish its last state: RQ's result has it
            result = self._result(conn, current)
            if result.get("status") in FINAL:
                return replace(current, **{k: v for k, v in result.items() if k in STATE})
            return replace(current, status="failed", end=now(), message="finished without a result")
        if status == "failed":
            return replace(current, status="failed", end=now(), pid=None, message=self._failure(conn, current))
        if status in ("stopped", "canceled"):
            return replace(current, status="cancelled", end=now(), message=f"{status} on the queue")
        if status in ("queued", "scheduled") and current.status == "running":
            return replace(current, status="queued", pid=None,
                           message=f"retrying after attempt {current.attempt}: {self._lost(current)}")
        return None

    def _result(self, conn: Any, record: RunRecord) -> dict[str, Any]:
        from rq.job import Job as RQJob

        with contextlib.suppress(Exception):
            result = RQJob.fetch(record.id, connection=conn, serializer=_serializer()).latest_result()
            if result is not None and isinstance(result.return_value, dict):
                return result.return_value
        return {}

    def _lost(self, record: RunRecord) -> str:
        where = " ".join(x for x in (record.worker and f"worker {record.worker}", record.host and
                                     f"on {record.host}") if x)
        return f"lost: no heartbeat from {where or 'its worker'} (the worker was killed or its machine is gone)"

    def _failure(self, conn: Any, record: RunRecord) -> str:
        """Why RQ failed a run its worker could not report on (abandoned, killed)."""
        from rq.job import Job as RQJob

        text = ""
        with contextlib.suppress(Exception):
            result = RQJob.fetch(record.id, connection=conn, serializer=_serializer()).latest_result()
            text = (result.exc_string or "") if result is not None else ""
        if "AbandonedJobError" in text or not text:
            return self._lost(record)
        return f"failed on the worker: {text.strip().splitlines()[-1][:300]}"

    def _record(self, run_id: str) -> RunRecord | None:
        return self.open.get(run_id) or self.done.get(run_id) or self.journal.find(run_id)

    def _close(self, record: RunRecord) -> None:
        self.open.pop(record.id, None)
        self.done[record.id] = record
        if len(self.done) > 50000:
            del self.done[next(iter(self.done))]

    def _settle_deferred(self, conn: Any, record: RunRecord, appended: list[RunRecord]) -> None:
        """RQ releases a dependent when its dependencies finished or failed, never when one was cancelled or
        skipped: such a dependent is skipped here (and taken off the queue), as run_batch would."""
        from rq.job import Job as RQJob

        over = [d for d in map(self._record, record.depends_on) if d is not None and d.status in ("cancelled",
                                                                                                 "skipped")]
        if not over:
            return
        skipped = replace(record, status="skipped", start=now(), end=now(),
                          message=f"dependency did not succeed: {', '.join(d.rule for d in over)}")
        with contextlib.suppress(Exception):
            RQJob.fetch(record.id, connection=conn, serializer=_serializer()).cancel()
        self.journal.append(skipped)
        appended.append(skipped)
        self._close(skipped)

    def wait(self, ids: Iterable[str], timeout: float | None = None, interval: float = 0.5) -> list[RunRecord]:
        """Sync until the runs are over (or ``timeout``); their latest records."""
        wanted = list(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(i in self.open for i in wanted):
            if deadline is not None and time.monotonic() > deadline:
                break
            self.sync()
            if any(i in self.open for i in wanted):
                time.sleep(interval)
        latest = {r.id: r for r in self.journal.records() if r.id in set(wanted)}
        return [latest[i] for i in wanted if i in latest]

    # ---- background
    def start(self, interval: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(Exception):
                    self.sync()

        self._thread = threading.Thread(target=loop, name="kaapcli-queue", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.sync()

    def cancel(self, record: RunRecord) -> None:
        """Stop a queued run (it never starts) or a running one (its worker kills the command)."""
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job as RQJob

        conn = self.connection()
        try:
            job = RQJob.fetch(record.id, connection=conn, serializer=_serializer())
        except NoSuchJobError:
            job = None
        if job is not None and job.get_status() == "started":
            with contextlib.suppress(InvalidJobOperation):
                send_stop_job_command(conn, record.id)
        elif job is not None and job.get_status() not in ("finished", "failed", "stopped", "canceled"):
            job.cancel(enqueue_dependents=True)
        if record.status == "pending" or job is None:
            cancelled = replace(record, status="cancelled", end=now(), message="cancelled")
            self.journal.append(cancelled)
            self._close(cancelled)


def _job_of(record: RunRecord) -> Job:
    return Job(**{k: v for k, v in asdict(record).items() if k in _JOB_FIELDS})


def _is_redis_error(exc: BaseException) -> bool:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, RedisError)


def sweep(conn: Any, queue_names: Iterable[str]) -> None:
    """Settle abandoned jobs (started, heartbeat expired): retried when they have retries left, else failed.

    Under RQ's own per-queue maintenance lock, taken for a few seconds only, so RQ's workers and every
    dispatcher never handle one abandoned job twice."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    for name in queue_names:
        queue = Queue(name, connection=conn, serializer=_serializer())
        if not conn.set(queue.registry_cleaning_key, 1, nx=True, ex=10):
            continue
        try:
            StartedJobRegistry(queue=queue).cleanup()
        finally:
            conn.delete(queue.registry_cleaning_key)


def cancel_run(settings: QueueSettings | None, journal: Journal, run_id: str) -> RunRecord:
    """``kaapcli runs cancel`` for a run handed to a queue."""
    from kaapcli.exitcodes import UsageError

    record = journal.find(run_id)
    if record is None:
        raise UsageError(f"{journal.path}: no run with id {run_id}")
    if record.status in FINAL:
        raise UsageError(f"run {run_id} ({record.rule}) is {record.status}: nothing to cancel")
    if settings is None or settings.label != record.via:
        raise UsageError(f"run {run_id} ({record.rule}) was handed to the queue {record.via}",
                         hint=f"kaapcli runs cancel {run_id} --queue {record.via}")
    Dispatcher(settings, journal).cancel(record)
    return record


# --------------------------------------------------------------------------- the worker side

@dataclass
class WorkerOptions:
    """What ``kaapcli worker`` runs with (the same in every worker process of a machine)."""

    settings: QueueSettings
    queues: tuple[str, ...] = QUEUES
    jobs: int = 1
    burst: bool = False
    heartbeat: float = DEFAULT_HEARTBEAT
    journal: Path | None = None
    name: str = ""
    s3: Any = None  # kaapcli.core.s3.Settings for staged runs
    quiet: bool = False


_OPTIONS: WorkerOptions | None = None  # set in each worker process; None under a plain `rq worker`
_RUNNING: dict[str, Any] = {}  # the run this worker process is executing: its pid, and whether it was stopped


class RunFailed(Exception):
    """Raised by :func:`perform` for a run that did not succeed, so that RQ retries or fails the job."""


def perform(run: dict[str, Any]) -> dict[str, Any]:
    """The RQ job function: run one kaapcli job on this worker (see the module docstring)."""
    from rq import get_current_job

    from kaapcli.core.rules import default_journal

    options = _OPTIONS
    journal = Journal((options.journal if options and options.journal else default_journal()).absolute())
    rq_job = get_current_job()
    conn = rq_job.connection if rq_job is not None else None
    job = Job(**{k: v for k, v in run.items() if k in _JOB_FIELDS})
    retries_left = rq_job.retries_left if rq_job is not None else None
    attempt = 1 + job.retries - retries_left if job.retries and retries_left is not None else 1
    worker = rq_job.worker_name or "" if rq_job is not None else ""

    def publish(record: RunRecord) -> None:
        record.worker, record.via = worker, ""
        if record.status == "running":
            _RUNNING.update(id=job.id, pid=record.pid)
            _guard(f"+{record.pid}")
        elif record.pid and record.status in FINAL:
            _guard(f"-{record.pid}")
        if _RUNNING.get("stopped") and record.status in FINAL:
            record.status, record.message = "cancelled", "stopped on request (kaapcli runs cancel)"
        if job.stage and record.status == "ok" and not _RUNNING.get("staged"):
            return  # final only once its outputs are uploaded
        if conn is not None:
            with contextlib.suppress(Exception):  # Redis down: the dispatcher re-runs what it cannot see finish
                with conn.pipeline() as pipe:
                    pipe.rpush(RUN_KEY.format(job.id), json.dumps({"rule": record.rule, **state_of(record)}))
                    pipe.expire(RUN_KEY.format(job.id), RESULT_TTL)
                    pipe.execute()

    _RUNNING.clear()
    deps = [_published(conn, d) for d in job.depends_on]
    skipped = resolve_dependencies(job, deps)
    if skipped is not None:
        skipped.host, skipped.attempt = socket.gethostname(), attempt
        journal.append(skipped)
        publish(skipped)
        return state_of(skipped)
    work_dir = journal.path.parent / "work"
    moves = {str(job.kwargs["run_dir"]): str(work_dir / job.id)} if job.kwargs.get("run_dir") else {}
    stage_dir = work_dir / f"{job.id}.stage"
    snapshot: dict[str, tuple[int, int]] = {}
    store = None
    try:
        if job.stage:
            store, snapshot = _stage_in(job, options, stage_dir)
            moves[job.stage["root"]] = str(stage_dir)
        job = remap(job, moves)
        record = run_job(job, journal, attempt=attempt, report=publish)
        if _RUNNING.get("stopped"):
            journal.append(record)  # (publish made it "cancelled": this worker's journal says so too)
        if store is not None and record.status == "ok":
            try:
                record.message += _stage_out(job, store, stage_dir, snapshot)
            except RunFailed as exc:
                record.status, record.message = "failed", str(exc)
            _RUNNING["staged"] = True
            journal.append(record)
            publish(record)
    finally:
        _RUNNING.clear()
        shutil.rmtree(stage_dir, ignore_errors=True)
    if record.status in FAILED:
        raise RunFailed(f"{job.rule} (series {job.series_uid}): {record.status}: {record.message}\n"
                        f"{_tail(Path(record.log))}")
    return state_of(record)  # RQ's result (the dashboard shows it; and the dispatcher, should a publish have failed)


def state_of(record: RunRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in STATE}


_GUARD: list[int] = []  # the write end of the pipe to this worker process's guard


def _start_guard() -> None:
    """A worker that is killed leaves no command behind: a small process in its own session reads the process
    groups of running commands from a pipe, and kills those still registered once the pipe closes (its worker
    died, however)."""
    read, write = os.pipe()
    if os.fork() == 0:
        os.setsid()
        os.close(write)
        groups: set[int] = set()
        buffer = b""
        while chunk := os.read(read, 4096):
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        os._exit(0)
    os.close(read)
    _GUARD[:] = [write]


def _guard(line: str) -> None:
    if _GUARD:
        with contextlib.suppress(OSError):
            os.write(_GUARD[0], f"{line}\n".encode())


def _stop_running() -> None:
    """A stop request (``kaapcli runs cancel``) or a cold shutdown: kill the running command's process group."""
    pid = _RUNNING.get("pid")
    _RUNNING["stopped"] = True
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _published(conn: Any, run_id: str) -> RunRecord | None:
    """A dependency's outcome as its worker published it."""
    if conn is None:
        return None
    data = conn.lindex(RUN_KEY.format(run_id), -1)
    if not data:
        return None
    state = json.loads(data)
    return RunRecord(id=run_id, rule=str(state.pop("rule", "")), series_uid="",
                     **{k: v for k, v in state.items() if k in STATE})


def remap(job: Job, moves: dict[str, str]) -> Job:
    """The job with directories moved (``{old: new}``) wherever a path starts in its arguments, environment,
    keywords and layout: a staged copy of the inputs, the worker's own run directory."""
    if not moves:
        return job
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(k) for k in sorted(moves, key=len, reverse=True))
                         + r")(?=/|$|[^\w.-])")

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(lambda m: moves[m[1]], value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    data = asdict(job)
    for name in ("argv", "env", "kwargs", "layout", "inputs"):
        data[name] = fix(data[name])
    return Job(**data)


def _stage_in(job: Job, options: WorkerOptions | None, stage_dir: Path) -> tuple[Any, dict[str, tuple[int, int]]]:
    from kaapcli.core import fsio, s3
    from kaapcli.exitcodes import NoInputError

    settings = options.s3 if options is not None else None
    if settings is None:
        try:
            settings = stage_settings(None)
        except ConfigError:
            raise RunFailed(f"{job.rule}: its inputs were staged to {job.stage['url']}, but this worker has no S3 "
                            f"store (give `kaapcli worker --s3 NAME`, or set KAAPCLI_S3_ENDPOINT and the keys)"
                            ) from None
    store = s3.Store(settings)
    bucket, prefix = s3.parse_url(job.stage["url"])
    for n, directory in enumerate(job.inputs):
        rel = _relative(directory, job.stage["root"])
        if rel is None:
            continue  # outside the staged tree: the worker reads it where it is (a shared file system)
        try:
            failed = [t for t in store.get(bucket, s3.join(prefix, rel), stage_dir / rel) if t.status == "failed"]
        except NoInputError:
            if n == 0:
                raise RunFailed(f"{job.rule}: staged series missing: s3://{bucket}/{s3.join(prefix, rel)}") from None
            continue  # an optional input ({out}, {study_dir}) with nothing in it yet
        if failed:
            raise RunFailed(f"{job.rule}: {failed[0].message}")
    out = _relative(str(job.kwargs.get("out", "")), job.stage["root"])
    if out is not None:
        (stage_dir / out).mkdir(parents=True, exist_ok=True)  # {out} exists where the run was planned
    snapshot = {}
    for path in fsio.walk_files(stage_dir) if stage_dir.is_dir() else []:
        st = path.stat()
        snapshot[str(path)] = (st.st_size, st.st_mtime_ns)
    return store, snapshot


def _stage_out(job: Job, store: Any, stage_dir: Path, snapshot: dict[str, tuple[int, int]]) -> str:
    """Upload what the run wrote under the staged tree (new or changed files) back to the stage."""
    from kaapcli.core import fsio, s3

    if not stage_dir.is_dir():
        return ""
    bucket, prefix = s3.parse_url(job.stage["url"])
    plan = []
    for path in fsio.walk_files(stage_dir):
        st = path.stat()
        if snapshot.get(str(path)) != (st.st_size, st.st_mtime_ns):
            plan.append((path, s3.join(prefix, path.relative_to(stage_dir).as_posix())))
    failed = [t for t in store.put(plan, bucket) if t.status == "failed"]
    if failed:
        raise RunFailed(f"{job.rule}: outputs not uploaded: {failed[0].message}")
    return f"; {len(plan)} outputs to {job.stage['url']}"


def _tail(log: Path, lines: int = 20) -> str:
    try:
        text = log.read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def serve(options: WorkerOptions, log: Callable[[str], None]) -> int:
    """``kaapcli worker``: ``options.jobs`` RQ worker processes until SIGINT/SIGTERM (or, with ``burst``, until
    the queues are empty).  A worker process that ends otherwise (Redis gone) is started again after a
    back-off.  Returns the exit code: 0, or 75 when a burst worker process failed."""
    conn = options.settings.connect()
    try:
        conn.ping()
    except Exception as exc:  # noqa: BLE001 - redis raises many kinds
        raise UnavailableError(describe_redis_error(exc, options.settings),
                               hint="check --queue and that Redis is running") from exc
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    delays: dict[int, float] = {}
    stopping = False
    failures = 0

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # a worker process
            code = 1
            try:
                code = _work(options)
            except BaseException as exc:  # noqa: BLE001 - say why and leave: the supervisor starts another
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    code = 0
                elif os.environ.get("KAAPCLI_DEBUG", "") not in ("", "0", "false", "no"):
                    import traceback

                    traceback.print_exc()
                else:
                    text = describe_redis_error(exc, options.settings) if _is_redis_error(exc) else (
                        f"{type(exc).__name__}: {exc}")
                    sys.stderr.write(f"kaapcli worker: worker process {os.getpid()} ended: {text}\n")
            finally:
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    for slot in range(options.jobs):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except KeyboardInterrupt:  # SIGINT/SIGTERM: warm shutdown; a second one is cold (RQ's convention)
            log("stopping: killing running jobs" if stopping else "stopping: running jobs finish (again: kill them)")
            stopping = True
            for child in list(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGTERM)
            continue
        if pid not in children:
            continue
        slot, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        if options.burst:
            failures += code != 0
            continue
        delay = delays[slot] = 1.0 if time.monotonic() - started > 60 else min(30.0, delays.get(slot, 0.5) * 2)
        log(f"worker process {pid} ended ({code}); starting another in {delay:g} s")
        try:
            time.sleep(delay)
        except KeyboardInterrupt:
            stopping = True
            continue
        spawn(slot)
    return 75 if failures else 0


def _work(options: WorkerOptions) -> int:
    """One RQ worker process: a SimpleWorker (the job is already isolated: run_job starts a child process)
    that heartbeats the running job, with a thread that sweeps abandoned jobs and enqueues due retries.
    Returns 0 when a burst worker emptied its queues."""
    from rq import Queue

    global _OPTIONS
    _OPTIONS = options
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # RQ installs its own handlers once it works
    _start_guard()
    conn = options.settings.connect()
    worker = _worker_class()(list(options.queues), name=f"{options.name or socket.gethostname()}.{os.getpid()}",
                             connection=conn, serializer=_serializer(),
                             worker_ttl=max(20, int(options.heartbeat) + 15),
                             job_monitoring_interval=max(1, int(options.heartbeat / 3)), maintenance_interval=60)
    worker.heartbeat_ttl = max(1, int(round(options.heartbeat)))
    worker.log_result_lifespan = False
    threading.Thread(target=_maintain, args=(options,), name="kaapcli-sweep", daemon=True).start()
    worker.work(burst=options.burst, with_scheduler=False, logging_level="WARNING" if options.quiet else "INFO",
                log_format="%(asctime)s kaapcli worker: %(message)s")
    if not options.burst:
        return 1  # a worker that stops without being asked to (Redis gone): the supervisor starts another
    try:
        return 0 if all(Queue(q, connection=conn).count == 0 for q in options.queues) else 1
    except Exception:  # noqa: BLE001 - Redis gone: not done
        return 1


def _maintain(options: WorkerOptions) -> None:
    """Every third of the heartbeat expiry: settle abandoned jobs, and enqueue retries whose back-off is over
    (RQ's scheduler, one pass at a time under its lock: no scheduler process outlives a killed worker)."""
    from rq.scheduler import RQScheduler

    conn = options.settings.connect()
    scheduler = RQScheduler(list(options.queues), connection=conn, serializer=_serializer(),
                            logging_level="WARNING")
    interval = max(0.5, options.heartbeat / 3)
    while True:
        time.sleep(interval)
        with contextlib.suppress(Exception):
            sweep(conn, options.queues)
            if scheduler.acquire_locks():
                try:
                    scheduler.enqueue_scheduled_jobs()
                finally:
                    scheduler.release_locks()


_WORKER_CLASS: Any = None


def _worker_class() -> Any:
    """RQ's SimpleWorker with a heartbeat thread per job, a configurable heartbeat expiry, a stop that kills the
    command's process group, and no job function other than :func:`perform`."""
    global _WORKER_CLASS
    if _WORKER_CLASS is not None:
        return _WORKER_CLASS
    from rq import SimpleWorker
    from rq.worker import WorkerStatus

    class KaapcliWorker(SimpleWorker):  # type: ignore[misc]
        heartbeat_ttl = int(DEFAULT_HEARTBEAT)

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return self.heartbeat_ttl

        def execute_job(self, job: Any, queue: Any) -> None:
            execution = self.prepare_execution(job)
            if job.func_name != PERFORM:
                job.ended_at = job.started_at = job.started_at or now_utc()
                self.handle_job_failure(job, queue, exc_string=f"refused: {job.func_name} is not a kaapcli rule "
                                                               f"job ({PERFORM})", execution=execution)
                self.set_state(WorkerStatus.IDLE)
                return
            stop = threading.Event()
            beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True)
            beat.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                stop.set()
                beat.join(timeout=5)
                self.set_state(WorkerStatus.IDLE)

        def unsubscribe(self) -> None:
            # RQ's unsubscribe can block for good on redis-py's pubsub thread (rq#1613): at most 5 s, in a daemon
            # thread, for the process ends right after it (os._exit) and nothing of the pubsub outlives it
            unsubscribing = threading.Thread(target=super().unsubscribe, name="kaapcli-unsubscribe", daemon=True)
            unsubscribing.start()
            unsubscribing.join(timeout=5)

        def handle_exception(self, job: Any, *exc_info: Any) -> None:
            if isinstance(exc_info[1], RunFailed):  # a rule that failed: one line, its log is in the journal
                self.log.warning("Worker %s: %s (%s)", self.name, str(exc_info[1]).splitlines()[0], job.id)
                return
            super().handle_exception(job, *exc_info)

        def _beat(self, job: Any, execution: Any, stop: threading.Event) -> None:
            while not stop.wait(self.job_monitoring_interval):
                with contextlib.suppress(Exception):
                    self.maintain_heartbeats(job, execution)

        def kill_horse(self, sig: Any = signal.SIGKILL) -> None:
            """A stop (``runs cancel``) or a cold shutdown: the job runs in this process, so stop its command."""
            _stop_running()

    _WORKER_CLASS = KaapcliWorker
    return KaapcliWorker


def now_utc() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
