"""``clean``: remove run folders (direct subdirectories of a root) whose newest file is too old.

Kaapana's expired-workflow clean-up.  Age is the newest modification time of any entry in the
folder (files and directories, symlinks by their own time: a link is never followed); a folder
with a directory that cannot be read has no known age and is never removed.  A run folder is
first renamed to a hidden name in the root and then deleted, so a half-deleted folder never looks
like a run; when the deletion fails, what is left gets its name back (never left hidden), and a
later clean finishes what an interrupted one left.  The root itself must not be ``/`` or the home
directory.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.exitcodes import CantCreateError, NoInputError, UsageError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
TRASH_PREFIX = ".kaapcli-removing-"


def parse_period(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``60d``, ``2w`` → seconds."""
    match = _PERIOD.match(text)
    if not match:
        raise UsageError(f"--older-than {text!r}: expected a number and a unit of s m h d w, e.g. 60d")
    return float(match.group(1)) * UNITS[match.group(2)]


def check_root(root: Path) -> Path:
    if not root.exists():
        raise NoInputError(f"{root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    resolved = root.resolve()
    if resolved == Path("/") or resolved == Path.home().resolve():
        raise UsageError(f"{root}: refusing to clean / or the home directory", hint="point at the runs directory")
    return resolved


def newest_mtime(folder: Path) -> float:
    """The newest mtime in a tree, never following symlinks.  A directory that cannot be read makes the age
    unknown: CantCreateError naming it (a folder is never removed on a guess)."""
    newest = folder.lstat().st_mtime
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=unreadable.append):
        for name in (*dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue  # vanished while walking
    if unreadable:
        exc = unreadable[0]
        raise CantCreateError(f"{folder}: cannot read {exc.filename}: {exc.strerror}; not removed",
                              hint="its age is unknown; fix the permissions or remove it by hand")
    return newest


@dataclass
class Expired:
    path: Path
    age: float  # seconds since its newest entry


@dataclass
class Unknown:
    path: Path
    reason: str  # why its age is unknown (a folder that cannot be read)


def expired_runs(root: Path, older_than: float, now: float | None = None) -> Iterator[Expired | Unknown]:
    """Direct subdirectories (not symlinks, not hidden) of ``root`` whose newest entry is older than the period;
    folders whose age cannot be read come as :class:`Unknown`."""
    now = time.time() if now is None else now
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            age = now - newest_mtime(entry)
        except CantCreateError as exc:
            yield Unknown(entry, exc.message)
            continue
        if age > older_than:
            yield Expired(entry, age)


def leftovers(root: Path) -> list[Path]:
    """Folders an interrupted clean renamed but did not finish deleting."""
    return sorted(p for p in root.iterdir() if p.name.startswith(TRASH_PREFIX) and p.is_dir() and not p.is_symlink())


def remove_run(path: Path) -> None:
    """Rename out of sight, then delete (rmtree never follows symlinks).  When the deletion fails, what is left
    gets its name back, so a half-deleted folder is never hidden."""
    trash = path.parent / f"{TRASH_PREFIX}{secrets.token_hex(4)}-{path.name}"
    try:
        os.rename(path, trash)
    except OSError as exc:
        raise CantCreateError(f"{path}: cannot remove: {exc.strerror}") from exc
    failures: list[tuple[str, str]] = []

    def failed(function: object, name: str, info: Any) -> None:
        failures.append((name, getattr(info[1], "strerror", None) or str(info[1])))

    shutil.rmtree(trash, onerror=failed)  # onexc from Python 3.12 on
    if not failures and not trash.exists():
        return
    try:
        os.rename(trash, path)
        where = path
    except OSError:
        where = trash
    name, reason = failures[0] if failures else (str(trash), "not empty")
    raise CantCreateError(f"{path}: cannot remove {name.replace(str(trash), str(path), 1)}: {reason}; "
                          f"what is left stays at {where}")


def remove_leftover(trash: Path) -> None:
    try:
        shutil.rmtree(trash)
    except OSError as exc:
        raise CantCreateError(f"{trash}: cannot remove the rest of an interrupted clean: {exc.strerror}") from exc
