"""kaapcli collect against Orthanc: find, retrieve, anonymize, forward to storescp; resumable."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_files, kaapcli
from peers import orthanc, storescp  # noqa: F401 - fixtures

pytestmark = pytest.mark.network


def test_collect_worklist_from_orthanc(orthanc, storescp, mock_studies: Path, tmp_path: Path) -> None:  # noqa: F811
    orthanc.clear()
    assert kaapcli("send", mock_studies, "--to", orthanc.dimse, "-q").returncode == 0
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(mock_studies)),
                     key=lambda ds: ds.AccessionNumber)
    first, last = headers[0], headers[-1]
    worklist = tmp_path / "worklist.csv"
    worklist.write_text("AccessionNumber,PatientID,StudyDate,note\n"
                        f"{first.AccessionNumber},,,by accession\n"
                        f",{last.PatientID},{last.StudyDate[:4]}-{last.StudyDate[4:6]}-{last.StudyDate[6:]},by date\n"
                        "NOPE123,,,missing\n")
    out = tmp_path / "out"
    proc = kaapcli("collect", worklist, "--from", orthanc.dimse, "-o", out, "--anonymize", "--key", "k1",
                   "--to", storescp.peer)
    assert proc.returncode == 1, proc.stderr  # one row found nothing
    results = list(csv.DictReader((out / "collect-results.csv").open()))
    assert [r["message"] for r in results][:2] == ["", ""], proc.stderr
    assert proc.stdout.strip() == str(out / "collect-results.csv")
    assert [r["status"] for r in results] == ["ok", "ok", "not-found"]
    assert [r["note"] for r in results] == ["by accession", "by date", "missing"]
    assert results[0]["studies"] == str(first.StudyInstanceUID) and results[0]["files"] == "6"
    anonymized = dicom_files(out / "anonymized")
    assert len(anonymized) == 12
    assert all(str(pydicom.dcmread(p, stop_before_pixels=True).PatientIdentityRemoved) == "YES" for p in anonymized)
    assert len(storescp.files()) == 12  # forwarded
    assert "row 3: not-found" in proc.stderr
    again = kaapcli("collect", worklist, "--from", orthanc.dimse, "-o", out, "--anonymize", "--key", "k1")
    assert again.returncode == 1 and "2 already done" in again.stderr


def test_collect_bad_worklist_and_dead_peer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("Name\nx\n")
    proc = kaapcli("collect", bad, "--from", "X@127.0.0.1:9", "-o", tmp_path / "o")
    assert proc.returncode == 65 and "AccessionNumber" in proc.stderr
    assert kaapcli("collect", tmp_path / "none.csv", "--from", "X@127.0.0.1:9", "-o", tmp_path / "o").returncode == 66
    good = tmp_path / "w.csv"
    good.write_text("AccessionNumber\nA1\n")
    dead = kaapcli("collect", good, "--from", "X@127.0.0.1:9", "-o", tmp_path / "o", "--timeout", "2")
    assert dead.returncode == 1 and "row 1: failed" in dead.stderr and "Traceback" not in dead.stderr
