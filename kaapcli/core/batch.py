"""The one batch engine every operator runs through.

An operator supplies "process one item"; the engine does the rest:

1. collect inputs (files, sorted directory walks, ``-`` for paths on stdin);
2. keep only the files the operator accepts (by default: files that sniff as DICOM),
   counting the others as skipped;
3. optionally group files into items (e.g. one per series) with a per-file key
   read in the worker pool;
4. keep the items of one shard (stable hash of the item key);
5. skip items whose outputs are up to date, made with the same options (a manifest
   per output directory remembers which outputs each item produced);
6. process items in a process pool, collecting one :class:`ItemResult` each;
7. report progress through a callback and return a :class:`BatchSummary` that
   knows its exit code.

This module never prints: the CLI renders results.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from kaapcli.core import fsio
from kaapcli.exitcodes import ExitCode, KaapcliError, UsageError

Status = Literal["ok", "skipped", "failed"]
MANIFEST_DIR = ".kaapcli"


@dataclass(frozen=True)
class Item:
    """One unit of work: a stable key (used for sharding and the manifest) and its input files.

    ``notes``: per path, what the operator's ``scan`` learnt of it while planning (empty: nothing), so
    ``process`` need not read it again."""

    key: str
    paths: tuple[Path, ...]
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
    reason: str = ""  # for skipped: "not-dicom", "up-to-date", "dry-run", ...
    nfiles: int = 1
    key: str = ""  # the item key, for the manifest

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
        """The item key of a file, when files are grouped (``None`` = one item per file)."""
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
    results: list[ItemResult] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    def count(self, status: Status, reason: str | None = None) -> int:
        return sum(
            r.nfiles if status == "skipped" else 1
            for r in self.results
            if r.status == status and (reason is None or r.reason == reason)
        )

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.results)

    @property
    def nfiles(self) -> int:
        return sum(r.nfiles for r in self.results if r.reason != "not-input")

    @property
    def exit_code(self) -> ExitCode:
        """0 all ok; 1 some failed; a shared specific code when nothing succeeded.

        Up-to-date items count as ok; skipped non-inputs count as nothing.
        """
        if self.interrupted:
            return ExitCode.INTERRUPTED
        failed = [r for r in self.results if r.status == "failed"]
        if not failed:
            return ExitCode.OK
        codes = {r.code for r in failed}
        nothing_ok = not any(r.status == "ok" or r.reason == "up-to-date" for r in self.results)
        specific = (ExitCode.DATAERR, ExitCode.UNAVAILABLE, ExitCode.CANTCREAT, ExitCode.TEMPFAIL, ExitCode.CONFIG)
        if nothing_ok and len(codes) == 1 and (code := codes.pop()) in specific:
            return ExitCode(code)
        return ExitCode.ITEMS_FAILED

    def line(self) -> str:
        """``300 files, 152 MB, 1.9 s, 80 MB/s, 0 failed`` plus skip counts."""
        mb = self.nbytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        extras = []
        for reason, label in (("not-input", "not DICOM/not an input"), ("up-to-date", "up to date"),
                              ("dry-run", "dry run"), ("other-shard", "other shards")):
            n = self.count("skipped", reason)
            if n:
                extras.append(f"{n} {label}")
        extra = f" ({', '.join(extras)})" if extras else ""
        return (f"{self.nfiles} files{extra}, {mb:.0f} MB, {self.seconds:.1f} s, "
                f"{rate:.0f} MB/s, {self.count('failed')} failed")


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


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


class Manifest:
    """Remembers, per output directory and operator, which outputs each item key produced.

    One file per shard (``OUT/.kaapcli/<op>-<i>of<n>.json``) so machines sharing an output
    directory never overwrite each other; all of them are read back.
    """

    def __init__(self, out: Path, op_name: str, shard: tuple[int, int] | None):
        self.dir = out / MANIFEST_DIR
        tag = f"{shard[0] + 1}of{shard[1]}" if shard else "all"
        self.path = self.dir / f"{op_name}-{tag}.json"
        self.prefix = f"{op_name}-"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.dir.is_dir():
            for f in sorted(self.dir.glob(f"{self.prefix}*.json")):
                try:
                    self.entries.update(json.loads(f.read_text()))
                except (OSError, ValueError):
                    continue  # a damaged manifest only costs a rebuild

    def up_to_date(self, item: Item, fingerprint: str) -> list[str] | None:
        entry = self.entries.get(item.key)
        if not entry or entry.get("options") != fingerprint:
            return None
        outputs = entry.get("outputs", [])
        try:
            newest_input = max((p.stat().st_mtime for p in item.paths), default=0.0)
            oldest_output = min((Path(o).stat().st_mtime for o in outputs), default=float("inf"))
        except OSError:
            return None
        if not outputs or oldest_output < newest_input:
            return None
        return outputs

    def record(self, key: str, fingerprint: str, outputs: list[str]) -> None:
        self.entries[key] = {"options": fingerprint, "outputs": outputs}

    def save(self) -> None:
        fsio.write_json(self.path, self.entries, indent=None)


# --------------------------------------------------------------------------- workers

def _accept(op: Operator, path: Path) -> bool:
    try:
        return op.accepts(path)
    except Exception:
        return False


def _scan_chunk(op: Operator, paths: list[Path]) -> list[tuple[Path, str | None, str, str, Any]]:
    """Group keys (and the operator's notes) for a chunk of files (runs in a worker).  Returns (path, key, error,
    skip reason, note)."""
    scan = getattr(op, "scan", None) or (lambda path: (op.group_key(path), None))
    out: list[tuple[Path, str | None, str, str, Any]] = []
    for path in paths:
        if not _accept(op, path):
            out.append((path, None, "", "", None))
            continue
        try:
            key, note = scan(path)
            out.append((path, key, "", "", note))
        except SkipItem as exc:
            out.append((path, None, "", str(exc), None))
        except KaapcliError as exc:
            out.append((path, None, str(exc), "", None))
        except Exception as exc:  # noqa: BLE001 - a broken file must not stop the scan
            out.append((path, None, describe_exception(exc), "", None))
    return out


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _process_one(op: Operator, item: Item, ctx: Context) -> ItemResult:
    label = item.label
    nbytes = 0
    try:
        nbytes = sum(p.stat().st_size for p in item.paths)
    except OSError:
        pass
    try:
        outcome = op.process(item, ctx)
    except KaapcliError as exc:
        msg = f"{label}: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "")
        return ItemResult(label, "failed", message=msg, code=int(exc.code), nbytes=0, nfiles=len(item.paths))
    except MemoryError:
        return ItemResult(label, "failed", message=f"{label}: out of memory", code=int(ExitCode.TEMPFAIL),
                          nfiles=len(item.paths))
    except Exception as exc:  # noqa: BLE001 - any exception on one item is one failed item
        msg = f"{label}: {describe_exception(exc)}"
        if ctx.debug:
            msg += "\n" + traceback.format_exc()
        # Most unexpected exceptions from pydicom/numpy on a file are bad data, not bugs.
        return ItemResult(label, "failed", message=msg, code=int(ExitCode.DATAERR), nfiles=len(item.paths))
    status: Status = "skipped" if outcome.skipped else "ok"
    nfiles = len(item.paths)
    if not item.paths:  # a generator (mock): count what was written instead
        nfiles = len(outcome.outputs)
        nbytes = sum(p.stat().st_size for p in outcome.outputs if p.exists())
    return ItemResult(label, status, outputs=[str(p) for p in outcome.outputs], message=outcome.message,
                      warnings=outcome.warnings, nbytes=nbytes, nfiles=nfiles,
                      reason="operator" if outcome.skipped else "")


def _process_chunk(op: Operator, items: list[Item], ctx: Context) -> list[ItemResult]:
    results = []
    for item in items:
        result = _process_one(op, item, ctx)
        result.key = item.key
        results.append(result)
    return results


# --------------------------------------------------------------------------- engine

ResultHook = Callable[[ItemResult], None]
TotalHook = Callable[[int], None]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _chunks(seq: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(seq), size):
        yield list(seq[i:i + size])


def _chunk_size(n: int, workers: int) -> int:
    return max(1, min(64, n // (workers * 8) or 1))


class _Pool:
    """A process pool (or inline execution for one worker) yielding chunk results in input order."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> _Pool:
        if self.workers > 1:
            import multiprocessing  # ~10 ms: only runs with worker processes need it

            self.executor = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=exc[0] is None, cancel_futures=True)

    def run(self, fn: Callable[..., list[Any]], chunks: Iterable[list[Any]], *args: Any) -> Iterable[list[Any]]:
        if self.executor is None:
            for chunk in chunks:
                yield fn(*args[:1], chunk, *args[1:])
            return
        futures = [self.executor.submit(fn, *args[:1], chunk, *args[1:]) for chunk in chunks]
        for fut in futures:  # in submission order: stdout is the same on every run
            yield fut.result()


