"""The one batch engine every operator runs through.

An operator supplies "process one item"; the engine does the rest, streaming (inputs are
planned and processed as they arrive, so memory does not grow with what is already done):

1. take input entries as :func:`kaapcli.core.fsio.iter_inputs` yields them (regular files;
   unusable paths arrive as :class:`~kaapcli.core.fsio.Unusable`: walked FIFOs, sockets,
   devices and broken symlinks are skipped and counted, unreadable files and directories fail);
2. keep the files the operator accepts (by default: files that sniff as DICOM), counting the
   others as skipped; a file that cannot be read is a failed item, never "not DICOM";
3. optionally group files into items (e.g. one per series) with a per-file key read in the
   worker pool (grouping needs every file, so per-series commands start after the input ends);
4. keep the items of one shard (stable hash of the item key);
5. skip items whose outputs are up to date, made with the same options (a manifest per output
   directory, kept *outside* it, remembers which outputs each item produced; it is journalled as
   items finish, so a re-run after a crash or SIGKILL only redoes what was not finished);
6. process items in a process pool, in chunks sized from the measured time per item; a worker
   writes an item's outputs to temporary files and the parent commits them (renames) together
   after checking that no other item of the run claimed the same output name — the later of two
   items writing one output fails, unless the bytes are identical;
7. report each result in input order through a callback and return a :class:`BatchSummary` that
   knows its exit code.

Interrupts: the first SIGINT/SIGTERM stops reading input and tells the workers (a flag in shared
memory) to start no further item; items in progress finish and are committed, so the summary and
the manifest say exactly what is on disk (futures are never cancelled: CPython before 3.12 then
breaks a pool whose workers die, gh-107219).
A second signal stops at once: workers remove their temporary files and nothing uncommitted is
reported.  Workers ignore SIGINT (the parent decides), die with the parent (PR_SET_PDEATHSIG) and
exit quietly on SIGTERM.  A worker that crashes (a segfault in a library, the OOM killer) fails
the item it was processing, found by re-running the affected items one at a time.

This module never prints: the CLI renders results.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import filecmp
import hashlib
import json
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from kaapcli.core import fsio
from kaapcli.exitcodes import ExitCode, KaapcliError, UsageError

Status = Literal["ok", "skipped", "failed"]
LEGACY_MANIFEST_DIR = ".kaapcli"  # manifests lived inside OUT before 0.2; read once, then removed
JOURNAL_SECONDS, JOURNAL_LINES = 0.5, 256  # how much finished work a crash may cost the next run


@dataclass(frozen=True)
class Item:
    """One unit of work: a stable key (used for sharding and the manifest) and its input files.

    ``root`` is the directory INPUT the file was found in (None when the file was named itself).
    ``notes``: per path, what the operator's ``scan`` learnt of it while planning (empty: nothing), so
    ``process`` need not read it again.
    """

    key: str
    paths: tuple[Path, ...]
    root: Path | None = None
    notes: tuple[Any, ...] = field(default=(), compare=False)

    @property
    def label(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else self.key


@dataclass
class ItemResult:
    input: str
    status: Status
    outputs: list[str] = field(default_factory=list)
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0
    code: int = 0  # the ExitCode class of a failure
    reason: str = ""  # for skipped: "not-input", "not-regular", "up-to-date", "dry-run", "operator"
    nfiles: int = 1
    key: str = ""  # the item key, for the manifest
    pending: list[tuple[str, str]] = field(default_factory=list)  # (temporary, output) the parent commits
    seconds: float = 0.0  # worker time

    def record(self) -> dict[str, Any]:
        """The ``--format jsonl`` record of DESIGN §1."""
        return {"input": self.input, "outputs": self.outputs, "status": self.status, "message": self.message}


@dataclass
class Context:
    """What a worker needs to process an item: where to write and how."""

    out: Path | None
    dry_run: bool = False
    debug: bool = False


@dataclass
class Outcome:
    """What an operator's ``process`` returns: the outputs it wrote and any warnings."""

    outputs: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    skipped: bool = False  # the operator decided there was nothing to do (e.g. a --if condition)


class Operator(Protocol):
    """The contract an operator fulfils.  Instances must be picklable (they go to worker processes)."""

    name: str

    def options(self) -> dict[str, Any]:
        """The options that shape outputs; a change makes up-to-date outputs stale."""
        ...

    def accepts(self, path: Path) -> bool:
        """Whether a walked file is an input of this operator (others are skipped, counted)."""
        ...

    def group_key(self, path: Path) -> str | None:
        """The item key of a file, when files are grouped (``None`` = not an input of this operator)."""
        ...

    def process(self, item: Item, ctx: Context) -> Outcome:
        """Do the work for one item, writing outputs atomically under ``ctx.out``."""
        ...


class SkipItem(Exception):
    """Raised by ``group_key`` for a file the operator recognises but does not process (e.g. a SEG met by
    convert): the file is skipped, not failed, with this message as the reason."""


class BaseOperator:
    """Defaults for :class:`Operator`: DICOM inputs, one item per file, no options."""

    name = "op"
    grouped = False  # True: group_key() is called per file and items are groups
    input_kind = "DICOM input"  # for "no DICOM input found in ..."
    collision_hint = "two inputs are the same instance (or the name misses a field that tells them apart)"
    outputs_follow_root = False  # True: an output's path depends on the INPUT directory a file was found in

    def options(self) -> dict[str, Any]:
        return {}

    def accepts(self, path: Path) -> bool:
        return fsio.is_dicom(path)

    def group_key(self, path: Path) -> str | None:
        return None

    def scan(self, path: Path) -> tuple[str | None, Any]:
        """The item key of a file and a note for ``process`` (``Item.notes``): by default no note."""
        return self.group_key(path), None

    def process(self, item: Item, ctx: Context) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class BatchOptions:
    workers: int | None = None
    shard: tuple[int, int] | None = None  # (index, count), index 0-based
    force: bool = False
    dry_run: bool = False
    debug: bool = False


