"""The DICOM upper layer (PS3.8) on plain blocking sockets: the fast paths of ``send`` and ``receive``.

pynetdicom runs each association as three threads (the caller, the association reactor and the DUL
reactor) that hand every PDU over queues polled with 1 ms sleeps; per file that is several hand-offs
and sleeps on each side, and more CPU time than the transfer itself. Storing files needs none of that:
:class:`StoreSCU` and :class:`StoreSCP` each run one association on one socket with blocking calls —
A-ASSOCIATE, then per file a C-STORE-RQ command and the dataset bytes (read from disk as they are /
written to disk as they arrive) in P-DATA-TF PDUs, the C-STORE-RSP, and A-RELEASE. Sockets may be TLS
sockets (PS3.15 B.1). Nothing here imports pydicom or pynetdicom. Echo, find, get and move stay on pynetdicom.

Every byte from the peer is untrusted, and bounded before it is used:

1. A PDU header is checked before its body is read: an A-ASSOCIATE PDU of at most 1 MiB (DCMTK's limit), a
   P-DATA-TF of at most the maximum length kaapcli advertised, the other PDUs their fixed size; anything else is
   an A-ABORT, never an allocation. Bodies are read into buffers of bounded size as they arrive.
2. Reads run under deadlines for a whole phase, not per ``recv()``: the association request (ARTIM, read by the
   receiver's acceptor without a thread: :class:`PendingAssociation`), each DIMSE message (``dimse`` seconds plus
   one second per 64 KiB received), the idle time between messages (``network``).
3. Command sets are parsed within their bounds, and their UIDs and AE titles validated: a malformed C-STORE-RQ
   gets a failure status, the association goes on.
4. A dataset is answered Success only after :class:`DatasetChecker` saw its element structure end cleanly (as
   the bytes stream to the spool file, no re-parse) and it names the SOP class and instance of its command; a
   dataset that cannot be written (a full disk) gets 0xA700. Either way the rest of the dataset is read and
   dropped, the association survives, and nothing lands under a final name.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from kaapcli.core import dicom
from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.exitcodes import KaapcliError, UnavailableError

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"  # the DICOM application context (PS3.7 A.2.1)
IMPLEMENTATION_UID = dicom.IMPLEMENTATION_UID.encode()  # as in the file meta kaapcli writes
IMPLEMENTATION_VERSION = b"KAAPCLI"
MAX_PDU = 4 * 1024 * 1024  # what we accept, and the largest P-DATA-TF we send to a peer without a limit
MAX_ASSOCIATE_PDU = 1024 * 1024  # an A-ASSOCIATE-RQ/AC larger than this is refused (DCMTK: 1 MiB)
PDU_SLACK = 6  # tolerated beyond MAX_PDU: some peers count the PDU header into the maximum length
MAX_COMMAND = 64 * 1024  # a command set is ~150 bytes; more is an attack
MIN_RATE = 64 * 1024  # bytes/s: a DIMSE message gets ``dimse`` seconds plus one per 64 KiB received
# Dataset bytes read at a time: a whole PDV of the largest P-DATA-TF accepted, so that a CT slice is one read and one
# write (two writes per file cost ~20 % more time on ext4).  The buffer is anonymous memory committed only as bytes
# arrive: a peer that claims a large PDV and sends nothing costs nothing.
CHUNK = MAX_PDU
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                                     "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
# C-STOREs a sender may have outstanding (PS3.7 D.3.3.3 Asynchronous Operations Window): proposed by StoreSCU, granted
# by StoreSCP.  A peer that does not answer the proposal gets the default, one: every file waits for its response.
WINDOW = 16
LOG = logging.getLogger("kaapcli.net")

# DIMSE statuses (PS3.4 B.2.3 for C-STORE, PS3.7 C for the general ones)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class (DCMTK uses it for a mismatching instance too)
CANNOT_UNDERSTAND = 0xC000
UNRECOGNIZED_OPERATION = 0x0211

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, and reason by source
RJ_RESULT = {1: "Rejected Permanent", 2: "Rejected Transient"}
RJ_SOURCE = {1: "Service User", 2: "Service Provider (ACSE related)", 3: "Service Provider (Presentation related)"}
RJ_REASON = {
    1: {1: "No reason given", 2: "Application context name not supported", 3: "Calling AE title not recognised",
        7: "Called AE title not recognised"},
    2: {1: "No reason given", 2: "Protocol version not supported"},
    3: {1: "Temporary congestion", 2: "Local limit exceeded"},
}
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ",
             6: "A-RELEASE-RP", 7: "A-ABORT"}
# The largest body each PDU type may have (PS3.8 9.3): anything longer is refused before it is read.
PDU_LIMITS = {1: MAX_ASSOCIATE_PDU, 2: MAX_ASSOCIATE_PDU, 3: 4, 4: MAX_PDU + PDU_SLACK, 5: 4, 6: 4, 7: 4}
_PDU_HEADER, _PDV_HEADER = struct.Struct(">BBI"), struct.Struct(">IBB")


class AssociationLost(Exception):
    """The association ended (abort, closed connection, timeout) while a file was in flight."""


class ProtocolError(AssociationLost):
    """The peer broke the upper-layer protocol: the association is aborted (A-ABORT reason 2 or 6, PS3.8 9.3.8)."""

    def __init__(self, message: str, reason: int = 6):
        super().__init__(message)
        self.reason = reason


class Malformed(ValueError):
    """A dataset whose element structure does not hold together (the message says where)."""


# --------------------------------------------------------------------------- values from the wire

_UID = re.compile(rb"[0-9]+(\.[0-9]+)*")


def wire_uid(raw: bytes | bytearray | memoryview) -> str | None:
    """A UID as sent (trailing NUL/space padding removed), or None unless it is 1-64 digits and dots (PS3.5 9.1).
    Leading zeros in components are tolerated: real devices send them."""
    value = bytes(raw).rstrip(b"\0 ")
    return value.decode("ascii") if len(value) <= 64 and _UID.fullmatch(value) else None


def wire_aet(raw: bytes | bytearray | memoryview) -> str | None:
    """An AE title as sent (padding spaces removed), or None unless it is 1-16 printable ASCII characters without a
    backslash (PS3.5 AE; 16 spaces mean "no title", which PS3.8 forbids)."""
    value = bytes(raw).strip(b" \0")
    if not value or len(value) > 16 or b"\\" in value or any(c < 0x20 or c > 0x7E for c in value):
        return None
    return value.decode("ascii")


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


# --------------------------------------------------------------------------- PDUs and command sets

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


def response(field: int, message_id: int, sop_class: str, status: int, sop_instance: str = "",
             comment: str = "") -> bytes:
    """The command set of a response without a dataset (C-STORE-RSP 0x8001, C-ECHO-RSP 0x8030, ...); the UIDs only
    when given (a request's invalid UIDs are not echoed), an Error Comment (LO, 64 characters) with a failure."""
    fields = ([(0x0002, _uid(sop_class))] if sop_class else []) + [
        (0x0100, _us(field)), (0x0120, _us(message_id)), (0x0800, _us(0x0101)), (0x0900, _us(status))]
    if comment:
        text = comment.encode("ascii", "replace")
        if len(text) > 64:  # LO: 64 characters; cut at a word
            text = text[:61].rsplit(b" ", 1)[0] + b"..."
        fields.append((0x0902, text + b" " * (len(text) % 2)))
    return command(fields + ([(0x1000, _uid(sop_instance))] if sop_instance else []))


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """Elements of a command set (group 0000, implicit VR little endian) by element number.

    Raises ValueError when an element's length runs past the data or the data ends inside a header.
    """
    elements: dict[int, bytes] = {}
    pos, size = 0, len(data)
    while pos < size:
        if pos + 8 > size:
            raise ValueError("the command set ends inside an element header")
        group, tag, length = struct.unpack_from("<HHI", data, pos)
        if group != 0x0000:
            raise ValueError(f"element ({group:04X},{tag:04X}) in a command set")
        if pos + 8 + length > size:
            raise ValueError(f"(0000,{tag:04X}) claims {length} bytes, {size - pos - 8} present")
        elements[tag] = bytes(data[pos + 8:pos + 8 + length])
        pos += 8 + length
    return elements


def _int(elements: dict[int, bytes], tag: int, default: int = -1) -> int:
    value = elements.get(tag, b"")
    return struct.unpack("<H", value)[0] if len(value) == 2 else default


def _text(value: bytes | bytearray) -> str:
    return value.rstrip(b"\0 ").decode("latin-1").strip()


def _items(data: bytes | bytearray | memoryview, pos: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of the items (or sub-items) of an A-ASSOCIATE PDU from ``pos``; ProtocolError when an item
    runs past the data."""
    size = len(data)
    while pos < size:
        if pos + 4 > size:
            raise ProtocolError("an A-ASSOCIATE item header is cut short")
        kind, _, length = struct.unpack_from(">BBH", data, pos)
        if pos + 4 + length > size:
            raise ProtocolError(f"A-ASSOCIATE item 0x{kind:02X} claims {length} bytes, {size - pos - 4} present")
        yield kind, bytes(data[pos + 4:pos + 4 + length])
        pos += 4 + length


def _window(user_information: bytes) -> int | None:
    """Maximum-number-operations-invoked of an Asynchronous Operations Window sub-item (None: no such item)."""
    return next((struct.unpack(">H", value[:2])[0] for kind, value in _items(user_information)
                 if kind == 0x53 and len(value) == 4), None)


def _peer_maximum(user_information: bytes) -> int:
    """The peer's Maximum Length Received (0: no limit)."""
    return next((struct.unpack(">I", value)[0] for kind, value in _items(user_information)
                 if kind == 0x51 and len(value) == 4), 0)


def _abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


def _reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


def describe_os_error(exc: BaseException) -> str:
    """What a socket error means for the association, in a few words."""
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the peer"
    if isinstance(exc, BrokenPipeError):
        return "connection closed by the peer (broken pipe)"
    if isinstance(exc, OSError) and exc.__class__.__module__ == "ssl":
        from kaapcli.core.net.tls import describe

        return describe(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- the dataset structure check

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
# explicit VRs (PS3.5 Table 6.2-1) by the size of their length field
_LONG_VRS = frozenset(dicom.LONG_LENGTH_VR_BYTES)
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_DATASET, _IN_ITEM, _IN_SEQUENCE, _IN_FRAGMENTS = range(4)
_EXPLICIT_LE_HEADER = struct.Struct("<HH2sH")
_CAPTURE_LIMIT = 256  # top-level values longer than this are not collected (UIDs have at most 64 bytes)
_INFLATE_STEP = 1 << 20
_MAX_INFLATED = 1 << 32


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class DatasetChecker:
    """Checks the element structure of a dataset as its fragments stream by (PS3.5 7.1-7.5 and A.4), for the
    negotiated transfer syntax: implicit/explicit VR little endian, explicit big endian, deflated (checked as it
    inflates) and the encapsulated syntaxes.  Element values are skipped, not read: the work is per element.

    Checked: every element header is complete and (explicit VR) names a known VR; every defined length ends
    inside its item or sequence, and the dataset ends exactly at an element boundary; undefined-length sequences,
    items and encapsulated pixel data are terminated by their delimiters; sequences hold only items, pixel data
    only fragments of defined length; no file meta (group 0002) element in the dataset.  Not checked: values, tag
    order, odd lengths (real devices write them and every reader copes), bytes after a deflate stream (ignored,
    as pydicom and DCMTK do).

    On the way the top-level values of ``wanted`` tags (short ones) are collected for the receiver.
    """

    def __init__(self, syntax: str, wanted: Collection[int] = (), sequence_tags: Collection[int] = ()):
        self.explicit = syntax != IMPLICIT_LE
        self.order = ">" if syntax == EXPLICIT_BE else "<"
        self._tag_struct = struct.Struct(self.order + "HH")
        self._u32 = struct.Struct(self.order + "I")
        self._u16 = struct.Struct(self.order + "H")
        self.inflater = zlib.decompressobj(-15) if syntax == DEFLATED_LE else None
        self.inflated = 0
        self.wanted = wanted
        self.sequence_tags = sequence_tags  # SQ tags of the dictionary: implicit VR sequences of defined length
        self.values: dict[int, bytes] = {}
        self.pos = 0  # dataset bytes consumed
        self.skip = 0  # value bytes still to pass
        self.tag = 0  # the element being read, for messages
        self.length = 0
        self._capture: bytearray | None = None
        self._carry = b""  # the start of an element header cut by the end of a fragment
        # open containers: [kind, end or None (undefined length), limit (nearest defined end), implicit, tag]
        self.stack: list[list[Any]] = []
        self._fast = self.explicit and self.order == "<"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the dataset; raises Malformed."""
        if self.inflater is None:
            self._feed(data)
            return
        pending: bytes | bytearray | memoryview = data
        try:
            while pending:
                out = self.inflater.decompress(pending, _INFLATE_STEP)
                self.inflated += len(out)
                if self.inflated > _MAX_INFLATED:
                    raise Malformed("the deflated data set inflates to more than 4 GiB")
                self._feed(out)
                pending = self.inflater.unconsumed_tail  # bytes after the deflate stream's end are ignored, as
                # pydicom and DCMTK do (PS3.5 A.5 allows a pad byte; real files have more)
        except zlib.error as exc:
            raise Malformed(f"not a deflate stream ({exc})") from exc

    def finish(self) -> dict[int, bytes]:
        """Called after the last fragment: raises Malformed unless the dataset ended cleanly; the values found."""
        if self.inflater is not None:
            try:
                self._feed(self.inflater.flush())
            except zlib.error as exc:
                raise Malformed(f"not a deflate stream ({exc})") from exc
            if not self.inflater.eof:
                raise Malformed("the deflated data set is cut short")
        if self.skip:
            raise Malformed(f"{_tag(self.tag)} claims {self.length} bytes, {self.length - self.skip} present")
        if self._carry:
            raise Malformed(f"the data set ends inside an element header after {_tag(self.tag)}")
        self._close_ended()
        if self.stack:
            kind, _end, _limit, _implicit, tag = self.stack[-1]
            what = {_IN_ITEM: "item", _IN_SEQUENCE: "sequence", _IN_FRAGMENTS: "encapsulated pixel data"}[kind]
            raise Malformed(f"the data set ends inside the {what} of {_tag(tag)}: no delimiter")
        return self.values

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        i = 0
        while True:
            if self.skip:
                take = min(self.skip, size - i)
                if self._capture is not None:
                    self._capture += data[i:i + take]
                i += take
                self.pos += take
                self.skip -= take
                if self.skip:
                    return
                if self._capture is not None:
                    self.values[self.tag] = bytes(self._capture)
                    self._capture = None
            if self.stack:
                self._close_ended()
            elif self._fast and not self._carry:
                i = self._top_level_run(data, i, size)
                if self.skip:
                    continue
            if i >= size:
                return
            if self._carry:
                joined = self._carry + bytes(data[i:i + 12])
                parsed = self._header(joined, 0)
                if parsed is None:
                    self._carry = joined
                    return
                used = parsed - len(self._carry)
                self._carry = b""
                i += used
            else:
                parsed = self._header(data, i)
                if parsed is None:
                    self._carry = bytes(data[i:])
                    return
                i += parsed

    def _top_level_run(self, data: bytes | bytearray | memoryview, i: int, size: int) -> int:
        """The common case in one tight loop: top-level explicit VR little endian elements with a 2-byte length,
        not wanted (most of a header).  Returns where the general path takes over; sets ``skip`` for a value that
        continues in the next fragment."""
        unpack, short, wanted = _EXPLICIT_LE_HEADER.unpack_from, _SHORT_VRS, self.wanted
        while i + 8 <= size:
            group, element, vr, length = unpack(data, i)
            if vr not in short or group in (0x0002, 0xFFFE) or (group << 16 | element) in wanted:
                return i
            self.tag, self.length = group << 16 | element, length
            i += 8 + length
            self.pos += 8 + length
            if i > size:
                self.skip = i - size
                self.pos -= self.skip
                return size
        return i

    def _close_ended(self) -> None:
        stack = self.stack
        while stack and stack[-1][1] is not None and self.pos >= stack[-1][1]:
            if self.pos > stack[-1][1]:
                raise Malformed(f"an element runs past the end of the item or sequence of {_tag(stack[-1][4])}")
            stack.pop()

    def _header(self, buf: bytes | bytearray | memoryview, at: int) -> int | None:
        """Read the element header at ``at``: its size in bytes, or None when ``buf`` ends first."""
        avail = len(buf) - at
        if avail < 8:
            return None
        group, element = self._tag_struct.unpack_from(buf, at)
        tag = group << 16 | element
        top = self.stack[-1] if self.stack else None
        explicit = self.explicit and not (top is not None and top[3])
        vr: bytes | None = None
        if group == 0xFFFE:
            used, length = 8, self._u32.unpack_from(buf, at + 4)[0]
        elif explicit:
            vr = bytes(buf[at + 4:at + 6])
            if vr in _LONG_VRS:
                if avail < 12:
                    return None
                used, length = 12, self._u32.unpack_from(buf, at + 8)[0]
            elif vr in _SHORT_VRS:
                used, length = 8, self._u16.unpack_from(buf, at + 6)[0]
            else:
                raise Malformed(f"{_tag(tag)}: {vr!r} is not a VR (is the data set in the negotiated transfer "
                                "syntax?)")
        else:
            used, length = 8, self._u32.unpack_from(buf, at + 4)[0]
        self.pos += used
        self.tag, self.length = tag, length
        if top is not None and top[2] is not None and self.pos > top[2]:
            raise Malformed(f"{_tag(tag)} starts past the end of the item or sequence of {_tag(top[4])}")
        self._element(tag, vr, length, top)
        return used

    def _push(self, kind: int, length: int, implicit: bool, tag: int, top: list[Any] | None) -> None:
        parent_limit = top[2] if top is not None else None
        end = None if length == _UNDEFINED else self.pos + length
        if end is not None and parent_limit is not None and end > parent_limit:
            raise Malformed(f"{_tag(tag)} claims {length} bytes, more than its item or sequence holds")
        self.stack.append([kind, end, end if end is not None else parent_limit, implicit, tag])

    def _value(self, tag: int, length: int, top: list[Any] | None) -> None:
        limit = top[2] if top is not None else None
        if limit is not None and self.pos + length > limit:
            raise Malformed(f"{_tag(tag)} claims {length} bytes, more than its item or sequence holds")
        self.skip = length
        if top is None and tag in self.wanted and length <= _CAPTURE_LIMIT:
            self._capture = bytearray()
            if not length:
                self.values[tag] = b""
                self._capture = None

    def _element(self, tag: int, vr: bytes | None, length: int, top: list[Any] | None) -> None:
        implicit = bool(top is not None and top[3])
        if top is not None and top[0] >= _IN_SEQUENCE:  # inside a sequence or encapsulated pixel data: items only
            if tag == _ITEM:
                if top[0] == _IN_SEQUENCE:
                    self._push(_IN_ITEM, length, implicit, top[4], top)
                elif length == _UNDEFINED:
                    raise Malformed(f"a fragment of {_tag(top[4])} of undefined length")
                else:
                    self._value(tag, length, top)
            elif tag == _SEQUENCE_END:
                if top[1] is not None:
                    raise Malformed(f"a sequence delimiter in {_tag(top[4])}, which has a defined length")
                if length:
                    raise Malformed(f"a sequence delimiter of length {length} in {_tag(top[4])}")
                self.stack.pop()
            else:
                raise Malformed(f"{_tag(tag)} where an item of {_tag(top[4])} was expected")
            return
        if tag == _ITEM_END:
            if top is None or top[1] is not None:
                raise Malformed("an item delimiter outside an item of undefined length")
            if length:
                raise Malformed(f"an item delimiter of length {length}")
            self.stack.pop()
            return
        if tag >> 16 == 0xFFFE:
            raise Malformed(f"{_tag(tag)} where a data element was expected")
        if top is None and tag >> 16 == 0x0002:
            raise Malformed(f"file meta element {_tag(tag)} inside the data set")
        if length == _UNDEFINED:
            if vr == b"SQ" or (vr is None and tag != _PIXEL_DATA):
                self._push(_IN_SEQUENCE, length, implicit, tag, top)
            elif vr == b"UN":  # an implicit VR sequence of unknown type (PS3.5 6.2.2)
                self._push(_IN_SEQUENCE, length, True, tag, top)
            elif vr in (b"OB", b"OW") or (vr is None and tag == _PIXEL_DATA):
                self._push(_IN_FRAGMENTS, length, implicit, tag, top)
            else:
                raise Malformed(f"{_tag(tag)} {vr.decode('latin-1') if vr else ''}: undefined length")
        elif vr == b"SQ" or (vr is None and tag in self.sequence_tags):
            self._push(_IN_SEQUENCE, length, implicit, tag, top)
            if not length:
                self.stack.pop()
        else:
            self._value(tag, length, top)


# --------------------------------------------------------------------------- one association on one socket

class Connection:
    """PDU input and output on one blocking socket (or TLS socket), every read under ``deadline``."""

    def __init__(self, sock: socket.socket | None, timeouts: Timeouts):
        self.sock = sock
        self.timeouts = timeouts
        self.max_data = MAX_PDU - 6  # payload of one PDV so that the P-DATA-TF fits the peer's maximum
        self.deadline = 0.0  # time.monotonic() by which the current read must be done
        self._socket_timeout = -1e9  # as last set on the socket
        if sock is not None:
            # Nagle's algorithm would hold each small command PDU until the peer's delayed ACK (~40 ms a file)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def is_established(self) -> bool:
        return self.sock is not None

    @property
    def is_tls(self) -> bool:
        return self.sock is not None and type(self.sock).__module__ == "ssl"

    def _set_timeout(self, seconds: float) -> None:
        if self.sock is not None:
            self.sock.settimeout(seconds)
            self._socket_timeout = seconds

    def expect_within(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def _recv_into(self, view: memoryview) -> int:
        """Some bytes into ``view``, waiting at most until the deadline (TimeoutError; up to a second later)."""
        sock = self.sock
        if sock is None:
            raise AssociationLost("not connected")
        while True:
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                raise TimeoutError("timed out")
            # The socket's timeout is set again only when a recv() would end more than a second after the deadline
            # or long before it (a deadline that moved): a TLS read returns one record (16 KiB) at a time, and a
            # system call for each would cost a tenth of the receiver's time.
            ends = now + self._socket_timeout
            if ends > self.deadline + 1.0 or ends < self.deadline - 5.0:
                self._set_timeout(remaining)
            try:
                n = sock.recv_into(view)
            except TimeoutError:
                if time.monotonic() < self.deadline:  # the deadline moved on meanwhile: wait for the rest of it
                    self._socket_timeout = -1e9
                    continue
                raise
            if n == 0:
                raise AssociationLost("connection closed by the peer")
            return n

    def _recv_exact(self, size: int, buffer: Any = None) -> Any:
        """``size`` bytes (bounded by the caller), into ``buffer`` (a writable buffer at least that large) when
        given, else into a new bytearray."""
        buffer = bytearray(size) if buffer is None else buffer
        view = memoryview(buffer)
        got = 0
        while got < size:
            got += self._recv_into(view[got:size])
        return buffer  # not copied: a fragment may be large

    def _pdu_header(self) -> tuple[int, int]:
        """Type and length of the next PDU, refused (ProtocolError) before its body is read when the type is unknown
        or the length exceeds what that type may have."""
        kind, _, length = _PDU_HEADER.unpack(self._recv_exact(6))
        limit = PDU_LIMITS.get(kind)
        if limit is None:
            raise ProtocolError(f"unknown PDU type 0x{kind:02X}", reason=1)
        if length > limit:
            raise ProtocolError(f"{PDU_NAMES[kind]} of {length} bytes, more than the {limit} accepted")
        return kind, length

    def _read_pdu(self) -> tuple[int, bytearray]:
        kind, length = self._pdu_header()
        return kind, self._recv_exact(length)

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

    def _peer_max(self, user_information: bytes) -> None:
        peer_max = _peer_maximum(user_information)
        if peer_max:  # 0: no limit
            self.max_data = min(self.max_data, max(peer_max - 6, 1))

    def abort(self, source: int = 0, reason: int = 0) -> None:
        if self.sock is not None:
            try:
                self._set_timeout(1.0)
                self.sock.sendall(_abort_pdu(source, reason))
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
        self._file_buffer: bytearray | None = None  # TLS: file bytes go through it (no sendfile)

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
        if peer.tls is not None:
            sock = self._handshake(sock)
        Connection.__init__(self, sock, self.timeouts)
        try:
            self.expect_within(self.timeouts.acse)
            sock.settimeout(self.timeouts.acse)
            sock.sendall(self._associate_rq())
            kind, body = self._read_pdu()
            if kind == 0x02:
                self._accepted(body)
        except (OSError, AssociationLost) as exc:
            self.close()
            raise UnavailableError(f"{peer}: association failed ({describe_os_error(exc)})") from exc
        if kind == 0x02:
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

    def _handshake(self, sock: socket.socket) -> socket.socket:
        peer = self.peer
        assert peer.tls is not None
        try:
            context = peer.tls.client_context()
            sock.settimeout(self.timeouts.acse)
            return context.wrap_socket(sock, server_hostname=peer.host)
        except KaapcliError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            why = describe_os_error(exc)
            hint = "--tls-verify chain checks the chain only" if "not for that host" in why else ""
            raise UnavailableError(f"{peer}: {why}", hint=hint) from exc

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
        if len(body) < 68:
            raise ProtocolError("A-ASSOCIATE-AC shorter than its fixed fields")
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
            self.expect_within(self.timeouts.acse)
            self._set_timeout(self.timeouts.acse)
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
            self._set_timeout(self.timeouts.network)
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
        except ProtocolError as exc:
            self.abort(2, exc.reason)
            raise AssociationLost(f"protocol error: {exc}") from exc
        except (OSError, AssociationLost) as exc:
            self.abort()
            raise AssociationLost(describe_os_error(exc)) from exc

    def _responses(self, keep: int) -> list[tuple[int, StoreStatus]]:
        """Read responses until at most ``keep`` requests are outstanding."""
        done = []
        while len(self.outstanding) > keep:
            self.expect_within(self.timeouts.dimse)
            done.append(self._response())
        return done

    def _send_file(self, context_id: int, path: Path, offset: int) -> None:
        """The file's bytes from ``offset`` as dataset fragments, copied by the kernel from the file to the socket
        (through a buffer over TLS, where the kernel cannot)."""
        sock = self.sock
        if sock is None:
            raise AssociationLost("not connected")
        tls = self.is_tls
        with open(path, "rb") as fh:
            remaining = os.fstat(fh.fileno()).st_size - offset
            if tls:
                fh.seek(offset)
            while True:
                count = max(0, min(self.max_data, remaining))
                remaining -= count
                control = 0x02 if remaining <= 0 else 0x00
                if tls:
                    self._send_read(fh, sock, path, context_id, control, count)
                else:
                    self._send_pdv(context_id, control, b"", count)
                    if count and sock.sendfile(fh, offset, count) != count:
                        raise AssociationLost(f"{path} shrank while it was sent")
                offset += count
                if remaining <= 0:
                    return

    def _send_read(self, fh: Any, sock: socket.socket, path: Path, context_id: int, control: int, count: int) -> None:
        """One P-DATA-TF of ``count`` bytes read from ``fh``, its header in the same buffer as the fragment: one
        write, so no TLS record (and system call on each side) carries just the 12 header bytes."""
        size = 12 + count
        if self._file_buffer is None or len(self._file_buffer) < size:
            self._file_buffer = bytearray(12 + min(self.max_data, MAX_PDU))
        view = memoryview(self._file_buffer)[:size]
        struct.pack_into(">BBIIBB", view, 0, 0x04, 0, count + 6, count + 2, context_id, control)
        got = 12
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                raise AssociationLost(f"{path} shrank while it was sent")
            got += n
        sock.sendall(view)

    def _response(self) -> tuple[int, StoreStatus]:
        command_set = bytearray()
        while True:
            kind, length = self._pdu_header()
            body = self._recv_exact(length)
            if kind == 0x07:
                raise AssociationLost("association aborted by the peer")
            if kind != 0x04:
                raise ProtocolError(f"unexpected {PDU_NAMES[kind]}", reason=2)
            for _context_id, control, data in _pdvs(body):
                if not control & 0x01:
                    raise ProtocolError("a data set fragment in a C-STORE response", reason=2)
                command_set += data
                if len(command_set) > MAX_COMMAND:
                    raise ProtocolError("a command set of more than 64 KiB")
                if control & 0x02:
                    try:
                        return self._status(parse_command(command_set))
                    except ValueError as exc:
                        raise ProtocolError(f"unreadable C-STORE response: {exc}") from exc

    def _status(self, elements: dict[int, bytes]) -> tuple[int, StoreStatus]:
        if _int(elements, 0x0100) != 0x8001:
            raise AssociationLost("the peer answered a C-STORE with another message")
        message_id = _int(elements, 0x0120)
        if message_id not in self.outstanding:
            raise AssociationLost("the peer answered a message that was not sent")
        self.outstanding.discard(message_id)
        return message_id, StoreStatus(_int(elements, 0x0900, 0xFFFF), _text(elements.get(0x0902, b"")))


def _pdvs(body: bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV of a P-DATA-TF (fragments not copied); a PDV
    that runs past its PDU is a ProtocolError."""
    view = memoryview(body)
    pos, size = 0, len(body)
    while pos < size:
        if pos + 6 > size:
            raise ProtocolError("a PDV header is cut short")
        length = struct.unpack_from(">I", body, pos)[0]
        if length < 2 or pos + 4 + length > size:
            raise ProtocolError(f"a PDV of {length} bytes in a P-DATA-TF of {size}")
        yield body[pos + 4], body[pos + 5], view[pos + 6:pos + 4 + length]
        pos += 4 + length


def _write_all(fd: int, parts: list[Any]) -> int:
    """Write ``parts`` to a file descriptor (one system call unless the kernel writes less); their length."""
    written = os.writev(fd, parts)
    for part in parts:  # finish a short write; a full disk raises on the next call
        view = memoryview(part)[written:]
        written = max(0, written - len(part))
        while view:
            view = view[os.write(fd, view):]
    return sum(len(part) for part in parts)


# --------------------------------------------------------------------------- receiving

@dataclass
class Incoming:
    """A C-STORE (or another request with a dataset) being received.  A C-STORE's Part 10 file is written to
    ``path`` (a hidden spool file) as it arrives, after ``meta``; ``values``: the top-level header values the
    checker collected; ``error``: (status, reason) once it cannot succeed — then its bytes are read and dropped."""

    sop_class: str
    sop_instance: str
    syntax: str
    calling_aet: str
    called_aet: str
    path: Path | None
    meta: bytes = b""
    size: int = 0  # bytes written to ``path``
    context_id: int = 0
    message_id: int = 0
    field: int = 0x0001  # the request's command field
    host: str = ""
    values: dict[int, bytes] = dataclass_field(default_factory=dict)
    error: tuple[int, str] | None = None
    checker: DatasetChecker | None = None
    fd: int = -1

    def fail(self, status: int, reason: str) -> None:
        """From now on this dataset only gets ``status``: its spool file is removed at once (a full disk frees)."""
        if self.error is None:
            self.error = (status, reason)
        self.checker = None
        self._drop_file()

    def _drop_file(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def take(self, data: memoryview) -> None:
        """The next fragment bytes: checked, then written (the file meta with the first)."""
        if self.error is not None:
            return
        if self.checker is not None:
            try:
                self.checker.feed(data)
            except Malformed as exc:
                self.fail(CANNOT_UNDERSTAND, f"malformed data set: {exc}")
                return
        try:
            self.size += _write_all(self.fd, [data] if self.size else [self.meta, data])
        except OSError as exc:
            self.fail(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")

    def complete(self) -> None:
        """After the last fragment: the structure must have ended cleanly and name the command's SOP class and
        instance (else ``error``); the spool file is closed."""
        if self.error is None and self.checker is not None:
            try:
                self.values = self.checker.finish()
            except Malformed as exc:
                self.fail(CANNOT_UNDERSTAND, f"malformed data set: {exc}")
        if self.error is None and self.size == 0:
            self.fail(CANNOT_UNDERSTAND, "empty data set")
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)  # NFS reports a failed write-back here
            except OSError as exc:
                self.fail(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        if self.error is None:
            self._consistent()

    def _consistent(self) -> None:
        sop_class, sop_instance = self.values.get(0x00080016), self.values.get(0x00080018)
        if sop_class is None or sop_instance is None:
            self.fail(CANNOT_UNDERSTAND, "the data set has no SOP Class UID or SOP Instance UID")
        elif wire_uid(sop_class) != self.sop_class:
            self.fail(DATASET_MISMATCH, f"the data set's SOP Class UID {_text(sop_class)[:64]!r} is not the "
                                        f"command's {self.sop_class}")
        elif wire_uid(sop_instance) != self.sop_instance:
            self.fail(DATASET_MISMATCH, f"the data set's SOP Instance UID {_text(sop_instance)[:64]!r} is not "
                                        f"the command's {self.sop_instance}")

    def discard(self) -> None:
        """The association ended before the last fragment: nothing of it is kept."""
        self._drop_file()


# Returns the C-STORE status (optionally with an error comment); the handler owns ``path`` afterwards.  It is called
# for every C-STORE, also one whose ``error`` is set (to count and log it).
StoreHandler = Callable[[Incoming], int | tuple[int, str]]


def remove_stale(directory: Path) -> int:
    """Remove the spool files an earlier receiver left behind (SIGKILL, power loss); the caller holds the lock on
    ``directory``, so none of them can be in use.  Returns how many."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(".kaapcli-part") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


class Spool:
    """Hidden files in one directory for the datasets being received, created ahead by a thread: creating a file
    costs a few hundred microseconds of kernel time on a busy ext4 volume, as much as the rest of storing a
    C-STORE, and the receiving thread need not wait for it.  :meth:`close` removes the files not used; after a
    SIGKILL, such empty hidden files are all that remains besides partial datasets, never a final name (the next
    receiver removes them: :func:`remove_stale`)."""

    AHEAD = 8

    def __init__(self, directory: Path):
        self.directory = directory
        self._ready: queue.Queue[tuple[Path, int]] = queue.Queue(self.AHEAD)
        self._closed = threading.Event()
        self._filler = threading.Thread(target=self._fill, name="kaapcli-spool", daemon=True)
        self._filler.start()

    def take(self) -> tuple[Path, int]:
        """A new empty spool file and its descriptor, open for writing (created now when none is ready).  A
        ready file whose name is gone (the output tree was deleted while receiving) is dropped, so the receiver
        goes on storing into a new tree instead of refusing every dataset from then on."""
        while True:
            try:
                spooled = self._ready.get_nowait()
            except queue.Empty:
                return self._create()
            if os.fstat(spooled[1]).st_nlink:
                return spooled
            os.close(spooled[1])

    def close(self) -> None:
        self._closed.set()
        self._filler.join()
        while not self._ready.empty():
            self._discard(self._ready.get_nowait())

    def _create(self) -> tuple[Path, int]:
        path = self.directory / f".{os.urandom(8).hex()}.kaapcli-part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            return path, os.open(path, flags, 0o644)
        except FileNotFoundError:  # the directory was deleted: made again
            self.directory.mkdir(parents=True, exist_ok=True)
            return path, os.open(path, flags, 0o644)

    @staticmethod
    def _discard(spooled: tuple[Path, int]) -> None:
        os.close(spooled[1])
        spooled[0].unlink(missing_ok=True)

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                spooled = self._create()
            except OSError:
                # a full disk or a missing directory: take() meets and reports it itself; try again later
                if self._closed.wait(1.0):
                    return
                continue
            while True:
                try:
                    self._ready.put(spooled, timeout=0.2)
                    break
                except queue.Full:
                    if self._closed.is_set():
                        self._discard(spooled)
                        return


@dataclass
class AssociateRequest:
    """A parsed A-ASSOCIATE-RQ; ``problem``: (result, source, reason, why) when it must be rejected."""

    called_aet: str
    calling_aet: str
    titles: bytes  # the called and calling AE title fields as sent, echoed in the A-ASSOCIATE-AC
    contexts: list[tuple[int, str, list[str]]]  # id, abstract syntax ("" when invalid), transfer syntaxes
    user_information: bytes = b""
    problem: tuple[int, int, int, str] | None = None

    @classmethod
    def parse(cls, body: bytes | bytearray) -> AssociateRequest:
        """Raises ProtocolError when the PDU does not parse (the caller aborts)."""
        if len(body) < 68:
            raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
        version = struct.unpack_from(">H", body, 0)[0]
        called, calling = wire_aet(body[4:20]), wire_aet(body[20:36])
        request = cls(called or "", calling or "", bytes(body[4:36]), [])
        context_ok = False
        for kind, item in _items(body, 68):
            if kind == 0x10:
                context_ok = item.rstrip(b"\0 ") == APPLICATION_CONTEXT
            elif kind == 0x20:
                if len(item) < 4:
                    raise ProtocolError("a presentation context item shorter than 4 bytes")
                subs = list(_items(item, 4))
                abstract = next((wire_uid(v) or "" for k, v in subs if k == 0x30), "")
                syntaxes = [uid for uid in (wire_uid(v) for k, v in subs if k == 0x40) if uid]
                request.contexts.append((item[0], abstract, syntaxes))
            elif kind == 0x50:
                request.user_information = item
                _peer_maximum(item)  # its sub-items must parse too
        if not version & 1:
            request.problem = (1, 2, 2, f"protocol version 0x{version:04X} not supported")
        elif called is None:
            request.problem = (1, 1, 7, f"invalid called AE title {bytes(body[4:20])!r}")
        elif calling is None:
            request.problem = (1, 1, 3, f"invalid calling AE title {bytes(body[20:36])!r}")
        elif not context_ok:
            request.problem = (1, 1, 2, "not the DICOM application context")
        return request


class PendingAssociation:
    """A connection whose A-ASSOCIATE-RQ is not complete yet.  The receiver's one acceptor thread reads it without
    blocking (a slow or idle connection costs no thread), into a buffer that grows only as bytes arrive and never
    past MAX_ASSOCIATE_PDU; a TLS handshake happens here too.  The ARTIM timer (PS3.8 9.1.5) is ``deadline``."""

    def __init__(self, sock: socket.socket, host: str, deadline: float, tls_context: Any = None):
        sock.setblocking(False)
        self.host = host
        self.deadline = deadline
        self.sock: Any = sock
        self.handshaking = tls_context is not None
        self.wants_write = False
        self._waits: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)
        if tls_context is not None:
            import ssl

            self.sock = tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self._waits += (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self.header = bytearray()
        self.body = bytearray()
        self.length = -1

    @property
    def buffered(self) -> int:
        return len(self.header) + len(self.body)

    def advance(self) -> bool:
        """Read what has arrived; True when the A-ASSOCIATE-RQ is complete.  Raises ProtocolError (an oversized or
        unexpected PDU, refused before it is read), AssociationLost (closed) or OSError (TLS failures included)."""
        if self.handshaking:
            try:
                self.sock.do_handshake()
            except self._waits as exc:
                self.wants_write = type(exc).__name__ == "SSLWantWriteError"
                return False
            self.handshaking = self.wants_write = False
        while True:
            if self.length < 0:
                chunk = self._recv(6 - len(self.header))
                if chunk is None:
                    return False
                self.header += chunk
                if len(self.header) < 6:
                    continue
                kind, _, length = _PDU_HEADER.unpack(self.header)
                if kind != 0x01:
                    raise ProtocolError(f"{PDU_NAMES.get(kind, f'PDU type 0x{kind:02X}')} before an A-ASSOCIATE-RQ",
                                        reason=2 if kind in PDU_NAMES else 1)
                if length > MAX_ASSOCIATE_PDU:
                    raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes, more than the {MAX_ASSOCIATE_PDU} "
                                        "accepted")
                self.length = length
            need = self.length - len(self.body)
            if need <= 0:
                return True
            chunk = self._recv(min(need, 65536))
            if chunk is None:
                return False
            self.body += chunk

    def _recv(self, size: int) -> bytes | None:
        try:
            data = self.sock.recv(size)
        except self._waits as exc:
            self.wants_write = type(exc).__name__ == "SSLWantWriteError"
            return None
        if not data:
            raise AssociationLost("connection closed by the peer")
        return bytes(data)

    def send_and_close(self, pdu: bytes) -> None:
        """A-ASSOCIATE-RJ or A-ABORT, without blocking (a peer that does not read loses it), then close."""
        with contextlib.suppress(OSError):
            self.sock.send(pdu)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class StoreSCP(Connection):
    """The acceptor side of one association: Verification and C-STORE of any SOP class.

    Each dataset is checked and written to a spool file as its fragments arrive (never held in memory), after a
    file meta built from the command and the context; ``on_store`` then moves it into place and returns the status.
    """

    def __init__(self, sock: socket.socket, timeouts: Timeouts, syntaxes: list[str], spool: Spool,
                 on_store: StoreHandler, host: str = "", wanted: Collection[int] = (),
                 sequence_tags: Collection[int] = ()):
        super().__init__(sock, timeouts)
        self.syntaxes = set(syntaxes)
        self.spool = spool
        self.on_store = on_store
        self.host = host
        self.wanted = frozenset({0x00080016, 0x00080018, *wanted})
        self.sequence_tags = sequence_tags
        self.calling_aet = self.called_aet = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: id -> (abstract syntax, transfer syntax)
        self.established = False
        self.ended = ""  # why the association ended, when not by release
        self.incoming: Incoming | None = None
        self._command = bytearray()
        self._chunk: mmap.mmap | None = None
        self._message_start = 0.0
        self._message_bytes = 0

    def accept(self, request: AssociateRequest) -> bool:
        """Answer an acceptable A-ASSOCIATE-RQ (read and judged by the acceptor) with an A-ASSOCIATE-AC."""
        if self.sock is None:
            return False
        self.called_aet, self.calling_aet = request.called_aet, request.calling_aet
        results = b""
        for context_id, abstract, syntaxes in request.contexts:
            if context_id in self.contexts:
                continue  # a repeated id: the first proposal stands
            syntax = next((ts for ts in syntaxes if ts in self.syntaxes), None)
            if abstract and syntax is not None and len(self.contexts) < 128:
                self.contexts[context_id] = (abstract, syntax)
                result = 0
            else:  # PS3.8 Table 9-18: abstract syntax / transfer syntaxes not supported, no reason given
                result = 3 if not abstract else 4 if syntax is None else 2
            offered = syntax or (syntaxes[0] if syntaxes else "")
            results += _item(0x21, bytes([context_id, 0, result, 0]) + _item(0x40, offered.encode()))
        asked = _window(request.user_information)  # requests are served in order anyway
        self._peer_max(request.user_information)
        granted = b"" if asked is None else _item(0x53, struct.pack(">HH", min(asked or WINDOW, WINDOW), 1))
        accept = (struct.pack(">HH", 1, 0) + request.titles + bytes(32) + _item(0x10, APPLICATION_CONTEXT)
                  + results + _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID)
                                    + granted + _item(0x55, IMPLEMENTATION_VERSION)))
        try:
            self._set_timeout(self.timeouts.acse)
            self.sock.sendall(struct.pack(">BBI", 0x02, 0, len(accept)) + accept)
        except OSError as exc:
            self.ended = describe_os_error(exc)
            self.close()
            return False
        self.established = True
        return True

    def interrupt(self) -> None:
        """From another thread: break the connection, so that :meth:`serve` returns (and discards a partial file)."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Answer C-ECHO and C-STORE requests until the peer releases or aborts, goes silent, or breaks the
        protocol (then A-ABORT); ``ended`` says why when it was not a release."""
        try:
            while self.sock is not None:
                busy = self.incoming is not None or bool(self._command)
                if not busy:
                    self.expect_within(self.timeouts.network)  # idle between messages
                kind, length = self._pdu_header()
                if kind not in (0x04, 0x05, 0x07):  # refused before its body is read
                    raise ProtocolError(f"unexpected {PDU_NAMES[kind]}", reason=2)
                if kind == 0x04:
                    if not busy:  # a new message: its own deadline
                        self._message_start, self._message_bytes = time.monotonic(), 0
                        self._extend()
                    self._p_data(length)
                    continue
                self._recv_exact(length)
                if kind == 0x05:  # A-RELEASE-RQ
                    self.sock.sendall(struct.pack(">BBII", 0x06, 0, 4, 0))
                    break
                self.ended = "aborted by the peer"
                break
        except ProtocolError as exc:
            self.ended = f"protocol error: {exc}"
            self.abort(2, exc.reason)
        except TimeoutError:
            busy = self.incoming is not None or bool(self._command)
            self.ended = (f"a DIMSE message not complete within {self.timeouts.dimse:g} s (+1 s per 64 KiB)" if busy
                          else f"idle for {self.timeouts.network:g} s")
            self.abort()
        except (OSError, AssociationLost) as exc:
            self.ended = describe_os_error(exc)
        finally:
            if self.incoming is not None:  # a dataset cut short is thrown away
                self.incoming.discard()
                self.incoming = None
            if self._chunk is not None:
                self._chunk.close()
                self._chunk = None
            self.established = False
            self.close()

    def _extend(self) -> None:
        self.deadline = self._message_start + self.timeouts.dimse + self._message_bytes / MIN_RATE

    def _p_data(self, length: int) -> None:
        remaining = length
        header = bytearray(6)
        while remaining:
            if remaining < 6:
                raise ProtocolError("a PDV header is cut short")
            pdv_length, context_id, control = _PDV_HEADER.unpack(self._recv_exact(6, header))
            if pdv_length < 2 or pdv_length + 4 > remaining:
                raise ProtocolError(f"a PDV of {pdv_length} bytes in a P-DATA-TF of {length}")
            remaining -= 4 + pdv_length
            size = pdv_length - 2
            if context_id not in self.contexts:
                raise ProtocolError(f"a PDV on presentation context {context_id}, which was not accepted")
            if control & 0x01:
                self._command_fragment(context_id, control, size)
            else:
                self._dataset_fragment(context_id, control, size)

    def _command_fragment(self, context_id: int, control: int, size: int) -> None:
        if self.incoming is not None:
            raise ProtocolError("a command fragment before the data set of the previous command ended", reason=2)
        if len(self._command) + size > MAX_COMMAND:
            raise ProtocolError("a command set of more than 64 KiB")
        self._command += self._recv_exact(size)
        self._message_bytes += size + 6
        self._extend()
        if control & 0x02:
            raw, self._command = self._command, bytearray()
            self._request(context_id, raw)

    def _dataset_fragment(self, context_id: int, control: int, size: int) -> None:
        incoming = self.incoming
        if incoming is None or context_id != incoming.context_id:
            raise ProtocolError("a data set fragment without its command", reason=2)
        if self._chunk is None:
            self._chunk = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        chunk = self._chunk
        view = memoryview(chunk)
        while size:
            n = min(size, CHUNK)
            self._recv_exact(n, chunk)
            size -= n
            self._message_bytes += n
            self._extend()
            incoming.take(view[:n])
        if control & 0x02:
            self.incoming = None
            incoming.complete()
            self._answer(incoming)

    def _request(self, context_id: int, raw: bytearray) -> None:
        """A complete command set: answer it, or get ready for its dataset."""
        try:
            elements = parse_command(raw)
        except ValueError as exc:
            raise ProtocolError(f"unreadable command set: {exc}") from exc
        field = _int(elements, 0x0100)
        if field < 0:
            raise ProtocolError("a command set without a valid Command Field (0000,0100)")
        if field == 0x0FFF:  # C-CANCEL-RQ: has no response; nothing here runs long enough to cancel
            return
        if field & 0x8000:
            raise ProtocolError(f"a response (0x{field:04X}) sent to the acceptor", reason=2)
        message_id = _int(elements, 0x0110)
        data_set_type = _int(elements, 0x0800)
        has_dataset = field == 0x0001 if data_set_type < 0 else data_set_type != 0x0101
        sop_class, sop_instance = wire_uid(elements.get(0x0002, b"")), wire_uid(elements.get(0x1000, b""))
        abstract, syntax = self.contexts[context_id]
        incoming = Incoming(sop_class or "", sop_instance or "", syntax, self.calling_aet, self.called_aet, None,
                            context_id=context_id, message_id=max(message_id, 0), field=field, host=self.host)
        if field == 0x0001:
            problem = ("no valid Message ID (0000,0110)" if message_id < 0
                       else "no valid Affected SOP Class UID (0000,0002)" if sop_class is None
                       else "no valid Affected SOP Instance UID (0000,1000)" if sop_instance is None
                       else "a C-STORE-RQ without a data set" if not has_dataset else "")
            if problem:
                incoming.error = (CANNOT_UNDERSTAND, problem)
            else:
                self._spool(incoming, abstract)
        elif field != 0x0030:  # C-ECHO-RQ is answered Success; any other request is not served here
            incoming.error = (UNRECOGNIZED_OPERATION, f"command 0x{field:04X} not supported here")
        if has_dataset:
            self.incoming = incoming  # its fragments follow (dropped unless a C-STORE is being written)
        else:
            self._answer(incoming)

    def _spool(self, incoming: Incoming, abstract: str) -> None:
        try:
            incoming.path, incoming.fd = self.spool.take()  # closed when the last fragment arrives, or in serve()
        except OSError as exc:
            incoming.fail(OUT_OF_RESOURCES, f"cannot create a spool file: {exc.strerror or exc}")
            return
        incoming.meta = dicom.encode_file_meta(incoming.sop_class or abstract, incoming.sop_instance,
                                               incoming.syntax, self.calling_aet)
        incoming.checker = DatasetChecker(incoming.syntax, self.wanted, self.sequence_tags)

    def _answer(self, incoming: Incoming) -> None:
        field = incoming.field
        comment = ""
        if field == 0x0001:
            outcome = self.on_store(incoming)
            status, comment = outcome if isinstance(outcome, tuple) else (outcome, "")
            if incoming.error is not None and status == incoming.error[0]:
                comment = comment or incoming.error[1]
        elif incoming.error is not None:
            status, comment = incoming.error
            LOG.warning("%s from %s (%s): %s", f"0x{field:04X}", incoming.calling_aet, incoming.host, comment)
        else:
            status = SUCCESS
        sop_class = incoming.sop_class or (VERIFICATION if field == 0x0030 else "")
        self._send(incoming.context_id, 0x01, response(field | 0x8000, incoming.message_id, sop_class, status,
                                                       incoming.sop_instance if field == 0x0001 else "", comment))
