"""Networking pieces that need no peer: PEER parsing, query identifiers, context planning, the ledger."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kaapcli.core.config import Config
from kaapcli.core.net import dimse
from kaapcli.core.net.ledger import Ledger
from kaapcli.core.net.peers import Timeouts, parse_peer
from kaapcli.core.net.query import Query, referenced_series, retrieve_query, uids_of
from kaapcli.exitcodes import ConfigError, UsageError


def test_parse_dimse_peer() -> None:
    peer = parse_peer("ORTHANC@pacs.example.org:4242")
    assert (peer.aet, peer.host, peer.port, peer.web) == ("ORTHANC", "pacs.example.org", 4242, False)
    assert peer.address == "ORTHANC@pacs.example.org:4242"


def test_parse_url_peer_keeps_credentials_out_of_the_label() -> None:
    peer = parse_peer("https://user:secret@pacs.example.org/dicom-web/")
    assert peer.web and peer.url == "https://pacs.example.org/dicom-web"
    assert peer.auth() == ("user", "secret")
    assert "secret" not in str(peer)


@pytest.mark.parametrize("text", ["nohost", "AET@host", "A@h:99999", "WAYTOOLONGAETITLE17@h:104", "http://"])
def test_bad_peers_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_peer(text, Config())


@pytest.mark.parametrize("aet", ["WAYTOOLONGAETITLE17", "ÄE", "A\x01B", "A\\B"])
def test_ae_titles_outside_the_default_repertoire_are_usage_errors(aet: str, mock_ct: Path) -> None:
    """AE is printable ASCII without backslash (PS3.5): any other title, given as a peer or an option, is a one-line
    usage error naming it (a non-ASCII one was an internal error when it was encoded on the wire)."""
    import subprocess
    import sys

    with pytest.raises(UsageError, match="printable ASCII"):
        parse_peer(f"{aet}@127.0.0.1:104")
    one = str(next(mock_ct.rglob("*.dcm")))
    for args in (["send", one, "--to", f"{aet}@127.0.0.1:1"], ["send", one, "--to", "RX@127.0.0.1:1", "--calling-aet",
                                                                aet], ["echo", f"{aet}@127.0.0.1:1"]):
        proc = subprocess.run([sys.executable, "-m", "kaapcli", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "printable ASCII" in proc.stderr and "Traceback" not in proc.stderr, args


def test_profile_peer_and_preference() -> None:
    cfg = Config(profiles={"pacs": {
        "both": {"aet": "DCM4CHEE", "host": "h", "port": 11112, "dicomweb": "http://h:8080/rs", "kind": "dcm4chee"},
        "web": {"aet": "X", "host": "h", "port": 104, "dicomweb": "http://h/rs", "prefer": "dicomweb"},
        "bad": {"kind": "pacsomatic", "dicomweb": "http://h"},
    }})
    both = parse_peer("both", cfg)
    assert not both.web and both.kind == "dcm4chee" and both.url == "http://h:8080/rs"
    assert parse_peer("web", cfg).web
    with pytest.raises(ConfigError):
        parse_peer("bad", cfg)


def test_timeouts() -> None:
    assert Timeouts.of(3) == Timeouts(connect=3, acse=3, dimse=3, network=3)
    assert Timeouts.of(None, 1).connect == 1


def test_query_identifier_and_qido_params() -> None:
    q = Query.parse("series", ["Modality=CT", "0010,0020=LUNG1-*", "StudyDate=20200101-20201231"],
                    ["BodyPartExamined"], limit=5)
    ds = q.identifier()
    assert ds.QueryRetrieveLevel == "SERIES"
    assert ds.Modality == "CT" and ds.PatientID == "LUNG1-*" and ds.StudyDate == "20200101-20201231"
    assert "SeriesInstanceUID" in ds and ds.SeriesInstanceUID in (None, "")
    assert "BodyPartExamined" in ds
    params = dict(q.qido_params())
    assert params["Modality"] == "CT" and params["limit"] == "5"
    assert ("includefield", "BodyPartExamined") in q.qido_params()
    assert Query.parse("instance", [], []).identifier().QueryRetrieveLevel == "IMAGE"


@pytest.mark.parametrize("keys", [["NoSuchKeyword=1"], ["Modality"]])
def test_query_rejects_bad_keys(keys: list[str]) -> None:
    with pytest.raises(UsageError):
        Query.parse("study", keys, [])


def test_retrieve_query_from_a_query_record() -> None:
    record = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
              "00080060": {"vr": "CS", "Value": ["CT"]}}
    uids = uids_of(record)
    q = retrieve_query(uids)
    assert q.level == "series" and q.keys == {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}
    with pytest.raises(UsageError):
        retrieve_query({})


def test_referenced_series_of_seg_and_rtstruct() -> None:
    from pydicom.dataset import Dataset

    seg = Dataset()
    seg.StudyInstanceUID = "1.2"
    ref = Dataset()
    ref.SeriesInstanceUID = "1.2.3"
    seg.ReferencedSeriesSequence = [ref]
    assert referenced_series(seg) == [{"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"}]
    rt = Dataset()
    rt.StudyInstanceUID = "9.9"
    series, study, frame = Dataset(), Dataset(), Dataset()
    series.SeriesInstanceUID = "9.9.1"
    study.ReferencedSOPInstanceUID = "9.8"
    study.RTReferencedSeriesSequence = [series]
    frame.RTReferencedStudySequence = [study]
    rt.ReferencedFrameOfReferenceSequence = [frame]
    assert referenced_series(rt) == [{"StudyInstanceUID": "9.8", "SeriesInstanceUID": "9.9.1"}]


def _inst(sop_class: str, syntax: str, n: int = 0) -> dimse.Instance:
    return dimse.Instance(Path(f"/x/{sop_class}-{n}"), sop_class, f"1.{n}", syntax, 10, True)


def test_contexts_propose_own_syntax_plus_uncompressed_fallbacks() -> None:
    ct, jpeg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.50"
    pairs = dimse.contexts_for([_inst(ct, dimse.EXPLICIT_LE), _inst(ct, jpeg, 1)])
    assert pairs == [(ct, dimse.EXPLICIT_LE), (ct, dimse.IMPLICIT_LE), (ct, jpeg)]


def test_plan_splits_past_128_contexts_and_over_associations() -> None:
    many = [_inst(f"1.2.3.{i}", dimse.EXPLICIT_LE, i) for i in range(100)]  # 2 contexts each
    jobs = dimse.plan(many)
    assert len(jobs) == 2 and all(len(dimse.contexts_for(j)) <= 128 for j in jobs)
    assert sorted(i.sop_instance for j in jobs for i in j) == sorted(i.sop_instance for i in many)
    one_class = [_inst("1.2.3", dimse.EXPLICIT_LE, i) for i in range(10)]
    assert [len(j) for j in dimse.plan(one_class, associations=3)] == [4, 4, 2]


def test_ledger_survives_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "sent.jsonl"
    ledger = Ledger(path)
    ledger.add("1.2.3", "X@h:1")
    ledger.close()
    with open(path, "a") as fh:
        fh.write('{"sop_instance_uid": "4.5')  # a crash mid-line
    again = Ledger(path)
    assert "1.2.3" in again and "4.5" not in again
    again.add("6.7", "X@h:1")
    again.close()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    assert {d["sop_instance_uid"] for d in lines} == {"1.2.3", "6.7"}


def test_scan_reads_file_meta(mock_ct: Path) -> None:
    path = sorted(mock_ct.rglob("*.dcm"))[0]
    inst = dimse.scan(path)
    assert inst.has_meta and inst.sop_class == "1.2.840.10008.5.1.4.1.1.2" and inst.syntax == dimse.EXPLICIT_LE
    assert inst.sop_instance == path.stem


# --------------------------------------------------------------------------- the plain-socket upper layer (ul.py)

def test_read_meta_agrees_with_pydicom(mock_ct: Path) -> None:
    import pydicom
    from pydicom.filereader import read_file_meta_info

    from kaapcli.core.net import ul

    path = sorted(mock_ct.rglob("*.dcm"))[0]
    values, offset = ul.read_meta(path)
    meta = read_file_meta_info(path)
    assert values["00020002"] == meta.MediaStorageSOPClassUID and values["00020010"] == meta.TransferSyntaxUID
    # the dataset starts right after the file meta: the bytes pydicom reads as the first dataset element
    first = next(iter(pydicom.dcmread(path, stop_before_pixels=True)))
    tag = first.tag.group.to_bytes(2, "little") + first.tag.elem.to_bytes(2, "little")
    assert path.read_bytes()[offset:offset + 4] == tag
    assert dimse.scan(path).offset == offset


def test_file_meta_is_valid_part10(tmp_path: Path) -> None:
    from pydicom.filereader import read_file_meta_info

    from kaapcli.core import dicom

    data = dicom.encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", dimse.EXPLICIT_LE, "SENDER")
    (tmp_path / "meta").write_bytes(data)
    meta = read_file_meta_info(tmp_path / "meta")
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4" and meta.TransferSyntaxUID == dimse.EXPLICIT_LE
    assert meta.SourceApplicationEntityTitle == "SENDER" and meta.FileMetaInformationGroupLength == len(data) - 144


@pytest.fixture()
def rx(tmp_path: Path):
    from kaapcli.core.net.scp import Receiver

    receiver = Receiver(tmp_path / "rx", port=0, timeouts=Timeouts.of(5))
    receiver.start()
    yield receiver
    receiver.stop(grace=2)


def test_ul_send_fragmented_and_pynetdicom_interop(rx, mock_ct: Path) -> None:
    """Our SCU in tiny PDUs with requests outstanding, pynetdicom's SCU (C-ECHO, C-STORE) → our SCP: identical
    files, no spool left."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from kaapcli.core.net import ul

    files = sorted(mock_ct.rglob("*.dcm"))[:3]
    peer = parse_peer(f"RX@127.0.0.1:{rx.port}")
    inst, other = dimse.scan(files[0]), dimse.scan(files[2])
    scu = ul.StoreSCU(peer, "TINY", Timeouts.of(5), dimse.contexts_for([inst]))
    scu.connect()
    assert scu.window == ul.WINDOW  # our SCP grants the asynchronous operations window proposed
    scu.max_data = 1000  # many P-DATA-TF per dataset
    sent = [scu.store(i.sop_class, i.sop_instance, i.syntax, (i.path, i.offset)) for i in (inst, other)]
    assert sent == [(1, []), (2, [])]  # both sent before any response was read
    assert sorted(scu.drain()) == [(1, ul.StoreStatus(0)), (2, ul.StoreStatus(0))] and not scu.outstanding
    scu.release()

    ae = AE("PYNETDICOM")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, dimse.IMPLICIT_LE)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="RX")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(pydicom.dcmread(files[1])).Status == 0  # re-encoded as implicit VR by pynetdicom
    assoc.release()

    stored = {p.stem: p for p in (rx.out).rglob("*.dcm") if not p.name.startswith(".")}
    assert stored.keys() == {f.stem for f in files} and rx.stored == 3
    received = stored[files[0].stem]
    assert received.read_bytes()[ul.read_meta(received)[1]:] == files[0].read_bytes()[inst.offset:]
    got = pydicom.dcmread(stored[files[1].stem])
    assert got.file_meta.TransferSyntaxUID == dimse.IMPLICIT_LE
    assert got.file_meta.SourceApplicationEntityTitle == "PYNETDICOM"
    assert got.PixelData == pydicom.dcmread(files[1]).PixelData
    assert partial_datasets(rx.out) == []


