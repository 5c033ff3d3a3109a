"""A send ledger: the SOP Instance UIDs a peer has acknowledged, so an interrupted send resumes.

JSON Lines, one ``{"sop_instance_uid", "peer", "status"}`` object per acknowledged instance. It is an
append-only log rather than an atomically replaced file on purpose: every line is written and flushed
the moment the peer answers, so a crash loses at most the line being written — and a damaged last
line is ignored when the ledger is read back.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO

from kaapcli.core import fsio
from kaapcli.exitcodes import CantCreateError


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    self.done.add(str(json.loads(line)["sop_instance_uid"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash

    def __contains__(self, sop_instance_uid: object) -> bool:
        return sop_instance_uid in self.done

    def add(self, sop_instance_uid: str, peer: str, status: str = "ok") -> None:
        line = json.dumps({"sop_instance_uid": sop_instance_uid, "peer": peer, "status": status}) + "\n"
        with self._lock:
            if self._fh is None:
                fsio.ensure_dir(self.path.parent)
                try:
                    self._fh = open(self.path, "a", encoding="utf-8")
                except OSError as exc:
                    raise CantCreateError(f"{self.path}: cannot write ledger: {exc.strerror}") from exc
                if self._fh.tell() > 0:
                    self._fh.write("\n")  # the previous run may have died mid-line
            self._fh.write(line)
            self._fh.flush()
            self.done.add(sop_instance_uid)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
