"""The DIMSE service user: C-ECHO, C-FIND, C-GET and C-MOVE over pynetdicom; C-STORE (send) over :mod:`ul`.

Sending never decodes: files go out as their encoded bytes, streamed from disk by the plain-socket
:class:`~kaapcli.core.net.ul.StoreSCU`, in a presentation context proposed for exactly their SOP class and
transfer syntax, after a check of their structure (:mod:`payload`: a truncated file is refused locally). Only
when the peer refuses that syntax is the file read and re-encoded in an accepted uncompressed one, with its
decoded pixels verified unchanged. Every status is checked, and every failure says which peer and why.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import dicom
from kaapcli.core.batch import ItemResult
from kaapcli.core.net import payload, ul
from kaapcli.core.net.payload import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.core.net.query import Query
from kaapcli.exitcodes import ExitCode, KaapcliError, UnavailableError

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255
MAX_PDU = 4 * 1024 * 1024
# SOP classes (PS3.4 Annex B.5), as UIDs: pynetdicom's sop_class module defines its names at run time
VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND

ResultHook = Callable[[ItemResult], None]
ASSOCIATION_LOST = "association-lost"  # ItemResult.reason of the files an association that broke took with it


# --------------------------------------------------------------------------- pynetdicom plumbing

class _ErrorLog(logging.Handler):
    """Keeps pynetdicom's error lines per thread, to explain a failed association in one line."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: dict[int, list[str]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        lines = self.lines[record.thread or 0]
        lines.append(record.getMessage())
        del lines[:-8]

    def pop(self, thread: int | None) -> list[str]:
        return self.lines.pop(thread or 0, [])


_errors = _ErrorLog()


def quiet_pynetdicom() -> None:
    """pynetdicom logs to stderr by itself; kaapcli reports failures its own way (one line each)."""
    logger = logging.getLogger("pynetdicom")
    if _errors not in logger.handlers:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_errors)
        logger.setLevel(logging.ERROR)
        logger.propagate = False


def make_ae(calling_aet: str, timeouts: Timeouts) -> Any:
    from pynetdicom import AE

    quiet_pynetdicom()
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = timeouts.acse, timeouts.dimse, timeouts.network
    ae.maximum_pdu_size = MAX_PDU
    return ae


def _why(lines: list[str]) -> str:
    text = " ".join(lines)
    low = text.lower()
    if "certificate verify failed" in low:
        why = text.split("certificate verify failed:", 1)[-1].split("(_ssl.c", 1)[0].strip(" :")
        what = "not for that host" if "mismatch" in why else "not trusted"
        return f"TLS: the peer's certificate is {what} ({why or 'certificate verify failed'})"
    if "[ssl" in low:
        return "TLS handshake failed: " + next(line for line in lines if "[SSL" in line).split(":", 1)[-1].strip()
    if "connection refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "no answer (timed out)"
    if "rejected" in low:
        # pynetdicom logs "Result: R, Source: S" and "Reason: T" (PS3.8 9.3.4): said as send says it
        detail = [part.strip() for line in lines if line.startswith(("Result:", "Reason:")) for part in line.split(",")]
        return "association rejected" + (f" ({'; '.join(detail)})" if detail else "")
    if "no accepted presentation contexts" in low:
        return "no presentation context accepted"
    if "unknown pdu" in low or "invalid a-associate" in low:
        return "the peer does not speak DICOM upper layer (unexpected reply)"
    if "aborted" in low:
        return "association aborted by the peer"
    for line in lines:
        if "error" in line.lower() and ":" in line:
            return f"cannot connect: {line.split(':', 1)[1].strip()}"
    return "association failed"


