"""``kaapcli watch``: files dropped into a folder, or series that become stable in Orthanc, are taken
and handled like received ones (DIANA's folder watcher and ObservableOrthanc).

Both sources feed the receiver's own bookkeeping (:class:`~kaapcli.core.net.scp.Receiver` without
its server): each file is stored under the layout, counted towards its series, and a complete
series runs the hooks (index, rules).  Nothing is taken before it is complete: a dropped file only
once its size and modification time have not changed for ``stable`` seconds; an Orthanc series
only once Orthanc reports it ``StableSeries``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.exitcodes import KaapcliError, UnavailableError

ORTHANC_STATE = Path(".kaapcli") / "orthanc-changes.json"


@dataclass
class FolderWatch:
    """Takes stable DICOM files from ``inbox``; stores them under ``receiver.out`` (moved) or in place."""

    inbox: Path
    receiver: Any  # kaapcli.core.net.scp.Receiver (not started: only its series bookkeeping is used)
    store: bool = True  # False: leave files where they are (series_dir = their folder)
    stable: float = 2.0
    on_error: Callable[[str], None] = print
    seen: dict[Path, tuple[int, float, float]] = field(default_factory=dict)  # path → (size, mtime, first seen)
    rejected: set[Path] = field(default_factory=set)

    def scan(self) -> int:
        """One pass: take every file that has been stable long enough; returns how many are still settling."""
        now = time.monotonic()
        settling = 0
        current: dict[Path, tuple[int, float, float]] = {}
        for path in fsio.walk_files(self.inbox):
            if path in self.rejected:
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # gone between the walk and the stat
            size_mtime = (st.st_size, st.st_mtime)
            before = self.seen.get(path)
            since = before[2] if before and before[:2] == size_mtime else now
            current[path] = (*size_mtime, since)
            if now - since >= self.stable and time.time() - st.st_mtime >= self.stable:
                self.take(path)
                current.pop(path, None)
            else:
                settling += 1
        self.seen = current
        return settling

    def take(self, path: Path) -> None:
        if not fsio.is_dicom(path):
            self.rejected.add(path)
            self.on_error(f"{path}: not a DICOM file: left in place")
            return
        try:
            if self.store:
                dest, header = self.receiver.writer.write(path.read_bytes())
                path.unlink()
            else:
                dest = path
                header = dicom.read(path, stop_before_pixels=True,
                                    specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
                dicom.require(header, "SeriesInstanceUID")
        except KaapcliError as exc:
            self.rejected.add(path)
            self.on_error(f"{path}: {exc.message}: left in place")
            return
        stored(self.receiver, dest, header, "")


def stored(receiver: Any, dest: Path, header: Any, calling: str) -> None:
    """Count a taken file towards its series, and report it as the receiver reports received ones."""
    receiver.record(dest, header, calling, "")
    if receiver.on_stored is not None:
        receiver.on_stored(dest)


@dataclass
class OrthancWatch:
    """Polls Orthanc's ``/changes`` feed; each ``StableSeries`` is downloaded into the store.

    The last change seen is kept in ``<store>/.kaapcli/orthanc-changes.json``, so a restart resumes.
    """

    url: str
    receiver: Any
    timeout: float = 30.0
    auth: tuple[str, str] | None = None

    @property
    def state_file(self) -> Path:
        return Path(self.receiver.out) / ORTHANC_STATE

    def since(self) -> int:
        try:
            return int(json.loads(self.state_file.read_text())["last"])
        except (OSError, ValueError, KeyError):
            return 0

    def _get(self, path: str, **params: Any) -> Any:
        import requests

        url = self.url.rstrip("/") + path
        try:
            response = requests.get(url, params=params, timeout=self.timeout, auth=self.auth)
        except requests.RequestException as exc:
            raise UnavailableError(f"Orthanc {self.url}: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise UnavailableError(f"Orthanc {self.url}: GET {path} answered HTTP {response.status_code}")
        return response

    def poll(self) -> bool:
        """Fetch the next page of changes and take its stable series; True when the feed is exhausted."""
        changes = self._get("/changes", since=self.since(), limit=100).json()
        for change in changes.get("Changes", []):
            if change.get("ChangeType") == "StableSeries":
                self.take_series(change["ID"])
            fsio.write_json(self.state_file, {"last": change["Seq"]})
        if not changes.get("Changes") and "Last" in changes:
            fsio.write_json(self.state_file, {"last": max(self.since(), int(changes["Last"]))})
        return bool(changes.get("Done", True))

    def take_series(self, orthanc_id: str) -> None:
        series = self._get(f"/series/{orthanc_id}").json()
        for instance in series.get("Instances", []):
            dest, header = self.receiver.writer.write(self._get(f"/instances/{instance}/file").content)
            stored(self.receiver, dest, header, "ORTHANC")
        self.receiver.poll(flush=True)  # Orthanc already judged the series complete


def run_forever(step: Callable[[], Any], receiver: Any, interval: float, once: Callable[[Any], bool]) -> None:
    """Call ``step`` every ``interval`` s, completing quiet series, until ``once(result)`` (or Ctrl-C/SIGTERM)."""
    try:
        while True:
            result = step()
            receiver.poll()
            if once(result):
                break
            time.sleep(interval)
    finally:
        receiver.poll(flush=True)


def environ_auth() -> tuple[str, str] | None:
    user = os.environ.get("KAAPCLI_ORTHANC_USER")
    return (user, os.environ.get("KAAPCLI_ORTHANC_PASSWORD", "")) if user else None