@dataclass
class BatchSummary:
    """What a run did, as counts: memory does not grow with the number of items (a million-file run keeps no
    per-item record).  ``results`` holds every :class:`ItemResult` only when the run was asked to keep them
    (``run_batch(keep_results=True)``, the default of the library; the CLI streams results instead)."""

    results: list[ItemResult] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    rolled_back: int = 0  # items in flight when workers ended early (a hard stop, signalled workers): not written
    other_shard: int = 0
    no_input: bool = False  # no input of the operator at all (nothing accepted, nothing failed)
    keep_results: bool = True
    reported: int = 0  # results added
    total_bytes: int = 0
    total_files: int = 0  # files of items that were inputs (not the non-inputs skipped)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, reason) -> items (files if skipped)
    failed_codes: set[int] = field(default_factory=set)

    def add(self, result: ItemResult) -> None:
        self.reported += 1
        self.total_bytes += result.nbytes
        if result.reason not in ("not-input", "not-regular"):
            self.total_files += result.nfiles
        key = (result.status, result.reason)
        self.counts[key] = self.counts.get(key, 0) + (result.nfiles if result.status == "skipped" else 1)
        if result.status == "failed":
            self.failed_codes.add(result.code)
        if self.keep_results:
            self.results.append(result)

    def mark_failed(self, result: ItemResult, message: str, code: int) -> None:
        """Turn an added result into a failure found later (``send --verify``), keeping the counts right."""
        key = (result.status, result.reason)
        self.counts[key] -= result.nfiles if result.status == "skipped" else 1
        result.status, result.message, result.code, result.reason = "failed", message, code, ""
        self.counts[("failed", "")] = self.counts.get(("failed", ""), 0) + 1
        self.failed_codes.add(code)

    def count(self, status: Status, reason: str | None = None) -> int:
        return sum(n for (s, r), n in self.counts.items() if s == status and (reason is None or r == reason))

    @property
    def nbytes(self) -> int:
        return self.total_bytes

    @property
    def nfiles(self) -> int:
        return self.total_files

    @property
    def exit_code(self) -> ExitCode:
        """0 all ok; 1 some failed; a shared specific code when nothing succeeded; 66 when there was no input.

        Up-to-date items count as ok; skipped non-inputs count as nothing.
        """
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if not self.count("failed"):
            return ExitCode.NOINPUT if self.no_input else ExitCode.OK
        codes = set(self.failed_codes)
        nothing_ok = not (self.count("ok") or self.count("skipped", "up-to-date"))
        specific = (ExitCode.DATAERR, ExitCode.NOINPUT, ExitCode.UNAVAILABLE, ExitCode.CANTCREAT, ExitCode.TEMPFAIL,
                    ExitCode.CONFIG)
        if nothing_ok and len(codes) == 1 and (code := codes.pop()) in specific:
            return ExitCode(code)
        return ExitCode.ITEMS_FAILED

    def line(self) -> str:
        """``300 files, 152 MB, 1.9 s, 80 MB/s, 0 failed`` plus skip counts."""
        mb = self.nbytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        extras = []
        for reason, label in (("not-input", "not DICOM/not an input"), ("not-regular", "not regular files"),
                              ("up-to-date", "up to date"), ("dry-run", "dry run"),
                              ("operator", "skipped by the command")):
            n = self.count("skipped", reason)
            if n:
                extras.append(f"{n} {label}")
        if self.other_shard:
            extras.append(f"{self.other_shard} items of other shards")
        extra = f" ({', '.join(extras)})" if extras else ""
        return (f"{self.nfiles} files{extra}, {mb:.0f} MB, {self.seconds:.1f} s, "
                f"{rate:.0f} MB/s, {self.count('failed')} failed")


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(os.fsencode(key)).digest()[:8], "big")


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 1 <= I <= N (1-based on the command line, as Slurm/K8s indexes are mapped)."""
    try:
        index_s, count_s = text.split("/")
        index, count = int(index_s), int(count_s)
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 1/4") from None
    if not (count >= 1 and 1 <= index <= count):
        raise UsageError(f"--shard {text!r}: need 1 <= I <= N")
    return index - 1, count


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or stable_hash(key) % shard[1] == shard[0]


def options_fingerprint(op: Operator) -> str:
    blob = json.dumps({"op": op.name, "options": op.options()}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the manifest

def _digest(key: str) -> int:
    """Manifests name items by a digest of their key: input paths (which may identify patients) never appear.
    In memory it is an int (44 bytes, a hex string takes 81); on disk its 32 hex digits."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(key), digest_size=16).digest(), "big")


def _hex(digest: int) -> str:
    return f"{digest:032x}"


def _pack(fingerprint: str, outputs: Iterable[str]) -> str:
    return "\0".join((fingerprint, *outputs))  # NUL is in no path


def _unpack(value: str) -> tuple[str, list[str]]:
    fingerprint, *outputs = value.split("\0")
    return fingerprint, outputs