def no_delay(event: Any) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm. pynetdicom writes a C-STORE as several small
    PDUs; with Nagle on, each waits for the peer's delayed ACK (~40 ms per file on loopback)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(ae: Any, peer: Peer, contexts: list[Any] | None = None, *,
              evt_handlers: list[Any] | None = None, **kwargs: Any) -> Any:
    """An established association, or UnavailableError naming the peer and what happened."""
    from pynetdicom import evt

    if contexts is not None:
        ae.requested_contexts = contexts
    rejection: list[Any] = []  # the A-ASSOCIATE-RJ PDU: pynetdicom may report a reject as an abort when the peer
    # closes the connection right after it (dcmqrscp does), so its result, source and reason are read here

    def on_pdu(event: Any) -> None:
        if type(event.pdu).__name__ == "A_ASSOCIATE_RJ":
            rejection.append(event.pdu)

    handlers = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_PDU_RECV, on_pdu), *(evt_handlers or [])]
    if peer.tls is not None:  # PS3.15 B.1; pynetdicom wraps the socket before it connects
        kwargs["tls_args"] = (peer.tls.client_context(), peer.host)
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet, evt_handlers=handlers, **kwargs)
    except OSError as exc:  # e.g. the host name does not resolve
        raise UnavailableError(f"{peer}: cannot connect: {exc.strerror or exc}") from exc
    # The association and its DUL run in their own threads; their error lines explain the failure.
    if assoc.is_established:
        _errors.pop(assoc.ident)
        return assoc
    if assoc.ident is not None:
        assoc.join(2.0)  # let its threads finish logging why
    # negotiation runs in this thread, the association and its DUL in their own: their error lines say why
    lines = _errors.pop(threading.get_ident()) + _errors.pop(assoc.ident) + _errors.pop(assoc.dul.ident)
    if rejection:
        raise UnavailableError(f"{peer}: association rejected ({rejected_because(rejection[0])})")
    if assoc.is_rejected:
        lines.append("rejected")
    raise UnavailableError(f"{peer}: {_why(lines)}")


def rejected_because(pdu: Any) -> str:
    """Result, source and reason of an A-ASSOCIATE-RJ (PS3.8 9.3.4), worded as :mod:`ul` words them for send."""
    result, source, reason = int(pdu.result), int(pdu.source), int(pdu.reason_diagnostic)
    return (f"Result: {ul.RJ_RESULT.get(result, result)}; Source: {ul.RJ_SOURCE.get(source, source)}; "
            f"Reason: {ul.RJ_REASON.get(source, {}).get(reason, reason)}")


def status_text(status: Any, table: str = "storage") -> tuple[str, str]:
    """(category, one-line description) of a DIMSE response status dataset."""
    return describe_status(int(status.Status), str(status.get("ErrorComment", "") or ""), table)


def describe_status(code: int, comment: str = "", table: str = "storage") -> tuple[str, str]:
    """(category, one-line description) of a DIMSE status code and its error comment."""
    comment = comment.strip()
    if code == 0x0000 and not comment:
        return "Success", "0x0000 Success"  # the common case, without importing pynetdicom
    from pynetdicom import status as st

    tables = {"storage": st.STORAGE_SERVICE_CLASS_STATUS, "find": st.QR_FIND_SERVICE_CLASS_STATUS,
              "move": st.QR_MOVE_SERVICE_CLASS_STATUS, "get": st.QR_GET_SERVICE_CLASS_STATUS}
    category = st.code_to_category(code)
    meaning = tables[table].get(code, ("", ""))[1] or category
    return category, f"0x{code:04X} {meaning}" + (f" ({comment})" if comment else "")


# --------------------------------------------------------------------------- echo

def echo(peer: Peer, calling_aet: str, timeouts: Timeouts) -> dict[str, Any]:
    ae = make_ae(calling_aet, timeouts)
    ae.add_requested_context(VERIFICATION)
    start = time.perf_counter()
    assoc = associate(ae, peer)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = round((time.perf_counter() - start) * 1000, 1)
    if not status:
        raise UnavailableError(f"{peer}: no C-ECHO response (association aborted or timed out)")
    return {"peer": peer.address, "ok": int(status.Status) == 0, "ms": ms, "status": f"0x{int(status.Status):04X}"}


