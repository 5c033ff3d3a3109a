"""Shared fixtures: run the CLI as a user does, make mock data, check objects with dciodvfy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DCMTK_BIN = Path("/usr/bin")  # pynetdicom installs its own `storescu` etc. on PATH: use DCMTK's explicitly


def kaapcli(*args: str | os.PathLike[str], input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kaapcli ARGS`` and return the completed process (text stdout/stderr)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("KAAPCLI_DEBUG", None) if env is None or "KAAPCLI_DEBUG" not in env else None
    return subprocess.run([sys.executable, "-m", "kaapcli", *map(str, args)], input=input, text=True,
                          capture_output=True, env=full_env, timeout=timeout, cwd=cwd)


def wait_for(predicate: Any, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` every 0.1 s until it is true (True) or ``timeout`` s have passed (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def kaapcli_on_terminal(*args: str | os.PathLike[str], columns: int = 100,
                        timeout: float = 120) -> tuple[int, str, str]:
    """Run ``python -m kaapcli ARGS`` with stderr on a pseudo-terminal (so a progress bar is drawn) and stdout
    on a pipe: (exit code, stdout, everything the terminal received)."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=timeout)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def dcmtk(name: str) -> str:
    path = DCMTK_BIN / name
    if not path.exists():
        pytest.skip(f"DCMTK {name} not installed (apt-get install dcmtk)")
    return str(path)


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy (dicom3tools) prints for one file."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not installed (apt-get install dicom3tools)")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pydicom_test_files() -> list[Path]:
    """Every file of pydicom's bundled test data (many vendors and syntaxes, some broken)."""
    import pydicom.data

    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def mock_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CT study: 1 study, 2 series of 8 slices, 64x64 (read-only: copy before modifying)."""
    out = tmp_path_factory.mktemp("mock_ct")
    proc = kaapcli("mock", "-o", out, "--series", "2", "--slices", "8", "--rows", "64", "--columns", "64",
                   "--seed", "7", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def mock_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CT studies (three patients), one series of 6 slices each, 32x32."""
    out = tmp_path_factory.mktemp("mock_studies")
    proc = kaapcli("mock", "-o", out, "--studies", "3", "--slices", "6", "--rows", "32", "--columns", "32",
                   "--seed", "3", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if not p.name.startswith("."))


@pytest.fixture(scope="session")
def distinct_pydicom_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pydicom's test files, one per SOP Instance UID (read-only: copy before modifying).  Its variants of one
    image (other syntaxes, byte orders) share the UID, so their de-identified outputs would share a name."""
    import pydicom

    dest = tmp_path_factory.mktemp("pydicom_distinct")
    seen: set[str] = set()
    for path in pydicom_test_files():
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID", ""))
        except Exception:  # noqa: BLE001 - broken inputs belong to other tests
            continue
        if uid and uid not in seen and not (dest / path.name).exists():
            seen.add(uid)
            shutil.copyfile(path, dest / path.name)
    return dest


@pytest.fixture(scope="session")
def anonymized_pydicom(distinct_pydicom_files: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``kaapcli anonymize`` of :func:`distinct_pydicom_files` (Basic Profile, burned-in guard off), --format jsonl."""
    out = tmp_path_factory.mktemp("pydicom_anonymized")
    proc = kaapcli("anonymize", distinct_pydicom_files, "-o", out, "--key", "test-key-1", "--burned-in", "ignore",
                   "--format", "jsonl", "-q")
    return proc, out
