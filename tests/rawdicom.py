"""A deliberately naive DICOM upper-layer client on raw sockets, for the hostile-peer tests: it sends exactly the bytes
it is given (lying lengths, broken command sets, half PDUs) and reads what comes back, every read bounded in time."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE, EXPLICIT_LE, JPEG_BASELINE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"


def item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: bytes = b"ANY", calling: bytes = b"HOSTILE",
                 contexts: list[tuple[int, str, str]] | None = None, max_pdu: int = 16384) -> bytes:
    contexts = contexts or [(1, CT, EXPLICIT_LE), (3, VERIFICATION, IMPLICIT_LE), (5, CT, JPEG_BASELINE),
                            (7, CT, IMPLICIT_LE)]
    body = struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, syntax in contexts:
        body += item(0x20, bytes([context_id, 0, 0, 0]) + item(0x30, abstract.encode()) + item(0x40, syntax.encode()))
    body += item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4"))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def element(tag: int, value: bytes) -> bytes:  # command set elements: implicit VR little endian
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def uid(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return raw + b"\0" * (len(raw) % 2)


def command_set(fields: dict[int, bytes]) -> bytes:
    body = b"".join(element(tag, value) for tag, value in sorted(fields.items()))
    return element(0x00000000, struct.pack("<I", len(body))) + body


def c_store_fields(message_id: int, sop_instance: str | bytes, sop_class: str = CT) -> dict[int, bytes]:
    return {0x00000002: uid(sop_class), 0x00000100: struct.pack("<H", 1), 0x00000110: struct.pack("<H", message_id),
            0x00000700: struct.pack("<H", 0), 0x00000800: struct.pack("<H", 0), 0x00001000: uid(sop_instance)}


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">BBIIBB", 4, 0, len(data) + 6, len(data) + 2, context_id, control) + data


def explicit(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element; ``length`` may lie."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, size) + value


def text(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def dataset(sop_instance: str, *, extra: bytes = b"", study: str = "1.2.826.0.1.3680043.10.999.1",
            series: str = "1.2.826.0.1.3680043.10.999.2") -> bytes:
    """A small, well-formed CT header (explicit VR LE) with ``extra`` elements appended after (0020,000E)."""
    return (explicit(0x00080016, b"UI", text(CT)) + explicit(0x00080018, b"UI", text(sop_instance))
            + explicit(0x00080060, b"CS", b"CT") + explicit(0x0020000D, b"UI", text(study))
            + explicit(0x0020000E, b"UI", text(series)) + extra)


@dataclass
class Response:
    status: int
    message_id: int
    comment: str = ""


class RawAssociation:
    """One connection: ``associate()``, then raw PDUs out and responses in (each read within ``timeout`` s)."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, size: int) -> bytes:
        data = b""
        deadline = time.monotonic() + self.timeout
        while len(data) < size:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed by the peer")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self.recv_exact(6))
        assert length < 1 << 20, f"PDU of {length} bytes"
        return kind, self.recv_exact(length)

    def associate(self, rq: bytes | None = None) -> tuple[int, bytes]:
        self.send(rq or associate_rq())
        return self.read_pdu()

    def accepted_contexts(self, ac: bytes) -> set[int]:
        found, pos = set(), 68
        while pos + 4 <= len(ac):
            kind, _, length = struct.unpack_from(">BBH", ac, pos)
            if kind == 0x21 and ac[pos + 6] == 0:
                found.add(ac[pos + 4])
            pos += 4 + length
        return found

    def response(self) -> Response:
        """The next command set answered; raises ConnectionError on A-ABORT or a closed connection."""
        command = b""
        while True:
            kind, body = self.read_pdu()
            if kind == 0x07:
                raise ConnectionError("A-ABORT")
            assert kind == 0x04, f"PDU type {kind}"
            pos = 0
            while pos < len(body):
                length = struct.unpack_from(">I", body, pos)[0]
                control, data = body[pos + 5], body[pos + 6:pos + 4 + length]
                command += data
                pos += 4 + length
                if control & 0x03 == 0x03:
                    return _parse_response(command)

    def store(self, dataset_bytes: bytes, sop_instance: str | bytes, message_id: int = 1, context_id: int = 1,
              fields: dict[int, bytes] | None = None) -> Response:
        self.send(pdata(context_id, 0x03, command_set(fields or c_store_fields(message_id, sop_instance))))
        self.send(pdata(context_id, 0x02, dataset_bytes))
        return self.response()

    def closed_within(self, seconds: float) -> bool:
        """Whether the peer closes (or aborts) within ``seconds``, reading and dropping what it sends."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def parse_fields(command: bytes) -> dict[int, bytes]:
    """Elements of a command set by element number."""
    fields, pos = {}, 0
    while pos + 8 <= len(command):
        _group, tag, length = struct.unpack_from("<HHI", command, pos)
        fields[tag] = command[pos + 8:pos + 8 + length]
        pos += 8 + length
    return fields


def _parse_response(command: bytes) -> Response:
    fields = parse_fields(command)
    comment = fields.get(0x0902, b"").decode("latin-1").strip(" \0")
    return Response(struct.unpack("<H", fields[0x0900])[0], struct.unpack("<H", fields[0x0120])[0], comment)