class Manifest:
    """Remembers, per output directory, operator and shard, which outputs each item produced and with which options.

    It lives in the output directory's state directory (:func:`kaapcli.core.fsio.state_dir`), never inside the
    output tree: ``<op>-<i>of<n>.json`` (a snapshot, JSON lines) plus ``<op>-<i>of<n>.journal`` (one JSON line
    per item as it finishes, so a crashed run's work is not lost).  Items are named by a digest of their key, outputs by
    their path below OUT.  Each shard writes only its own files, so machines sharing an output directory
    never overwrite each other; all of them are read back.
    """

    def __init__(self, out: Path, op_name: str, shard: tuple[int, int] | None, *, read_only: bool = False):
        self.out = out
        self._prefix = str(out).rstrip("/") + "/"
        self.read_only = read_only  # a dry run: read, never written
        self.dir = fsio.state_dir(out)
        tag = f"{shard[0] + 1}of{shard[1]}" if shard else "all"
        self.stem = f"{op_name}-{tag}"
        self.snapshot = self.dir / f"{self.stem}.json"
        self.journal_path = self.dir / f"{self.stem}.journal"
        # digest (as an int) -> "fingerprint\0output\0output..." (outputs below OUT): one small object per item,
        # ~250 bytes with its dictionary slots, so a million-item manifest fits in a quarter of a GB
        self.entries: dict[int, str] = {}
        self.own = self.entries  # what this shard's files hold: the same dictionary unless other shards' exist
        self._journal: int | None = None
        self._legacy: list[Path] = []
        self._crashed: list[str] = []  # run tokens of this shard's earlier runs that never closed their journal
        self._changed = False
        self._lines: list[str] = []  # journal records not yet written
        self._flushed = time.monotonic()
        self._load(op_name)
        if not read_only:
            self._start()

    def _load(self, op_name: str) -> None:
        if self.dir.is_dir():
            names = sorted(p.name for p in self.dir.iterdir() if p.name.startswith(f"{op_name}-"))
            own = [n for n in names if n.startswith(self.stem + ".")]
            if len(own) < len(names):
                self.own = {}  # other shards' files: their items are known, but not this shard's to write
            for name in [n for n in names if n not in own] + sorted(own):  # this shard's own view last
                target = self.own if name in own else None
                path = self.dir / name
                if name.endswith(".json"):
                    self._read_snapshot(path, target)
                elif name.endswith(".journal"):
                    self._read_journal(path, target)
        legacy_dir = self.out / LEGACY_MANIFEST_DIR
        if legacy_dir.is_dir():
            for path in sorted(legacy_dir.glob(f"{op_name}-*.json")):
                self._legacy.append(path)
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                for key, entry in data.items() if isinstance(data, dict) else ():
                    if isinstance(entry, dict) and _digest(key) not in self.entries:
                        outputs = [self._relative(o) for o in entry.get("outputs", [])]
                        self.entries[_digest(key)] = self.own[_digest(key)] = _pack(str(entry.get("options", "")),
                                                                                    outputs)

    def _start(self) -> None:
        """Open this shard's journal with the run's token first; when an earlier run of this shard died without
        closing its journal (SIGKILL, a crash), remove the temporary files it left in OUT."""
        import fcntl

        fsio.ensure_dir(self.dir)
        self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(self._journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:  # another run of this shard writes here now: its temporary files are its own
            alone = False
        if alone and self._crashed:
            fsio.remove_temps_of(self.out, self._crashed)
        os.write(self._journal, (fsio.dumps({"run": fsio.RUN_TOKEN}) + "\n").encode())

    def _read_snapshot(self, path: Path, own: dict[int, str] | None) -> None:
        """A snapshot is JSON lines, one item a line (version 3), read line by line: a million-item manifest is
        never one JSON document in memory.  Version 2 was one line ``{"version": 2, "items": {...}}``."""
        self._read_lines(path, own, journal=False)

    def _read_journal(self, path: Path, own: dict[int, str] | None) -> None:
        self._read_lines(path, own, journal=True)

    def _read_lines(self, path: Path, own: dict[int, str] | None, journal: bool) -> None:
        try:
            fh = open(path, "rb")
        except OSError:
            return  # a damaged or unreadable manifest only costs a rebuild
        with fh:
            try:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash
                    if not isinstance(record, dict):
                        continue
                    if isinstance(record.get("k"), str):
                        self._put(record["k"], record, own)
                    elif journal and own is not None and isinstance(record.get("run"), str):
                        self._crashed.append(record["run"])
                    elif not journal and isinstance(record.get("items"), dict):
                        for digest, entry in record["items"].items():
                            self._put(digest, entry, own)
            except OSError:
                return

    def _put(self, hexdigest: str, entry: Any, own: dict[int, str] | None) -> None:
        try:
            digest = int(hexdigest, 16)
        except ValueError:
            return
        if not isinstance(entry, dict):
            return
        if entry.get("o") is None:  # a tombstone: the item's outputs are no longer its own
            self.entries.pop(digest, None)
            if own is not None:
                own.pop(digest, None)
            return
        outputs = entry.get("out", [])
        value = _pack(str(entry.get("o")), [str(p) for p in outputs] if isinstance(outputs, list) else [])
        self.entries[digest] = value
        if own is not None:
            own[digest] = value

    def _relative(self, output: str) -> str:
        if output.startswith(self._prefix):  # the usual case: OUT / rel as the operator built it
            return output[len(self._prefix):]
        rel = os.path.relpath(output, self.out)
        return output if rel.startswith("..") else rel

    def outputs_of(self, relative: Iterable[str]) -> list[str]:
        base = "" if str(self.out) == "." else self._prefix  # as Path(".") / rel reads
        return [base + rel if not os.path.isabs(rel) else rel for rel in relative]

    def up_to_date(self, item: Item, fingerprint: str) -> list[str] | None:
        entry = self.entries.get(_digest(item.key))
        if not entry:
            return None
        made_with, relative = _unpack(entry)
        if made_with != fingerprint or not relative:
            return None
        outputs = self.outputs_of(relative)
        try:
            newest_input = max((p.stat().st_mtime for p in item.paths), default=0.0)
            oldest_output = min(os.stat(o).st_mtime for o in outputs)
        except OSError:
            return None
        return outputs if oldest_output >= newest_input else None

    def record(self, key: str, fingerprint: str, outputs: list[str]) -> None:
        if self.read_only:
            return
        digest = _digest(key)
        relative = [self._relative(o) for o in outputs]
        self.entries[digest] = self.own[digest] = _pack(fingerprint, relative)
        self._append({"k": _hex(digest), "o": fingerprint, "out": relative})

    def forget(self, key: str) -> None:
        if self.read_only:
            return
        digest = _digest(key)
        if self.entries.pop(digest, None) is not None or self.own.pop(digest, None) is not None:
            self._append({"k": _hex(digest), "o": None})

    def _append(self, record: dict[str, Any]) -> None:
        """Journal a record; written out every JOURNAL_SECONDS or JOURNAL_LINES (a crash loses at most that much
        finished work, which the next run redoes)."""
        self._changed = True
        self._lines.append(fsio.dumps(record) + "\n")
        now = time.monotonic()
        if len(self._lines) >= JOURNAL_LINES or now - self._flushed >= JOURNAL_SECONDS:
            self._flush_journal(now)

    def tick(self) -> None:
        """Write out journal records that have waited JOURNAL_SECONDS (called while the run waits)."""
        now = time.monotonic()
        if self._lines and now - self._flushed >= JOURNAL_SECONDS:
            self._flush_journal(now)

    def _flush_journal(self, now: float) -> None:
        if self._journal is not None and self._lines:
            os.write(self._journal, "".join(self._lines).encode())
        self._lines.clear()
        self._flushed = now

    def close(self) -> None:
        """Fold the journal into the snapshot (atomically), then drop the journal and any legacy manifest."""
        if self.read_only or self._journal is None:
            return
        self._flush_journal(time.monotonic())  # what the snapshot then holds is also in the journal, should it fail
        if self._changed or self._legacy or self._crashed:
            with fsio.atomic_write(self.snapshot) as fh:  # streamed: no second copy of the manifest in memory
                fh.write(b'{"version": 3}\n')
                for digest, value in self.own.items():
                    made_with, outputs = _unpack(value)
                    fh.write((fsio.dumps({"k": _hex(digest), "o": made_with, "out": outputs}) + "\n").encode())
        with contextlib.suppress(OSError):
            self.journal_path.unlink()
        os.close(self._journal)  # after the unlink: the lock is held until the journal is gone
        self._journal = None
        for path in self._legacy:
            with contextlib.suppress(OSError):
                path.unlink()
        if self._legacy:
            with contextlib.suppress(OSError):
                self._legacy[0].parent.rmdir()
        self._legacy = []


# --------------------------------------------------------------------------- workers

_libc: Any = None  # loaded in the parent before it forks workers, so each worker does not load it again


def _load_libc() -> None:
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - no C library to ask
            _libc = False


def _set_parent_death_signal(sig: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): the kernel signals this process when its parent dies."""
    _load_libc()
    try:
        _libc.prctl(1, sig, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except AttributeError:  # pragma: no cover - not Linux
        pass


def _worker_sigterm(signum: int, frame: object) -> None:
    fsio.remove_live_temps()
    os._exit(128 + signum)


_stop: Any = None  # a byte of shared memory (set by the parent on an interrupt): start no further item


def _stopped() -> bool:
    return bool(_stop is not None and _stop[0])


def _stop_flag() -> Any:
    """The shared stop flag, made before any worker forks (they inherit it), cleared for a new run.  An anonymous
    shared mapping: multiprocessing's RawValue costs its import and an arena file (~8 ms) in every run, even
    runs that never start a worker."""
    global _stop
    if _stop is None:
        import mmap

        _stop = mmap.mmap(-1, 1)  # MAP_SHARED: forked workers see the parent's writes
    _stop[0] = 0
    return _stop


def worker_init(parent: int) -> None:
    """Initializer of every kaapcli worker process: the parent handles interrupts; the worker dies with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        _worker_sigterm(signal.SIGTERM, None)


def process_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A forked process pool whose workers die with the parent and leave interrupts to it."""
    import multiprocessing  # ~10 ms: only runs with worker processes need it

    _load_libc()
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                  initializer=worker_init, initargs=(os.getpid(),))


def _accept(op: Operator, path: Path) -> tuple[bool, str, int]:
    """Whether ``path`` is an input of ``op``; or why it cannot be read, and the exit code class of that
    (the file is sniffed once, without blocking)."""
    try:
        head = fsio.read_head(path)
    except OSError as exc:
        return False, f"cannot read: {exc.strerror or exc}", int(ExitCode.NOINPUT)
    with fsio.sniffed(path, head):
        try:
            return bool(op.accepts(path)), "", 0
        except KaapcliError as exc:  # a DICOM file that cannot be read (to tell whether it is an input) fails
            return False, exc.message, int(exc.code)
        except Exception:  # noqa: BLE001 - an operator's test that fails otherwise means "not its input"
            return False, "", 0


def _scan_chunk(op: Operator, paths: list[Path]) -> list[tuple[Path, str | None, str, int, Any]]:
    """Group keys (and the operator's notes) for a chunk of files (runs in a worker).  Returns (path, key,
    error or skip reason, code, note)."""
    scan = getattr(op, "scan", None) or (lambda path: (op.group_key(path), None))
    out: list[tuple[Path, str | None, str, int, Any]] = []
    for path in paths:
        if _stopped():
            break
        accepted, error, code = _accept(op, path)
        if error or not accepted:
            out.append((path, None, error, code, None))
            continue
        try:
            key, note = scan(path)
            out.append((path, key, "", 0, note))
        except SkipItem as exc:  # recognised, not processed: skipped with its reason (code 0)
            out.append((path, None, str(exc), 0, None))
        except KaapcliError as exc:
            out.append((path, None, exc.message, int(exc.code), None))
        except Exception as exc:  # noqa: BLE001 - a broken file must not stop the scan
            out.append((path, None, describe_exception(exc), int(ExitCode.DATAERR), None))
    return out


def describe_exception(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):  # every reader walks nested sequences (or JSON) by recursion
        return "nested too deeply to read (sequences or objects beyond the interpreter's recursion limit)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _process_one(op: Operator, item: Item, ctx: Context) -> ItemResult:
    label = item.label
    nfiles = len(item.paths)
    nbytes = 0
    started = time.perf_counter()
    try:
        nbytes = sum(p.stat().st_size for p in item.paths)
    except OSError:
        pass
    try:
        with fsio.deferred_commits() as pending:
            outcome = op.process(item, ctx)
    except KaapcliError as exc:
        msg = f"{label}: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "")
        if ctx.debug:
            msg += "\n" + traceback.format_exc()
        return ItemResult(label, "failed", message=msg, code=int(exc.code), nfiles=nfiles)
    except MemoryError:
        return ItemResult(label, "failed", message=f"{label}: out of memory", code=int(ExitCode.TEMPFAIL),
                          nfiles=nfiles)
    except Exception as exc:  # noqa: BLE001 - any exception on one item is one failed item
        msg = f"{label}: {describe_exception(exc)}"
        if ctx.debug:
            msg += "\n" + traceback.format_exc()
        # Most unexpected exceptions from pydicom/numpy on a file are bad data, not bugs.
        return ItemResult(label, "failed", message=msg, code=int(ExitCode.DATAERR), nfiles=nfiles)
    status: Status = "skipped" if outcome.skipped else "ok"
    staged = {str(dest): str(tmp) for tmp, dest in pending}
    if not item.paths:  # a generator (mock): count what was written instead
        nfiles = len(outcome.outputs)
        nbytes = 0
        for path in outcome.outputs:
            with contextlib.suppress(OSError):
                nbytes += os.stat(staged.get(str(path), path)).st_size
    return ItemResult(label, status, outputs=[str(p) for p in outcome.outputs], message=outcome.message,
                      warnings=outcome.warnings, nbytes=nbytes, nfiles=nfiles,
                      reason="operator" if outcome.skipped else "",
                      pending=[(str(tmp), str(dest)) for tmp, dest in pending],
                      seconds=time.perf_counter() - started)


def _process_chunk(op: Operator, items: list[Item], ctx: Context) -> list[ItemResult]:
    results = []
    for item in items:
        if _stopped():  # interrupted: the rest of the chunk is not started
            results.append(ItemResult(item.label, "skipped", reason="not-started", key=item.key))
            continue
        result = _process_one(op, item, ctx)
        result.key = item.key
        results.append(result)
    fsio.forget_temps(tmp for r in results for tmp, _ in r.pending)  # the parent commits or removes them
    return results


# --------------------------------------------------------------------------- engine

ResultHook = Callable[[ItemResult], None]
TotalHook = Callable[[int], None]
SCAN_INLINE_SECONDS = 0.25  # group-key scanning done in the parent before a pool is worth its start (see feed_grouped)
CHUNK_SECONDS = 0.1  # a chunk's target duration: IPC amortised, interrupts and progress still prompt
MAX_CHUNK = 64
CLAIM_NAMES = 4096  # the latest outputs whose writer a collision message can still name


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class _Done:
    """A chunk run inline (one worker): looks like a finished future."""

    def __init__(self, value: Any):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


@dataclass
class _Slot:
    """One place in the output order: results ready now, or a chunk of items being processed."""

    results: list[ItemResult] | None = None
    future: Any = None
    items: list[Item] = field(default_factory=list)


class _Runner:
    def __init__(self, op: Operator, out: Path | None, opts: BatchOptions, on_total: TotalHook | None,
                 on_result: ResultHook | None):
        self.op, self.out, self.opts = op, out, opts
        self.on_total, self.on_result = on_total, on_result
        self.summary = BatchSummary()
        self.workers = opts.workers or default_workers()
        self.ctx = Context(out=out, dry_run=opts.dry_run, debug=opts.debug)
        self.fingerprint = options_fingerprint(op)
        self.manifest = Manifest(out, op.name, opts.shard, read_only=opts.dry_run) if out is not None else None
        self.executor: cf.ProcessPoolExecutor | None = None
        self.slots: deque[_Slot] = deque()
        self.held: list[Item] = []  # planned, not yet submitted
        self.in_flight = 0  # submitted chunks not yet emitted
        self.per_item = 0.0  # measured seconds per item (moving average)
        # hashes of the output paths written (or found up to date) in this run: one int per output, so memory stays
        # small for a million files; who claimed the latest ones, for the message when a second input claims one
        self.claims: set[int] = set()
        self.claim_names: dict[int, str] = {}
        self.accepted = 0  # items that were inputs of the operator (before sharding)
        self.stop_signal = 0
        self.stopping = False
        self.stop = _stop_flag()  # shared with the workers, which fork after this
        self.lost_workers = False  # workers ended early: results they sent may never have arrived
        self.cwd = os.getcwd()

    # ----------------------------------------------------------------- signals
    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.stop_signal:
                raise KeyboardInterrupt  # the second signal: stop now
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ----------------------------------------------------------------- planning
    def feed_files(self, entries: Iterable[Any]) -> None:
        for entry in entries:
            if self._check_stop():
                return
            if entry is fsio.IDLE:
                self._flush(force=True)
                self._drain(block=False)
                if self.manifest is not None:
                    self.manifest.tick()
                continue
            if isinstance(entry, fsio.Unusable):
                self._ready([self._unusable(entry)])
                continue
            path, root = (entry.path, entry.root) if isinstance(entry, fsio.InputFile) else (Path(entry), None)
            accepted, error, code = _accept(self.op, path)
            if error:
                self._ready([ItemResult(str(path), "failed", message=f"{path}: {error}", code=code)])
            elif not accepted:
                self._ready([ItemResult(str(path), "skipped", message="not an input of this command",
                                        reason="not-input")])
            else:
                self.plan(Item(self._file_key(path, root), (path,), root))
            self._drain(block=False)

    def _file_key(self, path: Path, root: Path | None) -> str:
        """The key of a one-file item: its absolute path (the manifest and the shards then agree whatever the
        working directory, and whether the path was typed relative or absolute), joined to the working directory
        known once: no system call per file.  An operator whose outputs mirror the tree below the INPUT directory
        (modify) keys by that directory too: the same file under another INPUT goes elsewhere."""
        absolute = os.path.normpath(os.path.join(self.cwd, path))
        if root is not None and getattr(self.op, "outputs_follow_root", False):
            return os.path.normpath(os.path.join(self.cwd, root)) + "\0" + absolute
        return absolute

    def feed_grouped(self, entries: Iterable[Any]) -> None:
        """Group keys are read in the pool as files arrive; items are formed when the input ends."""
        groups: dict[str, list[tuple[Path, Any]]] = {}
        batch: list[Path] = []
        scans: deque[Any] = deque()

        def collect(block: bool) -> None:
            while scans and (block or scans[0][0].done()):
                fut, paths = scans.popleft()
                self._wait(fut)
                try:
                    found = fut.result()
                except cf.process.BrokenProcessPool:  # every scan of the dead pool is lost with it
                    self.shutdown(kill=True)
                    paths += [p for _, lost in scans for p in lost]
                    scans.clear()
                    found = [(p, None, "a worker process died while reading group keys", int(ExitCode.SOFTWARE),
                              None) for p in paths]
                for path, key, error, code, note in found:
                    if error and code:
                        self._ready([ItemResult(str(path), "failed", message=f"{path}: {error}", code=code)])
                    elif key is None:
                        self._ready([ItemResult(str(path), "skipped", message=error or "not an input of this command",
                                                reason="not-input")])
                    else:
                        groups.setdefault(key, []).append((path, note))
                self._drain(block=False)
                block = False

        inline = [0.0]  # seconds spent scanning in this process before the pool starts

        def submit(final: bool = False) -> None:
            if batch:
                # cheap scans (a fast header reader: ~0.2 ms a file) stay here until they have cost SCAN_INLINE_SECONDS:
                # one series of a few hundred files never pays for forking workers and shipping its notes twice
                alone = self.executor is None and (inline[0] < SCAN_INLINE_SECONDS or (final and len(batch) <= 4))
                started = time.monotonic()
                scans.append((self._submit(_scan_chunk, list(batch), alone=alone), list(batch)))
                if alone:
                    inline[0] += time.monotonic() - started
                batch.clear()

        for entry in entries:
            if self._check_stop():
                break
            if entry is fsio.IDLE:
                submit()
                collect(block=False)
                continue
            if isinstance(entry, fsio.Unusable):
                self._ready([self._unusable(entry)])
                continue
            batch.append(entry.path if isinstance(entry, fsio.InputFile) else Path(entry))
            if len(batch) >= 32:
                submit()
                collect(block=len(scans) > 2 * self.workers + 2)
        submit(final=True)
        while scans and not self._check_stop():
            collect(block=True)
        if self.stopping:
            return
        self.accepted += len(groups)
        for key in groups:
            members = sorted(groups[key], key=lambda member: member[0])
            notes = tuple(note for _, note in members)
            self.plan(Item(key, tuple(path for path, _ in members),
                           notes=notes if any(note is not None for note in notes) else ()), counted=True)
            if self._check_stop():
                return

    def feed_items(self, items: Iterable[Item]) -> None:
        for item in items:
            if self._check_stop():
                return
            self.plan(item, counted=True)

    def plan(self, item: Item, counted: bool = False) -> None:
        if not counted:
            self.accepted += 1
        if not in_shard(item.key, self.opts.shard):
            self.summary.other_shard += 1
            return
        previous = self.manifest.up_to_date(item, self.fingerprint) if self.manifest and not self.opts.force else None
        if previous is not None:
            self._ready([ItemResult(item.label, "skipped", outputs=previous, message="up to date",
                                    reason="up-to-date", nfiles=len(item.paths) or len(previous), key=item.key)])
        elif self.opts.dry_run and not getattr(self.op, "supports_dry_run", False):
            self._ready([ItemResult(item.label, "skipped", message="would process", reason="dry-run",
                                    nfiles=len(item.paths), key=item.key)])
        else:
            self.held.append(item)
            if len(self.held) >= self._chunk_size():
                self._flush()
        self._backpressure()

    def _backpressure(self) -> None:
        """Emit what is done; wait while more chunks are in flight than the workers can use (bounded memory)."""
        self._drain(block=False)
        while self.in_flight > 2 * self.workers + 2 and not self.stopping:
            self._drain(block=True)

    def _unusable(self, entry: fsio.Unusable) -> ItemResult:
        if entry.failed:
            return ItemResult(str(entry.path), "failed", message=f"{entry.path}: {entry.reason}", code=entry.code)
        return ItemResult(str(entry.path), "skipped", message=entry.reason, reason=entry.kind)

    def _chunk_size(self) -> int:
        if self.per_item <= 0:
            return 1
        return max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / self.per_item)))

    # ----------------------------------------------------------------- submitting
    def _flush(self, force: bool = False, final: bool = False) -> None:
        if not self.held:
            return
        if self.executor is None and self.workers > 1 and not (force or final) and len(self.held) < 2 \
                and not self.slots:
            return  # a run of one item never starts a pool: wait for a second one (or the end)
        chunk, self.held = self.held, []
        self.slots.append(_Slot(future=self._submit(_process_chunk, chunk, self.ctx, alone=final and
                                                    self.executor is None and len(chunk) == 1), items=chunk))
        self.in_flight += 1

    def _submit(self, fn: Callable[..., Any], chunk: list[Any], *args: Any, alone: bool = False) -> Any:
        if self.workers <= 1 or alone:
            return _Done(fn(self.op, chunk, *args))
        if self.executor is None:
            self.executor = process_pool(self.workers)
        return self.executor.submit(fn, self.op, chunk, *args)

    # ----------------------------------------------------------------- emitting
    def _ready(self, results: list[ItemResult]) -> None:
        if not self.slots:
            for result in results:
                self._finish(result)
            return
        self.slots.append(_Slot(results=results))

    def _drain(self, block: bool) -> None:
        while self.slots:
            slot = self.slots[0]
            if slot.future is not None and not slot.future.done():
                if not block:
                    return
                self._wait(slot.future)
                if not slot.future.done():
                    continue
            block = False
            self.slots.popleft()
            if slot.future is None:
                for result in slot.results or []:
                    self._finish(result)
                continue
            self.in_flight -= 1
            self._emit_chunk(slot)

    def _emit_chunk(self, slot: _Slot) -> None:
        try:
            results = slot.future.result()
        except cf.process.BrokenProcessPool:
            self._broken(slot)
            return
        for result in results:
            if result.reason == "not-started":
                continue  # never begun (a stop): neither reported nor recorded
            self.per_item = result.seconds if self.per_item <= 0 else 0.8 * self.per_item + 0.2 * result.seconds
            self._finish(result)

    def _wait(self, fut: Any) -> None:
        """Wait for a future, noticing a first interrupt while waiting (a second one raises)."""
        while not fut.done():
            cf.wait([fut], timeout=0.2)
            self._check_stop()
            if self.manifest is not None:
                self.manifest.tick()

    def _check_stop(self) -> bool:
        if self.stop_signal and not self.stopping:
            self.stopping = True
            self.held.clear()  # planned, never started
            self.stop[0] = 1  # workers finish the item they are on and start no other
        return self.stopping

    # ----------------------------------------------------------------- committing
    def _finish(self, result: ItemResult) -> None:
        if result.status == "ok":
            self._commit(result)
        elif result.pending:  # pragma: no cover - workers roll back what failed items staged
            for tmp, _ in result.pending:
                fsio.discard(Path(tmp))
        elif result.reason == "up-to-date":
            self._claim_up_to_date(result)
        if self.manifest is not None and result.status == "ok" and result.outputs and not self.opts.dry_run:
            self.manifest.record(result.key, self.fingerprint, result.outputs)
        result.pending = []
        self.summary.add(result)
        if self.on_result is not None:
            self.on_result(result)

    def _commit(self, result: ItemResult) -> None:
        staged = {dest: tmp for tmp, dest in result.pending}
        for output in dict.fromkeys(result.outputs):
            if _claim_key(output) not in self.claims:
                continue
            tmp = staged.get(output)
            if tmp is not None and _same_bytes(tmp, output):
                fsio.discard(Path(tmp))
                staged.pop(output)
                result.pending = [(t, d) for t, d in result.pending if d != output]
                continue
            if tmp is None:
                continue  # placed by the operator itself, which never overwrites (sort)
            self._reject(result, f"{output} is also the output of {self._owner(output)}: not overwritten", self.op)
            return
        for position, (tmp, dest) in enumerate(result.pending):
            try:
                os.replace(tmp, dest)
            except OSError as exc:
                for later, _ in result.pending[position:]:
                    fsio.discard(Path(later))
                result.status, result.code = "failed", int(ExitCode.CANTCREAT)
                result.message = f"{result.input}: {dest}: cannot write: {exc.strerror}"
                result.outputs = [d for _, d in result.pending[:position]]
                return
        for output in result.outputs:
            self._claim(output, result.input)

    def _claim(self, output: str, name: str) -> bool:
        """Claim ``output`` for the input ``name``; False when an earlier input of the run did (each input is in
        a run once: the input stream drops duplicates)."""
        key = _claim_key(output)
        if key in self.claims:
            return False
        self.claims.add(key)
        self.claim_names[key] = name
        if len(self.claim_names) > CLAIM_NAMES:
            del self.claim_names[next(iter(self.claim_names))]
        return True

    def _owner(self, output: str) -> str:
        return self.claim_names.get(_claim_key(output), "an earlier input of this run")

    def _reject(self, result: ItemResult, reason: str, op: Operator) -> None:
        for tmp, _ in result.pending:
            fsio.discard(Path(tmp))
        hint = getattr(op, "collision_hint", "")
        result.status, result.code, result.outputs = "failed", int(ExitCode.DATAERR), []
        result.message = f"{result.input}: {reason}" + (f" (hint: {hint})" if hint else "")

    def _claim_up_to_date(self, result: ItemResult) -> None:
        for output in dict.fromkeys(result.outputs):
            if not self._claim(output, result.input):
                if self.manifest is not None:
                    self.manifest.forget(result.key)
                result.status, result.code, result.reason = "failed", int(ExitCode.DATAERR), ""
                result.message = f"{result.input}: its output {output} now holds the output of {self._owner(output)}"
                result.outputs = []
                return

    # ----------------------------------------------------------------- failures of the pool
    def _broken(self, first: _Slot) -> None:
        """A worker died.  During a stop its items are rolled back; otherwise every item the dead pool held is
        re-run alone in a fresh process, so only the one that kills its worker fails."""
        affected = [first] + [s for s in self.slots if s.future is not None]
        self.slots = deque(s for s in self.slots if s.future is None)
        self.in_flight = 0
        self.lost_workers = True
        self.shutdown(kill=True)
        if self.stopping:
            self.summary.rolled_back += sum(len(s.items) for s in affected)
            return
        for slot in affected:
            for item in slot.items:
                if self._check_stop():
                    self.summary.rolled_back += 1
                    continue
                for result in self._isolated(item):
                    self._finish(result)

    def _isolated(self, item: Item) -> list[ItemResult]:
        pool = process_pool(1)
        try:
            fut = pool.submit(_process_chunk, self.op, [item], self.ctx)
            self._wait(fut)
            return list(fut.result())
        except cf.process.BrokenProcessPool:
            return [ItemResult(item.label, "failed", key=item.key, code=int(ExitCode.SOFTWARE), nfiles=len(item.paths),
                               message=f"{item.label}: the worker process died while processing it (a crash in a "
                                       "library, or killed: out of memory?)")]
        finally:
            pool.shutdown(wait=True)

    def shutdown(self, kill: bool = False) -> None:
        if self.executor is None:
            return
        if kill:
            for proc in list(getattr(self.executor, "_processes", {}).values()):
                with contextlib.suppress(OSError, AttributeError):
                    proc.terminate()  # SIGTERM: the worker removes its temporary files and exits
        self.executor.shutdown(wait=True)  # never cancel_futures: see gh-107219 above
        self.executor = None

    def abort(self) -> None:
        """Stop now: workers end, nothing uncommitted is reported, their temporary files are removed."""
        self.stopping = True
        self.lost_workers = True
        self.held.clear()
        self.stop[0] = 1
        self.shutdown(kill=True)
        for slot in self.slots:
            if slot.future is None:
                continue
            self.summary.rolled_back += len(slot.items)
            if slot.future.done():
                with contextlib.suppress(Exception):
                    for result in slot.future.result():
                        for tmp, _ in result.pending:
                            fsio.discard(Path(tmp))
        self.slots.clear()

    def finish_input(self, had_items: bool) -> None:
        """The input ended (or a stop was asked for): submit what is held, then emit every chunk still in flight,
        so what finished is committed and reported."""
        if not self.stopping:
            self._flush(final=True)
            if self.on_total is not None:
                self.on_total(self.summary.reported + sum(len(s.results or s.items) for s in self.slots))
        while self.slots:
            self._drain(block=True)
        if self.stopping:
            return
        if not had_items and self.accepted == 0 and not self.summary.count("failed"):
            self.summary.no_input = True


def _claim_key(output: str) -> int:
    return hash(os.path.normpath(output))  # claims live in this process only: its string hash is stable here


def _same_bytes(a: str, b: str) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def run_batch(
    op: Operator,
    files: Iterable[Path | fsio.Entry],
    out: Path | None,
    options: BatchOptions | None = None,
    *,
    items: Iterable[Item] | None = None,
    on_total: TotalHook | None = None,
    on_result: ResultHook | None = None,
    keep_results: bool = True,
) -> BatchSummary:
    """Run ``op`` over ``files`` (paths, or the entries of :func:`fsio.iter_inputs`, consumed as they come), or
    over ready-made ``items``, and return the summary (with every result in it only when ``keep_results``:
    a caller that handles each in ``on_result`` keeps memory flat however many items there are)."""
    opts = options or BatchOptions()
    created: list[Path] = []  # directories this run made: removed at the end if it wrote nothing into them
    if out is not None and not opts.dry_run:
        created = [] if out.exists() else [out]
        fsio.ensure_dir(out)  # now: an OUT that cannot be created fails before any input is read
        state = fsio.state_dir(out)  # (after OUT's parents exist: where it goes depends on them)
        created += [] if state.exists() else [state]
    runner = _Runner(op, out, opts, on_total, on_result)
    runner.summary.keep_results = keep_results
    if isinstance(items, Sequence) and on_total is not None:
        on_total(len(items))
    start = time.perf_counter()
    try:
        with runner.signals():
            try:
                if items is not None:
                    runner.feed_items(items)
                elif getattr(op, "grouped", False):
                    runner.feed_grouped(files)
                else:
                    runner.feed_files(files)
                runner.finish_input(had_items=items is not None)
            except KeyboardInterrupt:
                runner.abort()
                runner.summary.interrupted = True
            except BaseException:
                runner.abort()
                raise
            finally:
                runner.shutdown()
    finally:
        runner.summary.interrupted = runner.summary.interrupted or bool(runner.stop_signal)
        if runner.lost_workers and out is not None and not opts.dry_run:
            fsio.remove_temps_of(out, [fsio.RUN_TOKEN])  # staged outputs whose results never reached this process
        if runner.manifest is not None:
            runner.manifest.close()
        for made in created:  # a run that wrote nothing (a usage error on stdin, no input) leaves no empty OUT
            with contextlib.suppress(OSError):
                made.rmdir()
        runner.summary.seconds = time.perf_counter() - start
    return runner.summary
