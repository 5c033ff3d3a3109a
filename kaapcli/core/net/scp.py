"""The receiver: a Storage SCP that writes what it is sent straight to disk, and tells when series are complete.

Datasets are never decoded nor held in memory: each association runs on its own thread over
:class:`~kaapcli.core.net.ul.StoreSCP`, which writes every C-STORE's fragments as they arrive to a hidden
spool file under ``OUT/.kaapcli/incoming`` (after a file meta built from the command); then only the few
header elements the output layout needs are read and the file is renamed into place — so no partial file
ever sits under a final name, even after SIGKILL.

A series counts as complete after ``series_timeout`` seconds without a new instance; then every hook of
``Receiver.hooks`` is called with a :class:`SeriesReceipt` (the index and pipeline commands plug in here).
The receipt is also written to ``OUT/.kaapcli/series/<SeriesInstanceUID>.json``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.net import ul
from kaapcli.core.net.peers import Timeouts
from kaapcli.exitcodes import CantCreateError, DataError, KaapcliError, UnavailableError

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
RECEIPTS_DIR = Path(".kaapcli") / "series"
SPOOL_DIR = Path(".kaapcli") / "incoming"  # datasets being received (hidden .*.kaapcli-part files)
MAX_ASSOCIATIONS = 64
LOG = logging.getLogger("kaapcli.net")

# C-STORE response statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
NOT_MATCHED = 0xB007  # "Data Set does not match SOP Class" (warning): DicomNode's answer to an unwanted object


def _now() -> str:
    return _iso_second(int(time.time()))


@functools.lru_cache(maxsize=1)
def _iso_second(second: int) -> str:  # files arrive hundreds a second: format each second once
    return datetime.fromtimestamp(second, UTC).astimezone().isoformat(timespec="seconds")


@dataclass
class SeriesReceipt:
    """What arrived of one series: where it is, from whom (Kaapana: calling AE = dataset, called AE = project)."""

    series_uid: str
    study_uid: str
    series_dir: str
    calling_aet: str
    called_aet: str
    instances: int = 0
    nbytes: int = 0
    first: str = ""
    last: str = ""
    files: list[str] = field(default_factory=list)
    calling_host: str = ""  # the association's peer address (where a reply may go)

    def placeholders(self) -> dict[str, str]:
        return {"series_dir": self.series_dir, "series_uid": self.series_uid, "study_uid": self.study_uid,
                "calling_aet": self.calling_aet, "called_aet": self.called_aet}


SeriesHook = Callable[[SeriesReceipt], None]
AcceptHook = Callable[[ul.Incoming], bool]  # before storing: False → not stored, answered NOT_MATCHED
ReadyHook = Callable[[SeriesReceipt, float], "bool | None"]  # (receipt, quiet s): complete now / hold / default


class StoreWriter:
    """Writes one C-STORE's encoded dataset to ``out/<layout>`` without decoding the pixel data."""

    HEAD = ul.Incoming.HEAD  # bytes of a dataset read for its header; past them, pydicom reads it

    def __init__(self, out: Path, layout: str = DEFAULT_LAYOUT):
        self.out = out
        self.layout = layout
        self.fields = sorted({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                              *dicom.template_fields(layout)})
        self._tags = _ascii_tags(self.fields)
        self._dirs: set[Path] = set()  # directories made: one mkdir per series, not per file

    def write(self, encoded: bytes) -> tuple[Path, Any]:
        """Write a Part 10 byte string; returns the path and the header elements read."""
        dest, header = self._destination(encoded[:self.HEAD], lambda: io.BytesIO(encoded))
        fsio.write_bytes(dest, encoded)
        return dest, header

    def place(self, spooled: Path, head: bytes | None = None) -> tuple[Path, Any]:
        """Move a complete Part 10 file (on the same file system) to its place: one atomic rename.  ``head``: its
        first bytes when the caller has them (``HEAD`` of them, or the whole file)."""
        if head is None:
            with open(spooled, "rb") as fh:
                head = fh.read(self.HEAD)
        dest, header = self._destination(head, lambda: spooled)
        if dest.parent not in self._dirs:
            fsio.ensure_dir(dest.parent)
            self._dirs.add(dest.parent)
        try:
            try:
                os.replace(spooled, dest)
            except FileNotFoundError:  # the directory was moved away since (e.g. by a rule): make it again
                os.replace(spooled, fsio.ensure_dir(dest.parent) / dest.name)
        except OSError as exc:
            raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from exc
        return dest, header

    def _destination(self, head: bytes, source: Callable[[], Any]) -> tuple[Path, Any]:
        header: Any = self._quick(head, whole=len(head) < self.HEAD)
        if header is None:
            import pydicom

            try:
                header = pydicom.dcmread(source(), stop_before_pixels=True, specific_tags=self.fields)
            except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's bad data
                raise DataError(f"cannot read the received dataset: {exc}") from exc
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            dicom.require(header, keyword)
        return self.out / fsio.render_template(self.layout, dicom.template_values(header, self.layout)), header

    def _quick(self, head: bytes, whole: bool) -> dict[str, str] | None:
        """The header fields read straight from the bytes (five times faster than pydicom), when every field
        has a VR of plain ASCII text and one value; else None."""
        if self._tags is None:
            return None
        found = dicom.peek_bytes(head, self._tags.values(), whole=whole)
        if found is None or any("\\" in value for value in found.values()):
            return None
        return {keyword: found[tag] for keyword, tag in self._tags.items() if tag in found}