def plan_items(op: Operator, files: list[Path], pool: _Pool, on_result: ResultHook) -> list[Item]:
    """Turn input files into items: one per file, or grouped by ``op.group_key``."""
    if not getattr(op, "grouped", False):
        items = []
        for path in files:  # a 132-byte sniff per file: cheap enough to do here, and counts stay exact
            if _accept(op, path):
                items.append(Item(str(path), (path,)))
            else:
                on_result(ItemResult(str(path), "skipped", message="not an input of this command",
                                     reason="not-input"))
        return items
    groups: dict[str, list[tuple[Path, Any]]] = {}
    size = _chunk_size(len(files), pool.workers)
    for chunk in pool.run(_scan_chunk, _chunks(files, size), op):
        for path, key, error, skip, note in chunk:
            if error:
                on_result(ItemResult(str(path), "failed", message=f"{path}: {error}", code=int(ExitCode.DATAERR)))
            elif key is None:
                on_result(ItemResult(str(path), "skipped", message=skip or "not an input of this command",
                                     reason="not-input"))
            else:
                groups.setdefault(key, []).append((path, note))
    items = []
    for key, members in groups.items():
        members.sort(key=lambda m: m[0])
        notes = tuple(note for _, note in members)
        items.append(Item(key, tuple(path for path, _ in members), notes if any(n is not None for n in notes) else ()))
    return items


