"""``clean``: remove run folders (direct subdirectories of a root) whose newest file is too old.

Kaapana's expired-workflow clean-up.  Age is the newest modification time of any entry in the
folder (files and directories, symlinks by their own time: a link is never followed).  A run
folder is first renamed to a hidden name in the root and then deleted, so a half-deleted folder
never looks like a run.  The root itself must not be ``/`` or the home directory.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    """The newest mtime in a tree, never following symlinks."""
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in (*dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue  # vanished while walking
    return newest


@dataclass
class Expired:
    path: Path
    age: float  # seconds since its newest entry


def expired_runs(root: Path, older_than: float, now: float | None = None) -> Iterator[Expired]:
    """Direct subdirectories (not symlinks, not hidden) of ``root`` whose newest entry is older than the period."""
    now = time.time() if now is None else now
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        age = now - newest_mtime(entry)
        if age > older_than:
            yield Expired(entry, age)


def remove_run(path: Path) -> None:
    """Rename out of sight, then delete (rmtree never follows symlinks)."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}"
    try:
        os.rename(path, trash)
        shutil.rmtree(trash)
    except OSError as exc:
        raise CantCreateError(f"{path}: cannot remove: {exc.strerror}") from exc
