"""The receiver: a Storage SCP that writes what it is sent straight to disk, and tells when series are complete.

1. At start it locks ``OUT`` (a second receiver on the same directory is refused), removes the spool files an
   earlier receiver left behind, and listens (with a warning when it listens beyond loopback with no allow-list).
2. One acceptor thread takes every connection: a host outside ``allow_hosts`` is closed at once; the others are
   read without a thread until their A-ASSOCIATE-RQ is complete (:class:`~kaapcli.core.net.ul.PendingAssociation`:
   bounded buffers, the ARTIM deadline, the TLS handshake), so slow or idle connections cost neither a thread nor
   an association slot. At most ``MAX_PENDING`` wait; past that the oldest of the busiest host is closed.
3. A complete request is judged there too (AE titles, ``allow_aets``, ``max_associations`` and ``max_per_host``)
   and rejected, or given its own thread over :class:`~kaapcli.core.net.ul.StoreSCP`, which checks and writes
   every C-STORE's fragments as they arrive to a hidden spool file under ``OUT/.kaapcli/incoming`` (after a file
   meta built from the command); then the file is renamed into place under the layout — so no partial file ever
   sits under a final name, even after SIGKILL. Datasets are never decoded nor held in memory.
4. Every refusal is counted (``refused``) and logged (at most one line per host and reason every 10 s); every
   failed C-STORE is answered with its status, counted (``failed``, ``failures``) and logged with its reason.

It never reads a byte from a host it does not allow, never starts a thread or allocates a buffer for a connection
before its association request is complete and admitted, and never answers Success for a dataset that is not
stored under its final name.

A series counts as complete after ``series_timeout`` seconds without a new instance; then every hook of
``Receiver.hooks`` is called with a :class:`SeriesReceipt` (the index and pipeline commands plug in here).
The receipt is also written to ``OUT/.kaapcli/series/<SeriesInstanceUID>.json``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.net import ul
from kaapcli.core.net.peers import Timeouts
from kaapcli.core.net.tls import TLS
from kaapcli.exitcodes import CantCreateError, DataError, KaapcliError, UnavailableError, UsageError

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
RECEIPTS_DIR = Path(".kaapcli") / "series"
SPOOL_DIR = Path(".kaapcli") / "incoming"  # datasets being received (hidden .*.kaapcli-part files)
LOCK_FILE = Path(".kaapcli") / "receive.lock"  # held (flock) by the receiver that owns OUT
MAX_ASSOCIATIONS = 64
MAX_PER_HOST = 32  # one `kaapcli send -j 32` fits; one host cannot take every slot
MAX_PENDING = 256  # connections whose association request is not complete yet
PENDING_BYTES = 32 * 1024 * 1024  # their buffers together (each is at most ul.MAX_ASSOCIATE_PDU)
LOG_EVERY = 10.0  # seconds between two log lines of one host and refusal reason
LOG = logging.getLogger("kaapcli.net")

# C-STORE response statuses (PS3.4 Annex B.2.3)
SUCCESS = ul.SUCCESS
OUT_OF_RESOURCES = ul.OUT_OF_RESOURCES
CANNOT_UNDERSTAND = ul.CANNOT_UNDERSTAND
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

    HEAD = 65536  # bytes of a dataset read for its header; past them, pydicom reads it

    def __init__(self, out: Path, layout: str = DEFAULT_LAYOUT):
        self.out = out
        self.layout = layout
        self.fields = sorted({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                              *dicom.template_fields(layout)})
        self._tags = _ascii_tags(self.fields)
        self._dirs: set[Path] = set()  # directories made: one mkdir per series, not per file

    @property
    def tags(self) -> frozenset[int]:
        """The top-level tags whose values the layout needs, when all of them are plain ASCII text."""
        return frozenset(self._tags.values()) if self._tags else frozenset()

    def write(self, encoded: bytes) -> tuple[Path, Any]:
        """Write a Part 10 byte string; returns the path and the header elements read."""
        head = encoded[:self.HEAD]
        dest, header = self._destination(self._quick(head, whole=len(head) < self.HEAD), lambda: io.BytesIO(encoded))
        fsio.write_bytes(dest, encoded)
        return dest, header

    def place(self, spooled: Path, values: dict[int, bytes] | None = None) -> tuple[Path, Any]:
        """Move a complete Part 10 file (on the same file system) to its place: one atomic rename.  ``values``:
        its top-level header values by tag when the caller has them (the receiver's structure check collects
        them); else its header is read."""
        if values is not None:
            header = self._from_values(values)
        else:
            with open(spooled, "rb") as fh:
                head = fh.read(self.HEAD)
            header = self._quick(head, whole=len(head) < self.HEAD)
        dest, header = self._destination(header, lambda: spooled)
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

    def _destination(self, header: Any, source: Callable[[], Any]) -> tuple[Path, Any]:
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

    def _from_values(self, values: dict[int, bytes]) -> dict[str, str] | None:
        if self._tags is None:
            return None
        found = {tag: values[tag].decode("latin-1").strip(" \x00") for tag in self._tags.values() if tag in values}
        if any("\\" in value for value in found.values()):
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


class HostList:
    """``--allow-host`` entries: addresses, CIDR networks, or host names (resolved once, at start)."""

    def __init__(self, entries: list[str]):
        import ipaddress

        self.entries = list(entries)
        self.networks: list[Any] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
                continue
            except ValueError:
                pass
            try:
                infos = socket.getaddrinfo(entry.strip(), None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise UsageError(f"--allow-host {entry!r}: not an address, a network or a host name that "
                                 f"resolves ({exc.strerror or exc})") from exc
            self.networks.extend(ipaddress.ip_network(info[4][0]) for info in infos)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows(self, host: str) -> bool:
        import ipaddress

        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:  # a dual-stack listener's IPv4 peers
            address = address.ipv4_mapped
        return any(address.version == net.version and address in net for net in self.networks)


def _is_loopback(bind: str) -> bool:
    """Whether ``bind`` (an address or a host name) listens on loopback only; "" and 0.0.0.0 listen everywhere."""
    import ipaddress

    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(bind or None, None, type=socket.SOCK_STREAM)}
        return bool(bind) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _sequence_tags() -> frozenset[int]:
    """Tags the DICOM dictionary defines as SQ: how an implicit VR dataset's sequences of defined length are known."""
    from pydicom.datadict import DicomDictionary

    return frozenset(int(tag) for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


class Receiver:
    """A Verification + Storage SCP (one thread per association); :meth:`poll` completes quiet series."""

    def __init__(self, out: Path, *, aet: str = "KAAPCLI", bind: str = "127.0.0.1", port: int = 11112,
                 layout: str = DEFAULT_LAYOUT, allow_aets: list[str] | None = None,
                 allow_hosts: list[str] | None = None, series_timeout: float = 10.0,
                 timeouts: Timeouts | None = None, on_stored: Callable[[Path], None] | None = None,
                 hooks: list[SeriesHook] | None = None, accept: AcceptHook | None = None,
                 ready: ReadyHook | None = None, max_associations: int = MAX_ASSOCIATIONS,
                 max_per_host: int = MAX_PER_HOST, tls: TLS | None = None):
        self.out = out
        self.accept, self.ready = accept, ready
        self.aet, self.bind, self.port = aet, bind, port
        self.writer = StoreWriter(out, layout)
        self.allow_aets = allow_aets or []
        self.allow_hosts = allow_hosts or []
        self.series_timeout = series_timeout
        self.timeouts = timeouts or Timeouts()
        self.on_stored = on_stored
        self.hooks: list[SeriesHook] = list(hooks or [])
        self.max_associations, self.max_per_host = max_associations, max_per_host
        self.tls = tls
        self.stored = 0
        self.failed = 0
        self.failures: Counter[str] = Counter()  # failed C-STOREs by status
        self.refused: Counter[str] = Counter()  # connections and associations refused, by reason
        self._series: dict[str, SeriesReceipt] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._associations: set[ul.StoreSCP] = set()
        self._per_host: Counter[str] = Counter()
        self._pending: dict[ul.PendingAssociation, None] = {}  # oldest first
        self._hosts = HostList([])
        self._tls_context: Any = None
        self._syntaxes: list[str] = []
        self._spool: ul.Spool | None = None
        self._lock_fd = -1
        self._logged: dict[tuple[str, str], list[float]] = {}  # (host, reason) -> [last logged, suppressed since]

    # ------------------------------------------------------------------ server

    def start(self) -> None:
        from pydicom.uid import AllTransferSyntaxes

        # every transfer syntax pydicom knows, compressed ones included; any SOP class, private ones included
        self._syntaxes = [str(ts) for ts in AllTransferSyntaxes]
        self._hosts = HostList(self.allow_hosts)
        self._tls_context = self.tls.server_context() if self.tls is not None else None
        _sequence_tags()
        spool = fsio.ensure_dir(self.out / SPOOL_DIR)
        self._take_lock()
        try:
            stale = ul.remove_stale(spool)
            if stale:
                LOG.info("removed %d spool files an earlier receiver left in %s", stale, spool)
            try:
                listener = socket.create_server((self.bind, self.port), backlog=128)
            except OSError as exc:
                raise UnavailableError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror}",
                                       hint="is another receiver running on that port? choose --port") from exc
        except BaseException:
            self._release_lock()
            raise
        self._spool = ul.Spool(spool)  # only once listening: a receiver that cannot start leaves no files
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        if not self.allow_aets and not self._hosts and not _is_loopback(self.bind):
            LOG.warning("listening on %s:%d with neither --allow-aet nor --allow-host: any host that reaches this "
                        "port can store files here", self.bind, self.port)
        self._stopping.clear()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), name="kaapcli-receive", daemon=True)
        self._acceptor.start()

    def _take_lock(self) -> None:
        import fcntl

        path = self.out / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise CantCreateError(f"{path}: cannot create: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise CantCreateError(f"{self.out}: another kaapcli receiver (pid {owner}) is receiving into this "
                                  "directory", hint="give each receiver its own -o directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def _accept(self, listener: socket.socket) -> None:
        """The acceptor: new connections and every association request still being read, in one selector."""
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                wake = min((p.deadline for p in self._pending), default=now + 0.2)
                for key, _events in selector.select(max(0.0, min(wake - now, 0.2))):
                    if key.data is None:
                        self._accept_new(listener, selector)
                    else:
                        self._advance(key.data, selector)
                now = time.monotonic()
                for pending in [p for p in self._pending if p.deadline <= now]:
                    self._drop(pending, selector)
                    self._refuse(pending.host, "association request not complete in time",
                                 f"no A-ASSOCIATE-RQ within {self.timeouts.acse:g} s (ARTIM)")
        finally:
            for pending in list(self._pending):
                self._drop(pending, selector)
            selector.close()
            listener.close()

    def _accept_new(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        for _ in range(64):  # a burst at a time; the pending ones get their turn in between
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the connection stays in the backlog for a while
                self._refuse("-", "cannot accept", exc.strerror or str(exc))
                time.sleep(0.05)
                return
            host = str(address[0])
            if self._hosts and not self._hosts.allows(host):
                conn.close()  # not a byte read from a host that is not allowed
                self._refuse(host, "host not allowed", "not in --allow-host")
                continue
            if len(self._pending) >= MAX_PENDING:
                self._evict(selector, "too many connections without an association request")
            try:
                pending = ul.PendingAssociation(conn, host, time.monotonic() + self.timeouts.acse,
                                                self._tls_context)
                selector.register(pending.sock, selectors.EVENT_READ, pending)
            except (OSError, ValueError) as exc:
                conn.close()
                self._refuse(host, "cannot accept", str(exc))
                continue
            self._pending[pending] = None

    def _evict(self, selector: selectors.BaseSelector, why: str) -> None:
        """Close the oldest pending connection of the host that holds the most (a slow-loris attacker's)."""
        busiest = Counter(p.host for p in self._pending).most_common(1)[0][0]
        victim = next(p for p in self._pending if p.host == busiest)
        self._drop(victim, selector)
        self._refuse(victim.host, "connection closed early", why)

    def _drop(self, pending: ul.PendingAssociation, selector: selectors.BaseSelector) -> None:
        self._pending.pop(pending, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(pending.sock)
        pending.close()

    def _advance(self, pending: ul.PendingAssociation, selector: selectors.BaseSelector) -> None:
        try:
            done = pending.advance()
        except ul.ProtocolError as exc:
            self._pending.pop(pending, None)
            selector.unregister(pending.sock)
            pending.send_and_close(ul._abort_pdu(2, exc.reason))
            self._refuse(pending.host, "protocol error", str(exc))
            return
        except (ul.AssociationLost, OSError) as exc:
            self._drop(pending, selector)
            if self._tls_context is not None and pending.handshaking:
                self._refuse(pending.host, "TLS handshake failed", ul.describe_os_error(exc))
            return  # else a connection closed before any request: a port probe, nothing to report
        if not done:
            events = selectors.EVENT_WRITE if pending.wants_write else selectors.EVENT_READ
            if selector.get_key(pending.sock).events != events:
                selector.modify(pending.sock, events, pending)
            if pending.buffered > 65536 and sum(p.buffered for p in self._pending) > PENDING_BYTES:
                largest = max(self._pending, key=lambda p: p.buffered)
                self._drop(largest, selector)
                self._refuse(largest.host, "connection closed early", "association requests over the memory budget")
            return
        self._pending.pop(pending, None)
        selector.unregister(pending.sock)
        self._admit(pending)

    def _admit(self, pending: ul.PendingAssociation) -> None:
        """Judge a complete A-ASSOCIATE-RQ: reject it, or start its association's thread."""
        host = pending.host
        try:
            request = ul.AssociateRequest.parse(pending.body)
        except ul.ProtocolError as exc:
            pending.send_and_close(ul._abort_pdu(2, exc.reason))
            self._refuse(host, "protocol error", str(exc))
            return
        if request.problem is not None:
            result, source, reason, why = request.problem
            pending.send_and_close(ul._reject_pdu(result, source, reason))
            self._refuse(host, "association rejected", why)
            return
        who = f"{request.calling_aet} ({host})"
        if self.allow_aets and request.calling_aet not in self.allow_aets:
            pending.send_and_close(ul._reject_pdu(1, 1, 3))
            self._refuse(host, "calling AE title not allowed", f"{request.calling_aet!r} not in --allow-aet")
            return
        if self._spool is None:
            pending.close()
            return
        scp = ul.StoreSCP(pending.sock, self.timeouts, self._syntaxes, self._spool, self._handle_store, host,
                          self.writer.tags, _sequence_tags())
        with self._lock:
            if len(self._associations) >= self.max_associations:
                busy = f"{self.max_associations} associations at once (--max-associations)"
            elif self._per_host[host] >= self.max_per_host:
                busy = f"{self.max_per_host} associations from one host (--max-per-host)"
            else:
                busy = ""
                self._associations.add(scp)
                self._per_host[host] += 1
        if busy:
            pending.send_and_close(ul._reject_pdu(2, 3, 2))  # transient, local limit exceeded
            self._refuse(host, "association limit", f"{who}: {busy}")
            return
        threading.Thread(target=self._serve, args=(scp, request, host), name="kaapcli-association",
                         daemon=True).start()

    def _serve(self, scp: ul.StoreSCP, request: ul.AssociateRequest, host: str) -> None:
        try:
            if scp.accept(request):
                scp.serve()
            if scp.ended.startswith(("protocol error", "a DIMSE message", "idle")):
                LOG.warning("association from %s (%s) aborted: %s", request.calling_aet, host, scp.ended)
        finally:
            with self._lock:
                self._associations.discard(scp)
                self._per_host[host] -= 1
                if self._per_host[host] <= 0:
                    del self._per_host[host]

    def _refuse(self, host: str, reason: str, detail: str) -> None:
        """Count a refusal; log it unless this host had the same refusal logged less than LOG_EVERY s ago."""
        with self._lock:
            self.refused[reason] += 1
            now = time.monotonic()
            entry = self._logged.get((host, reason))
            if entry is not None and now - entry[0] < LOG_EVERY:
                entry[1] += 1
                return
            more = f" (and {int(entry[1])} more since)" if entry is not None and entry[1] else ""
            self._logged[(host, reason)] = [now, 0]
        LOG.warning("refused %s: %s: %s%s", host, reason, detail, more)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running associations finish (up to ``grace`` s), complete every open series."""
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            self._stopping.set()
            acceptor.join()
            self._listener = None
            deadline = time.monotonic() + grace
            # Only established associations are waited for; connections that never sent a complete request
            # were closed with the acceptor.
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
            self._spool = None
        self.poll(flush=True)
        self._release_lock()

    def _handle_store(self, incoming: ul.Incoming) -> int | tuple[int, str]:
        who = f"C-STORE {incoming.sop_instance or '(no valid SOP Instance UID)'} from {incoming.calling_aet} " \
              f"({incoming.host})"
        if incoming.error is not None:
            status, reason = incoming.error
            return self._failed(who, status, reason, incoming)
        assert incoming.path is not None
        if self.accept is not None and not self._accepted(incoming):
            return self._failed(who, NOT_MATCHED, "matches no rule (--reject-unmatched): not stored", incoming)
        try:
            dest, header = self.writer.place(incoming.path, incoming.values)
        except Exception as exc:  # noqa: BLE001 - a handler must answer with a status, never raise
            message = exc.message if isinstance(exc, KaapcliError) else str(exc)
            return self._failed(who, CANNOT_UNDERSTAND if isinstance(exc, DataError) else OUT_OF_RESOURCES,
                                message, incoming)
        self.record(dest, header, incoming.calling_aet, incoming.called_aet, incoming.size, host=incoming.host)
        if self.on_stored is not None:
            try:
                self.on_stored(dest)
            except Exception as exc:  # noqa: BLE001 - the file is stored: its status stays Success
                LOG.error("%s: stored as %s, but reporting it failed: %s", who, dest, exc)
        return SUCCESS

    def _accepted(self, incoming: ul.Incoming) -> bool:
        assert self.accept is not None
        try:
            return bool(self.accept(incoming))
        except Exception as exc:  # noqa: BLE001 - a failing check keeps the data rather than losing it
            LOG.error("C-STORE from %s: accept check failed: %s", incoming.calling_aet, exc)
            return True

    def _failed(self, who: str, status: int, reason: str, incoming: ul.Incoming) -> tuple[int, str]:
        incoming.discard()
        LOG.error("%s: 0x%04X: %s", who, status, reason)
        with self._lock:
            self.failed += 1
            self.failures[f"0x{status:04X}"] += 1
        return status, reason

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
