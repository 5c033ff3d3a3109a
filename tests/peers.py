"""Real DICOM peers for the networking tests: Orthanc (+DICOMweb), DCMTK storescp, a kaapcli receiver.

Import the fixtures into a test module (``from peers import orthanc, storescp  # noqa: F401``).
Every server binds 127.0.0.1 on a port the OS picked and is stopped by its fixture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import dcmtk, free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MOVE_AET = "KAAPMOVE"  # the AE title Orthanc knows kaapcli's C-MOVE receiver by


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int
    move_port: int  # where Orthanc sends C-MOVE results for MOVE_AET

    @property
    def dimse(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def get(self, path: str) -> object:
        import requests

        return requests.get(f"{self.rest}{path}", timeout=10).json()

    def clear(self) -> None:
        import requests

        for study in requests.get(f"{self.rest}/studies", timeout=10).json():
            requests.delete(f"{self.rest}/studies/{study}", timeout=10)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not ORTHANC.exists():
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orthanc")
    peer = Orthanc("ORTHANC", free_port(), free_port(), free_port())
    config = {
        "Name": "kaapcli-test", "DicomAet": peer.aet, "DicomPort": peer.dicom_port, "HttpPort": peer.http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"), "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"kaapmove": [MOVE_AET, "127.0.0.1", peer.move_port]},
        "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "HttpBindAddress": "127.0.0.1",
        "DicomScpTimeout": 10, "StableAge": 1, "ConcurrentJobs": 1,
    }
    with run_orthanc(root, config):
        import requests

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{peer.rest}/system", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        yield peer


@contextmanager
def run_orthanc(root: Path, config: dict[str, Any]) -> Iterator[None]:
    """Orthanc with ``config`` (written to ROOT/orthanc.json, its log beside it), from the moment both its ports
    answer until the block ends."""
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([str(ORTHANC), str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(config["HttpPort"], proc=proc)
            wait_port(config["DicomPort"], proc=proc)
            yield
        finally:
            stop(proc)


@dataclass
class Storescp:
    aet: str
    port: int
    out: Path

    @property
    def peer(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Storescp]:
    """DCMTK's storescp (TCP_NODELAY=1: otherwise it stalls ~40 ms per image) writing into tmp_path/scp."""
    exe = dcmtk("storescp")
    scp = Storescp("STORESCP", free_port(), tmp_path / "scp")
    scp.out.mkdir()
    proc = subprocess.Popen([exe, "-aet", scp.aet, "-od", str(scp.out), str(scp.port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(scp.port, proc=proc)
        yield scp
    finally:
        stop(proc)


@dataclass
class Receiver:
    proc: subprocess.Popen[str]
    port: int
    out: Path

    @property
    def peer(self) -> str:
        return f"KAAPCLI@127.0.0.1:{self.port}"

    def finish(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        stdout, stderr = self.proc.communicate(timeout=30)
        return self.proc.returncode, stdout, stderr


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start ``kaapcli receive -o tmp_path/rx`` with extra arguments; stopped at teardown."""
    started: list[Receiver] = []

    def start(*args: str, out: Path | None = None, port: int | None = None) -> Receiver:
        port = port or free_port()
        dest = out or tmp_path / "rx"
        env = {**os.environ, "NO_COLOR": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "receive", "-o", str(dest), "--port", str(port),
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        rx = Receiver(proc, port, dest)
        started.append(rx)
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        return rx

    yield start
    for rx in started:
        if rx.proc.poll() is None:
            rx.proc.kill()
            rx.proc.communicate(timeout=10)
