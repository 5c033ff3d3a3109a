"""Jobs and the run journal: one rule run as a plain, serialisable description, and the one function that runs it.

A :class:`Job` is everything a run needs — an argv *or* a Python ``worker`` ("package.module:function"),
its environment, the ``added_params`` of its dependencies, the ids of the jobs it depends on, a timeout,
its retries, the directories it reads — and nothing else (no open files, no callables), so it can be
written to JSON and run later or elsewhere: ``kaapcli.core.queue`` puts exactly this on an RQ queue and
its workers call the same :func:`run_job`.  :func:`run_job` runs one job:

1. a cancelled job (``kaapcli runs cancel``) is not started;
2. its private directory (``{run_dir}``) and Kaapana's ``{batch_dir}`` layout are made where it runs;
3. a command runs as its own process group, stdin closed, stdout and stderr to its log file
   (created 0600); a worker runs in a child Python (``python -m kaapcli.core.runs worker JOB.json``), so a
   crashing worker never takes the receiver down;
4. a timeout kills the whole process group; a cancel does the same and is recorded as ``cancelled``; an
   interrupted caller (Ctrl-C, a queue worker shutting down) kills it too before it goes;
5. the run is appended to the journal twice (started with its pid and host, then finished).

:func:`run_batch` runs the jobs planned together (one series, one group) in order: a job whose
dependency did not succeed is ``skipped``, each job receives its dependencies' ``added_params``
(callback results and worker return values), in the environment as JSON and as a file, and a failed or
timed-out job with ``retries`` left runs again after its backoff.

The journal is JSON lines, created 0600 with its log directory 0700 (it holds PatientIDs and
``params``); appends are locked so parallel receivers and workers share it.  It never runs a shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaapcli.exitcodes import ConfigError

FAILED = ("failed", "timeout", "cancelled")  # statuses that make a series (an item) fail
FINAL = ("ok", "skipped", *FAILED)  # a run in one of these is over
DEFAULT_BACKOFF = (10.0, 60.0, 300.0)  # seconds before retry 1, 2, 3 (and every later one) of `"retries": N`
CALLBACK_TIMEOUT = 120.0  # seconds a rule's callback may take to decide
RAW_LIMIT = 1024  # characters of a raw header value exported to the environment


def new_id() -> str:
    return secrets.token_hex(6)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Job:
    """One run of one rule, as plain data (JSON-serialisable), executed by :func:`run_job`."""

    id: str
    rule: str
    series_uid: str
    batch: str = ""  # shared by the jobs planned together (one series, one group)
    argv: list[str] = field(default_factory=list)  # a command, or ...
    worker: str = ""  # ... a Python function "package.module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)  # keywords of the worker (headers, params, ...)
    env: dict[str, str] = field(default_factory=dict)  # params and placeholders (KAAPCLI_*)
    added_params: dict[str, Any] = field(default_factory=dict)  # from callbacks and dependencies
    depends_on: list[str] = field(default_factory=list)  # job ids of the same batch
    timeout: float | None = None
    python_path: list[str] = field(default_factory=list)  # where worker modules are imported from
    queue: str = ""  # the RQ queue (high/default/low by priority, or dcm-processor's queue name)
    retry_of: str = ""
    retries: int = 0  # runs again this many times after a failure (or a lost queue worker)
    retry_intervals: list[float] = field(default_factory=list)  # backoff before each retry (the last repeats)
    layout: dict[str, Any] = field(default_factory=dict)  # run_dir to make; Kaapana batch: {"batch": {...}}
    inputs: list[str] = field(default_factory=list)  # directories the run reads (what --stage ships)
    stage: dict[str, str] = field(default_factory=dict)  # {"url": "s3://b/p", "root": DIR}: inputs come from S3
    description: str = ""  # one readable line: rule, series, node (the queue dashboard shows it)


@dataclass
class RunRecord(Job):
    start: str = ""
    end: str = ""
    status: str = "queued"  # pending | queued | running | ok | failed | timeout | skipped | cancelled
    exit_code: int | None = None
    log: str = ""
    message: str = ""
    pid: int | None = None
    result: dict[str, Any] = field(default_factory=dict)  # what a worker returned (for its dependents)
    host: str = ""  # the machine that ran it
    worker: str = ""  # the queue worker that ran it
    attempt: int = 1
    via: str = ""  # the queue it was handed to (redis://host:port/db), "" for a local run

    @classmethod
    def of(cls, job: Job, **state: Any) -> RunRecord:
        return cls(**asdict(job), **state)


_RECORD_FIELDS = {f.name for f in fields(RunRecord)}


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _private_open(path: Path, mode: str) -> Any:
    """Open a file that is created 0600 whatever the umask (journal, logs: they hold PatientIDs)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    return os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")


