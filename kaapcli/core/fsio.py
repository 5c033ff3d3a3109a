"""File-system helpers shared by every operator: input collection, atomic writes, where run state lives.

Inputs are regular files only.  :func:`iter_inputs` walks INPUT arguments (directories recursed in
sorted order, ``-`` for paths on stdin, read as they arrive) and never opens anything but regular
files: FIFOs, sockets, devices, dangling symlinks and symlink loops are reported as
:class:`Unusable` entries (skipped and counted when walked, failed when named on stdin), symlinks to
directories are not followed, unreadable directories are failures that name the directory.  Names
are handled as bytes where the system gives bytes (``surrogateescape``), so a file name that is not
UTF-8 survives walks, stdin, stdout and JSON.

Every file kaapcli writes goes through :func:`atomic_write` (or :func:`temp_beside` and
:func:`commit` for writers that need a path): the bytes land in a hidden temporary file in the
destination directory and are renamed into place, so a reader (or a crash, even SIGKILL) never
sees a partial file under a final name.  Inside a batch item the renames are deferred
(:func:`deferred_commits`): the engine commits an item's outputs together, after checking that no
other input of the run claimed the same names (an operator that reads back what it wrote earlier
in the same item reads :func:`staged`).  Walks skip hidden names, so temporary files are
never taken as inputs either.

This module never reads DICOM beyond the 132-byte sniff, and never prints.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from kaapcli.exitcodes import CantCreateError, ExitCode, NoInputError, UsageError

TMP_SUFFIX = ".kaapcli-part"
# In every temporary name of this run (workers fork from it) and in its journal: a later run finds the
# temporaries of a crashed one by it.  os.urandom rather than secrets, whose hashlib costs ~4 ms of each start-up.
RUN_TOKEN = os.urandom(4).hex()
STATE_SUFFIX = ".kaapcli"  # the run-state directory beside an output directory: .<OUT name>.kaapcli
SNIFF_BYTES = 132  # the preamble and "DICM" (PS3.10 7.1)


# --------------------------------------------------------------------------- inputs

class InputFile(NamedTuple):
    """A regular file to process, and the directory INPUT it was found in (None: named itself)."""

    path: Path
    root: Path | None = None


@dataclass(frozen=True)
class Unusable:
    """A path that is not an input: skipped and counted (``failed=False``) or a failed item naming it."""

    path: Path
    reason: str
    failed: bool = False
    code: int = int(ExitCode.NOINPUT)
    kind: str = "not-regular"  # how a skipped one is counted: "not-regular", or "not-input"


class _Idle:
    """Yielded by :func:`iter_inputs` while stdin has no new line, so the engine can flush its work."""

    def __repr__(self) -> str:
        return "IDLE"


IDLE = _Idle()
Entry = InputFile | Unusable | _Idle


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _stat_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "dangling symbolic link"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    return f"cannot read: {exc.strerror}"


def classify(path: Path) -> InputFile | Unusable | Path:
    """A named path: a regular file (InputFile), a directory (returned as Path, to walk) or Unusable."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Unusable(path, _stat_problem(str(path), exc), failed=True)
    if stat.S_ISDIR(st.st_mode):
        return path
    if stat.S_ISREG(st.st_mode):
        return InputFile(path)
    return Unusable(path, f"{file_kind(st.st_mode)}, not a regular file: only regular files are inputs", failed=True)


def check_named(args: Iterable[str]) -> None:
    """Refuse, before any work, INPUT arguments that do not exist or are neither regular files nor directories."""
    for arg in args:
        if arg == "-":
            continue
        found = classify(Path(arg))
        if isinstance(found, Unusable):
            hint = "" if found.reason.startswith("no such") else "name the files themselves, or a directory"
            raise NoInputError(f"{arg}: {found.reason}", hint=hint)


class _Pruned:
    """Directories a walk never enters, by (device, inode).  A directory that does not exist yet (the output
    directory, made when the run starts) is looked up again as the walk goes, until it exists."""

    def __init__(self, paths: Iterable[Path] = ()):
        self.ids: set[tuple[int, int]] = set()
        self.inodes: set[int] = set()
        self.waiting = list(paths)
        self.resolve()

    def add(self, found: tuple[int, int]) -> None:
        self.ids.add(found)
        self.inodes.add(found[1])

    def resolve(self) -> None:
        if self.waiting:
            for path in list(self.waiting):
                if (found := _dev_ino(path)) is not None:
                    self.add(found)
                    self.waiting.remove(path)

    def __contains__(self, entry: os.DirEntry[str]) -> bool:
        if entry.inode() not in self.inodes:
            return False
        st = entry.stat(follow_symlinks=False)
        return (st.st_dev, st.st_ino) in self.ids


