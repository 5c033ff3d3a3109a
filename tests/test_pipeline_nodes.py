"""End to end through `kaapcli receive` with DCMTK's storescu as the sender: hostile AE titles and PatientIDs,
and the three examples of examples/pipelines (dcm-processor service, DicomNode PET/CT node, Kaapana
trigger_rule.json)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT, dcmtk, dicom_files, kaapcli, wait_for
from peers import orthanc, receiver, storescp  # noqa: F401 - fixtures

pytestmark = pytest.mark.network
EXAMPLES = ROOT / "examples" / "pipelines"


def storescu(port: int, *paths: Path, calling: str = "STORESCU", called: str = "KAAPCLI",
             verbose: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), *(["-v"] if verbose else []), "-aet", calling, "-aec", called,
                           "+sd", "+r", "+sp", "*.dcm",
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True, text=True, timeout=60)


def runs(journal: Path) -> list[dict]:
    return [json.loads(line) for line in kaapcli("runs", "--journal", journal).stdout.splitlines()]


@pytest.fixture
def kaapcli_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules run `kaapcli ...`: the one of this interpreter."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def mock(out: Path, modality: str, seed: int, slices: int = 4) -> Path:
    proc = kaapcli("mock", "-o", out, "--modality", modality, "--seed", str(seed), "--slices", str(slices),
                   "--rows", "16", "--columns", "16", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


# --------------------------------------------------------------------------- hostile values off the network

HOSTILE_AETS = ["`touch PWNED`", "$(touch PWNED)", "../../escape", ";touch PWNED"]
HOSTILE_IDS = ["$(touch PWNED)", "../../../escape", "a\0b/../../nul", "-" + "P" * 299]


def test_hostile_aets_and_patient_ids_run_nothing_and_stay_inside_out(receiver, tmp_path: Path) -> None:  # noqa: F811
    src = mock(tmp_path / "src", "CT", 21, slices=1)
    series = []
    for n, patient_id in enumerate(HOSTILE_IDS):
        for m, path in enumerate(dicom_files(src)):
            ds = pydicom.dcmread(path)
            ds.PatientID = patient_id
            ds.SeriesInstanceUID = f"2.25.{n + 1}{m}"
            ds.SOPInstanceUID = f"2.25.{n + 1}{m}1"
            dest = tmp_path / "send" / str(n) / f"{m}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dest)
        series.append(dest.parent)
    marks = tmp_path / "marks"
    marks.mkdir()
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([
        {"name": "touch", "run": ["touch", "{out}/{patient_id}.{calling_aet}.{called_aet}"]},
        {"name": "mkdir", "run": ["mkdir", "-p", "{out}/{calling_aet}/{patient_id}"]},
        {"name": "env", "run": ["sh", "-c", 'printf "%s|%s" "$KAAPCLI_CALLING_AET" "$KAAPCLI_RAW_PATIENT_ID" '
                                            '> "$1"', "sh", "{out}/{series_uid}.env"]}]))
    journal = tmp_path / "j.jsonl"
    rx = receiver("--series-timeout", "0.3", "--rules", str(rules), "--journal", str(journal),
                  "--on-complete", f"touch {marks}/{{calling_aet}}-{{called_aet}}-{{series_uid}}")
    for aet, path in zip(HOSTILE_AETS, series, strict=True):
        sent = storescu(rx.port, path, calling=aet, called="../../called")
        assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(list(marks.iterdir())) == len(series)
                    and len([r for r in runs(journal) if r["status"] == "ok"]) == 3 * len(series))
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    outside = [p for p in tmp_path.rglob("*") if any(s in p.name for s in ("escape", "nul", "PPPP", "called"))
               and rx.out not in p.parents and marks not in p.parents and not p.is_relative_to(tmp_path / "send")]
    assert outside == []
    assert len(list(marks.iterdir())) == len(series)
    for mark in marks.iterdir():
        assert "/" not in mark.name and not mark.name.startswith("-")
    envs = sorted(rx.out.rglob("*.env"))
    assert len(envs) == len(series)
    raw = {p.read_text().split("|", 1)[1] for p in envs}
    assert raw == {i.replace("\0", "") for i in HOSTILE_IDS}  # the raw value reaches the environment intact


def test_receive_refuses_placeholders_in_an_on_complete_script(tmp_path: Path) -> None:
    proc = kaapcli("receive", "-o", tmp_path / "rx", "--port", "0",
                   "--on-complete", "sh -c 'echo {calling_aet} >> log'", timeout=30)
    assert proc.returncode == 2 and "inside the script" in proc.stderr and "KAAPCLI_CALLING_AET" in proc.stderr
    assert not (tmp_path / "rx").exists()


# --------------------------------------------------------------------------- dcm-processor

def test_dcm_processor_service_end_to_end(receiver, tmp_path: Path, kaapcli_on_path: None) -> None:  # noqa: F811
    service = tmp_path / "service"
    shutil.copytree(EXAMPLES / "dcm-processor", service)
    ct, mr = mock(tmp_path / "ct", "CT", 31, slices=3), mock(tmp_path / "mr", "MR", 32, slices=3)
    journal = tmp_path / "j.jsonl"
    rx = receiver("--series-timeout", "0.5", "--rules", str(service / "settings.json"), "--journal", str(journal))
    sent = storescu(rx.port, ct, mr)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(list(rx.out.rglob("report.json"))) == 1)
    time.sleep(1.0)  # the MR series' callback has said no by now
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    [report] = list(rx.out.rglob("report.json"))
    added = json.loads(report.read_text())
    assert added["series-stats"]["instances"] == 3 and added["series-stats"]["modality"] == "CT"
    stats = json.loads(Path(added["series-stats"]["stats"]).read_text())
    assert stats["grid"] == [16, 16] and stats["decided"] == {"series-stats": {"modality": "CT", "instances": 3}}
    assert len(list(report.parent.glob("nifti/*.nii.gz"))) == 1
    by_series: dict[str, list[tuple[str, str]]] = {}
    for r in runs(journal):
        by_series.setdefault(r["series_uid"], []).append((r["rule"], r["status"]))
    assert sorted(map(sorted, by_series.values())) == [  # MR: the callback said no, its dependents did not run
        [("nifti", "ok"), ("report", "ok"), ("series-stats", "ok")], [("nifti", "skipped"), ("report", "skipped")]]


# --------------------------------------------------------------------------- DicomNode

def test_dicomnode_petct_node_end_to_end(receiver, storescp, tmp_path: Path, kaapcli_on_path: None,  # noqa: F811
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    ct, pet, mr = mock(data / "ct", "CT", 41), mock(data / "pet", "PT", 41), mock(data / "mr", "MR", 42, 2)
    config = tmp_path / "kaapcli.toml"  # the sender's SCP: where the node replies
    config.write_text(f'[pacs.modality]\naet = "MODALITY"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    monkeypatch.setenv("KAAPCLI_CONFIG", str(config))
    journal = tmp_path / "j.jsonl"
    series_timeout = 20.0  # completeness, not quiet time, must complete the inputs
    rx = receiver("--series-timeout", str(series_timeout), "--rules", str(EXAMPLES / "dicomnode" / "rules.json"),
                  "--journal", str(journal), "--reject-unmatched")
    start = time.monotonic()
    rejected = storescu(rx.port, mr, calling="MODALITY", verbose=True)
    assert (rejected.stdout + rejected.stderr).count("Warning: DataSetDoesNotMatchSOPClass") == 2  # 0xB007
    for series in (ct, pet):
        assert storescu(rx.port, series, calling="MODALITY").returncode == 0
    assert wait_for(lambda: {r["rule"]: r["status"] for r in runs(journal)}.get("petct:reply") == "ok",
                    timeout=series_timeout * 0.9)
    assert time.monotonic() - start < series_timeout  # complete by count, not by timeout
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    assert "matches no rule (--reject-unmatched): not stored" in stderr
    assert not [p for p in rx.out.rglob("*.dcm") if "MR" in str(pydicom.dcmread(p, stop_before_pixels=True).Modality)]
    replied = dicom_files(storescp.out) or sorted(storescp.out.rglob("*"))
    assert len(replied) == 4
    for path in replied:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Modality == "PT" and ds.SeriesDescription == "PET for PET/CT fusion"
    assert {ds.SeriesInstanceUID for ds in map(pydicom.dcmread, replied)} != {
        pydicom.dcmread(p).SeriesInstanceUID for p in dicom_files(pet)}


# --------------------------------------------------------------------------- Kaapana

def test_kaapana_trigger_rule_and_called_aet_dataset_end_to_end(receiver, tmp_path: Path,  # noqa: F811
                                                                 kaapcli_on_path: None) -> None:
    example = EXAMPLES / "kaapana"
    ct = mock(tmp_path / "ct", "CT", 51, slices=2)
    journal, index = tmp_path / "j.jsonl", tmp_path / "index.db"
    rx = receiver("--series-timeout", "0.5", "--rules", str(example / "dag_service_extract_metadata_trigger_rule.json"),
                  "--dags", str(example / "dags.json"), "--journal", str(journal), "--index", str(index))
    assert storescu(rx.port, ct, called="lung-study").returncode == 0  # dcmsend --call <dataset>
    assert wait_for(lambda: any(r["status"] == "ok" for r in runs(journal)))
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    [run] = runs(journal)
    assert run["rule"] == "service-extract-metadata" and run["status"] == "ok"
    # (the run state of each OUT sits beside it, hidden, as a shell's `metadata/*/*.json` leaves it out)
    assert len([p for p in rx.out.rglob("metadata/*/*.json") if not p.parent.name.startswith(".")]) == 1
    members = kaapcli("dataset", "show", "lung-study", "--index", index, "--format", "uids")
    assert members.returncode == 0 and len(members.stdout.split()) == 1, members.stderr


# --------------------------------------------------------------------------- send --verify (Kaapana's check_arrival)

def test_send_verify_confirms_arrival_by_c_find(orthanc, mock_ct: Path, tmp_path: Path) -> None:  # noqa: F811
    from kaapcli.core.net.dimse import verify_arrival
    from kaapcli.core.net.peers import Timeouts, parse_peer

    orthanc.clear()
    series = sorted({p.parent for p in dicom_files(mock_ct)})
    proc = kaapcli("send", series[0], "--to", orthanc.dimse, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert f"verified: {orthanc.aet}" in proc.stderr and "lists all 8 instances" in proc.stderr
    never_sent = dicom_files(series[1])[:2]
    missing = verify_arrival(never_sent, parse_peer(orthanc.dimse), calling_aet="KAAPCLI", timeouts=Timeouts())
    assert sorted(missing) == never_sent and all("does not list SOP Instance" in m for m in missing.values())
