"""kaapcli's networking against real peers: DCMTK (storescu/storescp/echoscu) and Orthanc with DICOMweb."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, dicom_files, free_port, kaapcli, pydicom_test_files
from peers import MOVE_AET, orthanc, receiver, storescp  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.network

COMPRESSED = ["SC_jpeg_no_color_transform.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm",
              "GDCMJ2K_TextGBR.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm",
              "MR_small_implicit.dcm", "JPEG-lossy.dcm"]


def pixel_bytes(path: Path) -> bytes:
    return bytes(pydicom.dcmread(path).PixelData)


def by_sop(paths: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- echo / dead peers

def test_echo_dcmtk_and_orthanc(storescp, orthanc) -> None:  # noqa: F811
    for peer in (storescp.peer, orthanc.dimse, orthanc.dicomweb):
        proc = kaapcli("echo", peer)
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout)
        assert record["ok"] is True and record["ms"] >= 0 and record["peer"] == peer


@pytest.mark.parametrize("command", ["echo", "send", "query", "retrieve"])
def test_dead_peer_is_exit_69_quickly(command: str, mock_ct: Path, tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    for peer in (f"NOBODY@127.0.0.1:{port}", f"http://127.0.0.1:{port}/dicom-web"):
        args = {"echo": ["echo", peer], "send": ["send", mock_ct, "--to", peer], "query": ["query", peer],
                "retrieve": ["retrieve", peer, "-k", "StudyInstanceUID=1.2", "-o", tmp_path]}[command]
        start = time.monotonic()
        proc = kaapcli(*args, "--timeout", "5")
        assert proc.returncode == 69, (args, proc.stdout, proc.stderr)
        assert time.monotonic() - start < 10
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_silent_peer_times_out(tmp_path: Path) -> None:
    """A peer that accepts TCP but never answers the A-ASSOCIATE-RQ: exit 69 after --timeout, no hang."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        start = time.monotonic()
        proc = kaapcli("echo", f"SILENT@127.0.0.1:{port}", "--timeout", "2")
        assert proc.returncode == 69, proc.stderr
        assert time.monotonic() - start < 8
        assert f"127.0.0.1:{port}" in proc.stderr
    finally:
        server.close()


# --------------------------------------------------------------------------- send