class Journal:
    """An append-only JSON-lines file of runs, with ``logs/`` and ``cancel/`` beside it."""

    def __init__(self, path: Path):
        self.path = path
        self.logs = path.parent / "logs"
        self.cancelled = path.parent / "cancel"

    def append(self, record: RunRecord) -> None:
        _private_dir(self.path.parent)
        line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
        with _private_open(self.path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line)

    def records(self) -> list[RunRecord]:
        """The latest record of each run id, in order of first appearance."""
        latest: dict[str, RunRecord] = {}
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    latest[data["id"]] = RunRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"{self.path}:{n}: not a run record") from None
        return list(latest.values())

    def find(self, run_id: str) -> RunRecord | None:
        return next((r for r in self.records() if r.id == run_id), None)

    def is_cancelled(self, run_id: str) -> bool:
        return (self.cancelled / run_id).exists()

    def log_path(self, run_id: str, suffix: str = ".log") -> Path:
        return _private_dir(self.logs) / f"{run_id}{suffix}"


# --------------------------------------------------------------------------- running one job

Report = Callable[["RunRecord"], None]


def run_job(job: Job, journal: Journal, *, attempt: int = 1, report: Report | None = None) -> RunRecord:
    """Run one job and journal it; never raises for a failing command or worker.

    ``report`` sees each record as it is journalled (a queue worker publishes them, and guards the pid).
    """
    log = journal.log_path(job.id)
    record = RunRecord.of(job, start=now(), log=str(log), status="running", host=socket.gethostname(),
                          attempt=attempt)

    def journalled() -> RunRecord:
        journal.append(record)
        if report is not None:
            report(record)
        return record

    if journal.is_cancelled(job.id):
        record.status, record.end, record.message = "cancelled", now(), "cancelled before it started"
        return journalled()
    try:
        prepare_layout(job)
    except OSError as exc:
        record.status, record.end = "failed", now()
        record.message = f"cannot make the run's directory {exc.filename}: {exc.strerror}"
        return journalled()
    argv = list(job.argv)
    env = {**os.environ, **job.env, "KAAPCLI_RUN_ID": job.id}
    if job.added_params:
        params_file = journal.log_path(job.id, ".added_params.json")
        with _private_open(params_file, "w") as fh:
            json.dump(job.added_params, fh, ensure_ascii=False)
        env.update(KAAPCLI_ADDED_PARAMS=json.dumps(job.added_params, ensure_ascii=False),
                   KAAPCLI_ADDED_PARAMS_FILE=str(params_file))
    result_file = journal.log_path(job.id, ".result.json")
    if job.worker:
        spec = journal.log_path(job.id, ".job.json")
        with _private_open(spec, "w") as fh:
            json.dump({**asdict(job), "result_file": str(result_file)}, fh, ensure_ascii=False)
        argv = [sys.executable, "-m", "kaapcli.core.runs", "worker", str(spec)]
        env["PYTHONPATH"] = os.pathsep.join([*job.python_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.monotonic()
    with _private_open(log, "ab" if attempt > 1 else "wb") as out:
        if attempt > 1:
            out.write(f"\n--- attempt {attempt} ---\n".encode())
            out.flush()
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # its own process group: timeout/cancel kill it all
        except OSError as exc:
            record.status, record.end = "failed", now()
            record.message = f"cannot run {argv[0]}: {exc.strerror}"
            return journalled()
        record.pid = proc.pid
        journalled()
        try:
            record.exit_code = proc.wait(timeout=job.timeout)
            record.status = "ok" if record.exit_code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            record.status, record.message = "timeout", f"killed after {job.timeout:g} s"
        except BaseException as exc:  # the caller is interrupted: never leave the command running
            _kill_group(proc)
            record.status, record.end = "cancelled", now()
            record.message = f"interrupted ({type(exc).__name__}): the command was killed"
            with contextlib.suppress(Exception):
                journalled()
            raise
    if journal.is_cancelled(job.id):
        record.status, record.message = "cancelled", "cancelled while running"
    if job.worker and result_file.exists():
        with contextlib.suppress(OSError, ValueError):
            outcome = json.loads(result_file.read_text(encoding="utf-8"))
            record.result = outcome.get("added_params") or {}
            record.message = outcome.get("message", "")
    record.end = now()
    if not record.message:
        record.message = f"exit {record.exit_code} after {time.monotonic() - start:.1f} s"
    return journalled()


def prepare_layout(job: Job) -> None:
    """Make the run's private directory and Kaapana's ``<run>/batch/<series>/get-input-data/`` layout (each
    series' files copied for ``fetch_method: copy``, the run owns them; else linked), where the job runs."""
    import shutil

    run_dir = job.layout.get("run_dir")
    if not run_dir:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for series, files in job.layout.get("batch", {}).items():
        target = Path(run_dir) / "batch" / series / "get-input-data"
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            source, dest = Path(name), target / Path(name).name
            if job.layout.get("copy"):
                shutil.copy2(source, dest)
            elif not dest.is_symlink() and not dest.exists():
                dest.symlink_to(source.absolute())


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def retry_interval(job: Job, attempt: int) -> float:
    """Seconds to wait before attempt ``attempt`` (2, 3, ...): the job's backoff, its last value repeating."""
    intervals = job.retry_intervals or list(DEFAULT_BACKOFF)
    return float(intervals[min(attempt - 2, len(intervals) - 1)])


def resolve_dependencies(job: Job, deps: list[RunRecord | None]) -> RunRecord | None:
    """Before a job runs: a ``skipped`` record when a dependency did not succeed (``None``: it left no record),
    else None after adding the dependencies' results to the job's ``added_params``."""
    unmet = [d.rule if d is not None else "a dependency that left no record" for d in deps
             if d is None or d.status != "ok"]
    if unmet:
        return RunRecord.of(job, start=now(), end=now(), status="skipped",
                            message=f"dependency did not succeed: {', '.join(unmet)}")
    for dep in deps:
        assert dep is not None
        if dep.result:  # a dependency's worker result joins what its callback decided
            job.added_params.setdefault(dep.rule, {}).update(dep.result)
        for name, values in dep.added_params.items():
            job.added_params.setdefault(name, values)
    return None


def run_batch(jobs: list[Job], journal: Journal, skipped: Iterable[RunRecord] = ()) -> list[RunRecord]:
    """Run jobs in the given (dependency) order; a job whose dependency did not succeed is skipped, one that
    fails with ``retries`` left runs again after its backoff.

    Every job is journalled ``queued`` first (so ``runs cancel`` can stop a queued one); ``skipped``
    are records decided before running (a dependency that did not fire, a callback that raised).
    """
    results: dict[str, RunRecord] = {}
    for record in skipped:
        journal.append(record)
        results[record.id] = record
    for job in jobs:
        journal.append(RunRecord.of(job, start=now(), status="queued"))
    for job in jobs:
        unmet = resolve_dependencies(job, [results[d] for d in job.depends_on if d in results])
        if unmet is not None:
            journal.append(unmet)
            record = unmet
        else:
            record = run_job(job, journal)
            while record.status in ("failed", "timeout") and record.attempt <= job.retries:
                delay = retry_interval(job, record.attempt + 1)
                journal.append(replace(record, status="queued", pid=None, end="", message=f"retrying in {delay:g} s "
                                       f"after attempt {record.attempt}: {record.status}: {record.message}"))
                time.sleep(delay)
                record = run_job(job, journal, attempt=record.attempt + 1)
        results[job.id] = record
    return list(results.values())


# --------------------------------------------------------------------------- run control

def cancel(journal: Journal, run_id: str) -> RunRecord:
    """Stop a queued run (it will not start) or a running one (its process group is killed)."""
    from kaapcli.exitcodes import UsageError

    record = journal.find(run_id)
    if record is None:
        raise UsageError(f"{journal.path}: no run with id {run_id}")
    if record.status not in ("queued", "running"):
        raise UsageError(f"run {run_id} ({record.rule}) is {record.status}: nothing to cancel")
    _private_dir(journal.cancelled)
    (journal.cancelled / run_id).touch()
    if record.status == "running" and record.pid and _is_our_run(record.pid, run_id):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGTERM)
    return record


def _is_our_run(pid: int, run_id: str) -> bool:
    """Whether ``pid`` still is the process of that run (pids are reused): its environment says so."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"KAAPCLI_RUN_ID={run_id}".encode() in environ.split(b"\0")


def retry(journal: Journal, run_id: str, execute: Callable[[list[Job], Journal], list[RunRecord]] | None = None
          ) -> list[RunRecord]:
    """Run a journalled run again, then the runs of its batch that depended on it (transitively), each
    linked to the run it repeats (``retry_of``); ``execute`` runs them (default :func:`run_batch`; a queue's
    dispatcher hands them to workers)."""
    from kaapcli.exitcodes import UsageError

    records = journal.records()
    old = next((r for r in records if r.id == run_id), None)
    if old is None:
        raise UsageError(f"{journal.path}: no run with id {run_id}")
    if old.status in ("pending", "queued", "running"):
        raise UsageError(f"run {run_id} ({old.rule}) is still {old.status}", hint=f"kaapcli runs cancel {run_id}")
    same_batch = [r for r in records if old.batch and r.batch == old.batch and r.id != old.id and not r.retry_of]
    chain, ids = [old], {old.id}
    for r in same_batch:  # journal order is dependency order
        if ids & set(r.depends_on):
            chain.append(r)
            ids.add(r.id)
    new_ids = {r.id: new_id() for r in chain}
    batch = new_id()
    jobs = []
    for r in chain:
        job_data = {k: v for k, v in asdict(r).items() if k in {f.name for f in fields(Job)}}
        job = Job(**job_data)
        job.id, job.batch, job.retry_of = new_ids[r.id], batch, r.id
        job.depends_on = [new_ids[d] for d in r.depends_on if d in new_ids]
        if r.id != old.id:  # dependents get the fresh results of the rerun, not the stale ones
            job.added_params = {}
        jobs.append(job)
    return (execute or run_batch)(jobs, journal)


def masked_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a run with secret-looking names masked (*_KEY, *SECRET*, *PASSWORD*, *TOKEN*)."""
    from kaapcli.core.config import mask_secrets

    return mask_secrets(env)


# --------------------------------------------------------------------------- the child Python of workers and callbacks

def load_function(spec: str) -> Any:
    """"package.module:function" (or dcm-processor's "package.module.function") → the function."""
    import importlib

    module_name, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, name)


