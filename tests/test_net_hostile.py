"""The trust boundary of the network commands: hostile clients (raw sockets on 127.0.0.1, bounded loops and time),
dying peers and a full disk, against `kaapcli receive` and, for comparison where DCMTK behaves as a node should,
DCMTK's storescp.  The receiver's memory is read from /proc/PID/status (VmHWM: its peak) and asserted bounded."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, dicom_files, free_port, kaapcli
from peers import receiver, stop, wait_port  # noqa: F401 - pytest fixture
from rawdicom import (
    RawAssociation,
    associate_rq,
    c_store_fields,
    command_set,
    dataset,
    explicit,
    item,
    parse_fields,
    pdata,
)

pytestmark = pytest.mark.network

MB = 1024 * 1024


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Scp:
    kind: str
    port: int
    out: Path
    proc: subprocess.Popen[bytes]

    @property
    def peer(self) -> str:
        return f"RX@127.0.0.1:{self.port}"

    def peak_kb(self) -> int:
        return status_kb(self.proc.pid, "VmHWM")

    def stored(self) -> list[Path]:
        return [p for p in self.out.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                             p.relative_to(self.out).parts)]


@pytest.fixture(params=["kaapcli", "storescp"])
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scp]:
    """kaapcli receive, or DCMTK storescp for comparison (TCP_NODELAY; ACSE/DIMSE timeouts as kaapcli's)."""
    port, out = free_port(), tmp_path / request.param
    out.mkdir()
    if request.param == "kaapcli":
        cmd = [sys.executable, "-m", "kaapcli", "receive", "-o", str(out), "--port", str(port), "--timeout", "5"]
    else:
        cmd = [dcmtk("storescp"), "-ta", "5", "-td", "5", "-od", str(out), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1", "NO_COLOR": "1"})
    try:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        yield Scp(request.param, port, out, proc)
    finally:
        stop(proc)


def associated(port: int, rq: bytes | None = None) -> RawAssociation:
    peer = RawAssociation(port, timeout=10)
    kind, _ = peer.associate(rq)
    assert kind == 0x02, f"association not accepted (PDU type {kind})"
    return peer


def refused_at_once(peer: RawAssociation) -> bool:
    """The peer answered with A-ABORT / A-ASSOCIATE-RJ or closed, within 5 s."""
    try:
        kind, _ = peer.read_pdu()
        return kind in (0x03, 0x07)
    except (ConnectionError, OSError):
        return True


# --------------------------------------------------------------------------- lengths that lie about memory

def test_a_10_byte_packet_allocates_nothing(scp: Scp) -> None:
    """A PDU header claiming 4 GiB, before association and as a P-DATA-TF after it: refused at once, memory flat."""
    time.sleep(0.3)
    before = scp.peak_kb()
    raw = RawAssociation(scp.port, timeout=5)
    raw.send(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF) + b"\0\1\0\0")
    assert refused_at_once(raw)
    raw.close()
    peer = associated(scp.port)
    peer.send(struct.pack(">BBI", 0x04, 0, 0xFFFFFFFF) + b"\0\0\0\xff")
    assert refused_at_once(peer)
    peer.close()
    time.sleep(0.3)
    assert scp.peak_kb() - before < 32 * 1024, f"{scp.kind}: peak memory grew by {scp.peak_kb() - before} kB"
    ok = associated(scp.port)  # and it still serves
    ok.close()


def test_an_oversized_association_request_is_refused_unread(receiver) -> None:  # noqa: F811
    rx = receiver("--timeout", "5")
    body = associate_rq()[6:] + item(0x50, b"\0" * 60000) * 20  # 1.2 MB: more than the 1 MiB DCMTK accepts too
    raw = RawAssociation(rx.port, timeout=5)
    with contextlib.suppress(OSError):
        raw.send(struct.pack(">BBI", 0x01, 0, len(body)) + body)
    assert refused_at_once(raw)
    code, _, stderr = rx.finish()
    assert "A-ASSOCIATE-RQ of 1200" in stderr and "more than the 1048576 accepted" in stderr, stderr


# --------------------------------------------------------------------------- slow and idle connections

def test_slow_connections_cost_no_slots_and_real_senders_are_served(receiver, mock_ct: Path) -> None:  # noqa: F811
    """100 connections trickling an A-ASSOCIATE-RQ one byte at a time: no thread, no association slot each; a real
    sender is served meanwhile; the ARTIM deadline (--timeout, here 4 s) closes them however they trickle."""
    rx = receiver("--timeout", "4", "--series-timeout", "60")
    time.sleep(0.3)
    threads_before = status_kb(rx.proc.pid, "Threads")
    slow = [socket.create_connection(("127.0.0.1", rx.port), timeout=5) for _ in range(100)]
    request = associate_rq()
    try:
        for step in range(3):
            for sock in slow:
                sock.send(request[step:step + 1])
            time.sleep(0.3)
        assert status_kb(rx.proc.pid, "Threads") <= threads_before + 2  # no thread per connection
        start = time.monotonic()
        proc = kaapcli("send", mock_ct, "--to", rx.peer, "-q")
        assert proc.returncode == 0, proc.stderr  # not "local limit exceeded"
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 10
        closed: set[int] = set()
        step = 3
        while len(closed) < len(slow) and time.monotonic() < deadline:  # keep trickling: the deadline is ARTIM's
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                try:
                    sock.send(request[step:step + 1])
                    sock.setblocking(False)
                    if sock.recv(1) == b"":
                        closed.add(i)
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(i)
                finally:
                    sock.setblocking(True)
            step += 1
            time.sleep(0.25)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow connections still open after ARTIM"
    finally:
        for sock in slow:
            sock.close()
    code, _, stderr = rx.finish()
    assert len(dicom_files(rx.out)) == 16
    refusals = [line for line in stderr.splitlines() if "association request not complete in time" in line]
    assert 1 <= len(refusals) <= 3, stderr  # counted, logged once per host and reason per 10 s
    assert "more since" in stderr or len(refusals) == 1


def test_pending_connections_beyond_the_limit_evict_the_oldest(receiver) -> None:  # noqa: F811
    """More idle connections than MAX_PENDING (256) from one host: the oldest are closed, a new real association
    is still accepted."""
    rx = receiver("--timeout", "20")
    idle = [socket.create_connection(("127.0.0.1", rx.port), timeout=5) for _ in range(300)]
    try:
        time.sleep(0.5)
        peer = associated(rx.port)
        peer.close()
        first = idle[0]
        first.settimeout(2)
        assert first.recv(1) == b""  # the oldest was closed for the newcomers
        assert status_kb(rx.proc.pid, "Threads") < 12
    finally:
        for sock in idle:
            sock.close()
    _, _, stderr = rx.finish()
    assert "too many connections without an association request" in stderr


def test_idle_association_and_slow_message_are_closed(receiver) -> None:  # noqa: F811
    """Deadlines per phase: an association idle for --timeout is aborted; so is a C-STORE whose dataset trickles
    (one message gets --timeout seconds plus one per 64 KiB received), not per recv()."""
    rx = receiver("--timeout", "2")
    idle = associated(rx.port)
    slow = associated(rx.port)
    slow.send(pdata(1, 0x03, command_set(c_store_fields(1, "1.2.3.4"))))
    start = time.monotonic()
    data = dataset("1.2.3.4")
    closed = False
    for i in range(40):  # a byte every 0.2 s: each recv() is quick, the message never completes
        try:
            slow.send(pdata(1, 0x00, data[i:i + 1]))
        except OSError:
            closed = True
            break
        if slow.closed_within(0.2):
            closed = True
            break
    assert closed and time.monotonic() - start < 6
    assert idle.closed_within(3)
    code, _, stderr = rx.finish()
    assert "idle for 2 s" in stderr and "a DIMSE message not complete within 2 s" in stderr, stderr
    assert dicom_files(rx.out) == []


# --------------------------------------------------------------------------- limits and allow-lists

def test_association_limits_are_checked_before_a_thread_exists(receiver) -> None:  # noqa: F811
    rx = receiver("--max-associations", "3", "--max-per-host", "2")
    held = [associated(rx.port), associated(rx.port)]
    third = RawAssociation(rx.port)
    kind, body = third.associate()
    assert (kind, body[1:4]) == (0x03, bytes([2, 3, 2])), "per-host limit: transient, local limit exceeded"
    for peer in held:
        peer.send(struct.pack(">BBII", 0x05, 0, 4, 0))  # release
        assert peer.read_pdu()[0] == 0x06
    again = associated(rx.port)  # the slots are free again
    again.close()
    code, _, stderr = rx.finish()
    assert "2 associations from one host (--max-per-host)" in stderr, stderr


def test_allow_host_closes_other_hosts_before_reading(receiver, mock_ct: Path) -> None:  # noqa: F811
    blocked = receiver("--allow-host", "10.0.0.0/8", "--allow-host", "192.168.1.7")
    proc = kaapcli("echo", blocked.peer, "--timeout", "5")
    assert proc.returncode == 69, proc.stderr
    _, _, stderr = blocked.finish()
    assert "refused 127.0.0.1: host not allowed" in stderr, stderr
    allowed = receiver("--allow-host", "127.0.0.0/8", out=blocked.out.parent / "ok")
    assert kaapcli("send", mock_ct, "--to", allowed.peer, "-q").returncode == 0
    _, _, stderr = allowed.finish()
    assert "warning" not in stderr


def test_listening_beyond_loopback_without_allow_list_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """--bind 0.0.0.0 without an allow-list warns at start (the test's server still binds loopback only)."""
    from kaapcli.core.net import scp as scp_module

    real = socket.create_server
    monkeypatch.setattr(scp_module.socket, "create_server", lambda address, **kw: real(("127.0.0.1", 0), **kw))
    for bind, allow, warns in (("0.0.0.0", [], True), ("0.0.0.0", ["10.0.0.0/8"], False), ("localhost", [], False),
                               ("127.0.0.1", [], False)):
        caplog.clear()
        rx = scp_module.Receiver(tmp_path / bind, bind=bind, port=0, allow_hosts=allow)
        with caplog.at_level("WARNING", logger="kaapcli.net"):
            rx.start()
            rx.stop(grace=0)
        said = [r.getMessage() for r in caplog.records if "neither --allow-aet nor --allow-host" in r.getMessage()]
        assert bool(said) == warns, (bind, allow, said)


@pytest.mark.parametrize(("called", "calling", "reason"), [
    (b"ANY", b"BAD\x01AET", 3), (b"ANY", "CAFÉ".encode("latin-1"), 3), (b"ANY", b"WITH\\SLASH", 3),
    (b" " * 16, b"HOSTILE", 7)])
def test_invalid_ae_titles_are_rejected(receiver, called: bytes, calling: bytes, reason: int) -> None:  # noqa: F811
    rx = receiver()
    peer = RawAssociation(rx.port)
    kind, body = peer.associate(associate_rq(called=called, calling=calling))
    assert (kind, body[1], body[2], body[3]) == (0x03, 1, 1, reason)


def test_pdata_on_a_context_not_accepted_is_aborted(receiver) -> None:  # noqa: F811
    rx = receiver()
    peer = associated(rx.port)
    peer.send(pdata(99, 0x03, command_set(c_store_fields(1, "1.2.3"))))
    assert refused_at_once(peer)
    _, _, stderr = rx.finish()
    assert "presentation context 99, which was not accepted" in stderr


# --------------------------------------------------------------------------- datasets and commands that lie

PIXELS_CLAIMED = explicit(0x00280010, b"US", b"\x10\x00") + explicit(0x7FE00010, b"OW", b"\0" * 100, length=1_000_000)
UNTERMINATED = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
                + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9")
ITEM_OVERRUN = (explicit(0x00081140, b"SQ", b"", length=16) + struct.pack("<HHI", 0xFFFE, 0xE000, 40)
                + explicit(0x00081150, b"UI", b"1.2\0"))
SEQUENCE_OPEN = explicit(0x00081140, b"SQ", b"", length=0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
HEADER_CUT = explicit(0x00280010, b"US", b"\x10\x00") + b"\xe0\x7f\x10\x00OW"
FILE_META = explicit(0x00020010, b"UI", b"1.2.840.10008.1.2\0")


@pytest.mark.parametrize(("name", "extra", "context"), [
    ("lying length", PIXELS_CLAIMED, 1), ("unterminated pixel data", UNTERMINATED, 5)])
def test_a_dataset_that_lies_is_refused_and_not_stored(scp: Scp, name: str, extra: bytes, context: int) -> None:
    """storescp aborts the association; kaapcli answers a failure status, stores nothing under a final name and
    keeps the association for the next C-STORE."""
    check_refused(scp, name, extra, context)


@pytest.mark.parametrize(("name", "extra"), [
    ("item beyond its sequence", ITEM_OVERRUN), ("unterminated sequence", SEQUENCE_OPEN),
    ("header cut short", HEADER_CUT)])
def test_broken_structure_is_refused(receiver, name: str, extra: bytes) -> None:  # noqa: F811
    """Structures storescp stores anyway (an item longer than its sequence is a warning there)."""
    rx = receiver()
    check_refused(Scp("kaapcli", rx.port, rx.out, rx.proc), name, extra, 1)  # type: ignore[arg-type]


def check_refused(scp: Scp, name: str, extra: bytes, context: int) -> None:
    peer = associated(scp.port)
    try:
        response = peer.store(dataset("1.2.3.1", extra=extra), "1.2.3.1", context_id=context)
    except ConnectionError:
        assert scp.kind == "storescp", f"kaapcli dropped the association on {name}"
        response = None
    assert response is None or response.status != 0x0000, name
    if scp.kind == "kaapcli":
        assert response is not None and response.status == 0xC000 and response.comment, response
        assert peer.store(dataset("1.2.3.2"), "1.2.3.2", message_id=2).status == 0x0000
        time.sleep(0.2)
        assert [p.name for p in scp.stored()] == ["1.2.3.2.dcm"]
        assert not [p for p in (scp.out / ".kaapcli" / "incoming").iterdir() if p.stat().st_size]
    else:
        assert scp.stored() == []
    peer.close()


def test_file_meta_inside_the_dataset_is_refused(receiver) -> None:  # noqa: F811
    """A (0002,0010) in the dataset would override the transfer syntax of the file meta kaapcli writes."""
    rx = receiver()
    peer = associated(rx.port)
    response = peer.store(FILE_META + dataset("1.2.3.7"), "1.2.3.7")
    assert response.status == 0xC000 and "file meta" in response.comment


@pytest.mark.parametrize(("name", "fields", "expected"), [
    ("non-ASCII SOP Instance UID", {0x00001000: b"1.2.3.3\xe9\0"}, 0xC000),
    ("no SOP Instance UID", {0x00001000: None}, 0xC000),
    ("no Message ID", {0x00000110: None}, 0xC000),
    ("a UID with a slash", {0x00001000: b"../../x"}, 0xC000),
    ("another SOP Instance UID than the dataset's", {0x00001000: b"1.2.3.30"}, 0xA900),
    ("another SOP Class UID than the dataset's", {0x00000002: b"1.2.840.10008.5.1.4.1.1.4\0"}, 0xA900)])
def test_malformed_command_sets_get_a_failure_status(scp: Scp, name: str, fields: dict[int, bytes | None],
                                                     expected: int) -> None:
    """Never a dead association for kaapcli (nor a stored file); storescp does not answer Success either."""
    command = c_store_fields(1, "1.2.3.3")
    for tag, value in fields.items():
        if value is None:
            del command[tag]
        else:
            command[tag] = value
    peer = associated(scp.port)
    try:
        response = peer.store(dataset("1.2.3.3"), "1.2.3.3", fields=command)
    except ConnectionError:
        assert scp.kind == "storescp", f"kaapcli dropped the association on {name}"
        return
    assert response.status != 0x0000, name
    if scp.kind == "kaapcli":
        assert response.status == expected and response.comment, (name, response)
        assert peer.store(dataset("1.2.3.4"), "1.2.3.4", message_id=2).status == 0x0000
        time.sleep(0.2)
        assert [p.name for p in scp.stored()] == ["1.2.3.4.dcm"]
    peer.close()


def test_garbage_command_set_is_aborted_not_crashed(receiver) -> None:  # noqa: F811
    rx = receiver()
    peer = associated(rx.port)
    peer.send(pdata(1, 0x03, struct.pack("<HHI", 0, 0x0100, 4000) + b"\1\0"))  # an element longer than the set
    assert refused_at_once(peer)
    ok = associated(rx.port)
    assert ok.store(dataset("1.2.3.5"), "1.2.3.5").status == 0


# --------------------------------------------------------------------------- a full disk

def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 320 KiB file system (tmpfs) that fills after a few files, unmounted at teardown."""
    path = tmp_path / "disk"
    _mount_tmpfs(path, "320k")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def ct_128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct128")
    assert kaapcli("mock", "-o", out, "--slices", "24", "--rows", "128", "--columns", "128", "-q").returncode == 0
    return out


def test_full_disk_answers_out_of_resources_and_keeps_serving(receiver, small_disk: Path, ct_128: Path,  # noqa: F811
                                                              mock_ct: Path) -> None:
    rx = receiver("--series-timeout", "60", out=small_disk)
    proc = kaapcli("send", ct_128, "--to", rx.peer, "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 24 and ok and len(failed) >= 10
    assert all("C-STORE failed: 0xA700" in r["message"] and "No space left" in r["message"] for r in failed)
    assert "association lost" not in proc.stderr  # every C-STORE was answered on the same association
    for path in dicom_files(small_disk):  # what was stored is whole
        ds = pydicom.dcmread(path)
        assert len(ds.PixelData) == 128 * 128 * 2
    spool = small_disk / ".kaapcli" / "incoming"
    assert not [p for p in spool.iterdir() if p.stat().st_size], "partial spool files left on the full disk"
    assert kaapcli("echo", rx.peer).returncode == 0  # still serving
    for path in dicom_files(small_disk):
        path.unlink()  # room again: real senders are served again by the same receiver
    again = kaapcli("send", sorted(dicom_files(mock_ct))[0], "--to", rx.peer, "-q")
    assert again.returncode == 0, again.stderr
    code, _, stderr = rx.finish()
    assert code == 0
    assert f"{len(ok) + 1} files received, {len(failed)} failed ({len(failed)} x 0xA700)" in stderr, stderr
    assert stderr.count("No space left on device") >= len(failed)


def test_full_disk_storescp_for_comparison(small_disk: Path, ct_128: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-od", str(small_disk), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port, proc=proc)
        sent = kaapcli("send", ct_128, "--to", f"STORESCP@127.0.0.1:{port}", "--format", "jsonl")
        assert sent.returncode == 1
        failed = [json.loads(line) for line in sent.stdout.splitlines() if '"failed"' in line]
        assert failed and all("0xA700" in r["message"] for r in failed)
    finally:
        stop(proc)


# --------------------------------------------------------------------------- the receiver's directory

def test_second_receiver_on_one_directory_is_refused_and_stale_spool_removed(receiver, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "rx"
    spool = out / ".kaapcli" / "incoming"
    spool.mkdir(parents=True)
    for i in range(5):  # what a SIGKILLed receiver leaves
        (spool / f".stale{i}.kaapcli-part").write_bytes(b"partial")
    first = receiver("--series-timeout", "60", out=out)
    time.sleep(0.3)
    assert not [p for p in spool.iterdir() if p.name.startswith(".stale")]
    second = kaapcli("receive", "-o", out, "--port", str(free_port()), timeout=30)
    assert second.returncode == 73, second.stderr
    assert f"another kaapcli receiver (pid {first.proc.pid}) is receiving into this directory" in second.stderr
    assert "hint:" in second.stderr
    _, _, stderr = first.finish()
    assert "removed 5 spool files an earlier receiver left" in stderr


# --------------------------------------------------------------------------- dying peers

class DyingPeer:
    """A Storage/Verification/Q-R SCP that accepts any association (granting an operations window of ``window``),
    answers the first ``answer`` requests (over all its associations) with Success, then resets the connection (RST)
    at the next one — after one pending C-FIND match when ``match`` (an implicit VR identifier) is given."""

    def __init__(self, answer: int = 0, window: int = 16, match: bytes | None = None):
        self.answer, self.window, self.match = answer, window, match
        self.answered = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def peer(self) -> str:
        return f"DYING@127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.server.settimeout(30)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _accept(self, peer: RawAssociation) -> None:
        _, rq = peer.read_pdu()
        results, pos = b"", 68
        while pos + 4 <= len(rq):
            kind, _, length = struct.unpack_from(">BBH", rq, pos)
            payload = rq[pos + 4:pos + 4 + length]
            if kind == 0x20:
                sub, syntax = 4, b""
                while sub + 4 <= len(payload):
                    sk, _, sl = struct.unpack_from(">BBH", payload, sub)
                    if sk == 0x40 and not syntax:
                        syntax = payload[sub + 4:sub + 4 + sl]
                    sub += 4 + sl
                results += item(0x21, bytes([payload[0], 0, 0, 0]) + item(0x40, syntax))
            pos += 4 + length
        ac = (rq[:36] + bytes(32) + item(0x10, b"1.2.840.10008.3.1.1.1") + results
              + item(0x50, item(0x51, struct.pack(">I", 16384))
                     + (item(0x53, struct.pack(">HH", self.window, 1)) if self.window > 1 else b"")))
        peer.send(struct.pack(">BBI", 2, 0, len(ac)) + ac)

    def _serve(self, conn: socket.socket) -> None:
        peer = RawAssociation.__new__(RawAssociation)
        peer.sock, peer.timeout = conn, 30
        us = struct.Struct("<H")
        with contextlib.suppress(OSError, ConnectionError, AssertionError):
            self._accept(peer)
            command, waiting = b"", False
            while True:
                kind, body = peer.read_pdu()
                if kind == 0x05:
                    peer.send(struct.pack(">BBII", 0x06, 0, 4, 0))  # A-RELEASE-RP
                if kind != 0x04:
                    break
                context, control, data = body[4], body[5], body[6:]
                if control & 0x01:
                    command += data
                    if not control & 0x02:
                        continue
                    waiting = us.unpack(parse_fields(command)[0x0800])[0] != 0x0101
                    if waiting:
                        continue  # its dataset follows
                elif not control & 0x02 or not waiting:
                    continue
                fields = parse_fields(command)
                request, command, waiting = us.unpack(fields[0x0100])[0], b"", False
                with self.lock:
                    due, self.answered = self.answered >= self.answer, self.answered + 1
                if due:
                    if request == 0x0020 and self.match is not None:  # C-FIND: one match, then the reset
                        peer.send(pdata(context, 0x03, command_set({
                            0x00000002: fields[0x0002], 0x00000100: us.pack(0x8020), 0x00000120: fields[0x0110],
                            0x00000800: us.pack(0), 0x00000900: us.pack(0xFF00)})))
                        peer.send(pdata(context, 0x02, self.match))
                        time.sleep(0.5)  # read before the reset (a RST discards what the other side has not read)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()  # RST
                    return
                peer.send(pdata(context, 0x03, command_set({
                    0x00000100: us.pack(request | 0x8000), 0x00000120: fields[0x0110],
                    0x00000800: us.pack(0x0101), 0x00000900: us.pack(0)})))

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def ct_big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files larger than the loopback socket buffers, so that a sender is still writing when the peer resets."""
    out = tmp_path_factory.mktemp("ctbig")
    assert kaapcli("mock", "-o", out, "--slices", "12", "--rows", "512", "--columns", "512", "-q").returncode == 0
    return out


@pytest.mark.parametrize("answered", [0, 3])
def test_send_to_a_peer_that_resets_midway(ct_big: Path, answered: int) -> None:
    """Was: killed by SIGPIPE (exit 141, nothing on stderr).  Now exit 69 (1 when some files were stored) and one
    line naming the peer and the reason.  (With C-STOREs outstanding, files the peer stored but never answered are
    failed too: so the case with some answered runs without the operations window.)"""
    dying = DyingPeer(answer=answered, window=1 if answered else 16)
    try:
        proc = kaapcli("send", ct_big, "--to", dying.peer, "--format", "jsonl", timeout=60)
    finally:
        dying.close()
    assert proc.returncode == (1 if answered else 69), (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and dying.peer in errors[0] and "association lost" in errors[0], proc.stderr
    assert "reset" in errors[0] or "broken pipe" in errors[0] or "closed" in errors[0], errors[0]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sum(r["status"] == "ok" for r in records) == answered
    assert len(records) == 12 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["echo", "query", "retrieve"])
def test_pynetdicom_commands_to_a_peer_that_resets(command: str, tmp_path: Path) -> None:
    dying = DyingPeer()
    args = {"echo": ["echo", dying.peer], "query": ["query", dying.peer],
            "retrieve": ["retrieve", dying.peer, "-k", "StudyInstanceUID=1.2.3", "-o", tmp_path / "out"]}[command]
    try:
        proc = kaapcli(*args, "--timeout", "10", timeout=60)
    finally:
        dying.close()
    assert proc.returncode == 69, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"127.0.0.1:{dying.port}" in errors[0], proc.stderr


def test_query_and_retrieve_cut_short_after_some_items_exit_1(tmp_path: Path) -> None:
    identifier = (struct.pack("<HHI", 0x0008, 0x0052, 6) + b"STUDY " + struct.pack("<HHI", 0x0020, 0x000D, 6)
                  + b"1.2.3\0")
    dying = DyingPeer(match=identifier)
    try:
        query = kaapcli("query", dying.peer, "--timeout", "10", timeout=60)
    finally:
        dying.close()
    assert query.returncode == 1, query.stderr
    assert [json.loads(line)["0020000D"]["Value"] for line in query.stdout.splitlines()] == [["1.2.3"]]
    errors = [line for line in query.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "after 1 matches" in errors[0] and f"127.0.0.1:{dying.port}" in errors[0]
    requests = tmp_path / "requests.jsonl"
    records = [json.dumps({"0020000D": {"vr": "UI", "Value": [uid]}}) for uid in ("1.2.3", "1.2.4")]
    requests.write_text("\n".join(records) + "\n")
    dying = DyingPeer(answer=2)  # the first request's C-FIND probe and C-GET, then resets
    try:
        retrieve = kaapcli("retrieve", dying.peer, "--from-query", requests, "-o", tmp_path / "out", "--timeout", "10",
                           timeout=60)
    finally:
        dying.close()
    assert retrieve.returncode == 1, retrieve.stderr
    # the first request was answered Success with no instance (itself an error: nothing received), the second cut
    errors = [line for line in retrieve.stderr.splitlines() if "error" in line]
    assert any("no C-GET response" in e and "1 of 2 requests" in e and "not done" in e for e in errors), retrieve.stderr
    assert "2 requests failed" in retrieve.stderr


def test_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    """`kaapcli mock ... | head -1`: like a Unix tool killed by SIGPIPE, without its default action."""
    import fcntl

    read_end, write_end = os.pipe()
    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, 4096)  # one page: the 60 lines cannot all fit before the reader goes
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "mock", "-o", str(tmp_path / "m"), "--slices", "60",
                             "--rows", "16", "--columns", "16"], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.readline()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in stderr and b"Broken pipe" not in stderr, stderr


# --------------------------------------------------------------------------- the C-MOVE receiver of retrieve

def test_move_receiver_binds_loopback_and_accepts_only_the_queried_peer(tmp_path: Path, mock_ct: Path) -> None:
    from kaapcli.core.net.fetch import Fetcher
    from kaapcli.core.net.peers import parse_peer

    port = free_port()
    pacs = parse_peer("PACS@127.0.0.1:1")  # only its AE title and host matter here
    files = dicom_files(mock_ct)
    with Fetcher(pacs, tmp_path / "out", method="move", port=port) as fetcher:
        assert fetcher.receiver.bind == "127.0.0.1"
        stranger = subprocess.run([dcmtk("storescu"), "-aet", "STRANGER", "-aec", "KAAPCLI", "127.0.0.1", str(port),
                                   str(files[0])], capture_output=True, text=True, timeout=30)
        assert stranger.returncode != 0
        as_pacs = subprocess.run([dcmtk("storescu"), "-aet", "PACS", "-aec", "KAAPCLI", "127.0.0.1", str(port),
                                  str(files[1])], capture_output=True, text=True, timeout=30)
        assert as_pacs.returncode == 0, as_pacs.stderr
        assert dict(fetcher.receiver.refused) == {"calling AE title not allowed": 1}
    assert [p.name for p in dicom_files(tmp_path / "out")] == [files[1].name]
