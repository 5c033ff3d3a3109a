"""Networking as strict real peers expect it (issue #16): transcoding that keeps pixels, C-GET contexts, the
hierarchical retrieve keys of dcmqrscp and pynetdicom's qrscp, third-AE C-MOVE, QIDO wildcards, STOW-RS
per-file status, bearer tokens, rejection reasons, multi-object delete and Modality Worklist (wlmscpfs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dcmtk, dicom_files, free_port, kaapcli, pydicom_test_files
from peers import DICOMWEB_PLUGIN, ORTHANC, Orthanc, orthanc, run_orthanc, stop, storescp, wait_port  # noqa: F401 - fixtures

pytestmark = pytest.mark.network

BIG_ENDIAN = ["emri_small_big_endian.dcm", "OBXXXX1A_expb.dcm", "gdcm-US-ALOKA-16_big.dcm", "MR_small_bigendian.dcm",
              "SC_rgb_small_odd_big_endian.dcm", "liver_expb_1frame.dcm", "SC_rgb_expb_16bit.dcm",
              "SC_rgb_expb_32bit.dcm"]  # 8, 16 and 32 bits allocated
RLE = ["MR_small_RLE.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit_2frame.dcm", "rtdose_rle_1frame.dcm"]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def all_test_files() -> list[Path]:
    """pydicom's bundled test files and those of the pydicom-data package (big endian, RLE, JPEG variants)."""
    files = pydicom_test_files()
    try:
        import data_store  # the pydicom-data package

        files += sorted(p for p in (Path(data_store.__file__).parent / "data").rglob("*") if p.is_file())
    except ImportError:
        pass
    return files


def unique_copies(dest: Path, names: set[str] | None = None) -> dict[str, Path]:
    """Every test file (or those ``names``) under ``dest``; a file whose SOP Instance UID an earlier one has gets a
    new one (storescp names files by it). Returns SOP Instance UID -> the copy."""
    dest.mkdir()
    seen: dict[str, Path] = {}
    for n, path in enumerate(p for p in all_test_files() if names is None or p.name in names):
        copy = dest / f"{n:03d}_{path.name}"
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
        except Exception:  # noqa: BLE001 - broken or non-DICOM: copied as it is
            shutil.copy(path, copy)
            continue
        if uid in seen:
            try:
                full = pydicom.dcmread(path, force=True)
                full.SOPInstanceUID = uid = pydicom.uid.generate_uid()
                if "MediaStorageSOPInstanceUID" in full.file_meta:
                    full.file_meta.MediaStorageSOPInstanceUID = uid
                full.save_as(copy)
            except Exception:  # noqa: BLE001 - cannot be made unique: left out
                continue
        else:
            shutil.copy(path, copy)
        seen[uid] = copy
    return seen