# VRs whose values are ASCII by definition (no character set to apply) and read as their stripped text
_ASCII_VRS = frozenset({"UI", "CS", "DA", "TM", "DT", "AS", "AE"})


def _ascii_tags(keywords: list[str]) -> dict[str, int] | None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tags = {keyword: tag_for_keyword(keyword) for keyword in keywords}
    if any(tag is None or dictionary_VR(tag) not in _ASCII_VRS for tag in tags.values()):
        return None
    return {keyword: int(tag) for keyword, tag in tags.items() if tag is not None}


class Receiver:
    """A Verification + Storage SCP (one thread per association); :meth:`poll` completes quiet series."""

    def __init__(self, out: Path, *, aet: str = "KAAPCLI", bind: str = "127.0.0.1", port: int = 11112,
                 layout: str = DEFAULT_LAYOUT, allow_aets: list[str] | None = None, series_timeout: float = 10.0,
                 timeouts: Timeouts | None = None, on_stored: Callable[[Path], None] | None = None,
                 hooks: list[SeriesHook] | None = None, accept: AcceptHook | None = None,
                 ready: ReadyHook | None = None):
        self.out = out
        self.accept, self.ready = accept, ready
        self.aet, self.bind, self.port = aet, bind, port
        self.writer = StoreWriter(out, layout)
        self.allow_aets = allow_aets or []
        self.series_timeout = series_timeout
        self.timeouts = timeouts or Timeouts()
        self.on_stored = on_stored
        self.hooks: list[SeriesHook] = list(hooks or [])
        self.stored = 0
        self.failed = 0
        self._series: dict[str, SeriesReceipt] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._associations: set[ul.StoreSCP] = set()
        self._syntaxes: list[str] = []
        self._spool: ul.Spool | None = None

    # ------------------------------------------------------------------ server

    def start(self) -> None:
        from pydicom.uid import AllTransferSyntaxes

        # every transfer syntax pydicom knows, compressed ones included; any SOP class, private ones included
        self._syntaxes = [str(ts) for ts in AllTransferSyntaxes]
        spool = fsio.ensure_dir(self.out / SPOOL_DIR)
        try:
            listener = socket.create_server((self.bind, self.port), backlog=MAX_ASSOCIATIONS)
        except OSError as exc:
            raise UnavailableError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror}",
                                   hint="is another receiver running on that port? choose --port") from exc
        self._spool = ul.Spool(spool)  # only once listening: a receiver that cannot start leaves no files
        listener.settimeout(0.2)  # accept() wakes up to notice stop()
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept, name="kaapcli-receive", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self._spool is None:  # not started
            conn.close()
            return
        try:
            host = str(conn.getpeername()[0])
        except OSError:
            host = ""
        scp = ul.StoreSCP(conn, self.timeouts, self._syntaxes, self._spool,
                          functools.partial(self._handle_store, host=host), self.allow_aets)
        with self._lock:
            busy = len(self._associations) >= MAX_ASSOCIATIONS
            if not busy:
                self._associations.add(scp)
        if busy:
            scp.refuse()
            return
        try:
            if scp.negotiate():
                scp.serve()
        finally:
            with self._lock:
                self._associations.discard(scp)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running associations finish (up to ``grace`` s), complete every open series."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self._acceptor is not None:
                self._acceptor.join()
            deadline = time.monotonic() + grace
            # Only associations that carry data are waited for: a bare TCP connection (a port probe, a
            # liveness check) never sends an A-ASSOCIATE-RQ and would otherwise hold us until its timeout.
            while time.monotonic() < deadline:
                with self._lock:
                    if not any(scp.established for scp in self._associations):
                        break
                time.sleep(0.05)
            with self._lock:
                running = list(self._associations)
            for scp in running:
                scp.interrupt()
        if self._spool is not None:
            self._spool.close()
        self.poll(flush=True)

    def _handle_store(self, incoming: ul.Incoming, host: str = "") -> int:
        if self.accept is not None and not self._accepted(incoming):
            incoming.path.unlink(missing_ok=True)
            return NOT_MATCHED
        try:
            dest, header = self.writer.place(incoming.path, incoming.head)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status, never raise
            incoming.path.unlink(missing_ok=True)
            message = exc.message if isinstance(exc, KaapcliError) else str(exc)
            LOG.error("C-STORE from %s: %s", incoming.calling_aet, message)
            with self._lock:
                self.failed += 1
            return CANNOT_UNDERSTAND if isinstance(exc, DataError) else OUT_OF_RESOURCES
        self.record(dest, header, incoming.calling_aet, incoming.called_aet, incoming.size, host=host)
        if self.on_stored is not None:
            self.on_stored(dest)
        return SUCCESS

    def _accepted(self, incoming: ul.Incoming) -> bool:
        try:
            accepted = self.accept is None or self.accept(incoming)
        except Exception as exc:  # noqa: BLE001 - a failing check keeps the data rather than losing it
            LOG.error("C-STORE from %s: accept check failed: %s", incoming.calling_aet, exc)
            return True
        if not accepted:
            LOG.error("C-STORE from %s: %s matches no rule: not stored (0x%04X)", incoming.calling_aet,
                      incoming.sop_instance, NOT_MATCHED)
            with self._lock:
                self.failed += 1
        return accepted

    # ------------------------------------------------------------------ series bookkeeping

    def record(self, dest: Path, header: Any, calling: str, called: str, nbytes: int | None = None,
               host: str = "") -> None:
        """Count a stored file (of ``nbytes``, when known) towards its series (the receiver calls it; so does
        `kaapcli watch`)."""
        uid = str(header.get("SeriesInstanceUID"))
        now = _now()
        with self._lock:
            self.stored += 1
            receipt = self._series.get(uid)
            if receipt is None:
                receipt = self._series[uid] = SeriesReceipt(
                    series_uid=uid, study_uid=str(header.get("StudyInstanceUID")), series_dir=str(dest.parent),
                    calling_aet=calling.strip(), called_aet=called.strip(), first=now, calling_host=host)
            if str(dest) not in receipt.files:
                receipt.files.append(str(dest))
                receipt.instances += 1
            receipt.nbytes += dest.stat().st_size if nbytes is None else nbytes
            receipt.last = now
            self._touched[uid] = time.monotonic()

    def poll(self, flush: bool = False) -> list[SeriesReceipt]:
        """Complete the series quiet for ``series_timeout`` s (all of them with ``flush``); run the hooks."""
        now = time.monotonic()
        with self._lock:
            touched = list(self._touched.items())
            open_series = {uid: self._series[uid] for uid, _ in touched}
        verdicts: dict[str, bool | None] = {}
        if self.ready is not None and not flush:
            for uid, t in touched:  # outside the lock: the check may read a file
                try:
                    verdicts[uid] = self.ready(open_series[uid], now - t)
                except Exception as exc:  # noqa: BLE001 - a failing check falls back to the series timeout
                    LOG.error("series %s: completeness check failed: %s", uid, exc)
        done = [uid for uid, t in touched if flush or verdicts.get(uid) is True
                or (verdicts.get(uid) is None and now - t >= self.series_timeout)]
        stamps = dict(touched)
        with self._lock:  # a series that got a new instance meanwhile stays open
            done = [uid for uid in done if self._touched.get(uid) == stamps[uid]]
            receipts = [self._series.pop(uid) for uid in done]
            for uid in done:
                del self._touched[uid]
        for receipt in receipts:
            receipt.files.sort()
            fsio.write_json(self.out / RECEIPTS_DIR / f"{fsio.safe_name(receipt.series_uid)}.json", asdict(receipt))
            for hook in self.hooks:
                try:
                    hook(receipt)
                except Exception as exc:  # noqa: BLE001 - one failing hook must not stop the receiver
                    LOG.error("series %s: hook %s failed: %s", receipt.series_uid,
                              getattr(hook, "__name__", hook), exc)
        return receipts

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
