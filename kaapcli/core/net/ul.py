"""The DICOM upper layer (PS3.8) on plain blocking sockets: the fast paths of ``send`` and ``receive``.

pynetdicom runs each association as three threads (the caller, the association reactor and the DUL
reactor) that hand every PDU over queues polled with 1 ms sleeps; per file that is several hand-offs
and sleeps on each side, and more CPU time than the transfer itself. Storing files needs none of that:
:class:`StoreSCU` and :class:`StoreSCP` each run one association on one socket with blocking calls and
socket timeouts — A-ASSOCIATE, then per file a C-STORE-RQ command and the dataset bytes (read from disk
as they are / written to disk as they arrive) in P-DATA-TF PDUs, the C-STORE-RSP, and A-RELEASE.
Nothing here imports pydicom or pynetdicom. Echo, find, get and move stay on pynetdicom.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kaapcli.core import dicom
from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.exitcodes import UnavailableError

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"  # the DICOM application context (PS3.7 A.2.1)
IMPLEMENTATION_UID = dicom.IMPLEMENTATION_UID.encode()  # as in the file meta kaapcli writes
IMPLEMENTATION_VERSION = b"KAAPCLI"
MAX_PDU = 4 * 1024 * 1024  # what we accept, and the largest P-DATA-TF we send to a peer without a limit
VERIFICATION = "1.2.840.10008.1.1"
# C-STOREs a sender may have outstanding (PS3.7 D.3.3.3 Asynchronous Operations Window): proposed by StoreSCU, granted
# by StoreSCP.  A peer that does not answer the proposal gets the default, one: every file waits for its response.
WINDOW = 16

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, and reason by source
RJ_RESULT = {1: "Rejected Permanent", 2: "Rejected Transient"}
RJ_SOURCE = {1: "Service User", 2: "Service Provider (ACSE related)", 3: "Service Provider (Presentation related)"}
RJ_REASON = {
    1: {1: "No reason given", 2: "Application context name not supported", 3: "Calling AE title not recognised",
        7: "Called AE title not recognised"},
    2: {1: "No reason given", 2: "Protocol version not supported"},
    3: {1: "Temporary congestion", 2: "Local limit exceeded"},
}


class AssociationLost(Exception):
    """The association ended (abort, closed connection, timeout) while a file was in flight."""


def read_meta(path: Path) -> tuple[dict[str, str], int]:
    """The group 0002 string values of a Part 10 file and the offset of its dataset.

    Raises ValueError when the file has no (well-formed, explicit VR little endian) file meta.
    """
    with open(path, "rb") as fh:
        head = fh.read(132)
        if len(head) < 132 or head[128:] != b"DICM":
            raise ValueError("no DICM prefix")
        values: dict[str, str] = {}
        offset = 132
        while True:
            element = fh.read(8)
            if len(element) < 8 or element[:2] != b"\x02\x00":
                return values, offset
            tag = struct.unpack_from("<H", element, 2)[0]
            vr = element[4:6]
            if vr in dicom.LONG_LENGTH_VR_BYTES:
                length = struct.unpack("<I", fh.read(4))[0]
                offset += 12
            elif vr.isalpha() and vr.isupper():
                length = struct.unpack_from("<H", element, 6)[0]
                offset += 8
            else:
                raise ValueError("file meta is not explicit VR")
            value = fh.read(length)
            if len(value) < length:
                raise ValueError("truncated file meta")
            offset += length
            if vr == b"UI":
                values[f"0002{tag:04X}"] = value.rstrip(b"\0 ").decode("ascii", "replace")


@dataclass(frozen=True)
class StoreStatus:
    """The parts of a C-STORE-RSP kaapcli reports."""

    code: int
    comment: str = ""


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _aet(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def _element(tag: int, value: bytes) -> bytes:  # (0000,tag), implicit VR little endian
    return struct.pack("<HHI", 0, tag, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def command(fields: list[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, implicit VR little endian) with its group length."""
    body = b"".join(_element(tag, value) for tag, value in fields)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1), priority medium, with a dataset."""
    return command([(0x0002, _uid(sop_class)), (0x0100, _us(0x0001)), (0x0110, _us(message_id)),
                    (0x0700, _us(0)), (0x0800, _us(0)), (0x1000, _uid(sop_instance))])


def response(field: int, message_id: int, sop_class: str, status: int, sop_instance: str = "") -> bytes:
    """The command set of a C-STORE-RSP (0x8001) or C-ECHO-RSP (0x8030), without a dataset."""
    fields = [(0x0002, _uid(sop_class)), (0x0100, _us(field)), (0x0120, _us(message_id)),
              (0x0800, _us(0x0101)), (0x0900, _us(status))]
    return command(fields + ([(0x1000, _uid(sop_instance))] if sop_instance else []))


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of a command set (group 0000, implicit VR little endian) by element number."""
    elements: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        _group, tag, length = struct.unpack_from("<HHI", data, pos)
        elements[tag] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return elements