def test_send_walks_the_structure_of_files_scanned_without_it(rx, mock_ct: Path, tmp_path: Path) -> None:
    """``send`` scans without the walk over the element headers, which then runs as each file's turn comes: a
    truncated file fails with the scan's message and exit code 65, and the files around it are stored."""
    from kaapcli.exitcodes import KaapcliError

    files = sorted(mock_ct.rglob("*.dcm"))[:3]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(files[1].read_bytes()[:-1000])
    with pytest.raises(KaapcliError) as refused:
        dimse.scan(cut)
    instances = [dimse.scan(path, check=False) for path in (files[0], cut, files[2])]
    assert not any(inst.checked for inst in instances) and dimse.scan(files[0]).checked
    results = {r.input: r for r in dimse.send(instances, parse_peer(f"RX@127.0.0.1:{rx.port}"), calling_aet="T",
                                               timeouts=Timeouts.of(5), on_result=lambda result: None)}
    failed = results.pop(str(cut))
    assert failed.status == "failed" and failed.code == 65 and failed.message == f"{cut}: {refused.value.message}"
    assert [r.status for r in results.values()] == ["ok", "ok"] and rx.stored == 2


def test_receiver_goes_on_after_its_output_tree_is_deleted(rx, mock_ct: Path) -> None:
    """Deleting OUT (spool directory and the spool files made ahead included) while receiving costs nothing: the
    next association's files are all stored, in a tree made again."""
    import time

    files = sorted(mock_ct.rglob("*.dcm"))[:3]
    peer = parse_peer(f"RX@127.0.0.1:{rx.port}")

    def send(paths: list[Path]) -> list[str]:
        results = dimse.send([dimse.scan(p) for p in paths], peer, calling_aet="T", timeouts=Timeouts.of(5),
                             on_result=lambda result: None)
        return [r.status for r in results]

    assert send(files[:1]) == ["ok"]
    deadline = time.monotonic() + 5
    while len(list((rx.out / ".kaapcli" / "incoming").iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # spool files made ahead, about to be deleted with the tree
    shutil.rmtree(rx.out)
    assert send(files) == ["ok"] * 3
    stored = sorted(p.name for p in rx.out.rglob("*.dcm"))
    assert stored == sorted(p.name for p in files)


def test_ul_abort_mid_dataset_stores_nothing(rx, mock_ct: Path) -> None:
    import time

    from kaapcli.core.net import ul

    inst = dimse.scan(sorted(mock_ct.rglob("*.dcm"))[0])
    scu = ul.StoreSCU(parse_peer(f"RX@127.0.0.1:{rx.port}"), "ABORTER", Timeouts.of(5), dimse.contexts_for([inst]))
    scu.connect()
    context_id = scu.accepted[(inst.sop_class, inst.syntax)]
    scu._send(context_id, 0x01, ul.c_store_rq(1, inst.sop_class, inst.sop_instance))
    scu._send_pdv(context_id, 0x00, inst.path.read_bytes()[inst.offset:inst.offset + 1000])  # not the last fragment
    deadline = time.monotonic() + 5
    while not partial_datasets(rx.out) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(partial_datasets(rx.out)) == 1  # being written as it arrives
    scu.abort()
    while partial_datasets(rx.out) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial_datasets(rx.out) == [] and rx.stored == 0 and not list(rx.out.rglob("*.dcm"))


def partial_datasets(out: Path) -> list[Path]:
    """Spool files holding data (the empty ones are created ahead for the next datasets)."""
    found = []
    for path in (out / ".kaapcli" / "incoming").iterdir():
        try:
            if path.stat().st_size:
                found.append(path)
        except FileNotFoundError:  # removed since listed
            pass
    return found


def test_spool_creates_ahead_and_cleans_up(tmp_path: Path) -> None:
    import time

    from kaapcli.core.net import ul

    spool = ul.Spool(tmp_path)
    deadline = time.monotonic() + 5
    while len(list(tmp_path.iterdir())) < ul.Spool.AHEAD and time.monotonic() < deadline:
        time.sleep(0.01)
    path, fd = spool.take()
    os.write(fd, b"data")
    os.close(fd)
    spool.close()
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"data"


def test_writer_remakes_a_series_directory_moved_away(mock_ct: Path, tmp_path: Path) -> None:
    """The writer makes each directory once; one moved away meanwhile (a rule took the series) is made again."""
    from kaapcli.core.net.scp import StoreWriter

    writer = StoreWriter(tmp_path / "out")
    first, second = sorted(mock_ct.rglob("*.dcm"))[:2]
    for src in (first, second):
        shutil.copy(src, tmp_path / "spooled")
        dest, _ = writer.place(tmp_path / "spooled")
        assert dest.read_bytes() == src.read_bytes()
        shutil.rmtree(dest.parent)


# --------------------------------------------------------------------------- the receiver's structure check

# pydicom test files whose structure is broken (truncated, an item longer than its sequence, a dataset in implicit
# VR behind an explicit transfer syntax): the check refuses them, as a receiver must
BROKEN = {"MR_truncated.dcm", "rtplan_truncated.dcm", "DICOMDIR-nooffset", "SC_rgb_jpeg.dcm"}


def _dataset_of(path: Path) -> tuple[str, bytes] | None:
    from kaapcli.core.net import ul

    try:
        meta, offset = ul.read_meta(path)
    except (ValueError, OSError, IndexError):
        return None
    return (meta["00020010"], path.read_bytes()[offset:]) if meta.get("00020010") else None


def test_structure_check_of_every_pydicom_test_file() -> None:
    """Every well-formed file passes in any transfer syntax (implicit/explicit LE, big endian, deflated,
    encapsulated), the broken ones fail; fed in odd-sized fragments, the values found are those of one piece."""
    from conftest import pydicom_test_files

    from kaapcli.core.net import ul
    from kaapcli.core.net.scp import _sequence_tags

    wanted = {0x00080016, 0x00080018, 0x0020000E}
    refused, syntaxes = set(), set()
    for path in pydicom_test_files():
        found = _dataset_of(path)
        if found is None:
            continue
        syntax, data = found
        whole = ul.DatasetChecker(syntax, wanted, _sequence_tags())
        pieces = ul.DatasetChecker(syntax, wanted, _sequence_tags())
        try:
            whole.feed(data)
            values = whole.finish()
        except ul.Malformed:
            refused.add(path.name)
            continue
        view = memoryview(data)
        for start in range(0, len(data), 4093):
            pieces.feed(view[start:start + 4093])
        assert pieces.finish() == values, path.name
        syntaxes.add(syntax)
    assert refused == BROKEN
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"} <= syntaxes


def test_structure_check_byte_by_byte_and_its_messages() -> None:
    import pydicom.data

    from kaapcli.core.net import ul

    syntax, data = _dataset_of(Path(pydicom.data.get_testdata_file("CT_small.dcm")))  # type: ignore[misc]
    checker = ul.DatasetChecker(syntax, {0x00080018})
    for i in range(len(data)):  # every header cut at every place
        checker.feed(data[i:i + 1])
    assert checker.finish()[0x00080018].rstrip(b"\0") == b"1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    for cut, message in ((len(data) - 3, "claims"), (len(data) + 1, None)):
        checker = ul.DatasetChecker(syntax)
        checker.feed((data + b"\x10")[:cut])
        if message is None:
            with pytest.raises(ul.Malformed, match="ends inside an element header"):
                checker.finish()
        else:
            with pytest.raises(ul.Malformed, match=message):
                checker.finish()
