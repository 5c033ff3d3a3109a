"""Networking pieces that need no peer: PEER parsing, query identifiers, context planning, the ledger."""

from __future__ import annotations

import json
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
