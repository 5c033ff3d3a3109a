"""``kaapcli sort``: tag-named trees, exact copies or hard links, collisions never overwrite."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from kaapcli.cli.sort import DEFAULT_TEMPLATE as CLI_TEMPLATE
from kaapcli.core.sort import DEFAULT_TEMPLATE, check_template
from kaapcli.exitcodes import UsageError
from tests.conftest import dicom_files, kaapcli, pydicom_test_files


def expected_default_path(ds: pydicom.Dataset) -> Path:
    return Path(ds.PatientID, f"{ds.StudyDate}_{ds.StudyInstanceUID}",
                f"{ds.Modality}_{ds.SeriesNumber}_{ds.SeriesInstanceUID}", f"{ds.SOPInstanceUID}.dcm")


def test_default_template_names_and_exact_bytes(mock_ct: Path, tmp_path: Path) -> None:
    assert CLI_TEMPLATE == DEFAULT_TEMPLATE
    proc = kaapcli("sort", mock_ct, "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    inputs = dicom_files(mock_ct)
    expected = {tmp_path / expected_default_path(pydicom.dcmread(p)): p for p in inputs}
    assert set(dicom_files(tmp_path)) == set(expected)
    assert sorted(proc.stdout.split()) == sorted(map(str, expected))
    for dest, src in expected.items():
        assert dest.read_bytes() == src.read_bytes()
        assert dest.stat().st_ino != src.stat().st_ino


def test_values_are_sanitized_and_stay_inside_out(mock_ct: Path, tmp_path: Path) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for n, patient_id in enumerate(["../../escape", "a/b\\c", "..", ""]):
        ds = pydicom.dcmread(dicom_files(mock_ct)[n])
        ds.PatientID = patient_id
        ds.save_as(src_dir / f"{n}.dcm")
    out = tmp_path / "out"
    proc = kaapcli("sort", src_dir, "-o", out, "--layout", "{PatientID}/{SeriesDescription}/{SOPInstanceUID}.dcm")
    assert proc.returncode == 0, proc.stderr
    written = dicom_files(out)
    assert len(written) == 4
    assert {p.relative_to(out).parts[0] for p in written} == {"escape", "a_b_c", "unknown"}
    descriptions = {pydicom.dcmread(p).SeriesDescription for p in src_dir.iterdir()}
    assert {p.parent.name for p in written} == {d.replace(" ", "_") for d in descriptions}
    assert not [p for p in tmp_path.rglob("*.dcm") if not p.is_relative_to(out) and not p.is_relative_to(src_dir)]


def test_link_shares_the_inode(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("sort", mock_ct, "-o", tmp_path, "--link")
    assert proc.returncode == 0, proc.stderr
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dicom_files(mock_ct)}
    for dest in dicom_files(tmp_path):
        assert dest.stat().st_ino == by_uid[dest.stem].stat().st_ino


def test_link_across_file_systems_copies_with_a_warning(mock_ct: Path, tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to link across")
    with tempfile.TemporaryDirectory(dir=other) as out:
        proc = kaapcli("sort", dicom_files(mock_ct)[0], "-o", out, "--link")
        assert proc.returncode == 0, proc.stderr
        assert "copied instead" in proc.stderr
        [dest] = dicom_files(Path(out))
        assert dest.read_bytes() == dicom_files(mock_ct)[0].read_bytes()


def test_collisions_fail_and_never_overwrite(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("sort", mock_ct, "-o", tmp_path, "--layout", "{PatientID}/{SeriesNumber}.dcm",
                   "--format", "jsonl", "-w", "1")
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sum(r["status"] == "ok" for r in records) == 2  # the first file of each series
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 14
    assert all("already exists with different content" in r["message"] and r["message"].startswith(r["input"])
               for r in failed)
    # Each kept file is still the one that got there first (input order with one worker).
    first = {pydicom.dcmread(p).SeriesNumber: p for p in reversed(dicom_files(mock_ct))}
    for number, src in first.items():
        assert (tmp_path / "MOCK-0007-0000" / f"{number}.dcm").read_bytes() == src.read_bytes()


def test_identical_content_under_one_name_is_fine(mock_ct: Path, tmp_path: Path) -> None:
    src = dicom_files(mock_ct)[0]
    twin = tmp_path / "twin" / "copy.dcm"
    twin.parent.mkdir()
    shutil.copy(src, twin)
    proc = kaapcli("sort", src, twin, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert len(dicom_files(tmp_path / "out")) == 1


def test_rerun_is_up_to_date_and_force_rebuilds(mock_ct: Path, tmp_path: Path) -> None:
    dry = kaapcli("sort", mock_ct, "-o", tmp_path, "--dry-run")
    assert dry.returncode == 0 and dry.stdout == "" and "would copy to" in dry.stderr
    assert dicom_files(tmp_path) == []
    first = kaapcli("sort", mock_ct, "-o", tmp_path)
    again = kaapcli("sort", mock_ct, "-o", tmp_path)
    assert first.returncode == again.returncode == 0
    assert "16 up to date" in again.stderr
    assert sorted(again.stdout.split()) == sorted(first.stdout.split())
    forced = kaapcli("sort", mock_ct, "-o", tmp_path, "--force")
    assert forced.returncode == 0 and "up to date" not in forced.stderr
    assert sorted(forced.stdout.split()) == sorted(first.stdout.split())
    linked = kaapcli("sort", mock_ct, "-o", tmp_path, "--link")  # other options: not up to date, same bytes: ok
    assert linked.returncode == 0 and "up to date" not in linked.stderr


@pytest.mark.parametrize("template", ["{NotAKeyword}/x.dcm", "../{PatientID}.dcm", "plain/name.dcm",
                                      "{PatientID:d}/x", "{PatientID", "{PatientID}/../x"])
def test_bad_templates(template: str) -> None:
    with pytest.raises(UsageError):
        check_template(template)


def test_usage_errors(mock_ct: Path, tmp_path: Path) -> None:
    both = kaapcli("sort", mock_ct, "-o", tmp_path / "a", "--link", "--copy")
    assert both.returncode == 2 and "exclude each other" in both.stderr
    bad = kaapcli("sort", mock_ct, "-o", tmp_path / "b", "--layout", "{Nope}.dcm")
    assert bad.returncode == 2 and "Nope is not a DICOM keyword" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_pydicom_test_file_succeeds_or_fails_cleanly(tmp_path: Path) -> None:
    files = pydicom_test_files()
    root = Path(get_testdata_file("CT_small.dcm")).parent
    proc = kaapcli("sort", root, "-o", tmp_path, "--format", "jsonl")
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["input"] for r in records} == {str(f) for f in files}
    failed = [r for r in records if r["status"] == "failed"]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == len(failed)
    for record in failed:  # pydicom's files share UIDs across syntaxes: collisions, each one line
        assert "\n" not in record["message"] and record["message"].startswith(record["input"] + ": ")
    for record in records:
        if record["status"] == "ok":
            [dest] = record["outputs"]
            assert Path(dest).read_bytes() == Path(record["input"]).read_bytes()
            assert os.path.commonpath([dest, tmp_path]) == str(tmp_path)