def call_with_keywords(function: Any, available: dict[str, Any]) -> Any:
    """Call with the keywords the function takes (all of them when it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return function(**available)
    return function(**{p.name: available[p.name] for p in params if p.name in available})


def decision(value: Any) -> tuple[bool, dict[str, Any]]:
    """dcm-processor's return convention: a bool, or (bool, dict)."""
    if isinstance(value, tuple | list):
        ok = bool(value[0]) if value else False
        extra = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
        return ok, extra
    if isinstance(value, dict):
        return True, value
    return (True, {}) if value is None else (bool(value), {})


def _child(kind: str, spec_file: str) -> int:
    """``python -m kaapcli.core.runs worker|callback SPEC.json``: call the function, write its decision."""
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    sys.path[:0] = spec.get("python_path", [])
    function = load_function(spec["worker"] if kind == "worker" else spec["callback"])
    keywords = {**spec.get("kwargs", {}), "added_params": spec.get("added_params", {}),
                "jobName": spec.get("rule", ""), "job_name": spec.get("rule", "")}
    ok, extra = decision(call_with_keywords(function, keywords))
    result = {"ok": ok, "added_params": json.loads(json.dumps(extra, default=str)),
              "message": "" if ok else f"{kind} returned false"}
    with _private_open(Path(spec["result_file"]), "w") as fh:
        json.dump(result, fh)
    return 0 if ok else 1


