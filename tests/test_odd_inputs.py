"""The batch engine on the file systems and inputs users really have (issue #15), through the real CLI.

Every odd tree is built here: FIFOs and sockets named *.dcm, symlink loops, dangling links, file names that are
not UTF-8, truncated copies of pydicom's files, unreadable files and folders (as the unprivileged user "nobody"
when the tests run as root), interrupted and killed runs, streams on stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import dciodvfy_errors, dcmtk, dicom_files, kaapcli, pydicom_test_files
from peers import storescp  # noqa: F401
from pydicom.data import get_charset_files, get_testdata_file

KEY = "odd-inputs-key"
LATIN1 = os.fsdecode(b"caf\xe9.dcm")  # a name that is not UTF-8: Latin-1 e-acute


def run_bytes(*args: object, input: bytes | None = None, timeout: float = 60,
              user: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """kaapcli with stdout/stderr as bytes (names that are not UTF-8 stay intact), optionally as another user."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("KAAPCLI_DEBUG", None)
    prefix: list[str] = []
    if user is not None:  # util-linux setpriv: the process runs without capabilities, so permissions apply
        env["HOME"] = tempfile.gettempdir()
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run([*prefix, sys.executable, "-m", "kaapcli", *map(os.fspath, args)],  # type: ignore[arg-type]
                          input=input, capture_output=True, env=env, timeout=timeout)