def test_send_to_storescp_bytes_arrive_unchanged(storescp, mock_ct: Path) -> None:  # noqa: F811
    proc = kaapcli("send", mock_ct, "--to", storescp.peer, "--jobs", "2", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    records = jsonl(proc.stdout)
    assert len(records) == 16 and all(r["status"] == "ok" for r in records)
    sent = by_sop(dicom_files(mock_ct))
    got = by_sop(storescp.files())
    assert got.keys() == sent.keys()
    for uid, path in sent.items():
        assert pixel_bytes(got[uid]) == pixel_bytes(path)
    assert "16 files sent" in proc.stderr and "0 failed" in proc.stderr


def test_send_refused_sop_class_is_a_failed_item(storescp, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "data"
    files = dicom_files(mock_ct)[:3]
    data.mkdir()
    for f in files:
        shutil.copy(f, data / f.name)
    odd = pydicom.dcmread(files[0])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.10.999.1"  # storescp knows no such
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.2"
    odd.save_as(data / "odd.dcm")
    (data / "notes.txt").write_text("not dicom")
    (data / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")
    proc = kaapcli("send", data, "--to", storescp.peer, "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    status = {Path(r["input"]).name: r["status"] for r in jsonl(proc.stdout)}
    assert status.pop("odd.dcm") == "failed" and status.pop("broken.dcm") == "failed"
    assert set(status.values()) == {"ok"} and len(status) == 3
    assert "accepts no presentation context" in proc.stderr and "broken.dcm" in proc.stderr
    assert len(storescp.files()) == 3 and "Traceback" not in proc.stderr


def test_send_resume_ledger_skips_acknowledged(storescp, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    ledger = tmp_path / "sent.jsonl"
    first = kaapcli("send", mock_ct, "--to", storescp.peer, "--resume", ledger, "-q")
    assert first.returncode == 0 and len(first.stdout.splitlines()) == 16
    assert len(ledger.read_text().splitlines()) == 16
    for f in storescp.files():
        f.unlink()
    second = kaapcli("send", mock_ct, "--to", storescp.peer, "--resume", ledger)
    assert second.returncode == 0 and second.stdout == ""
    assert storescp.files() == [] and "16 up to date" in second.stderr


def test_kaapana_dataset_and_project_become_aets(receiver, mock_ct: Path) -> None:  # noqa: F811
    rx = receiver("--series-timeout", "0.5")
    proc = kaapcli("send", mock_ct, "--to", rx.peer, "--dataset", "lung", "--project", "study1", "-q")
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.5)
    code, _, stderr = rx.finish()
    assert code == 0, stderr
    receipts = [json.loads(p.read_text()) for p in (rx.out / ".kaapcli" / "series").glob("*.json")]
    assert len(receipts) == 2
    assert {(r["calling_aet"], r["called_aet"]) for r in receipts} == {("kp-lung", "kp-study1")}


# --------------------------------------------------------------------------- receive

def test_receive_from_storescu_with_hook_and_clean_sigterm(receiver, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    marks = tmp_path / "marks"
    marks.mkdir()
    rx = receiver("--series-timeout", "0.5", "--on-complete",
                  f"touch {marks}/{{series_uid}}__{{calling_aet}}__{{called_aet}}")
    proc = subprocess.run([dcmtk("storescu"), "-aet", "SENDER", "-aec", "PROJ", "+sd", "+r", "+sp", "*.dcm",
                           "127.0.0.1", str(rx.port), str(mock_ct)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.5)
    code, stdout, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    received = dicom_files(rx.out)
    assert len(received) == 16 and sorted(stdout.split()) == sorted(map(str, received))
    assert stderr.count("series complete") == 2
    series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in received}
    assert {m.name for m in marks.iterdir()} == {f"{s}__SENDER__PROJ" for s in series}
    sent = by_sop(dicom_files(mock_ct))
    for uid, path in by_sop(received).items():
        assert path.read_bytes()[132:] != b"" and pixel_bytes(path) == pixel_bytes(sent[uid])


def test_receive_compressed_syntaxes_unchanged(receiver, tmp_path: Path) -> None:  # noqa: F811
    sources: dict[str, Path] = {}
    for path in pydicom_test_files():
        if path.name in COMPRESSED:  # several share one SOP Instance UID: give each its own (bytes otherwise kept)
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            sources[path.name] = tmp_path / path.name
            ds.save_as(sources[path.name])
    assert len(sources) == len(COMPRESSED)
    rx = receiver("--series-timeout", "60")
    proc = kaapcli("send", *sources.values(), "--to", rx.peer, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    code, _, stderr = rx.finish()
    assert code == 0, stderr
    got = by_sop(dicom_files(rx.out))
    for name, src in sources.items():
        ds = pydicom.dcmread(src)
        out = pydicom.dcmread(got[str(ds.SOPInstanceUID)])
        assert out.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, name
        assert bytes(out.PixelData) == bytes(ds.PixelData), name


def test_receive_four_concurrent_senders_lose_nothing(receiver, mock_studies: Path, mock_ct: Path) -> None:  # noqa: F811
    rx = receiver("--series-timeout", "60")
    studies = sorted(p for p in mock_studies.iterdir() if p.is_dir() and not p.name.startswith("."))
    senders = [subprocess.Popen([sys.executable, "-m", "kaapcli", "send", str(s), "--to", rx.peer, "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for s in studies]
    senders.append(subprocess.Popen([dcmtk("storescu"), "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(rx.port),
                                     str(mock_ct)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for sender in senders:
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
    code, stdout, stderr = rx.finish()
    assert code == 0, stderr
    expected = set(by_sop(dicom_files(mock_studies))) | set(by_sop(dicom_files(mock_ct)))
    assert set(by_sop(dicom_files(rx.out))) == expected and len(stdout.split()) == len(expected)


def test_receive_sigkill_leaves_no_partial_file(receiver, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "big"
    made = kaapcli("mock", "-o", data, "--slices", "120", "--rows", "256", "--columns", "256", "-q")
    assert made.returncode == 0
    rx = receiver()
    sender = subprocess.Popen([dcmtk("storescu"), "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(rx.port), str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(dicom_files(rx.out) if rx.out.exists() else []) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    rx.proc.kill()  # SIGKILL mid-transfer
    rx.proc.communicate(timeout=10)
    sender.wait(30)
    finals = dicom_files(rx.out)
    assert 10 <= len(finals) < 120
    for path in finals:
        ds = pydicom.dcmread(path)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2, path


def test_allow_aet_rejects_others(receiver, mock_ct: Path) -> None:  # noqa: F811
    rx = receiver("--allow-aet", "FRIEND")
    proc = kaapcli("send", mock_ct, "--to", rx.peer, "--calling-aet", "STRANGER")
    assert proc.returncode == 69 and "association rejected" in proc.stderr, proc.stderr
    ok = kaapcli("send", mock_ct, "--to", rx.peer, "--calling-aet", "FRIEND", "-q")
    assert ok.returncode == 0, ok.stderr


def test_receiver_that_cannot_write_answers_failure(receiver, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "rx"
    out.mkdir()
    study = str(pydicom.dcmread(dicom_files(mock_ct)[0], stop_before_pixels=True).StudyInstanceUID)
    (out / study).write_text("a file where the study directory should go")
    rx = receiver(out=out)
    proc = kaapcli("send", mock_ct, "--to", rx.peer, "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    records = jsonl(proc.stdout)
    assert len(records) == 16 and {r["status"] for r in records} == {"failed"}
    assert "C-STORE failed: 0xA700" in proc.stderr and "16 failed" in proc.stderr


def test_pipelined_statuses_go_to_their_files(receiver, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    """With C-STOREs outstanding (kaapcli receive grants the window), one refused file in the middle of the
    stream fails exactly that file: each response is matched to its request by message id."""
    out = tmp_path / "rx"
    out.mkdir()
    (out / "7").write_text("a file where instance 7's directory should go")
    rx = receiver("--layout", "{InstanceNumber}/{SOPInstanceUID}.dcm", out=out)
    proc = kaapcli("send", mock_ct, "--to", rx.peer, "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    sevens = {str(f) for f in dicom_files(mock_ct) if pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber == 7}
    records = jsonl(proc.stdout)
    assert sevens and {r["input"] for r in records if r["status"] == "failed"} == sevens
    assert len(list(out.rglob("*.dcm"))) == len(records) - len(sevens) > 0


# --------------------------------------------------------------------------- Orthanc: send, query, retrieve, delete

@pytest.fixture
def loaded(orthanc, mock_ct: Path):  # noqa: F811
    orthanc.clear()
    proc = kaapcli("send", mock_ct, "--to", orthanc.dimse, "-q")
    assert proc.returncode == 0, proc.stderr
    return orthanc


def _series(mock_ct: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for p in dicom_files(mock_ct):
        groups.setdefault(str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID), []).append(p)
    return groups


def test_query_cfind_and_qido_agree(loaded, mock_ct: Path) -> None:
    series = _series(mock_ct)
    patient_id = str(pydicom.dcmread(dicom_files(mock_ct)[0], stop_before_pixels=True).PatientID)
    for peer in (loaded.dimse, loaded.dicomweb):
        proc = kaapcli("query", peer, "--level", "series", "-k", "Modality=CT", "--return", "BodyPartExamined")
        assert proc.returncode == 0, proc.stderr
        matches = jsonl(proc.stdout)
        assert {m["0020000E"]["Value"][0] for m in matches} == set(series), peer
        studies = jsonl(kaapcli("query", peer, "-k", "StudyDate=19000101-20991231", "-k", "PatientID=MOCK*",
                                "--return", "PatientBirthDate").stdout)
        assert len(studies) == 1 and studies[0]["00100020"]["Value"] == [patient_id]
        assert "00100030" in studies[0]
        assert jsonl(kaapcli("query", peer, "-k", "PatientID=NOBODY").stdout) == []
        limited = kaapcli("query", peer, "--level", "instance", "-k",
                          f"SeriesInstanceUID={next(iter(series))}", "--limit", "3")
        assert limited.returncode == 0 and len(jsonl(limited.stdout)) == 3, limited.stderr


@pytest.mark.parametrize("method", ["get", "move", "wado"])
def test_retrieve_series(loaded, mock_ct: Path, tmp_path: Path, method: str) -> None:
    uid, files = next(iter(_series(mock_ct).items()))
    out = tmp_path / "out"
    if method == "wado":
        proc = kaapcli("retrieve", loaded.dicomweb, "-k", f"SeriesInstanceUID={uid}", "-o", out, "--format", "jsonl")
    else:
        extra = ["--aet", MOVE_AET, "--port", str(loaded.move_port), "--bind", "127.0.0.1"] if method == "move" else []
        proc = kaapcli("retrieve", loaded.dimse, "-k", f"SeriesInstanceUID={uid}", "-o", out, "--method",
                       "move" if method == "move" else "get", *extra, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    [record] = jsonl(proc.stdout)
    assert record["ok"] and record["received"] == 8 and record["failed"] == 0
    got = by_sop(dicom_files(out))
    sent = by_sop(files)
    assert got.keys() == sent.keys()
    for sop, path in sent.items():
        assert pixel_bytes(got[sop]) == pixel_bytes(path)


def test_query_pipe_into_retrieve(loaded, mock_ct: Path, tmp_path: Path) -> None:
    query = kaapcli("query", loaded.dimse, "--level", "series")
    assert query.returncode == 0
    proc = kaapcli("retrieve", loaded.dimse, "--from-query", "-", "-o", tmp_path / "out", input=query.stdout)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) == 16 and len(dicom_files(tmp_path / "out")) == 16


def test_retrieve_missing_series_is_not_ok(loaded, tmp_path: Path) -> None:
    for peer in (loaded.dimse, loaded.dicomweb):
        proc = kaapcli("retrieve", peer, "-k", "SeriesInstanceUID=1.2.3.4.5.6.7", "-o", tmp_path / "none")
        assert proc.returncode != 0, (peer, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_retrieve_reference_of_a_seg(loaded, mock_ct: Path, tmp_path: Path) -> None:
    uid, files = next(iter(_series(mock_ct).items()))
    seg = pydicom.dcmread(files[0], stop_before_pixels=True)
    ref = pydicom.Dataset()
    ref.SeriesInstanceUID = uid
    seg.ReferencedSeriesSequence = [ref]
    seg.Modality = "SEG"
    (tmp_path / "seg").mkdir()
    seg.save_as(tmp_path / "seg" / "seg.dcm")
    proc = kaapcli("retrieve", loaded.dimse, "--reference-of", tmp_path / "seg", "-o", tmp_path / "ref")
    assert proc.returncode == 0, proc.stderr
    assert set(by_sop(dicom_files(tmp_path / "ref"))) == set(by_sop(files))


def test_stow_then_qido(orthanc, mock_studies: Path) -> None:  # noqa: F811
    orthanc.clear()
    proc = kaapcli("send", mock_studies, "--to", orthanc.dicomweb, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert len(jsonl(proc.stdout)) == 18 and all(r["status"] == "ok" for r in jsonl(proc.stdout))
    assert len(orthanc.get("/instances")) == 18
    studies = jsonl(kaapcli("query", orthanc.dicomweb).stdout)
    assert len(studies) == 3


def test_delete_on_orthanc(loaded, mock_ct: Path) -> None:
    uid = next(iter(_series(mock_ct)))
    refused = kaapcli("delete", loaded.dicomweb, "--series", uid, "--server-type", "orthanc", input="")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(loaded.get("/series")) == 2
    proc = kaapcli("delete", loaded.dicomweb, "--series", uid, "--server-type", "orthanc", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert len(loaded.get("/series")) == 1
    again = kaapcli("delete", loaded.dicomweb, "--series", uid, "--server-type", "orthanc", "--yes")
    assert again.returncode == 66, again.stderr


def test_send_interrupted_then_resumed(receiver, tmp_path: Path) -> None:  # noqa: F811
    """SIGINT mid-send: exit 130; the ledger holds exactly what was acknowledged; resume sends the rest."""
    data = tmp_path / "data"
    assert kaapcli("mock", "-o", data, "--slices", "150", "--rows", "128", "--columns", "128", "-q").returncode == 0
    rx = receiver("--series-timeout", "60")
    ledger = tmp_path / "ledger.jsonl"
    sender = subprocess.Popen([sys.executable, "-m", "kaapcli", "send", str(data), "--to", rx.peer, "--resume",
                               str(ledger), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while (not ledger.exists() or len(ledger.read_text().splitlines()) < 5) and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.send_signal(signal.SIGINT)
    out, err = sender.communicate(timeout=30)
    first = len(out.split())
    if sender.returncode == 0:
        pytest.skip("the send finished before it could be interrupted")
    assert sender.returncode == 130, err
    resumed = kaapcli("send", data, "--to", rx.peer, "--resume", ledger, "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert first + len(resumed.stdout.split()) >= 150
    code, _, _ = rx.finish()
    assert len(dicom_files(rx.out)) == 150