def _walk(root: Path, prune: _Pruned) -> Iterator[InputFile | Unusable]:
    """Regular files below ``root``, files of a directory before its subdirectories, each level sorted by name;
    hidden names skipped; symlinks to files followed, to directories not; pruned directories left out."""
    stack: list[Iterator[str]] = [iter([str(root)])]
    while stack:
        directory = next(stack[-1], None)
        if directory is None:
            stack.pop()
            continue
        prune.resolve()
        try:
            runs, others = _listing(directory)
        except OSError as exc:
            yield Unusable(Path(directory), f"cannot read directory: {exc.strerror}", failed=True)
            continue
        subdirs: list[str] = []
        listing = heapq.merge(*(((name, None) for name in _run_names(run)) for run in runs),
                              ((e.name, e) for e in others), key=lambda pair: pair[0])
        for name, entry in listing:
            found = InputFile(Path(os.path.join(directory, name))) if entry is None else \
                _entry(entry, prune, subdirs)
            if found is not None:
                yield found
        stack.append(iter(subdirs))


LISTING_RUN = 4096  # names sorted at a time while a directory is read
LISTING_PIECE = 256  # names per string of a sorted run


def _listing(directory: str) -> tuple[list[list[str]], list[os.DirEntry[str]]]:
    """The visible names of a directory: regular files as sorted runs of names, each run a list of strings of
    NUL-separated names, anything else as entries, sorted.  A directory's listing is held while it is walked, and
    a DirEntry costs ~250 bytes, a name in a run ~35: a 50,000-file directory takes ~2 MB instead of ~13, never
    more than one run of names is held as separate strings, and the strings are let go as the walk passes them
    (the file type comes from the scan, no extra stat)."""
    runs: list[list[str]] = []
    names: list[str] = []
    others: list[os.DirEntry[str]] = []

    def add_run() -> None:
        names.sort()
        runs.append(["\0".join(names[i:i + LISTING_PIECE]) for i in range(0, len(names), LISTING_PIECE)])
        names.clear()

    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError:  # vanished or unreadable: _entry reports it
                regular = False
            if not regular:
                others.append(entry)
                continue
            names.append(entry.name)
            if len(names) == LISTING_RUN:
                add_run()
    if names:
        add_run()
    others.sort(key=lambda e: e.name)
    return runs, others


def _run_names(pieces: list[str]) -> Iterator[str]:
    """The names of a run, one at a time; each string of names is dropped once its names are out."""
    pieces.reverse()
    while pieces:
        yield from pieces.pop().split("\0")