def evaluate_callback(job: Job, callback: str, journal: Journal) -> tuple[bool, dict[str, Any]]:
    """Run a rule's callback in a child Python (its output goes to the run's log); raises RuntimeError
    with the reason when it fails — a failing callback fails its rule, never the caller."""
    result_file = journal.log_path(job.id, ".callback.json")
    spec = journal.log_path(job.id, ".callback-job.json")
    with _private_open(spec, "w") as fh:
        json.dump({**asdict(job), "callback": callback, "result_file": str(result_file)}, fh, ensure_ascii=False)
    env = {**os.environ, **job.env, "KAAPCLI_RUN_ID": job.id,
           "PYTHONPATH": os.pathsep.join([*job.python_path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with _private_open(journal.log_path(job.id), "wb") as log:
        log.write(f"callback {callback}\n".encode())
        log.flush()
        try:
            proc = subprocess.run([sys.executable, "-m", "kaapcli.core.runs", "callback", str(spec)], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  timeout=CALLBACK_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"callback {callback} did not answer within {CALLBACK_TIMEOUT:g} s") from None
    try:
        outcome = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RuntimeError(f"callback {callback} failed (exit {proc.returncode}; see the log)") from None
    return bool(outcome["ok"]), outcome.get("added_params") or {}


if __name__ == "__main__":  # the child of workers and callbacks
    sys.exit(_child(sys.argv[1], sys.argv[2]))
