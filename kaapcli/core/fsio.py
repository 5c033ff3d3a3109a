"""File-system helpers shared by every operator: input collection and atomic writes.

Every file kaapcli writes goes through :func:`atomic_write`: the bytes land in a
hidden temporary file in the destination directory and are renamed into place,
so a reader (or a crash, even SIGKILL) never sees a partial file under a final
name.  Walks skip hidden names, so those temporary files are never taken as
inputs either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from kaapcli.exitcodes import CantCreateError, NoInputError, UsageError

TMP_SUFFIX = ".kaapcli-part"


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files below ``root`` in sorted order, hidden names skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def collect_inputs(args: Iterable[str], stdin: IO[str] | None = None) -> list[Path]:
    """Expand INPUT arguments: files, directories (recursed, sorted) and ``-`` (paths on stdin).

    Order is kept and duplicates are dropped.  A missing path raises NoInputError (exit 66).
    """
    paths: list[Path] = []
    for arg in args:
        if arg == "-":
            stream = stdin if stdin is not None else sys.stdin
            paths.extend(Path(_stdin_path(line.strip())) for line in stream if line.strip())
        else:
            paths.append(Path(arg))
    seen: set[Path] = set()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            candidates: Iterable[Path] = walk_files(path)
        elif path.is_file():
            candidates = (path,)
        else:
            raise NoInputError(f"{path}: no such file or directory")
        for f in candidates:
            if f not in seen:
                seen.add(f)
                files.append(f)
    return files


def _stdin_path(line: str) -> str:
    """A path read from stdin; a JSON record there (``kaapcli search`` without ``--format paths``) is a usage error."""
    if line.startswith("{") and not os.path.exists(line):
        raise UsageError(f"stdin: a JSON record, not a path: {line[:60]}...",
                         hint="kaapcli search QUERY --format paths prints the files of the series")
    return line


def outside_output(args: Iterable[str], files: list[Path], out: Path) -> list[Path]:
    """``files`` minus those inside ``out``, so a re-run never takes its own outputs as inputs
    (``OUT`` may sit inside an INPUT directory); an INPUT that is ``out`` or lies inside it is a UsageError."""
    out_dir = out.resolve()
    for arg in args:
        if arg != "-" and Path(arg).resolve().is_relative_to(out_dir):
            raise UsageError(f"{arg}: input is inside the output directory {out}",
                             hint="write to another directory (or, for modify, use --in-place)")
    return [f for f in files if not f.resolve().is_relative_to(out_dir)]


def is_dicom(path: Path) -> bool:
    """Cheap sniff: a Part 10 preamble ("DICM" at 128), or a raw dataset starting in group 0002/0008."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # No preamble: accept a bare dataset whose first tag is in group 0002 or 0008 (as DCMTK does).
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CantCreateError(f"{path}: cannot create directory: {exc.strerror}") from exc
    return path


@contextlib.contextmanager
def atomic_write(dest: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``dest``; on success fsync-free rename over ``dest``.

    On any exception (including KeyboardInterrupt) the temporary file is removed
    and ``dest`` is left as it was.
    """
    ensure_dir(dest.parent)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        fh = open(tmp, mode)
    except OSError as exc:
        raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from exc
    try:
        with fh:
            yield fh
        os.replace(tmp, dest)
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from exc
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_bytes(dest: Path, data: bytes) -> int:
    with atomic_write(dest) as fh:
        fh.write(data)
    return len(data)


def write_json(dest: Path, obj: Any, *, indent: int | None = 2) -> int:
    data = (json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n").encode()
    return write_bytes(dest, data)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


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