def run_batch(
    op: Operator,
    files: list[Path],
    out: Path | None,
    options: BatchOptions | None = None,
    *,
    items: list[Item] | None = None,
    on_total: TotalHook | None = None,
    on_result: ResultHook | None = None,
) -> BatchSummary:
    """Run ``op`` over ``files`` (already collected), or over ready-made ``items``, and return the summary."""
    opts = options or BatchOptions()
    summary = BatchSummary()
    start = time.perf_counter()

    def emit(result: ItemResult) -> None:
        summary.results.append(result)
        if on_result:
            on_result(result)

    workers = opts.workers or default_workers()
    if out is not None and not opts.dry_run:
        fsio.ensure_dir(out)
    ctx = Context(out=out, dry_run=opts.dry_run, debug=opts.debug)
    fingerprint = options_fingerprint(op)
    manifest = Manifest(out, op.name, opts.shard) if out is not None else None
    try:
        with _Pool(min(workers, max(1, len(files), len(items or ())))) as pool:
            if items is None:
                items = plan_items(op, files, pool, emit)
            todo: list[Item] = []
            for item in items:
                if not in_shard(item.key, opts.shard):
                    continue
                previous = manifest.up_to_date(item, fingerprint) if manifest and not opts.force else None
                if previous is not None:
                    emit(ItemResult(item.label, "skipped", outputs=previous, message="up to date",
                                    reason="up-to-date", nfiles=len(item.paths) or len(previous)))
                elif opts.dry_run and not getattr(op, "supports_dry_run", False):
                    emit(ItemResult(item.label, "skipped", message="would process", reason="dry-run",
                                    nfiles=len(item.paths)))
                else:
                    todo.append(item)
            if on_total:
                on_total(len(todo) + len(summary.results))
            size = _chunk_size(len(todo), pool.workers)
            for chunk in pool.run(_process_chunk, _chunks(todo, size), op, ctx):
                for result in chunk:
                    if manifest is not None and result.status == "ok" and result.outputs and not opts.dry_run:
                        manifest.record(result.key, fingerprint, result.outputs)
                    emit(result)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if manifest is not None and not opts.dry_run and manifest.entries:
            manifest.save()
        summary.seconds = time.perf_counter() - start
    return summary
