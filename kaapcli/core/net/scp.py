"""The receiver: a Storage SCP that writes what it is sent straight to disk, and tells when series are complete.

Datasets are never decoded: the handler takes the encoded bytes of the C-STORE (``event.encoded_dataset()``),
reads only the few header elements the output layout needs, and writes the Part 10 file through
:func:`fsio.atomic_write` — so no partial file ever sits under a final name, even after SIGKILL.

A series counts as complete after ``series_timeout`` seconds without a new instance; then every hook of
``Receiver.hooks`` is called with a :class:`SeriesReceipt` (the index and pipeline commands plug in here).
The receipt is also written to ``OUT/.kaapcli/series/<SeriesInstanceUID>.json``.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.net.peers import Timeouts
from kaapcli.exitcodes import DataError, KaapcliError, UnavailableError

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
RECEIPTS_DIR = Path(".kaapcli") / "series"
MAX_PDU = 4 * 1024 * 1024  # large PDUs: fewer, bigger reads per dataset
LOG = logging.getLogger("kaapcli.net")

# C-STORE response statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def _now() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


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

    def placeholders(self) -> dict[str, str]:
        return {"series_dir": self.series_dir, "series_uid": self.series_uid, "study_uid": self.study_uid,
                "calling_aet": self.calling_aet, "called_aet": self.called_aet}


SeriesHook = Callable[[SeriesReceipt], None]


class StoreWriter:
    """Writes one C-STORE's encoded dataset to ``out/<layout>`` without decoding the pixel data."""

    def __init__(self, out: Path, layout: str = DEFAULT_LAYOUT):
        self.out = out
        self.layout = layout
        self.fields = sorted({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                              *dicom.template_fields(layout)})

    def write(self, encoded: bytes) -> tuple[Path, Any]:
        """Write a Part 10 byte string; returns the path and the header elements read."""
        import pydicom

        try:
            header = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True, specific_tags=self.fields)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's bad data
            raise DataError(f"cannot read the received dataset: {exc}") from exc
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            dicom.require(header, keyword)
        dest = self.out / fsio.render_template(self.layout, dicom.template_values(header, self.layout))
        fsio.write_bytes(dest, encoded)
        return dest, header


class Receiver:
    """A Verification + Storage SCP over ``AE.start_server``; :meth:`poll` completes quiet series."""

    def __init__(self, out: Path, *, aet: str = "KAAPCLI", bind: str = "127.0.0.1", port: int = 11112,
                 layout: str = DEFAULT_LAYOUT, allow_aets: list[str] | None = None, series_timeout: float = 10.0,
                 timeouts: Timeouts | None = None, on_stored: Callable[[Path], None] | None = None,
                 hooks: list[SeriesHook] | None = None):
        self.out = out
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
        self._server: Any = None

    # ------------------------------------------------------------------ server

    def start(self) -> None:
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, _config, evt
        from pynetdicom.sop_class import Verification

        _config.UNRESTRICTED_STORAGE_SERVICE = True  # any SOP class, private ones included
        fsio.ensure_dir(self.out)
        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = MAX_PDU
        ae.acse_timeout, ae.dimse_timeout = self.timeouts.acse, self.timeouts.dimse
        ae.network_timeout = self.timeouts.network
        ae.maximum_associations = 64
        if self.allow_aets:
            ae.require_calling_aet = self.allow_aets
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(Verification, syntaxes[:3])
        # With UNRESTRICTED_STORAGE_SERVICE, pynetdicom accepts any abstract syntax proposed with these.
        from pynetdicom.presentation import AllStoragePresentationContexts

        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        from kaapcli.core.net.dimse import no_delay

        handlers = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_C_STORE, self._handle_store),
                    (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        try:
            self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise UnavailableError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror}",
                                   hint="is another receiver running on that port? choose --port") from exc
        self.port = int(self._server.server_address[1])

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running associations finish (up to ``grace`` s), complete every open series."""
        if self._server is not None:
            self._server.shutdown()
            deadline = time.monotonic() + grace
            # Only associations that carry data are waited for: a bare TCP connection (a port probe, a
            # liveness check) never sends an A-ASSOCIATE-RQ and would otherwise hold us until its timeout.
            while (any(a.is_established for a in self._server.active_associations)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            for assoc in self._server.active_associations:
                assoc.abort()
            self._server = None
        self.poll(flush=True)

    def _handle_store(self, event: Any) -> int:
        try:
            dest, header = self.writer.write(event.encoded_dataset())
        except KaapcliError as exc:
            LOG.error("C-STORE from %s: %s", event.assoc.requestor.ae_title, exc.message)
            with self._lock:
                self.failed += 1
            return OUT_OF_RESOURCES if exc.code != DataError.code else CANNOT_UNDERSTAND
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status, never raise
            LOG.error("C-STORE from %s: %s", event.assoc.requestor.ae_title, exc)
            with self._lock:
                self.failed += 1
            return OUT_OF_RESOURCES
        requested = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ: the called AE title as the sender chose it
        self._record(dest, header, event.assoc.requestor.ae_title, requested.called_ae_title)
        if self.on_stored is not None:
            self.on_stored(dest)
        return SUCCESS

    # ------------------------------------------------------------------ series bookkeeping

    def _record(self, dest: Path, header: Any, calling: str, called: str) -> None:
        uid = str(header.SeriesInstanceUID)
        now = _now()
        with self._lock:
            self.stored += 1
            receipt = self._series.get(uid)
            if receipt is None:
                receipt = self._series[uid] = SeriesReceipt(
                    series_uid=uid, study_uid=str(header.StudyInstanceUID), series_dir=str(dest.parent),
                    calling_aet=calling.strip(), called_aet=called.strip(), first=now)
            if str(dest) not in receipt.files:
                receipt.files.append(str(dest))
                receipt.instances += 1
            receipt.nbytes += dest.stat().st_size
            receipt.last = now
            self._touched[uid] = time.monotonic()

    def poll(self, flush: bool = False) -> list[SeriesReceipt]:
        """Complete the series quiet for ``series_timeout`` s (all of them with ``flush``); run the hooks."""
        now = time.monotonic()
        with self._lock:
            done = [uid for uid, t in self._touched.items() if flush or now - t >= self.series_timeout]
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