def copy_dicom(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    return dest


@pytest.fixture
def odd_tree(tmp_path: Path, mock_ct: Path) -> Iterator[Path]:
    """Two DICOM files (one named in Latin-1) among a FIFO, a socket and a device link named *.dcm, a dangling
    link, a link loop and a directory loop."""
    root = tmp_path / "odd"
    first, second = dicom_files(mock_ct)[:2]
    copy_dicom(first, root / "series" / "good.dcm")
    copy_dicom(second, root / "series" / LATIN1)
    os.mkfifo(root / "series" / "fifo.dcm")
    (root / "series" / "null.dcm").symlink_to("/dev/null")
    (root / "dangling.dcm").symlink_to(root / "nowhere")
    (root / "loop1.dcm").symlink_to(root / "loop2.dcm")
    (root / "loop2.dcm").symlink_to(root / "loop1.dcm")
    (root / "series" / "up").symlink_to("..")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket.dcm"))
    try:
        yield root
    finally:
        sock.close()


# --------------------------------------------------------------------------- non-regular files, odd names

@pytest.mark.parametrize("command", [
    ["sort"], ["modify", "-i", "PatientID=ODD"], ["anonymize", "--key", KEY], ["dcm2json"], ["thumbnail"]])
def test_odd_trees_neither_hang_nor_crash(odd_tree: Path, tmp_path: Path, command: list[str]) -> None:
    out = tmp_path / "out"
    proc = run_bytes(command[0], odd_tree, "-o", out, *command[1:], "-w", "2")
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "7 not regular files" in stderr  # FIFO, socket, device link, dangling link, 2 looping links, a dir link
    if command[0] in ("sort", "modify", "anonymize"):
        assert len(proc.stdout.splitlines()) == 2 and all(Path(os.fsdecode(p)).is_file()
                                                         for p in proc.stdout.splitlines())
    if command[0] == "modify":  # the mirrored tree keeps the name's bytes
        assert (out / "series" / LATIN1).is_file() and b"caf\xe9.dcm" in proc.stdout
        again = run_bytes(command[0], odd_tree, "-o", out, *command[1:], "--format", "jsonl")
        records = [json.loads(line) for line in again.stdout.splitlines()]
        latin = next(r for r in records if r["input"].endswith(LATIN1))
        assert latin["status"] == "skipped" and os.fsencode(latin["outputs"][0]).endswith(b"caf\xe9.dcm")
        assert "2 up to date" in again.stderr.decode()  # the manifest held the name too


def test_named_special_files_are_errors(odd_tree: Path, tmp_path: Path) -> None:
    proc = kaapcli("dcm2json", odd_tree / "series" / "fifo.dcm", "-o", tmp_path / "out")
    assert proc.returncode == 66 and "fifo.dcm: a FIFO (named pipe), not a regular file" in proc.stderr
    loop = kaapcli("sort", odd_tree / "loop1.dcm", "-o", tmp_path / "out")
    assert loop.returncode == 66 and "loop1.dcm: symbolic link loop" in loop.stderr
    piped = kaapcli("anonymize", "-", "-o", tmp_path / "out", "--key", KEY, "--format", "jsonl",
                    input=f"{odd_tree / 'series' / 'fifo.dcm'}\n{odd_tree / 'series' / 'good.dcm'}\n")
    assert piped.returncode == 1, piped.stderr
    status = {Path(r["input"]).name: r["status"] for r in map(json.loads, piped.stdout.splitlines())}
    assert status == {"fifo.dcm": "failed", "good.dcm": "ok"}


def test_zip_stores_names_as_bytes_and_skips_special_files(odd_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "odd.zip"
    proc = run_bytes("zip", odd_tree, "-o", archive)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr
    assert "dangling.dcm: dangling symbolic link: not stored" in stderr and "fifo.dcm" in stderr
    with zipfile.ZipFile(archive) as zf:
        raw = {i.filename.encode("cp437") if not i.flag_bits & 0x800 else i.filename.encode() for i in zf.infolist()}
    assert raw == {b"series/good.dcm", b"series/caf\xe9.dcm"}
    assert subprocess.run(["unzip", "-t", str(archive)], capture_output=True).returncode == 0
    back = run_bytes("unzip", archive, "-o", tmp_path / "back")
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "back" / "series" / LATIN1).read_bytes() == (odd_tree / "series" / LATIN1).read_bytes()


# --------------------------------------------------------------------------- truncated and damaged files

def cut_copies(dest: Path) -> list[Path]:
    """CT_small and MR_small cut at 10 % of their size and inside the 8-byte header of a middle element."""
    made = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        ds = pydicom.dcmread(get_testdata_file(name), force=True)
        middle = list(ds._dict.values())[len(ds) // 2]
        header_cut = middle.value_tell + middle.length + 4  # 4 of the next element's 8 header bytes
        for label, size in (("10pct", len(data) // 10), ("header", header_cut)):
            made.append(dest / f"{Path(name).stem}-{label}.dcm")
            made[-1].parent.mkdir(parents=True, exist_ok=True)
            made[-1].write_bytes(data[:size])
    return made


@pytest.mark.parametrize("command", [
    ["modify", "-i", "PatientID=X"], ["anonymize", "--key", KEY], ["dcm2json", "--per-instance"], ["sort"]])
def test_truncated_files_are_failed_items(tmp_path: Path, command: list[str]) -> None:
    cuts = cut_copies(tmp_path / "cut")
    out = tmp_path / "out"
    proc = kaapcli(command[0], tmp_path / "cut", "-o", out, *command[1:])
    assert proc.returncode == 65, proc.stderr
    for path in cuts:
        assert f"{path}: " in proc.stderr and "truncated" in proc.stderr.split(f"{path}: ")[1].splitlines()[0]
    assert not [p for p in out.rglob("*") if p.is_file()]


def nested_sequences(path: Path, depth: int) -> Path:
    """A Part 10 file (explicit VR LE) whose Content Sequence nests ``depth`` levels deep, written as bytes."""
    import struct

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        long = vr in (b"OB", b"SQ")
        return struct.pack("<HH2sHI" if long else "<HH2sH", tag >> 16, tag & 0xFFFF, vr, *((0,) if long else ()),
                           len(value)) + value

    sop, syntax = b"1.2.826.0.1.3680043.10.777.1", b"1.2.840.10008.1.2.1"
    meta = (element(0x00020001, b"OB", b"\0\1") + element(0x00020002, b"UI", b"1.2.840.10008.5.1.4.1.1.7")
            + element(0x00020003, b"UI", sop) + element(0x00020010, b"UI", syntax))
    header = (element(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.7") + element(0x00080018, b"UI", sop)
              + element(0x00080060, b"CS", b"OT") + element(0x00100020, b"LO", b"DEEP")
              + element(0x0020000D, b"UI", b"1.2.826.0.1.3680043.10.777.2")
              + element(0x0020000E, b"UI", b"1.2.826.0.1.3680043.10.777.3"))
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                           0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + element(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta
                     + header + opening * depth + closing * depth)
    return path


@pytest.mark.parametrize("command", [["dcm2json", "-o"], ["index", "--index"]])
def test_sequences_nested_beyond_the_recursion_limit_are_failed_items(tmp_path: Path, command: list[str]) -> None:
    """A hostile file nesting sequences 5,000 deep is one failed input with a reason, never an internal error."""
    deep = nested_sequences(tmp_path / "in" / "deep.dcm", 5000)
    proc = kaapcli(command[0], deep, *command[1:], tmp_path / ("i.db" if command[0] == "index" else "out"))
    assert proc.returncode == 65, proc.stderr
    assert "nested too deeply to read" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["thumbnail", "convert"])
def test_damaged_images_are_failed_items_with_reasons(tmp_path: Path, command: str) -> None:
    cut_copies(tmp_path / "cut")
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    (tmp_path / "cut" / "pixels.dcm").write_bytes(data[:-3000])  # cut inside Pixel Data
    proc = kaapcli(command, tmp_path / "cut", "-o", tmp_path / "out")
    assert proc.returncode == 65, proc.stderr
    assert proc.stderr.count("error: ") == 5 and proc.stderr.count("truncated") == 5  # said on stderr, not only jsonl
    assert "not an image" not in proc.stderr


# --------------------------------------------------------------------------- collisions

def test_anonymize_of_pydicom_data_reports_what_it_wrote(tmp_path: Path) -> None:
    src = Path(get_testdata_file("CT_small.dcm")).parent
    out = tmp_path / "anon"
    proc = kaapcli("anonymize", src, "-o", out, "--key", KEY, "--format", "jsonl", "-w", "2", timeout=300)
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    collided = [r for r in records if "is also the output of" in r["message"]]
    written = {str(p) for p in out.rglob("*") if p.is_file()}
    assert {o for r in ok for o in r["outputs"]} == written  # every output reported is there, nothing else is
    assert len(collided) >= 20  # different encodings of one instance: the later ones fail, named
    firsts = {r["input"]: r for r in records}
    for record in collided:
        first = record["message"].split(" is also the output of ")[1].split(": not overwritten")[0]
        assert firsts[first]["status"] == "ok"
    assert len(records) == len(pydicom_test_files())  # one record per file: none lost on the way


# --------------------------------------------------------------------------- unreadable files and folders

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can work in (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kaapcli-odd-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o777, follow_symlinks=False)
        shutil.rmtree(path, ignore_errors=True)


NOBODY = 65534 if os.geteuid() == 0 else None  # as root, run as "nobody"; as another user, chmod 000 works already


def test_unreadable_files_and_folders_are_failed_items(shared_dir: Path, mock_ct: Path) -> None:
    tree = shared_dir / "in"
    good, secret, hidden = dicom_files(mock_ct)[:3]
    copy_dicom(good, tree / "good.dcm")
    copy_dicom(secret, tree / "secret.dcm").chmod(0o000)
    copy_dicom(hidden, tree / "locked" / "x.dcm")
    (tree / "locked").chmod(0o000)
    for path in (tree, shared_dir):
        path.chmod(0o777)
    proc = run_bytes("dcm2json", tree, "-o", shared_dir / "meta", "--per-instance", "--format", "jsonl", user=NOBODY)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    assert f"{tree / 'secret.dcm'}: cannot read: Permission denied" in stderr
    assert f"{tree / 'locked'}: cannot read directory: Permission denied" in stderr
    assert "not DICOM" not in stderr
    named = run_bytes("dcm2json", tree / "secret.dcm", "-o", shared_dir / "meta2", user=NOBODY)
    assert named.returncode == 66 and b"Permission denied" in named.stderr

    archive = shared_dir / "in.zip"
    for inputs in ([tree / "good.dcm", tree / "secret.dcm"], [tree], [tree / "locked"]):
        zipped = run_bytes("zip", *inputs, "-o", archive, user=NOBODY)
        assert zipped.returncode == 66, zipped.stderr  # the input is blamed, never the archive
        blamed = tree / ("locked" if tree / "locked" in inputs or inputs == [tree] else "secret.dcm")
        assert f"{blamed}: cannot read".encode() in zipped.stderr and b"Permission denied" in zipped.stderr
        assert not archive.exists() and not [p for p in shared_dir.iterdir() if p.name.startswith(".in.zip")]


def test_clean_never_hides_a_folder_it_cannot_remove(shared_dir: Path) -> None:
    runs = shared_dir / "runs"
    (runs / "locked" / "sub").mkdir(parents=True)
    (runs / "locked" / "sub" / "f").write_text("x")
    (runs / "stuck" / "sub").mkdir(parents=True)
    (runs / "stuck" / "sub" / "f").write_text("x")
    old = time.time() - 90 * 86400
    for path in [*runs.rglob("*")]:
        os.utime(path, (old, old))
    runs.chmod(0o777)
    (runs / "locked" / "sub").chmod(0o000)  # its age cannot be read
    (runs / "stuck" / "sub").chmod(0o555)  # its file cannot be deleted
    proc = run_bytes("clean", runs, "--older-than", "60d", user=NOBODY)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    assert f"{runs / 'locked'}: cannot read {runs / 'locked' / 'sub'}: Permission denied; not removed" in stderr
    assert "stuck/sub/f: Permission denied" in stderr and proc.stdout == b""
    assert sorted(p.name for p in runs.iterdir()) == ["locked", "stuck"]  # nothing renamed to a hidden name


# --------------------------------------------------------------------------- no input

def test_no_input_at_all_is_66(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no DICOM here")
    for folder, extra in (("empty", ""), ("text", " (1 other file skipped)")):
        proc = kaapcli("dcm2json", tmp_path / folder, "-o", tmp_path / "out")
        assert proc.returncode == 66, proc.stderr
        assert f"no DICOM input found in {tmp_path / folder}{extra}" in proc.stderr
    assert kaapcli("anonymize", "-", "-o", tmp_path / "out", "--key", KEY, input="").returncode == 66


# --------------------------------------------------------------------------- processes, signals, streams

@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("many")
    proc = kaapcli("mock", "-o", out, "--slices", "600", "--rows", "32", "--columns", "32", "--seed", "5", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of a session."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def wait_gone(sid: int, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("command", [["anonymize", "--key", KEY], ["dcm2json"]])
def test_head_leaks_no_worker_processes(many: Path, tmp_path: Path, command: list[str]) -> None:
    kaap = f"{sys.executable} -m kaapcli {command[0]} {many} -o {tmp_path / 'out'} {' '.join(command[1:])} -w 2"
    proc = subprocess.Popen(["sh", "-c", f"{kaap} --per-instance | head -n 1" if command[0] == "dcm2json"
                             else f"{kaap} | head -n 1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert len(out.splitlines()) == 1 and b"Traceback" not in err, err
    left = wait_gone(proc.pid)
    for pid in left:  # pragma: no cover - the failure being tested: do not leave them running
        os.kill(pid, signal.SIGKILL)
    assert not left


def start_run(many: Path, out: Path, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "kaapcli", "anonymize", str(many), "-o", str(out), "--key", KEY,
                             "-w", "2", "--format", "jsonl"],
                            stdout=stdout, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "NO_COLOR": "1"})


def wait_for_outputs(out: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(dicom_files(out)) < n:
        time.sleep(0.05)


def manifest_items(out: Path) -> int:
    state = out.parent / f".{out.name}.kaapcli"
    lines = (state / "anonymize-all.json").read_text().splitlines()  # JSON lines: a version, then one item a line
    return sum("k" in json.loads(line) for line in lines)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM to the group"])
def test_interrupt_stops_and_reports_exactly_what_is_on_disk(many: Path, tmp_path: Path, how: str) -> None:
    out = tmp_path / "out"
    proc = start_run(many, out)
    wait_for_outputs(out, 40)
    if how == "SIGINT":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and b"interrupted after" in stderr
    wait_gone(proc.pid)
    on_disk = len(dicom_files(out))
    time.sleep(1)
    assert len(dicom_files(out)) == on_disk < 600  # nothing keeps writing after the exit
    reported = [json.loads(line) for line in stdout.splitlines()]
    assert sum(r["status"] == "ok" for r in reported) == on_disk == manifest_items(out)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # in-flight temporary files committed or removed
    rerun = kaapcli("anonymize", many, "-o", out, "--key", KEY, "-w", "2")
    assert rerun.returncode == 0 and len(dicom_files(out)) == 600
    assert f"({on_disk} up to date)" in rerun.stderr  # exactly what the interrupted run reported is skipped


def test_sigkill_rerun_is_incremental_and_cleans_up(many: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_run(many, out, stdout=subprocess.DEVNULL)  # nobody reads it here: a pipe would fill and block
    journal = out.parent / f".{out.name}.kaapcli" / "anonymize-all.journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count('"k"') < 5):
        time.sleep(0.05)  # until the run has journalled some finished items (every JOURNAL_SECONDS)
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must die with it
    proc.communicate(timeout=30)
    assert not wait_gone(proc.pid)
    finished = len(dicom_files(out))
    rerun = kaapcli("anonymize", many, "-o", out, "--key", KEY, "-w", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert " up to date" in rerun.stderr, rerun.stderr
    up_to_date = int(rerun.stderr.split(" up to date")[0].rsplit("(", 1)[1])
    assert 5 <= up_to_date <= finished  # the journal kept what the killed run had finished
    assert len(dicom_files(out)) == 600
    assert not [p for p in out.rglob(".*")]  # the killed run's temporary files were removed by the re-run


def test_stdin_is_processed_as_it_arrives(mock_ct: Path, tmp_path: Path) -> None:
    first, second = dicom_files(mock_ct)[:2]
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "anonymize", "-", "-o", str(tmp_path / "out"),
                             "--key", KEY, "-w", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(f"{first}\n".encode())
        proc.stdin.flush()
        line = proc.stdout.readline()  # before stdin ends: the first path was processed on arrival
        assert Path(line.decode().strip()).is_file()
        rest, err = proc.communicate(f"{second}\n".encode(), timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
    assert proc.returncode == 0, err
    assert len(rest.splitlines()) == 1


# --------------------------------------------------------------------------- output trees DCMTK can scan

def test_output_trees_are_clean_for_dcmtk_and_hold_nothing_identifying(
        mock_ct: Path, tmp_path: Path, storescp) -> None:  # noqa: F811
    identifying = "DOE_JOHN_MRN12345"
    src = tmp_path / identifying
    shutil.copytree(mock_ct, src)
    anon = tmp_path / "anon"
    for _ in range(2):  # the second run is up to date: the manifest still works from beside the tree
        proc = kaapcli("anonymize", src, "-o", anon, "--key", KEY)
        assert proc.returncode == 0, proc.stderr
    assert "16 up to date" in proc.stderr
    everything = [p for p in anon.rglob("*")]
    assert not [p for p in everything if p.name.startswith(".")]
    assert not [p for p in everything if p.is_file() and identifying.encode() in p.read_bytes()]
    assert identifying not in (tmp_path / ".anon.kaapcli" / "anonymize-all.json").read_text()  # hashed keys
    sorted_tree = tmp_path / "sorted"
    assert kaapcli("sort", anon, "-o", sorted_tree, "--shard", "1/2").returncode == 0
    assert kaapcli("sort", anon, "-o", sorted_tree, "--shard", "2/2").returncode == 0
    assert "up to date" in kaapcli("sort", anon, "-o", sorted_tree, "--shard", "2/2").stderr
    for tree in (anon, sorted_tree):
        sent = subprocess.run([dcmtk("storescu"), "-aec", storescp.aet, "+sd", "+r", "127.0.0.1", str(storescp.port),
                               str(tree)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
    assert len(list(storescp.out.iterdir())) == 16


# --------------------------------------------------------------------------- modify, index, --debug, dry runs

def test_modify_keeps_iso_2022_files_consistent(tmp_path: Path) -> None:
    src = Path(get_charset_files("chrH31.dcm")[0])  # Yamada^Tarou in ISO 2022 IR 87
    before = pydicom.dcmread(src)
    proc = kaapcli("modify", src, "-o", tmp_path / "latin", "-i", "StudyDescription=Überweisung Müller")
    assert proc.returncode == 0 and "changed to ISO_IR 192" in proc.stderr, proc.stderr
    after = pydicom.dcmread(tmp_path / "latin" / src.name)
    assert after.SpecificCharacterSet == "ISO_IR 192"
    assert after.StudyDescription == "Überweisung Müller" and after.PatientName == before.PatientName
    assert "Überweisung".encode() in (tmp_path / "latin" / src.name).read_bytes()  # UTF-8, not Latin-1
    kanji = kaapcli("modify", src, "-o", tmp_path / "kanji", "-i", "StudyDescription=山田")
    assert kanji.returncode == 0 and "ISO_IR 192" not in kanji.stderr  # JIS X 0208 holds it: the set is kept
    ds = pydicom.dcmread(tmp_path / "kanji" / src.name)
    assert list(ds.SpecificCharacterSet) == ["", "ISO 2022 IR 87"] and ds.StudyDescription == "山田"
    assert dciodvfy_errors(tmp_path / "latin" / src.name) == dciodvfy_errors(src)


def test_modify_value_errors_are_one_line(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("modify", mock_ct, "-o", tmp_path, "-i", "Rows=abc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kaapcli: error: -i 'Rows=abc': 'abc' is not a valid US value (expected an integer from 0 to 65535)"]


def test_index_warnings_name_their_file(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesDescription = "x" * 80  # longer than LO allows: pydicom warns when it reads it back
    ds.save_as(tmp_path / "long.dcm")
    proc = kaapcli("index", tmp_path / "long.dcm", "--index", tmp_path / "ix.db")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and all(str(tmp_path / "long.dcm") in line for line in warnings)


def test_every_command_takes_debug() -> None:
    import click

    from kaapcli.cli.app import click_command

    missing = []

    def walk(cmd: click.Command, name: str) -> None:
        if isinstance(cmd, click.Group):
            for sub_name, sub in cmd.commands.items():
                walk(sub, f"{name} {sub_name}")
        elif not any("--debug" in getattr(p, "opts", ()) for p in cmd.params):
            missing.append(name)

    walk(click_command(), "kaapcli")
    assert missing == []
    refused = kaapcli("echo", "NOBODY@127.0.0.1:1", "--debug", "--timeout", "2")
    assert refused.returncode == 69, refused.stderr  # refused by the peer, not by the option parser


def test_anonymize_dry_run_summarises(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("anonymize", mock_ct, "-o", tmp_path / "out", "--key", KEY, "--dry-run")
    assert proc.returncode == 0 and not (tmp_path / "out").exists()
    lines = proc.stderr.splitlines()
    assert len(lines) < 16 + 80  # the first file's plan in full, then one line per file (was 16 x ~60)
    assert sum("would write" in line for line in lines) == 16