def _entry(entry: os.DirEntry[str], prune: _Pruned, subdirs: list[str]) -> InputFile | Unusable | None:
    try:
        if entry.is_dir(follow_symlinks=False):
            if entry not in prune:
                subdirs.append(entry.path)
            return None
        if entry.is_file(follow_symlinks=False):
            return InputFile(Path(entry.path))
        if entry.is_symlink():
            try:
                st = os.stat(entry.path)
            except OSError as exc:
                return Unusable(Path(entry.path), _stat_problem(entry.path, exc))
            if stat.S_ISREG(st.st_mode):
                return InputFile(Path(entry.path))
            what = "symbolic link to a directory (not followed)" if stat.S_ISDIR(st.st_mode) else \
                f"symbolic link to {file_kind(st.st_mode)}"
            return Unusable(Path(entry.path), what)
        return Unusable(Path(entry.path), file_kind(entry.stat(follow_symlinks=False).st_mode))
    except OSError as exc:  # vanished while walking, or unreadable
        return Unusable(Path(entry.path), _stat_problem(entry.path, exc), failed=exc.errno != errno.ENOENT)


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files below ``root`` in sorted order, hidden names and non-regular files skipped."""
    for found in _walk(root, _Pruned()):
        if isinstance(found, InputFile):
            yield found.path


def _stdin_lines(stdin: IO[bytes] | IO[str] | None, poll: float) -> Iterator[str | _Idle]:
    """Lines of stdin as they arrive (IDLE while none is ready), decoded as file names are (surrogateescape).

    A pipe, socket or terminal is read with ``select`` and ``os.read`` in this thread: no reader thread, whose
    buffer lock a forked worker would inherit held (multiprocessing closes ``sys.stdin`` in each child)."""
    stream: Any = stdin if stdin is not None else sys.stdin
    raw = getattr(stream, "buffer", stream)
    try:
        fd = raw.fileno()
        mode = os.fstat(fd).st_mode
        live = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)
    except (AttributeError, OSError, ValueError):
        live = False
    if not live:
        for line in raw:
            yield os.fsdecode(line) if isinstance(line, bytes) else line
        return
    import select

    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], poll)
        if not ready:
            yield IDLE
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if pending:
                yield os.fsdecode(pending)
            return
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield os.fsdecode(line)


def iter_inputs(args: Iterable[str], stdin: IO[bytes] | IO[str] | None = None, *,
                prune: Iterable[Path] = (), poll: float = 0.05) -> Iterator[Entry]:
    """Expand INPUT arguments lazily: files, directories (recursed, sorted) and ``-`` (paths on stdin, as
    they arrive).  Duplicates (a file named twice, or inside a directory already walked) are dropped.

    ``prune``: directories never walked into (the output directory and its run state).  A path on stdin
    that is missing or not a regular file is a failed :class:`Unusable`; named arguments are expected to be
    checked first (:func:`check_named`), but are classified the same way.
    """
    pruned = _Pruned(prune)
    pruned_real = [os.path.realpath(p).rstrip("/") + "/" for p in prune]
    parents: dict[str, bool] = {}  # directory of a file named one by one -> inside a pruned directory
    walked: list[str] = []  # absolute roots already walked
    named: set[int] = set()  # hashes of the absolute names of files given one by one (arguments, stdin lines)

    def inside_walked(absolute: str) -> bool:
        return any(absolute == r or absolute.startswith(r.rstrip("/") + "/") for r in walked)

    def expand(path: Path) -> Iterator[InputFile | Unusable]:
        found = classify(path)
        if isinstance(found, Unusable):
            yield found
            return
        absolute = os.path.abspath(path)
        if isinstance(found, InputFile):
            if hash(absolute) in named or inside_walked(absolute):
                return
            parent = os.path.dirname(absolute)
            if pruned_real and parent not in parents:
                parents[parent] = (os.path.realpath(parent) + "/").startswith(tuple(pruned_real))
            if parents.get(parent):  # e.g. `find OUT | kaapcli ... - -o OUT`: never its own outputs as inputs
                yield Unusable(path, "inside the output directory", kind="not-input")
                return
            named.add(hash(absolute))
            yield found
            return
        if inside_walked(absolute):
            return
        for earlier in walked:  # a directory given after one of its subdirectories: that one is not walked twice
            if earlier.startswith(absolute.rstrip("/") + "/") and (found_id := _dev_ino(Path(earlier))) is not None:
                pruned.add(found_id)
        walked.append(absolute)
        for entry in _walk(path, pruned):
            if isinstance(entry, InputFile):
                if named and hash(os.path.abspath(entry.path)) in named:
                    continue
                yield InputFile(entry.path, path)
            else:
                yield entry

    for arg in args:
        if arg != "-":
            yield from expand(Path(arg))
            continue
        for line in _stdin_lines(stdin, poll):
            if line is IDLE:
                yield IDLE
            elif isinstance(line, str) and line.strip():
                yield from expand(Path(_stdin_path(line.strip())))


def collect_inputs(args: Iterable[str], stdin: IO[str] | IO[bytes] | None = None,
                   on_unusable: Callable[[Unusable], None] | None = None) -> list[Path]:
    """Expand INPUT arguments into a list of regular files (see :func:`iter_inputs`), for commands that need
    every path before they start.

    A missing or non-regular named path raises NoInputError (exit 66).  Other unusable paths go to
    ``on_unusable``; without it, those that are errors (an unreadable directory, a missing path on
    stdin) raise NoInputError and the others (FIFOs, dangling symlinks met while walking) are left out.
    """
    args = list(args)
    check_named(args)
    return list(iter_files(args, stdin, on_unusable))


def iter_files(args: Iterable[str], stdin: IO[str] | IO[bytes] | None = None,
               on_unusable: Callable[[Unusable], None] | None = None) -> Iterator[Path]:
    """:func:`collect_inputs` as the files are found, for commands that stream (named arguments are the
    caller's to check first, with :func:`check_named`)."""
    for entry in iter_inputs(args, stdin):
        if isinstance(entry, InputFile):
            yield entry.path
        elif isinstance(entry, Unusable):
            if on_unusable is not None:
                on_unusable(entry)
            elif entry.failed:
                raise NoInputError(f"{entry.path}: {entry.reason}")


def _stdin_path(line: str) -> str:
    """A path read from stdin; a JSON record there (``kaapcli search`` without ``--format paths``) is a usage error."""
    if line.startswith("{") and not os.path.exists(line):
        raise UsageError(f"stdin: a JSON record, not a path: {line[:60]}...",
                         hint="kaapcli search QUERY --format paths prints the files of the series")
    return line


def _dev_ino(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_not_inside(args: Iterable[str], out: Path) -> None:
    """An INPUT that is ``out`` or lies inside it is a UsageError (a re-run would take its outputs as inputs).

    Paths are compared resolved (``os.path.realpath``, which never fails on symlink loops)."""
    out_dir = os.path.realpath(out)
    for arg in args:
        if arg == "-":
            continue
        real = os.path.realpath(arg)
        if real == out_dir or real.startswith(out_dir.rstrip("/") + "/"):
            raise UsageError(f"{arg}: input is inside the output directory {out}",
                             hint="write to another directory (or, for modify, use --in-place)")


# --------------------------------------------------------------------------- sniffing

_sniffed: tuple[str, bytes] | None = None  # the head the engine just read, while the operator's accepts() runs


def read_head(path: Path, size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` bytes of a regular file, opened without blocking (a FIFO swapped in after the walk never
    hangs a run).  Raises OSError when the file cannot be read or is not a regular file."""
    key = os.fspath(path)
    if _sniffed is not None and _sniffed[0] == key:
        return _sniffed[1][:size]
    fd = os.open(key, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{file_kind(mode)}, not a regular file", key)
        return os.read(fd, size)
    finally:
        os.close(fd)


@contextlib.contextmanager
def sniffed(path: Path, head: bytes) -> Iterator[None]:
    """Within the block, :func:`read_head` of ``path`` answers from ``head`` (one open per file while planning)."""
    global _sniffed
    _sniffed = (os.fspath(path), head)
    try:
        yield
    finally:
        _sniffed = None


def looks_like_dicom(head: bytes) -> bool:
    """A Part 10 preamble ("DICM" at 128), or a raw dataset starting in group 0002/0008 (as DCMTK accepts)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def is_dicom(path: Path) -> bool:
    """Cheap sniff (see :func:`looks_like_dicom`); False for files that cannot be read."""
    try:
        return looks_like_dicom(read_head(path))
    except OSError:
        return False


# --------------------------------------------------------------------------- writing

def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CantCreateError(f"{path}: cannot create directory: {exc.strerror}") from exc
    return path


_live_temps: set[str] = set()  # temporary files of this process not yet renamed (removed on SIGTERM)
_deferred: list[tuple[Path, Path]] | None = None  # (temporary, destination) of the batch item being processed


def _create_temp(dest: Path, suffix: str = "") -> tuple[Path, int]:
    """A fresh hidden temporary file in ``dest``'s directory, created (so the name is ours) and open for writing."""
    ensure_dir(dest.parent)
    for _ in range(8):
        tmp = dest.parent / f".{dest.name}.{RUN_TOKEN}-{os.urandom(3).hex()}{TMP_SUFFIX}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from exc
        _live_temps.add(str(tmp))
        return tmp, fd
    raise CantCreateError(f"{dest}: cannot create a temporary file beside it")  # pragma: no cover


def temp_beside(dest: Path, suffix: str = "") -> Path:
    """A fresh hidden temporary name in ``dest``'s directory (created, so the name is ours), for writers that
    need a path (SimpleITK, zipfile); finish with :func:`commit`, or :func:`discard` on failure."""
    tmp, fd = _create_temp(dest, suffix)
    os.close(fd)
    return tmp


def commit(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary file over ``dest`` — or, inside a batch item, leave that to the engine."""
    if _deferred is not None:
        _deferred.append((tmp, dest))
        return
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        discard(tmp)
        raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from exc
    _live_temps.discard(str(tmp))


def discard(tmp: Path) -> None:
    _unlink_quietly(tmp)
    _live_temps.discard(str(tmp))


@contextlib.contextmanager
def deferred_commits() -> Iterator[list[tuple[Path, Path]]]:
    """Collect the renames of the block instead of doing them (the engine commits a whole item at once);
    on an exception every collected temporary file is removed."""
    global _deferred
    collected: list[tuple[Path, Path]] = []
    outer, _deferred = _deferred, collected
    try:
        yield collected
    except BaseException:
        for tmp, _ in collected:
            discard(tmp)
        collected.clear()
        raise
    finally:
        _deferred = outer


def staged(path: Path) -> Path:
    """Where to read an output this batch item wrote earlier: its temporary file until the engine commits it."""
    for tmp, dest in reversed(_deferred or []):
        if dest == path:
            return tmp
    return path


def forget_temps(paths: Iterable[str]) -> None:
    """Temporary files handed to another process (the engine's parent), no longer this process's to remove."""
    _live_temps.difference_update(paths)


def remove_live_temps() -> None:
    """Remove every temporary file this process is writing (a worker told to stop)."""
    for name in list(_live_temps):
        with contextlib.suppress(OSError):
            os.unlink(name)
    _live_temps.clear()


@contextlib.contextmanager
def atomic_write(dest: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``dest``; on success (fsync-free) rename it over ``dest``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``dest`` is
    left as it was.  Errors about ``dest`` itself are CantCreateError naming it; errors reading
    other files inside the block are the caller's (they propagate unchanged).
    """
    tmp, fd = _create_temp(dest)
    fh = os.fdopen(fd, mode)
    try:
        with fh:
            yield fh
    except OSError as exc:
        discard(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) and exc.filename in (None, str(tmp)):
            raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from exc
        raise
    except BaseException:
        discard(tmp)
        raise
    commit(tmp, dest)


def reserve(fh: IO[Any], size: int) -> None:
    """Allocate the blocks of a file about to be written with ``size`` bytes: a full disk fails here, before a byte
    is written, and ext4 has no delayed allocation to flush when the file is then renamed over an existing one
    (its ``auto_da_alloc``: about a third of an in-place header edit's time).  File systems without fallocate
    just write."""
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def write_bytes(dest: Path, data: bytes) -> int:
    with atomic_write(dest) as fh:
        fh.write(data)
    return len(data)


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """JSON text; strings that hold undecodable file-name bytes (surrogateescape) are written as ``\\udcXX``
    escapes, which Python's json and ``os.fsencode`` turn back into the same bytes."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent, ensure_ascii=True, default=str)
    return text


def write_json(dest: Path, obj: Any, *, indent: int | None = 2) -> int:
    return write_bytes(dest, (dumps(obj, indent=indent) + "\n").encode())


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def remove_temps_of(root: Path, tokens: Iterable[str]) -> int:
    """Remove the temporary files that runs with these tokens left below ``root`` (they were SIGKILLed)."""
    marks = tuple(f".{token}-" for token in tokens)
    removed = 0
    if not marks:
        return 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if TMP_SUFFIX in name and any(mark in name for mark in marks):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed


# --------------------------------------------------------------------------- run state

def state_dir(out: Path) -> Path:
    """Where kaapcli keeps the run state (manifests) of the output directory ``out``: never inside it.

    ``$KAAPCLI_STATE_DIR/<name>-<hash>`` when set; else a hidden sibling ``.<name>.kaapcli`` beside
    ``out`` (same file system, shared by every machine that shares ``out``); else, when that parent
    cannot be written, ``$XDG_STATE_HOME/kaapcli/<name>-<hash>`` (default ``~/.local/state``).
    """
    import hashlib

    real = Path(os.path.realpath(out))
    name = real.name or "root"
    keyed = f"{name}-{hashlib.sha1(os.fsencode(str(real))).hexdigest()[:12]}"
    configured = os.environ.get("KAAPCLI_STATE_DIR")
    if configured:
        return Path(configured) / keyed
    parent = real.parent
    if real.name and parent != real and os.access(parent, os.W_OK | os.X_OK):
        return parent / f".{name}{STATE_SUFFIX}"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "kaapcli" / keyed


# --------------------------------------------------------------------------- names

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(value: object, default: str = "unknown") -> str:
    """A value made safe as one path component: no separators, no leading dots, bounded length."""
    text = str(value).strip() if value is not None else ""
    text = _UNSAFE.sub("_", text).strip("._")
    return text[:120] or default


class _Safe(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "unknown"


def render_template(template: str, values: dict[str, Any]) -> Path:
    """Fill ``{Keyword}`` fields of a path template; each value sanitized as a path component."""
    safe = _Safe({k: safe_name(v) for k, v in values.items()})
    parts = [part.format_map(safe) for part in template.split("/") if part]
    return Path(*parts)