def _int(elements: dict[int, bytes], tag: int, default: int = -1) -> int:
    value = elements.get(tag, b"")
    return struct.unpack("<H", value[:2])[0] if len(value) >= 2 else default


def _text(value: bytes | bytearray) -> str:
    return value.rstrip(b"\0 ").decode("latin-1").strip()


def _items(data: bytes | bytearray, pos: int = 0) -> Iterator[tuple[int, bytearray | bytes]]:
    """(type, payload) of the items (or sub-items) of an A-ASSOCIATE PDU from ``pos``."""
    while pos + 4 <= len(data):
        kind, _, length = struct.unpack_from(">BBH", data, pos)
        yield kind, data[pos + 4:pos + 4 + length]
        pos += 4 + length


def _window(user_information: bytes | bytearray) -> int | None:
    """Maximum-number-operations-invoked of an Asynchronous Operations Window sub-item (None: no such item)."""
    return next((struct.unpack(">H", value[:2])[0] for kind, value in _items(user_information)
                 if kind == 0x53 and len(value) == 4), None)


class Connection:
    """PDU input and output on one blocking socket."""

    def __init__(self, sock: socket.socket | None, timeouts: Timeouts):
        self.sock = sock
        self.timeouts = timeouts
        self.max_data = MAX_PDU - 6  # payload of one PDV so that the P-DATA-TF fits the peer's maximum
        self._buffer = bytearray()  # see _read_pdu_reusing
        if sock is not None:
            # Nagle's algorithm would hold each small command PDU until the peer's delayed ACK (~40 ms a file)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def is_established(self) -> bool:
        return self.sock is not None

    def _recv_exact(self, size: int, buffer: bytearray | None = None) -> bytearray:
        """``size`` bytes from the socket, into ``buffer`` (at least that large) when given."""
        if self.sock is None:
            raise AssociationLost("not connected")
        buffer = bytearray(size) if buffer is None else buffer
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:size])
            if n == 0:
                raise AssociationLost("connection closed by the peer")
            got += n
        return buffer  # not copied: a P-DATA-TF may be megabytes

    def _read_pdu(self) -> tuple[int, bytearray]:
        kind, length = self._pdu_header()
        return kind, self._recv_exact(length)

    def _read_pdu_reusing(self) -> tuple[int, memoryview]:
        """Like :meth:`_read_pdu`, into one buffer kept for the connection: the body is valid until the next read,
        and a receiver does not allocate and fault in a fresh buffer for every dataset."""
        kind, length = self._pdu_header()
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        return kind, memoryview(self._recv_exact(length, self._buffer))[:length]

    def _pdu_header(self) -> tuple[int, int]:
        kind, _, length = struct.unpack(">BBI", self._recv_exact(6))
        if kind not in range(0x01, 0x08):
            raise AssociationLost(f"unknown PDU type 0x{kind:02X}")
        return kind, length

    def _send_pdv(self, context_id: int, control: int, chunk: bytes | memoryview, follows: int = 0) -> None:
        """One P-DATA-TF with one PDV; ``control`` bit 0: command, bit 1: last fragment.  The fragment is
        ``chunk``, or ``follows`` bytes the caller sends next."""
        if self.sock is None:
            raise AssociationLost("not connected")
        size = len(chunk) or follows
        header = struct.pack(">BBIIBB", 0x04, 0, size + 6, size + 2, context_id, control)
        if size <= 65536:  # commands and small fragments: one segment, one system call
            self.sock.sendall(header + chunk)
        else:
            self.sock.sendall(header)
            self.sock.sendall(chunk)

    def _send(self, context_id: int, control: int, data: bytes) -> None:
        """``data`` in as many P-DATA-TF as the peer's maximum PDU length needs."""
        view = memoryview(data)
        for start in range(0, max(len(data), 1), self.max_data):
            last = start + self.max_data >= len(data)
            self._send_pdv(context_id, control | (0x02 if last else 0), view[start:start + self.max_data])

    def _peer_max(self, user_information: bytes | bytearray) -> None:
        for kind, value in _items(user_information):
            if kind == 0x51 and len(value) == 4:
                peer_max = struct.unpack(">I", value)[0]
                if peer_max:  # 0: no limit
                    self.max_data = min(self.max_data, max(peer_max - 6, 1))

    def abort(self) -> None:
        if self.sock is not None:
            try:
                self.sock.sendall(struct.pack(">BBII", 0x07, 0, 4, 0))
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class StoreSCU(Connection):
    """One association for C-STORE: ``connect``, ``store`` per file, ``release``."""

    def __init__(self, peer: Peer, calling_aet: str, timeouts: Timeouts, contexts: list[tuple[str, str]]):
        super().__init__(None, timeouts)
        self.peer, self.calling_aet = peer, calling_aet
        # one transfer syntax per proposed context; ids are odd, 1..255
        self.proposed = {2 * i + 1: pair for i, pair in enumerate(contexts)}
        self.accepted: dict[tuple[str, str], int] = {}
        self.message_id = 0
        self.window = 1  # until the peer grants more
        self.outstanding: set[int] = set()  # message ids sent and not yet answered

    def connect(self) -> None:
        """Open the association, or raise UnavailableError naming the peer and what happened."""
        peer = self.peer
        try:
            sock = socket.create_connection((peer.host, peer.port), timeout=self.timeouts.connect)
        except ConnectionRefusedError as exc:
            raise UnavailableError(f"{peer}: connection refused") from exc
        except TimeoutError as exc:
            raise UnavailableError(f"{peer}: no answer (timed out)") from exc
        except OSError as exc:  # e.g. the host name does not resolve
            raise UnavailableError(f"{peer}: cannot connect: {exc.strerror or exc}") from exc
        Connection.__init__(self, sock, self.timeouts)
        try:
            sock.settimeout(self.timeouts.acse)
            sock.sendall(self._associate_rq())
            kind, body = self._read_pdu()
        except TimeoutError as exc:
            self.close()
            raise UnavailableError(f"{peer}: no answer (timed out)") from exc
        except (OSError, AssociationLost) as exc:
            self.close()
            raise UnavailableError(f"{peer}: association failed ({exc})") from exc
        if kind == 0x02:
            self._accepted(body)
            if not self.accepted:
                self.abort()
                raise UnavailableError(f"{peer}: no presentation context accepted")
            return
        self.close()
        if kind == 0x03 and len(body) >= 4:
            result, source, reason = body[1], body[2], body[3]
            detail = (f"Result: {RJ_RESULT.get(result, result)}; Source: {RJ_SOURCE.get(source, source)}; "
                      f"Reason: {RJ_REASON.get(source, {}).get(reason, reason)}")
            raise UnavailableError(f"{peer}: association rejected ({detail})")
        if kind == 0x07:
            raise UnavailableError(f"{peer}: association aborted by the peer")
        raise UnavailableError(f"{peer}: the peer does not speak DICOM upper layer (unexpected reply)")

    def _associate_rq(self) -> bytes:
        body = struct.pack(">HH", 1, 0) + _aet(self.peer.aet) + _aet(self.calling_aet) + bytes(32)
        body += _item(0x10, APPLICATION_CONTEXT)
        for context_id, (sop_class, syntax) in self.proposed.items():
            body += _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, sop_class.encode("ascii"))
                          + _item(0x40, syntax.encode("ascii")))
        body += _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID)
                      + _item(0x53, struct.pack(">HH", WINDOW, 1)) + _item(0x55, IMPLEMENTATION_VERSION))
        return struct.pack(">BBI", 0x01, 0, len(body)) + body

    def _accepted(self, body: bytearray) -> None:
        """Read the A-ASSOCIATE-AC: accepted contexts and the peer's maximum PDU length."""
        for kind, item in _items(body, 68):  # after protocol version, AE titles and reserved fields
            if kind == 0x21 and len(item) >= 4 and item[2] == 0 and item[0] in self.proposed:
                self.accepted[self.proposed[item[0]]] = item[0]  # one syntax proposed per context
            elif kind == 0x50:
                self._peer_max(item)
                granted = _window(item)
                self.window = 1 if granted is None else min(granted or WINDOW, WINDOW)  # 0: unlimited

    def release(self) -> None:
        """A-RELEASE; a peer that does not answer it properly is simply disconnected."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(self.timeouts.acse)
            self.sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))
            self._read_pdu()  # A-RELEASE-RP
        except (OSError, AssociationLost):
            pass
        self.close()

    def store(self, sop_class: str, sop_instance: str, syntax: str,
              dataset: bytes | tuple[Path, int]) -> tuple[int, list[tuple[int, StoreStatus]]]:
        """Send one dataset — encoded bytes, or (file, offset) to stream a file's dataset from disk — in the
        accepted context (``sop_class``, ``syntax``).  Returns its message id and the (message id, status) of
        the responses read to keep at most ``window`` requests outstanding: the sender reads and sends the next
        files while the peer stores the previous ones.  :meth:`drain` collects the rest.

        Raises AssociationLost (after aborting) when the association breaks or the peer does not answer in time.
        """
        context_id = self.accepted[(sop_class, syntax)]
        self.message_id = self.message_id % 0xFFFF + 1
        with self._guard():
            if self.sock is None:
                raise AssociationLost("not connected")
            self.sock.settimeout(self.timeouts.network)
            self._send(context_id, 0x01, c_store_rq(self.message_id, sop_class, sop_instance))
            if isinstance(dataset, bytes):
                self._send(context_id, 0x00, dataset)
            else:
                self._send_file(context_id, *dataset)
            self.outstanding.add(self.message_id)
            return self.message_id, self._responses(self.window - 1)

    def drain(self) -> list[tuple[int, StoreStatus]]:
        """The responses to every request still outstanding."""
        with self._guard():
            return self._responses(0)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError as exc:
            self.abort()
            raise AssociationLost("timed out") from exc
        except (OSError, AssociationLost) as exc:
            self.abort()
            raise AssociationLost(str(exc) or type(exc).__name__) from exc

    def _responses(self, keep: int) -> list[tuple[int, StoreStatus]]:
        """Read responses until at most ``keep`` requests are outstanding."""
        done = []
        if self.sock is not None and len(self.outstanding) > keep:
            self.sock.settimeout(self.timeouts.dimse)
        while len(self.outstanding) > keep:
            done.append(self._response())
        return done

    def _send_file(self, context_id: int, path: Path, offset: int) -> None:
        """The file's bytes from ``offset`` as dataset fragments, copied by the kernel from the file to the socket."""
        if self.sock is None:
            raise AssociationLost("not connected")
        with open(path, "rb") as fh:
            remaining = os.fstat(fh.fileno()).st_size - offset
            while True:
                count = max(0, min(self.max_data, remaining))
                remaining -= count
                self._send_pdv(context_id, 0x02 if remaining <= 0 else 0x00, b"", count)
                if count and self.sock.sendfile(fh, offset, count) != count:
                    raise AssociationLost(f"{path} shrank while it was sent")
                offset += count
                if remaining <= 0:
                    return

    def _response(self) -> tuple[int, StoreStatus]:
        command_set = b""
        while True:
            kind, body = self._read_pdu()
            if kind == 0x07:
                raise AssociationLost("association aborted by the peer")
            if kind != 0x04:
                raise AssociationLost(f"unexpected PDU type 0x{kind:02X}")
            for _context_id, control, data in _pdvs(body):
                if control & 0x01:
                    command_set += data
                    if control & 0x02:
                        return self._status(parse_command(command_set))

    def _status(self, elements: dict[int, bytes]) -> tuple[int, StoreStatus]:
        if _int(elements, 0x0100) != 0x8001:
            raise AssociationLost("the peer answered a C-STORE with another message")
        message_id = _int(elements, 0x0120)
        if message_id not in self.outstanding:
            raise AssociationLost("the peer answered a message that was not sent")
        self.outstanding.discard(message_id)
        return message_id, StoreStatus(_int(elements, 0x0900, 0xFFFF), _text(elements.get(0x0902, b"")))