# --------------------------------------------------------------------------- send

@dataclass(frozen=True)
class Instance:
    """What sending needs to know of a file, read from its header only."""

    path: Path
    sop_class: str
    sop_instance: str
    syntax: str
    nbytes: int
    has_meta: bool  # a Part 10 file with file meta: can be streamed as it is
    offset: int = -1  # where its dataset starts (after the file meta); -1: unknown, read it with pydicom
    checked: bool = True  # False: :func:`send` checks its element structure just before it leaves


def scan(path: Path, *, check: bool = True) -> Instance:
    """SOP class, SOP instance and transfer syntax of a file: file meta only when there is one. With ``check``,
    a file whose element lengths do not fit in it (truncated) raises KaapcliError, as storescu refuses it;
    without, that check is left to :func:`send`, which makes it before the file leaves (``send`` scans without it:
    the walk over the headers then runs while earlier files are in flight, not before the association opens)."""
    size = path.stat().st_size
    try:  # the common case, a Part 10 file, without pydicom
        meta_values, offset = ul.read_meta(path)
        sop_class, sop_instance, syntax = (meta_values.get(tag, "") for tag in ("00020002", "00020003", "00020010"))
    except (OSError, ValueError, struct.error):
        sop_class = ""
    if sop_class and sop_instance and syntax:
        if check:
            try:
                payload.check_structure(path, offset, syntax)
            except payload.BadStructure as exc:
                raise KaapcliError(f"not sent: {exc}", code=ExitCode.DATAERR) from None
        return Instance(path, sop_class, sop_instance, syntax, size, True, offset, checked=check)
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
        values = [meta.get(k) for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                                        "TransferSyntaxUID")]
        if all(values):
            sop_class, sop_instance, syntax = (str(v) for v in values)
            return Instance(path, sop_class, sop_instance, syntax, size, True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        pass
    ds = dicom.read(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    sop_class, sop_instance = dicom.require(ds, "SOPClassUID"), dicom.require(ds, "SOPInstanceUID")
    syntax = IMPLICIT_LE if ds.original_encoding[0] else EXPLICIT_LE
    if ds.original_encoding[1] is False:
        syntax = EXPLICIT_BE
    return Instance(path, str(sop_class), str(sop_instance), syntax, size, False)


def plan(instances: list[Instance], associations: int = 1, decompress: str = "lossless") -> list[list[Instance]]:
    """Split instances into association jobs: at most 128 contexts each, ``associations`` jobs per group."""
    by_class: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        by_class[inst.sop_class].append(inst)
    groups: list[list[Instance]] = []
    current: list[Instance] = []
    for members in by_class.values():
        if current and len(contexts_for(current + members, decompress)) > MAX_CONTEXTS:
            groups.append(current)
            current = []
        current = current + members
    if current:
        groups.append(current)
    jobs: list[list[Instance]] = []
    for group in groups:
        n = max(1, min(associations, len(group)))
        size = -(-len(group) // n)
        jobs.extend(group[i:i + size] for i in range(0, len(group), size))
    return jobs


def contexts_for(instances: list[Instance], decompress: str = "lossless") -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs to propose: each file's own syntax, plus Explicit and Implicit VR
    Little Endian as fallbacks for the files that may be re-encoded (the peer may accept only one of them)."""
    pairs: dict[tuple[str, str], None] = {}
    for inst in instances:
        pairs[(inst.sop_class, inst.syntax)] = None
        if payload.may_decompress(inst.syntax, decompress):
            pairs[(inst.sop_class, EXPLICIT_LE)] = None
            pairs[(inst.sop_class, IMPLICIT_LE)] = None
    return list(pairs)


@dataclass
class SendJob:
    peer: Peer
    calling_aet: str
    timeouts: Timeouts
    instances: list[Instance]
    on_result: ResultHook
    stop: threading.Event
    acknowledged: Callable[[Instance, str], None] | None = None
    decompress: str = "lossless"
    results: list[ItemResult] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)  # message id -> how a re-encoded file was sent

    def emit(self, result: ItemResult) -> None:
        self.results.append(result)
        self.on_result(result)

    def fail_rest(self, rest: list[Instance], message: str, code: ExitCode, reason: str = "") -> None:
        for inst in rest:
            self.emit(ItemResult(str(inst.path), "failed", message=f"{inst.path}: {message}", code=int(code),
                                 reason=reason))

    def lost(self, rest: list[Instance], exc: Exception) -> None:
        """The association broke: the files in flight and those not sent yet fail, marked ``association-lost`` so
        that the CLI says it in one line, not one per file."""
        self.fail_rest(rest, f"not stored: {self.peer}: association lost ({exc})", ExitCode.UNAVAILABLE,
                       ASSOCIATION_LOST)

    def run(self, scu: ul.StoreSCU) -> None:
        """Send every instance on an established association, as many ahead of their responses as the peer
        granted; every status checked, whatever order the responses come in."""
        pending: dict[int, Instance] = {}  # message id -> instance whose response has not arrived

        def answered(responses: list[tuple[int, ul.StoreStatus]]) -> None:
            for message_id, status in responses:
                self.emit(self._result(pending.pop(message_id), status, self.notes.pop(message_id, "")))

        try:
            for i, inst in enumerate(self.instances):
                if self.stop.is_set():
                    break  # interrupted: the rest is not sent (nor in the ledger); what is in flight is answered
                try:
                    syntax, dataset, note = self._payload(inst, scu.accepted)
                except KaapcliError as exc:
                    self.emit(ItemResult(str(inst.path), "failed", message=f"{inst.path}: not sent: {exc.message}"
                                         + (f" (hint: {exc.hint})" if exc.hint else ""), code=int(ExitCode.DATAERR)))
                    continue
                if syntax is None:
                    self.emit(self._refused(inst))
                    continue
                try:
                    message_id, responses = scu.store(inst.sop_class, inst.sop_instance, syntax, dataset)
                except ul.AssociationLost as exc:
                    self.lost([*pending.values(), *self.instances[i:]], exc)
                    return
                pending[message_id] = inst
                if note:
                    self.notes[message_id] = note
                answered(responses)
            try:
                answered(scu.drain())
            except ul.AssociationLost as exc:
                self.lost(list(pending.values()), exc)
        finally:
            scu.release()

    def _payload(self, inst: Instance, accepted: Any) -> tuple[str | None, Any, str]:
        """(transfer syntax, dataset, note) to send: the file's own bytes streamed from disk when the peer accepted
        its syntax; else the file re-encoded in an uncompressed syntax the peer accepted, pixels verified
        (:func:`payload.transcode`), with a note saying so.  A file scanned without the structure check gets it
        here (KaapcliError)."""
        if not inst.checked:
            try:
                payload.check_structure(inst.path, inst.offset, inst.syntax)
            except payload.BadStructure as exc:
                raise KaapcliError(str(exc)) from None
        if (inst.sop_class, inst.syntax) in accepted and inst.offset >= 0:
            return inst.syntax, (inst.path, inst.offset), ""
        if (inst.sop_class, inst.syntax) in accepted:  # no file meta: read and encoded as it was
            from pydicom.uid import UID

            uid = UID(inst.syntax)
            return inst.syntax, dicom.encode_dataset(dicom.read(inst.path), uid.is_implicit_VR,
                                                     uid.is_little_endian), ""
        # the peer's choice among what it accepted: Explicit VR LE first (keeps VRs), then Implicit VR LE
        syntax = next((ts for ts in (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE) if (inst.sop_class, ts) in accepted), None)
        if syntax is None:
            return None, None, ""
        encoded, note = payload.transcode(inst.path, inst.syntax, syntax, self.decompress)
        return syntax, encoded, note

    def _refused(self, inst: Instance) -> ItemResult:
        from pydicom.uid import UID

        hint = "" if payload.may_decompress(inst.syntax, self.decompress) else " (hint: --decompress lossy)"
        return ItemResult(str(inst.path), "failed", code=int(ExitCode.ITEMS_FAILED),
                          message=f"{inst.path}: {self.peer} accepts no presentation context for "
                                  f"{UID(inst.sop_class).name} in {UID(inst.syntax).name}{hint}")

    def _result(self, inst: Instance, status: ul.StoreStatus, note: str = "") -> ItemResult:
        category, text = describe_status(status.code, status.comment)
        if category in ("Success", "Warning"):
            if self.acknowledged is not None:
                self.acknowledged(inst, category.lower())
            warnings = [f"C-STORE warning {text}"] if category == "Warning" else []
            return ItemResult(str(inst.path), "ok", warnings=warnings, nbytes=inst.nbytes, message=note)
        return ItemResult(str(inst.path), "failed", message=f"{inst.path}: C-STORE failed: {text}",
                          code=int(ExitCode.ITEMS_FAILED))


def send(instances: list[Instance], peer: Peer, *, calling_aet: str, timeouts: Timeouts, associations: int = 1,
         on_result: ResultHook, acknowledged: Callable[[Instance, str], None] | None = None,
         stop: threading.Event | None = None, decompress: str = "lossless") -> list[ItemResult]:
    """C-STORE ``instances`` over up to ``associations`` parallel associations; a file whose syntax the peer
    refuses is re-encoded (compressed ones decoded as ``decompress`` allows: never, lossless, lossy).

    Raises UnavailableError when no association at all could be established (a dead or refusing peer);
    otherwise returns one result per instance (an association lost midway fails its remaining files).
    """
    stop = stop or threading.Event()
    lock = threading.Lock()

    def locked(result: ItemResult) -> None:
        with lock:
            on_result(result)

    jobs = [SendJob(peer, calling_aet, timeouts, chunk, locked, stop, acknowledged, decompress)
            for chunk in plan(instances, associations, decompress)]

    def connect(job: SendJob) -> ul.StoreSCU:
        scu = ul.StoreSCU(peer, calling_aet, timeouts, contexts_for(job.instances, decompress))
        scu.connect()
        return scu

    def run(job: SendJob) -> UnavailableError | None:
        try:
            assoc = connect(job)
        except UnavailableError as exc:
            return exc
        job.run(assoc)
        return None

    # The first association alone: a dead peer is one error, not one per file.
    first = connect(jobs[0]) if jobs else None
    with ThreadPoolExecutor(max(1, associations)) as pool:
        futures: list[Future[UnavailableError | None]] = []
        if first is not None:
            futures.append(pool.submit(lambda: jobs[0].run(first)))  # type: ignore[func-returns-value]
        futures += [pool.submit(run, job) for job in jobs[1:]]
        try:
            errors = [f.result() for f in futures]
        except KeyboardInterrupt:
            stop.set()
            raise
    for job, error in zip(jobs[1:], errors[1:], strict=True):
        if error is not None:
            job.fail_rest(job.instances, f"not sent: {error.message}", ExitCode.UNAVAILABLE)
    return [r for job in jobs for r in job.results]


# --------------------------------------------------------------------------- find

def find(peer: Peer, query: Query, *, calling_aet: str, timeouts: Timeouts) -> Iterator[dict[str, Any]]:
    """C-FIND (Patient Root for the patient level, Modality Worklist for the worklist, Study Root otherwise):
    matches as DICOM JSON."""
    from pydicom.uid import UID

    model = UID({"patient": PATIENT_ROOT_FIND, "worklist": WORKLIST_FIND}.get(query.level, STUDY_ROOT_FIND))
    ae = make_ae(calling_aet, timeouts)
    ae.add_requested_context(model)
    assoc = associate(ae, peer)
    count = 0
    try:
        responses = assoc.send_c_find(query.identifier(), model, msg_id=1)
        for status, identifier in responses:
            if not status:
                raise UnavailableError(f"{peer}: no C-FIND response (association aborted or timed out)")
            category, text = status_text(status, "find")
            if category == "Pending" and identifier is not None:
                if query.limit is not None and count >= query.limit:
                    assoc.send_c_cancel(1, query_model=model)
                    continue  # drain until the final response
                count += 1
                record = identifier.to_json_dict()
                record.pop("00080052", None)  # QueryRetrieveLevel: not part of the match
                yield record
            elif category not in ("Success", "Cancel", "Pending"):
                raise KaapcliError(f"{peer}: C-FIND failed: {text}", code=ExitCode.UNAVAILABLE)
    finally:
        if assoc.is_established:
            assoc.release()


# --------------------------------------------------------------------------- get / move

# Storage classes proposed for C-GET when the peer does not tell which ones the data uses.
COMMON_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
    "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.2",
    "1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.104.1",
    "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.11.1",
)
# Transfer syntaxes proposed for C-GET, one context each (as DCMTK's getscu does), so a peer can send every object
# in the syntax it is stored in instead of transcoding to the one syntax a shared context would get accepted in.
GET_SYNTAXES = (
    EXPLICIT_LE, IMPLICIT_LE,
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000 lossless, lossy
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS lossless, near-lossless
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # JPEG baseline, extended
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
    DEFLATED_LE, EXPLICIT_BE,
)
_UPPER_KEYS = {"series": ("StudyInstanceUID",), "instance": ("StudyInstanceUID", "SeriesInstanceUID")}
_LEVEL_KEY = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}


@dataclass
class RetrieveOutcome:
    """Sub-operation counts of one C-GET/C-MOVE/WADO request and the files that arrived."""

    request: str
    completed: int = 0
    failed: int = 0
    warning: int = 0
    files: list[Path] = field(default_factory=list)
    status: str = ""
    message: str = ""
    expected: int | None = None  # instances the peer's C-FIND listed, when it answered
    elsewhere: bool = False  # a C-MOVE to a third AE: nothing arrives here, the peer's counters tell

    @property
    def arrived(self) -> int:
        return self.completed + self.warning if self.elsewhere else len(self.files)

    @property
    def ok(self) -> bool:
        if self.failed or self.message or self.arrived == 0:
            return False
        if self.expected is not None and self.arrived < self.expected:
            return False
        return self.elsewhere or len(self.files) >= self.completed + self.warning

    def record(self) -> dict[str, Any]:
        return {"request": self.request, "completed": self.completed, "failed": self.failed,
                "warning": self.warning, "received": len(self.files), "status": self.status,
                "ok": self.ok, "message": self.message or self.shortfall(),
                **({"expected": self.expected} if self.expected is not None else {}),
                **({"destination_elsewhere": True} if self.elsewhere else {})}

    def shortfall(self) -> str:
        """Why an outcome without a message is not ok ("" when it is)."""
        if self.ok or self.message or self.failed:
            return ""
        what = "stored at the destination" if self.elsewhere else "received"
        if self.expected:
            return f"{self.arrived} of {self.expected} instances {what}"
        return f"no instances {what}" if self.arrived == 0 else ""


def _counts(outcome: RetrieveOutcome, status: Any) -> None:
    for attr, keyword in (("completed", "NumberOfCompletedSuboperations"),
                          ("failed", "NumberOfFailedSuboperations"), ("warning", "NumberOfWarningSuboperations")):
        value = status.get(keyword)
        if value is not None:
            setattr(outcome, attr, int(value))


def _final(outcome: RetrieveOutcome, responses: Any, peer: Peer, kind: str) -> None:
    final = None
    for status, _identifier in responses:
        if not status:
            raise UnavailableError(f"{peer}: no C-{kind.upper()} response (association aborted or timed out)")
        final = status
    if final is None:
        raise UnavailableError(f"{peer}: no C-{kind.upper()} response")
    _counts(outcome, final)
    category, text = status_text(final, kind)
    outcome.status = text
    if category not in ("Success", "Warning"):
        outcome.message = f"C-{kind.upper()} {category.lower()}: {text}"
    elif not outcome.elsewhere and len(outcome.files) < outcome.completed + outcome.warning:
        outcome.message = (f"{peer} reported {outcome.completed + outcome.warning} sub-operations done "
                           f"but {len(outcome.files)} files arrived")


@dataclass
class Located:
    """What a C-FIND told of a retrieve: the full hierarchical keys, the SOP classes, the syntaxes they are stored
    in (when the peer says) and how many instances there are (None when the peer would not answer)."""

    query: Query
    classes: list[str] = field(default_factory=list)
    syntaxes: dict[str, list[str]] = field(default_factory=dict)
    instances: int | None = None


def _first(record: dict[str, Any], tag: str) -> str:
    values = (record.get(tag) or {}).get("Value") or [""]
    return str(values[0] or "")


def locate(peer: Peer, query: Query, calling_aet: str, timeouts: Timeouts) -> Located:
    """Complete the unique keys of the levels above the query's (PS3.4 C.4.2.2.1: a hierarchical SCP needs the
    StudyInstanceUID of a series, and the study and series UIDs of an instance), then list its instances.

    Raises NoInputError when the peer's C-FIND finds no such object."""
    from kaapcli.exitcodes import NoInputError

    keys = dict(query.keys)
    missing = [k for k in _UPPER_KEYS.get(query.level, ()) if not keys.get(k)]
    if missing:
        probe = Query(query.level, {_LEVEL_KEY[query.level]: keys[_LEVEL_KEY[query.level]]}, list(missing))
        try:
            matches = list(find(peer, probe, calling_aet=calling_aet, timeouts=timeouts))
        except KaapcliError:
            matches = []  # the peer does not answer such a query: retrieve with what we have
        else:
            if not matches:
                raise NoInputError(f"{peer}: no {query.level} {keys[_LEVEL_KEY[query.level]]} (C-FIND found none)")
        for key in missing:
            value = next((_first(m, _tag(key)) for m in matches if _first(m, _tag(key))), "")
            if value:
                keys[key] = value
    order = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    located = Located(Query(query.level, {k: keys[k] for k in order if keys.get(k)}))
    probe = Query("instance", dict(located.query.keys), ["SOPClassUID", "AvailableTransferSyntaxUID"])
    try:
        matches = list(find(peer, probe, calling_aet=calling_aet, timeouts=timeouts))
    except KaapcliError:
        return located
    uids = {_first(m, "00080018") for m in matches} - {""}
    located.instances = len(uids) or None  # a peer that answers with no instance level keys tells nothing
    for record in matches:
        sop_class = _first(record, "00080016")
        if not sop_class:
            continue
        stored = located.syntaxes.setdefault(sop_class, [])
        for syntax in (record.get("00083002") or {}).get("Value") or []:
            if syntax and syntax not in stored:
                stored.append(str(syntax))
    located.classes = sorted(located.syntaxes)
    return located


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    return f"{tag_for_keyword(keyword):08X}"


def get_contexts(located: Located) -> list[tuple[str, str]]:
    """(SOP class, syntax) pairs for C-GET: per class the syntaxes it is stored in, then the common ones, one
    context each, as many per class as fit in 127 contexts (one more is the C-GET model's)."""
    classes = located.classes or list(COMMON_STORAGE)
    classes = classes[:(MAX_CONTEXTS - 1) // 2]  # at least the two uncompressed syntaxes for each class
    per_class = max(2, (MAX_CONTEXTS - 1) // len(classes))
    pairs: list[tuple[str, str]] = []
    for sop_class in classes:
        stored = located.syntaxes.get(sop_class, [])
        ordered = [*stored, *(ts for ts in GET_SYNTAXES if ts not in stored)]
        pairs.extend((sop_class, ts) for ts in ordered[:per_class])
    return pairs[:MAX_CONTEXTS - 1]


def get(peer: Peer, query: Query, writer: Any, *, calling_aet: str, timeouts: Timeouts,
        on_stored: Callable[[Path], None] | None = None) -> RetrieveOutcome:
    """C-GET into ``writer`` (a :class:`~kaapcli.core.net.scp.StoreWriter`) on the same association."""
    from pydicom.uid import UID
    from pynetdicom import evt
    from pynetdicom.presentation import build_context, build_role

    outcome = RetrieveOutcome(request=_describe(query))
    located = locate(peer, query, calling_aet, timeouts)
    outcome.expected = located.instances
    ae = make_ae(calling_aet, timeouts)
    pairs = get_contexts(located)
    contexts = [build_context(STUDY_ROOT_GET)]
    contexts += [build_context(sop, ts) for sop, ts in pairs]
    roles = [build_role(sop, scp_role=True) for sop in dict.fromkeys(sop for sop, _ in pairs)]

    def on_store(event: Any) -> int:
        try:
            dest, _ = writer.write(event.encoded_dataset())
        except KaapcliError:
            return 0xA700
        outcome.files.append(dest)
        if on_stored is not None:
            on_stored(dest)
        return 0x0000

    assoc = associate(ae, peer, contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        _final(outcome, assoc.send_c_get(located.query.retrieve_identifier(), UID(STUDY_ROOT_GET)), peer, "get")
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def move(peer: Peer, query: Query, receiver: Any, *, calling_aet: str, destination: str, timeouts: Timeouts,
         ) -> RetrieveOutcome:
    """C-MOVE to ``destination``: the AE title under which the peer knows ``receiver`` (already started), or, with
    ``receiver`` None, a third node; then the response's sub-operation counters are all there is to count."""
    from pydicom.uid import UID

    outcome = RetrieveOutcome(request=_describe(query), elsewhere=receiver is None)
    located = locate(peer, query, calling_aet, timeouts)
    outcome.expected = located.instances
    ae = make_ae(calling_aet, timeouts)
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = associate(ae, peer)
    stored: list[Path] = []
    previous = receiver.on_stored if receiver is not None else None

    def collect(path: Path) -> None:
        stored.append(path)
        if previous is not None:
            previous(path)

    if receiver is not None:
        receiver.on_stored = collect
    try:
        responses = assoc.send_c_move(located.query.retrieve_identifier(), destination, UID(STUDY_ROOT_MOVE))
        outcome.files = stored
        _final(outcome, responses, peer, "move")
    finally:
        if receiver is not None:
            receiver.on_stored = previous
        if assoc.is_established:
            assoc.release()
    return outcome


def _describe(query: Query) -> str:
    return " ".join(f"{k}={v}" for k, v in query.keys.items()) or query.level


# --------------------------------------------------------------------------- verify (Kaapana's check_arrival)

def verify_arrival(paths: list[Path], peer: Peer, *, calling_aet: str, timeouts: Timeouts) -> dict[Path, str]:
    """After a send: which of these files the peer does not report by C-FIND (IMAGE level, one query per series,
    PS3.4 C.4.1 hierarchical keys), with the reason; an empty dict when every instance arrived."""
    by_series: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in paths:
        ds = dicom.read(path, stop_before_pixels=True,
                        specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        by_series[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))][str(ds.SOPInstanceUID)] = path
    missing: dict[Path, str] = {}
    for (study, series), instances in by_series.items():
        query = Query("instance", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, ["SOPInstanceUID"])
        found = {str(m.get("00080018", {}).get("Value", [""])[0])
                 for m in find(peer, query, calling_aet=calling_aet, timeouts=timeouts)}
        for sop, path in instances.items():
            if sop not in found:
                missing[path] = f"{path}: sent, but {peer} does not list SOP Instance {sop} (C-FIND after the send)"
    return missing