def pixels_or_bytes(path: Path) -> object:
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # a file without file meta: the syntax it was read in
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ("1.2.840.10008.1.2" if implicit else
                                          "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    if not any(t in ds for t in (0x7FE00008, 0x7FE00009, 0x7FE00010)):
        return None
    try:
        return ds.pixel_array
    except Exception:  # noqa: BLE001 - not decodable: compare the raw value instead
        return bytes(ds.PixelData)


def same_pixels(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    return type(a) is type(b) and a == b


def check_transcoded(records: list[dict], sources: dict[str, Path], received: dict[str, Path]) -> list[str]:
    """Every ok record's file arrived with the original's pixels; every failed one says why. Returns the names
    of the files sent in another syntax."""
    by_path = {str(p): uid for uid, p in sources.items()}
    transcoded = []
    assert records
    for record in records:
        name = Path(record["input"]).name
        if record["status"] == "failed":
            assert record["message"].startswith(record["input"]) and len(record["message"]) > len(record["input"]) + 5
            continue
        if record["status"] != "ok":
            continue
        uid = by_path[record["input"]]
        assert uid in received, name
        before, after = pixels_or_bytes(sources[uid]), pixels_or_bytes(received[uid])
        assert same_pixels(before, after), (name, type(before), type(after), record["message"])
        if record["message"].startswith("sent as"):
            transcoded.append(name.split("_", 1)[1])
    return transcoded


def sop_of(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID", ""))


# --------------------------------------------------------------------------- send: transcoding keeps pixels

def test_send_to_implicit_only_storescp_keeps_every_pixel(tmp_path: Path) -> None:
    """storescp +xi accepts Implicit VR Little Endian only: big endian files are byte-swapped, lossless
    compressed ones decoded, lossy ones refused (--decompress lossless, the default), truncated ones refused
    locally; whatever arrives has the original's pixel array."""
    sources = unique_copies(tmp_path / "src")
    out = tmp_path / "scp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "+xi", "-aet", "IMPLICIT", "-od", str(out), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        sent = kaapcli("send", tmp_path / "src", "--to", f"IMPLICIT@127.0.0.1:{port}", "--format", "jsonl",
                       timeout=300)
    finally:
        stop(proc)
    assert sent.returncode == 1 and "Traceback" not in sent.stderr  # some files cannot be sent: exit 1
    records = jsonl(sent.stdout)
    received = {sop_of(p): p for p in out.iterdir()}
    for p in received.values():
        assert pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    transcoded = check_transcoded(records, sources, received)
    assert set(BIG_ENDIAN + RLE) <= set(transcoded), sorted(set(BIG_ENDIAN + RLE) - set(transcoded))
    status = {Path(r["input"]).name.split("_", 1)[1]: r for r in records}
    assert status["MR_truncated.dcm"]["status"] == "failed" and status["rtplan_truncated.dcm"]["status"] == "failed"
    assert status["JPEG2000.dcm"]["status"] == "failed" and "--decompress lossy" in status["JPEG2000.dcm"]["message"]
    assert "no C-STORE response" not in sent.stderr  # no file took the association down with it


def test_send_lossy_decompression_only_when_asked(storescp, tmp_path: Path) -> None:  # noqa: F811
    """--decompress lossy decodes JPEG baseline for an uncompressed-only peer (pixels as pydicom decodes them,
    Lossy Image Compression 01); --decompress never refuses even lossless RLE."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "CT_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), src / name)
    port = free_port()
    out = tmp_path / "xi"
    out.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "+xi", "-od", str(out), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        never = kaapcli("send", src, "--to", f"ANY@127.0.0.1:{port}", "--decompress", "never", "--format", "jsonl")
        assert never.returncode == 1
        assert {Path(r["input"]).name: r["status"] for r in jsonl(never.stdout)} == {
            "SC_rgb_jpeg_dcmtk.dcm": "failed", "MR_small_RLE.dcm": "failed", "CT_small.dcm": "ok"}
        assert never.stderr.count("accepts no presentation context") == 2 and "--decompress lossy" in never.stderr
        lossy = kaapcli("send", src, "--to", f"ANY@127.0.0.1:{port}", "--decompress", "lossy", "--format", "jsonl")
    finally:
        stop(proc)
    assert lossy.returncode == 0, lossy.stderr
    got = {sop_of(p): p for p in out.iterdir()}
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "CT_small.dcm"):
        uid = sop_of(src / name)
        assert same_pixels(pixels_or_bytes(src / name), pixels_or_bytes(got[uid])), name
    assert pydicom.dcmread(got[sop_of(src / "SC_rgb_jpeg_dcmtk.dcm")]).LossyImageCompression == "01"


@contextmanager
def own_orthanc(root: Path, aet: str, **config: object) -> Iterator[Orthanc]:
    """An Orthanc of the test's own (the session one is shared), with ``config`` over loopback defaults."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc not installed")
    peer = Orthanc(aet, free_port(), free_port(), free_port())
    root.mkdir()
    full = {"Name": aet, "DicomAet": peer.aet, "DicomPort": peer.dicom_port, "HttpPort": peer.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"), "HttpBindAddress": "127.0.0.1", "DicomAlwaysAllowStore": True,
            "DicomScpTimeout": 10, **config}
    with run_orthanc(root, full):
        yield peer


@pytest.fixture
def explicit_only_orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc that accepts Explicit VR Little Endian only."""
    with own_orthanc(tmp_path / "orthanc-restricted", "RESTRICTED", UnknownSopClassAccepted=True,
                     AcceptedTransferSyntaxes=["1.2.840.10008.1.2.1"]) as peer:
        yield peer


def test_send_to_explicit_only_orthanc_keeps_every_pixel(explicit_only_orthanc: Orthanc, tmp_path: Path) -> None:
    import requests

    peer = explicit_only_orthanc
    # the byte-order and compression cases, lossy and broken ones included (storescp above gets every file)
    sources = unique_copies(tmp_path / "src", {*BIG_ENDIAN, *RLE, *COMPRESSED, "MR_truncated.dcm", "CT_small.dcm",
                                               "ExplVR_BigEndNoMeta.dcm", "OT-PAL-8-face.dcm", "image_dfl.dcm",
                                               "MR_small_implicit.dcm", "liver_expb.dcm", "SC_rgb_expb_32bit.dcm"})
    sent = kaapcli("send", tmp_path / "src", "--to", peer.dimse, "--format", "jsonl", timeout=300)
    assert sent.returncode == 1 and "Traceback" not in sent.stderr
    received: dict[str, Path] = {}
    (tmp_path / "got").mkdir()
    for n, instance in enumerate(requests.get(f"{peer.rest}/instances", timeout=10).json()):
        path = tmp_path / "got" / f"{n}.dcm"
        path.write_bytes(requests.get(f"{peer.rest}/instances/{instance}/file", timeout=30).content)
        received[sop_of(path)] = path
    transcoded = check_transcoded(jsonl(sent.stdout), sources, received)
    assert set(BIG_ENDIAN + RLE) <= set(transcoded), sorted(set(BIG_ENDIAN + RLE) - set(transcoded))


# --------------------------------------------------------------------------- retrieve: strict SCPs, C-GET, C-MOVE

COMPRESSED = ["GDCMJ2K_TextGBR.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
              "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "SC_rgb_jls_lossy_line.dcm"]


def test_cget_from_orthanc_returns_compressed_objects_as_stored(orthanc, tmp_path: Path) -> None:  # noqa: F811
    """One presentation context per transfer syntax (the stored ones first): Orthanc sends JPEG 2000, JPEG-LS,
    RLE and JPEG objects as it stores them, instead of transcoding (or failing to: "Cannot transcode")."""
    orthanc.clear()
    src = tmp_path / "src"
    src.mkdir()
    study = pydicom.uid.generate_uid()
    for name in COMPRESSED:  # one study, a series per file (several share their UIDs: new ones, bytes kept)
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.PatientID = "CGET"
        ds.save_as(src / name)
    assert kaapcli("send", src, "--to", orthanc.dimse, "-q").returncode == 0
    proc = kaapcli("retrieve", orthanc.dimse, "-k", f"StudyInstanceUID={study}", "-o", tmp_path / "out",
                   "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    [record] = jsonl(proc.stdout)
    assert record["received"] == record["expected"] == len(COMPRESSED)
    got = {sop_of(p): p for p in dicom_files(tmp_path / "out")}
    for name in COMPRESSED:
        sent = src / name
        back = got[sop_of(sent)]
        assert (pydicom.dcmread(back, stop_before_pixels=True).file_meta.TransferSyntaxUID
                == pydicom.dcmread(sent, stop_before_pixels=True).file_meta.TransferSyntaxUID), name
        # the encoded pixel data as stored, byte for byte (DCMTK under Orthanc corrects an OW VR of encapsulated
        # pixel data to OB, so the whole dataset may differ in that one byte)
        assert bytes(pydicom.dcmread(back).PixelData) == bytes(pydicom.dcmread(sent).PixelData), name


@pytest.fixture(scope="module")
def strict_scps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """DCMTK's dcmqrscp and pynetdicom's qrscp app, both loaded with one mock study of two series, and a
    storescp as the third AE (KAAPMOVE) both know as a move destination."""
    root = tmp_path_factory.mktemp("strict")
    third_port, dcmqr_port, qr_port, rx_port = free_port(), free_port(), free_port(), free_port()
    (root / "db").mkdir()
    (root / "third").mkdir()
    (root / "dcmqrscp.cfg").write_text(
        f"NetworkTCPPort = {dcmqr_port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\nkaapmove = (KAAPMOVE, 127.0.0.1, {third_port})\nkaaprx = (KAAPRX, 127.0.0.1, {rx_port})\n"
        "HostTable END\n"
        f"VendorTable BEGIN\nVendorTable END\nAETable BEGIN\nDCMQR {root / 'db'} RW (200, 1024mb) ANY\nAETable END\n")
    (root / "qrscp.ini").write_text(
        f"[DEFAULT]\nae_title: QRSCP\nport: {qr_port}\nmax_pdu: 16382\nacse_timeout: 30\ndimse_timeout: 30\n"
        f"network_timeout: 30\nbind_address: 127.0.0.1\ninstance_location: {root / 'qrinst'}\n"
        f"database_location: {root / 'qr.sqlite'}\nlog_identifier: False\n"
        f"[KAAPMOVE]\naddress: 127.0.0.1\nport: {third_port}\n[KAAPRX]\naddress: 127.0.0.1\nport: {rx_port}\n")
    pytest.importorskip("sqlalchemy")  # pynetdicom's qrscp app needs it
    procs = [subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(root / "dcmqrscp.cfg")], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(root / "qrscp.ini")], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([dcmtk("storescp"), "-aet", "KAAPMOVE", "-od", str(root / "third"), str(third_port)],
                              env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        for port, proc in zip((dcmqr_port, qr_port, third_port), procs, strict=True):
            wait_port(port, proc=proc)
        data = root / "mock"
        assert kaapcli("mock", "-o", data, "--series", "2", "--slices", "4", "--rows", "16", "--columns", "16",
                       "--seed", "11", "-q").returncode == 0
        peers = {"dcmqrscp": f"DCMQR@127.0.0.1:{dcmqr_port}", "qrscp": f"QRSCP@127.0.0.1:{qr_port}"}
        for peer in peers.values():
            sent = kaapcli("send", data, "--to", peer, "-q")
            assert sent.returncode == 0, sent.stderr
        series: dict[str, list[Path]] = {}
        for p in dicom_files(data):
            series.setdefault(str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID), []).append(p)
        yield {"peers": peers, "series": series, "third": root / "third", "rx_port": rx_port}
    finally:
        for proc in procs:
            stop(proc)


@pytest.mark.parametrize("scp", ["dcmqrscp", "qrscp"])
@pytest.mark.parametrize("method", ["get", "move"])
def test_series_retrieve_from_strict_scps(strict_scps, scp: str, method: str, tmp_path: Path) -> None:
    """Only the SeriesInstanceUID given: kaapcli looks the StudyInstanceUID up and sends the full hierarchical key
    (dcmqrscp answered a bare series key with 0 sub-operations and Success, qrscp with 0xC413)."""
    peer = strict_scps["peers"][scp]
    uid, files = next(iter(strict_scps["series"].items()))
    extra = ["--method", "move", "--aet", "KAAPRX", "--port", str(strict_scps["rx_port"]), "--bind", "127.0.0.1"] \
        if method == "move" else []
    proc = kaapcli("retrieve", peer, "-k", f"SeriesInstanceUID={uid}", "-o", tmp_path / "out", "--format", "jsonl",
                   *extra)
    assert proc.returncode == 0, proc.stderr
    [record] = jsonl(proc.stdout)
    assert record["ok"] and record["received"] == record["expected"] == len(files)
    assert {sop_of(p) for p in dicom_files(tmp_path / "out")} == {sop_of(p) for p in files}


@pytest.mark.parametrize("scp", ["dcmqrscp", "qrscp"])
def test_move_to_a_third_ae_counts_the_peers_counters(strict_scps, scp: str, tmp_path: Path) -> None:
    third: Path = strict_scps["third"]
    for old in third.iterdir():
        old.unlink()
    uid, files = next(iter(strict_scps["series"].items()))
    proc = kaapcli("retrieve", strict_scps["peers"][scp], "-k", f"SeriesInstanceUID={uid}", "-o", tmp_path / "out",
                   "--dest", "KAAPMOVE", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    [record] = jsonl(proc.stdout)
    assert record["ok"] and record["completed"] == len(files) and record["received"] == 0
    deadline = time.monotonic() + 10
    while len(list(third.iterdir())) < len(files) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {sop_of(p) for p in third.iterdir()} == {sop_of(p) for p in files}
    unknown = kaapcli("retrieve", strict_scps["peers"][scp], "-k", f"SeriesInstanceUID={uid}", "-o", tmp_path / "x",
                      "--dest", "NOBODY", "--format", "jsonl")
    assert unknown.returncode == 1 and "0xA801" in unknown.stderr


@pytest.mark.parametrize("scp", ["dcmqrscp", "qrscp"])
def test_retrieve_of_nothing_is_not_exit_0(strict_scps, scp: str, tmp_path: Path) -> None:
    peer = strict_scps["peers"][scp]
    proc = kaapcli("retrieve", peer, "-k", "SeriesInstanceUID=1.2.3.4.5.6.7.8", "-o", tmp_path / "out")
    assert proc.returncode == 66 and "no series 1.2.3.4.5.6.7.8" in proc.stderr, proc.stderr
    study = str(pydicom.dcmread(next(iter(strict_scps["series"].values()))[0], stop_before_pixels=True)
                .StudyInstanceUID)
    both = kaapcli("retrieve", peer, "-k", f"StudyInstanceUID={study}", "-o", tmp_path / "all", "--format", "jsonl")
    assert both.returncode == 0, both.stderr
    assert jsonl(both.stdout)[0]["received"] == sum(len(f) for f in strict_scps["series"].values())


def test_rejection_reasons_for_echo_query_and_send(strict_scps) -> None:
    """dcmqrscp rejects an unknown called AE title: echo, query and send all print result, source and reason."""
    port = strict_scps["peers"]["dcmqrscp"].rsplit(":", 1)[1]
    for args in (["echo"], ["query"], ["send", strict_scps["series"][next(iter(strict_scps["series"]))][0], "--to"]):
        proc = kaapcli(*args, f"NOSUCHAE@127.0.0.1:{port}")
        assert proc.returncode == 69, (args, proc.stderr)
        assert ("association rejected (Result: Rejected Permanent; Source: Service User; "
                "Reason: Called AE title not recognised)") in proc.stderr, (args, proc.stderr)


# --------------------------------------------------------------------------- send: truncated files refused locally

def test_truncated_file_is_refused_locally_and_the_batch_goes_on(orthanc, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    """A file cut short in its pixel data: storescu refuses it before sending; so does kaapcli (Orthanc would
    wait 30 s for the rest, then abort the association and fail the files behind it)."""
    orthanc.clear()
    data = tmp_path / "data"
    shutil.copytree(mock_ct, data)
    files = dicom_files(data)
    cut = files[len(files) // 2]
    cut.write_bytes(cut.read_bytes()[:-1000])
    start = time.monotonic()
    for peer in (orthanc.dimse, orthanc.dicomweb):
        orthanc.clear()
        proc = kaapcli("send", data, "--to", peer, "--format", "jsonl", "--timeout", "20")
        assert proc.returncode == 1, proc.stderr
        status = {r["input"]: r for r in jsonl(proc.stdout)}
        assert status.pop(str(cut))["message"] == (
            f"{cut}: not sent: element (7FE0,0010) needs 8192 bytes at byte {cut.stat().st_size - 7192}, "
            f"but the file ends after 7192")
        assert {r["status"] for r in status.values()} == {"ok"} and len(status) == len(files) - 1
        assert len(orthanc.get("/instances")) == len(files) - 1
    assert time.monotonic() - start < 20  # nobody waited for the missing bytes


# --------------------------------------------------------------------------- DICOMweb against Orthanc

def test_qido_wildcards_return_what_curl_returns(orthanc, mock_studies: Path) -> None:  # noqa: F811
    import requests

    orthanc.clear()
    assert kaapcli("send", mock_studies, "--to", orthanc.dimse, "-q").returncode == 0
    for value in ("MOCK*", "MOCK-0003-000?", "*0001", "NOBODY*"):
        url = f"{orthanc.dicomweb}/studies?PatientID={value}"  # the literal characters, as curl sends them
        expected = requests.get(url, timeout=10).json() if requests.get(url, timeout=10).content else []
        proc = kaapcli("query", orthanc.dicomweb, "-k", f"PatientID={value}")
        assert proc.returncode == 0, proc.stderr
        got = jsonl(proc.stdout)
        assert sorted(r["0020000D"]["Value"][0] for r in got) == sorted(r["0020000D"]["Value"][0] for r in expected)
    assert len(jsonl(kaapcli("query", orthanc.dicomweb, "-k", "PatientID=MOCK*").stdout)) == 3


def test_stow_reports_each_files_real_status(orthanc, mock_studies: Path, tmp_path: Path) -> None:  # noqa: F811
    """One file Orthanc cannot store (no StudyInstanceUID): Orthanc answers 400 for the request but lists the 18
    it stored; those are ok, the bad one failed with its FailureReason."""
    orthanc.clear()
    data = tmp_path / "data"
    shutil.copytree(mock_studies, data)
    ds = pydicom.dcmread(dicom_files(data)[0])
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(data / "no-study.dcm")
    proc = kaapcli("send", data, "--to", orthanc.dicomweb, "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    status = {Path(r["input"]).name: r for r in jsonl(proc.stdout)}
    bad = status.pop("no-study.dcm")
    assert bad["status"] == "failed" and "HTTP 400" in bad["message"] and "0xC000" in bad["message"]
    assert len(status) == 18 and {r["status"] for r in status.values()} == {"ok"}
    assert len(orthanc.get("/instances")) == 18


def test_delete_several_series_deletes_or_reports_each(orthanc, mock_ct: Path) -> None:  # noqa: F811
    orthanc.clear()
    assert kaapcli("send", mock_ct, "--to", orthanc.dimse, "-q").returncode == 0
    series = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in dicom_files(mock_ct)})
    assert len(series) == 2
    proc = kaapcli("delete", orthanc.dicomweb, "--series", series[0], "--series", series[1], "--series", "1.2.3.4",
                   "--server-type", "orthanc", "--yes")
    assert proc.returncode == 1, proc.stderr  # two deleted, one not found
    assert orthanc.get("/series") == []
    assert "no series 1.2.3.4" in proc.stderr and proc.stderr.count("/series/") == 2
    again = kaapcli("delete", orthanc.dicomweb, "--series", series[0], "--series", series[1], "--server-type",
                    "orthanc", "--yes")
    assert again.returncode == 66 and again.stderr.count("no series") == 2


# --------------------------------------------------------------------------- DICOMweb credentials

class TokenServer:
    """A DICOMweb stand-in over HTTP that wants ``Authorization: Bearer <token>``: QIDO answers [], STOW-RS refuses a
    request whole (400, no body) when it holds a file of ``bad`` and stores the rest. Records every request."""

    def __init__(self, token: str, bad: set[str]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, str, int]] = []  # method, path, Authorization, parts
        self.stored: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def answer(self, code: int, body: object = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorised(self, parts: int = 0) -> bool:
                auth = self.headers.get("Authorization", "")
                server.requests.append((self.command, self.path, auth, parts))
                if auth != f"Bearer {token}":
                    self.answer(401)
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.authorised():
                    self.answer(200, [])

            def do_POST(self) -> None:  # noqa: N802
                from io import BytesIO

                body = self.rfile.read(int(self.headers["Content-Length"]))
                boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
                parts = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in body.split(b"--" + boundary)[1:-1]]
                if not self.authorised(len(parts)):
                    return
                uids = [str(pydicom.dcmread(BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in parts]
                if bad & set(uids):
                    self.answer(400)
                    return
                server.stored += uids
                self.answer(200, {"00081199": {"vr": "SQ", "Value": [
                    {"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_bearer_token_from_option_and_profile_never_printed(mock_studies: Path, tmp_path: Path) -> None:
    files = dicom_files(mock_studies)
    bad = sop_of(files[7])
    server = TokenServer("s3cret-t0ken", {bad})
    try:
        refused = kaapcli("query", server.url)
        assert refused.returncode == 69 and "HTTP 401" in refused.stderr and "--token" in refused.stderr
        wrong = kaapcli("echo", server.url, "--token", "nope")
        assert wrong.returncode == 69 and "check the bearer token" in wrong.stderr and "nope" not in wrong.stderr
        ok = kaapcli("query", server.url, "-k", "PatientID=MOCK*", "--token", "s3cret-t0ken",
                     env={"KAAPCLI_DEBUG": "1"})
        assert ok.returncode == 0 and "s3cret" not in ok.stderr, ok.stderr
        method, path, auth, _ = server.requests[-1]
        assert method == "GET" and path.startswith("/dicom-web/studies?PatientID=MOCK*&")
        assert auth == "Bearer s3cret-t0ken"
        (tmp_path / "kaapcli.toml").write_text(f'[pacs.web]\ndicomweb = "{server.url}"\ntoken_env = "WEB_TOKEN"\n')
        env = {"WEB_TOKEN": "s3cret-t0ken"}
        assert kaapcli("echo", "web", cwd=tmp_path, env=env).returncode == 0
        shown = kaapcli("config", "show", cwd=tmp_path, env=env)
        assert shown.returncode == 0 and "s3cret" not in shown.stdout, shown.stdout
        server.requests.clear()
        sent = kaapcli("send", mock_studies, "--to", "web", "--format", "jsonl", cwd=tmp_path, env=env)
        assert "s3cret" not in sent.stderr + sent.stdout
        assert sent.returncode == 1, sent.stderr
        status = {r["input"]: r["status"] for r in jsonl(sent.stdout)}
        assert status.pop(str(files[7])) == "failed" and set(status.values()) == {"ok"} and len(status) == 17
        assert sorted(server.stored) == sorted(sop_of(f) for f in files if sop_of(f) != bad)
        # the batch of 18 was refused whole, then halved until the bad file was alone
        assert [parts for method, _, _, parts in server.requests if method == "POST"][:3] == [18, 9, 4]
        assert {auth for *_, auth, _ in server.requests} == {"Bearer s3cret-t0ken"}
    finally:
        server.close()


def test_basic_auth_with_orthanc(mock_ct: Path, tmp_path: Path) -> None:
    with own_orthanc(tmp_path / "orthanc-auth", "AUTH", AuthenticationEnabled=True,
                     RegisteredUsers={"kaap": "pw-1234"}, Plugins=[str(DICOMWEB_PLUGIN)],
                     DicomWeb={"Enable": True, "Root": "/dicom-web/"}) as peer:
        (tmp_path / "kaapcli.toml").write_text(f'[pacs.auth]\ndicomweb = "{peer.dicomweb}"\nusername = "kaap"\n'
                                               'password_env = "AUTH_PW"\n')
        sent = kaapcli("send", mock_ct, "--to", "auth", "-q", cwd=tmp_path, env={"AUTH_PW": "pw-1234"})
        assert sent.returncode == 0, sent.stderr
        found = kaapcli("query", "auth", "-l", "series", cwd=tmp_path, env={"AUTH_PW": "pw-1234"})
        assert found.returncode == 0 and len(jsonl(found.stdout)) == 2, found.stderr
        wrong = kaapcli("query", "auth", cwd=tmp_path, env={"AUTH_PW": "wrong"})
        assert wrong.returncode == 69 and "HTTP 401" in wrong.stderr and "wrong" not in wrong.stderr


# --------------------------------------------------------------------------- Modality Worklist

WORKLIST_ITEM = """(0008,0005) CS [ISO_IR 100]
(0008,0050) SH [{accession}]
(0010,0010) PN [{name}]
(0010,0020) LO [{patient}]
(0020,000d) UI [{study}]
(0032,1060) LO [{what}]
(0040,1001) SH [RP-{accession}]
(0040,0100) SQ (Sequence with undefined length)
(fffe,e000) na (Item with undefined length)
(0008,0060) CS [{modality}]
(0040,0001) AE [{station}]
(0040,0002) DA [{date}]
(0040,0003) TM [090000]
(0040,0007) LO [{what}]
(0040,0009) SH [SPS-{accession}]
(fffe,e00d) na (ItemDelimitationItem)
(fffe,e0dd) na (SequenceDelimitationItem)
"""


@pytest.fixture
def wlmscpfs(tmp_path: Path, mock_studies: Path) -> Iterator[str]:
    """DCMTK's worklist SCP over two worklist files made with dump2dcm: a CT step for the second mock study (its
    accession number and study UID) and an MR step for a patient kaapcli's mock has not."""
    ds = pydicom.dcmread(sorted(dicom_files(mock_studies))[-1], stop_before_pixels=True)
    items = [dict(accession=str(ds.AccessionNumber), name=str(ds.PatientName), patient=str(ds.PatientID),
                  study=str(ds.StudyInstanceUID), what="CT chest", modality="CT", station="CTSCANNER", date="20261204"),
             dict(accession="ACC-MR-1", name="Other^Patient", patient="WL-0002", study=pydicom.uid.generate_uid(),
                  what="MR head", modality="MR", station="MRSCANNER", date="20261205")]
    aedir = tmp_path / "worklists" / "WLM"
    aedir.mkdir(parents=True)
    (aedir / "lockfile").touch()  # wlmscpfs wants it in each AE directory
    for n, item in enumerate(items):
        (tmp_path / f"{n}.dump").write_text(WORKLIST_ITEM.format(**item))
        subprocess.run([dcmtk("dump2dcm"), str(tmp_path / f"{n}.dump"), str(aedir / f"{n}.wl")], check=True,
                       capture_output=True)
    port = free_port()
    proc = subprocess.Popen([dcmtk("wlmscpfs"), "-dfp", str(tmp_path / "worklists"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        yield f"WLM@127.0.0.1:{port}"
    finally:
        stop(proc)


def test_worklist_query_as_json_lines(wlmscpfs: str) -> None:
    every = kaapcli("query", wlmscpfs, "--worklist")
    assert every.returncode == 0, every.stderr
    records = jsonl(every.stdout)
    assert len(records) == 2 and "ACC-MR-1" in {r["00080050"]["Value"][0] for r in records}
    step = next(r for r in records if r["00080050"]["Value"] == ["ACC-MR-1"])["00400100"]["Value"][0]
    assert step["00080060"]["Value"] == ["MR"] and step["00400001"]["Value"] == ["MRSCANNER"]
    ct = jsonl(kaapcli("query", wlmscpfs, "--worklist", "-k", "Modality=CT").stdout)
    assert len(ct) == 1 and ct[0]["00400100"]["Value"][0]["00400001"]["Value"] == ["CTSCANNER"]
    # wlmscpfs matches dates by range, station AE titles by single value, patient names by wildcard
    dated = jsonl(kaapcli("query", wlmscpfs, "--worklist", "-k", "ScheduledProcedureStepStartDate=20261205-",
                          "-k", "ScheduledStationAETitle=MRSCANNER", "-k", "PatientName=Other*").stdout)
    assert [r["00100020"]["Value"] for r in dated] == [["WL-0002"]]
    assert jsonl(kaapcli("query", wlmscpfs, "--worklist", "-k", "PatientID=NOBODY").stdout) == []
    web = kaapcli("query", "http://127.0.0.1:9/dicom-web", "--worklist")
    assert web.returncode == 2 and "DIMSE" in web.stderr


def test_collect_takes_its_list_from_a_worklist(wlmscpfs: str, orthanc, mock_studies: Path, tmp_path: Path) -> None:  # noqa: F811
    orthanc.clear()
    assert kaapcli("send", mock_studies, "--to", orthanc.dimse, "-q").returncode == 0
    worklist = tmp_path / "ct.jsonl"
    query = kaapcli("query", wlmscpfs, "--worklist", "-k", "Modality=CT")
    assert query.returncode == 0, query.stderr
    worklist.write_text(query.stdout)
    proc = kaapcli("collect", worklist, "--from", orthanc.dimse, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    study = jsonl(query.stdout)[0]["0020000D"]["Value"][0]
    got = dicom_files(tmp_path / "out" / "studies")
    assert len(got) == 6 and {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in got} == {study}