def _write_all(spool: IO[bytes], parts: list[Any]) -> int:
    """Write ``parts`` to an unbuffered file (one system call unless the kernel writes less); their length."""
    fd = spool.fileno()
    written = os.writev(fd, parts)
    for part in parts:  # finish a short write; a full disk raises on the next call
        view = memoryview(part)[written:]
        written = max(0, written - len(part))
        while view:
            view = view[os.write(fd, view):]
    return sum(len(part) for part in parts)


def _pdvs(body: bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV of a P-DATA-TF (fragments not copied)."""
    view = memoryview(body)
    pos = 0
    while pos + 6 <= len(body):
        length = struct.unpack_from(">I", body, pos)[0]
        yield body[pos + 4], body[pos + 5], view[pos + 6:pos + 4 + length]
        pos += 4 + length


@dataclass
class Incoming:
    """A C-STORE being received: its Part 10 file is written to ``path`` (a hidden spool file) as it arrives;
    its first ``HEAD`` bytes are also kept in ``head``, so that the handler reads the header without reopening
    the file (``head`` shorter than ``HEAD``: it is the whole file)."""

    HEAD = 65536

    sop_class: str
    sop_instance: str
    syntax: str
    calling_aet: str
    called_aet: str
    path: Path
    head: bytes = b""
    size: int = 0  # bytes written to ``path``


StoreHandler = Callable[[Incoming], int]  # returns the C-STORE status; the handler owns ``path`` afterwards


class Spool:
    """Hidden files in one directory for the datasets being received, created ahead by a thread: creating a file
    costs a few hundred microseconds of kernel time on a busy ext4 volume, as much as the rest of storing a
    C-STORE, and the receiving thread need not wait for it.  :meth:`close` removes the files not used; after a
    SIGKILL, such empty hidden files are all that remains besides partial datasets, never a final name."""

    AHEAD = 8

    def __init__(self, directory: Path):
        self.directory = directory
        self._ready: queue.Queue[tuple[Path, IO[bytes]]] = queue.Queue(self.AHEAD)
        self._closed = threading.Event()
        self._filler = threading.Thread(target=self._fill, name="kaapcli-spool", daemon=True)
        self._filler.start()

    def take(self) -> tuple[Path, IO[bytes]]:
        """A new empty spool file, open for writing (created now when none is ready)."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return self._create()

    def close(self) -> None:
        self._closed.set()
        self._filler.join()
        while not self._ready.empty():
            self._discard(self._ready.get_nowait())

    def _create(self) -> tuple[Path, IO[bytes]]:
        path = self.directory / f".{secrets.token_hex(8)}.kaapcli-part"
        return path, open(path, "wb", buffering=0)  # noqa: SIM115 - closed by the association that takes it, or by close()

    @staticmethod
    def _discard(spooled: tuple[Path, IO[bytes]]) -> None:
        spooled[1].close()
        spooled[0].unlink(missing_ok=True)

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                spooled = self._create()
            except OSError:
                return  # a full disk or a missing directory: take() meets and reports it itself
            while True:
                try:
                    self._ready.put(spooled, timeout=0.2)
                    break
                except queue.Full:
                    if self._closed.is_set():
                        self._discard(spooled)
                        return


class StoreSCP(Connection):
    """The acceptor side of one association: Verification and C-STORE of any SOP class.

    Each dataset is written to a spool file as its fragments arrive (never held in memory), after a file
    meta built from the command and the context; ``on_store`` then moves it into place and returns the status.
    """

    def __init__(self, sock: socket.socket, timeouts: Timeouts, syntaxes: list[str], spool: Spool,
                 on_store: StoreHandler, allow_aets: list[str] | None = None):
        super().__init__(sock, timeouts)
        self.syntaxes = set(syntaxes)
        self.spool = spool
        self.on_store = on_store
        self.allow_aets = allow_aets or []
        self.calling_aet = self.called_aet = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: id -> (abstract syntax, transfer syntax)
        self.established = False

    def negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and accept or reject it; False when there is no association."""
        if self.sock is None:
            return False
        try:
            self.sock.settimeout(self.timeouts.acse)
            kind, body = self._read_pdu()
        except (OSError, AssociationLost):  # e.g. a bare TCP probe that closes at once
            self.close()
            return False
        if kind != 0x01 or len(body) < 68:
            self.abort()
            return False
        self.called_aet, self.calling_aet = _text(body[4:20]), _text(body[20:36])
        proposed: list[tuple[int, str, list[str]]] = []
        context_ok = False
        asked: int | None = None  # outstanding C-STOREs the requester proposes; requests are served in order anyway
        for item_kind, item in _items(body, 68):
            if item_kind == 0x10:
                context_ok = item.rstrip(b"\0 ") == APPLICATION_CONTEXT
            elif item_kind == 0x20 and len(item) >= 4:
                subs = list(_items(item, 4))
                abstract = next((_text(v) for k, v in subs if k == 0x30), "")
                proposed.append((item[0], abstract, [_text(v) for k, v in subs if k == 0x40]))
            elif item_kind == 0x50:
                self._peer_max(item)
                asked = _window(item)
        if not context_ok:
            return self._reject(1, 1, 2)  # application context name not supported
        if self.allow_aets and self.calling_aet not in self.allow_aets:
            return self._reject(1, 1, 3)  # calling AE title not recognised
        results = b""
        for context_id, abstract, syntaxes in proposed:
            syntax = next((ts for ts in syntaxes if ts in self.syntaxes), None)
            if abstract and syntax is not None:
                self.contexts[context_id] = (abstract, syntax)
            offered = syntax or (syntaxes[0] if syntaxes else "")
            results += _item(0x21, bytes([context_id, 0, 0 if syntax else 4, 0]) + _item(0x40, offered.encode()))
        granted = b"" if asked is None else _item(0x53, struct.pack(">HH", min(asked or WINDOW, WINDOW), 1))
        accept = (struct.pack(">HH", 1, 0) + bytes(body[4:36]) + bytes(32) + _item(0x10, APPLICATION_CONTEXT)
                  + results + _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID)
                                    + granted + _item(0x55, IMPLEMENTATION_VERSION)))
        try:
            self.sock.sendall(struct.pack(">BBI", 0x02, 0, len(accept)) + accept)
        except OSError:
            self.close()
            return False
        self.established = True
        return True

    def refuse(self) -> None:
        """Read the A-ASSOCIATE-RQ and reject it: too many associations at once (local limit exceeded)."""
        try:
            if self.sock is not None:
                self.sock.settimeout(self.timeouts.acse)
                self._read_pdu()
        except (OSError, AssociationLost):
            pass
        self._reject(2, 3, 2)

    def interrupt(self) -> None:
        """From another thread: break the connection, so that :meth:`serve` returns (and discards a partial file)."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _reject(self, result: int, source: int, reason: int) -> bool:
        if self.sock is not None:
            try:
                self.sock.sendall(struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason))
            except OSError:
                pass
        self.close()
        return False

    def serve(self) -> None:
        """Answer C-ECHO and C-STORE requests until the peer releases or aborts, or goes silent."""
        incoming: Incoming | None = None
        spool = None
        command_set = b""
        elements: dict[int, bytes] = {}
        try:
            while self.sock is not None:
                self.sock.settimeout(self.timeouts.network)
                kind, body = self._read_pdu_reusing()
                if kind == 0x05:  # A-RELEASE-RQ
                    self.sock.sendall(struct.pack(">BBII", 0x06, 0, 4, 0))
                    break
                if kind != 0x04:  # A-ABORT, or anything unexpected
                    break
                for context_id, control, data in _pdvs(body):
                    if control & 0x01:  # command fragment
                        command_set += data
                        if not control & 0x02:
                            continue
                        elements, command_set = parse_command(command_set), b""
                        if _int(elements, 0x0800) == 0x0101:  # no dataset follows
                            self._answer(context_id, elements, None)
                        elif _int(elements, 0x0100) == 0x0001 and context_id in self.contexts:
                            incoming, spool = self._open(context_id, elements)
                        else:
                            raise AssociationLost("unsupported request")
                    elif spool is not None and incoming is not None:  # dataset fragment of a C-STORE
                        # the file meta goes out with the first fragment: one write, one block allocation
                        incoming.size += _write_all(spool, [data] if incoming.size else [incoming.head, data])
                        if len(incoming.head) < Incoming.HEAD:
                            incoming.head += data[:Incoming.HEAD - len(incoming.head)]
                        if control & 0x02:
                            spool.close()
                            spool = None
                            self._answer(context_id, elements, incoming)
                            incoming = None
        except (OSError, AssociationLost):
            pass  # aborted, closed or silent: nothing to answer
        finally:
            if spool is not None and incoming is not None:  # a dataset cut short is thrown away
                spool.close()
                incoming.path.unlink(missing_ok=True)
            self.established = False
            self.close()

    def _open(self, context_id: int, elements: dict[int, bytes]) -> tuple[Incoming, Any]:
        abstract, syntax = self.contexts[context_id]
        sop_class, sop_instance = _text(elements.get(0x0002, b"")), _text(elements.get(0x1000, b""))
        path, spool = self.spool.take()  # closed when the last fragment arrives, or in serve()
        meta = dicom.encode_file_meta(sop_class or abstract, sop_instance, syntax, self.calling_aet)  # see serve()
        return (Incoming(sop_class or abstract, sop_instance, syntax, self.calling_aet, self.called_aet, path, meta),
                spool)

    def _answer(self, context_id: int, elements: dict[int, bytes], incoming: Incoming | None) -> None:
        field, message_id = _int(elements, 0x0100), _int(elements, 0x0110, 0)
        if field == 0x0030:  # C-ECHO-RQ
            self._send(context_id, 0x01, response(0x8030, message_id, VERIFICATION, 0x0000))
        elif field == 0x0001 and incoming is not None:
            status = self.on_store(incoming)
            self._send(context_id, 0x01, response(0x8001, message_id, incoming.sop_class, status,
                                                  incoming.sop_instance))
        else:
            raise AssociationLost("unsupported request")
