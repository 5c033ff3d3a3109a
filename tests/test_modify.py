"""``kaapcli modify``: dcmodify's vocabulary, checked against mock data, pydicom's test files and DCMTK dcmodify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from kaapcli.core import dicom, fsio
from kaapcli.core.dicom import ALL_ITEMS, TagStep, parse_tag, parse_tag_path
from kaapcli.core.modify import parse_edits
from kaapcli.exitcodes import UsageError
from tests.conftest import dciodvfy_errors, dcmtk, dicom_files, kaapcli, pydicom_test_files


def read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def only_file(root: Path) -> Path:
    files = dicom_files(root)
    assert len(files) == 1, files
    return files[0]


def first_slice(mock_ct: Path) -> Path:
    return dicom_files(mock_ct)[0]


# --------------------------------------------------------------------------- tag paths (core/dicom.py)

@pytest.mark.parametrize("text", ["PatientName", "(0010,0010)", "0010,0010", "0x0010,0x0010", "0010|0010",
                                  "00100010", " ( 0010 , 0010 ) "])
def test_parse_tag_forms(text: str) -> None:
    assert parse_tag(text) == 0x00100010


def test_parse_tag_path_sequences() -> None:
    assert parse_tag_path("ReferencedSeriesSequence[0].SeriesInstanceUID") == (
        TagStep(0x00081115, 0), TagStep(0x0020000E, None))
    assert parse_tag_path("(0008,1115)[*].(0020,000e)") == (TagStep(0x00081115, ALL_ITEMS), TagStep(0x0020000E))
    assert parse_tag_path("ReferencedSeriesSequence[2]") == (TagStep(0x00081115, 2),)


@pytest.mark.parametrize("text", ["NoSuchKeyword", "ReferencedSeriesSequence.SeriesInstanceUID", "(0010,001)",
                                  "Patient Name", "", "a[0]b"])
def test_parse_tag_path_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_tag_path(text)


# --------------------------------------------------------------------------- the basic edits

def test_insert_modify_erase_mirror_the_tree(mock_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = kaapcli("modify", mock_ct, "-o", out, "-i", "PatientComments=added", "-m", "PatientName=Doe^Jane",
                   "-e", "InstitutionName", "-i", "ImageType=DERIVED\\SECONDARY", "-m", "(0008,1030)=Changed")
    assert proc.returncode == 0, proc.stderr
    inputs = dicom_files(mock_ct)
    # The input tree is mirrored: same relative paths, and stdout lists exactly what was written.
    assert sorted(p.relative_to(out) for p in dicom_files(out)) == sorted(p.relative_to(mock_ct) for p in inputs)
    assert sorted(proc.stdout.split()) == sorted(str(p) for p in dicom_files(out))
    for src in inputs:
        ds, orig = read(out / src.relative_to(mock_ct)), read(src)
        assert ds.PatientComments == "added"
        assert ds.PatientName == "Doe^Jane" and orig.PatientName != "Doe^Jane"
        assert "InstitutionName" not in ds and "InstitutionName" in orig
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.StudyDescription == "Changed"
        assert ds.SOPInstanceUID == orig.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
        assert ds.PixelData == orig.PixelData


def test_modify_absent_is_a_warning_not_an_insert(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("modify", first_slice(mock_ct), "-o", tmp_path, "-m", "PatientComments=x")
    assert proc.returncode == 0, proc.stderr
    assert "PatientComments: not present" in proc.stderr
    assert "PatientComments" not in read(only_file(tmp_path))


def test_output_passes_dciodvfy(mock_ct: Path, tmp_path: Path) -> None:
    src = first_slice(mock_ct)
    assert dciodvfy_errors(src) == []
    proc = kaapcli("modify", src, "-o", tmp_path, "-m", "PatientName=Doe^Jane", "-i", "StudyDescription=New",
                   "-i", "PatientComments=Müller", "--new-uids", "study", "--new-uids", "series",
                   "--new-uids", "instance", "-e", "StationName")
    assert proc.returncode == 0, proc.stderr
    assert dciodvfy_errors(only_file(tmp_path)) == []


# --------------------------------------------------------------------------- sequences

def test_sequence_path_creates_items_like_dcmodify(mock_ct: Path, tmp_path: Path) -> None:
    """Same edits through kaapcli and DCMTK dcmodify give the same dataset."""
    src = first_slice(mock_ct)
    edits = ["-i", "ReferencedImageSequence[0].ReferencedSOPClassUID=1.2.840.10008.5.1.4.1.1.2",
             "-i", "ReferencedImageSequence[0].ReferencedSOPInstanceUID=1.2.3.4",
             "-i", "(0008,1110)[0].(0008,1155)=1.2.3.5",
             "-m", "PatientName=Smith^John", "-i", "PatientComments=x\\y"]
    proc = kaapcli("modify", src, "-o", tmp_path / "k", *edits)
    assert proc.returncode == 0, proc.stderr
    theirs = tmp_path / "dcmtk.dcm"
    shutil.copy(src, theirs)
    done = subprocess.run([dcmtk("dcmodify"), "-nb", *edits, str(theirs)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ours, ref = read(only_file(tmp_path / "k")), read(theirs)
    assert ours.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert ours.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3.5"
    assert ours == ref  # every data element, sequences included (file meta aside)
    assert ours.PixelData == ref.PixelData


def test_wildcard_item_edits_every_item(tmp_path: Path) -> None:
    src = get_testdata_file("rtplan.dcm")
    before = read(Path(src))
    assert len(before.DoseReferenceSequence) == 2
    proc = kaapcli("modify", src, "-o", tmp_path, "-i", "DoseReferenceSequence[*].DoseReferenceDescription=D",
                   "-e", "FractionGroupSequence[0]")
    assert proc.returncode == 0, proc.stderr
    ds = read(only_file(tmp_path))
    assert [item.DoseReferenceDescription for item in ds.DoseReferenceSequence] == ["D", "D"]
    assert len(ds.FractionGroupSequence) == 0 and len(before.FractionGroupSequence) == 1


def test_erase_all_reaches_into_sequences(tmp_path: Path) -> None:
    src = Path(get_testdata_file("rtplan.dcm"))
    tag = 0x00081155  # ReferencedSOPInstanceUID, nested in several sequences of this plan
    assert sum(e.tag == tag for e in read(src).iterall()) > 0
    proc = kaapcli("modify", src, "-o", tmp_path, "--erase-all", "ReferencedSOPInstanceUID")
    assert proc.returncode == 0, proc.stderr
    ds = read(only_file(tmp_path))
    assert sum(e.tag == tag for e in ds.iterall()) == 0
    assert ds.SOPInstanceUID == read(src).SOPInstanceUID  # nothing else went


def test_erase_private_inside_sequences(tmp_path: Path) -> None:
    sources = [Path(get_testdata_file(name)) for name in ("priv_SQ.dcm", "nested_priv_SQ.dcm")]
    proc = kaapcli("modify", *sources, "-o", tmp_path, "--erase-private")
    assert proc.returncode == 0, proc.stderr
    for src in sources:
        before, after = read(src), read(tmp_path / src.name)
        assert any(e.tag.is_private for e in before.iterall())
        assert not any(e.tag.is_private for e in after.iterall())
        assert [e.tag for e in before if not e.tag.is_private] == [e.tag for e in after]


# --------------------------------------------------------------------------- UIDs

def uid_table(root: Path) -> list[tuple[str, str, str, str]]:
    return [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID)
            for ds in map(read, dicom_files(root))]


def test_new_uids_consistent_per_series_and_file_meta_in_sync(mock_ct: Path, tmp_path: Path) -> None:
    args = ["--new-uids", "study", "--new-uids", "series", "--new-uids", "instance", "-q"]
    assert kaapcli("modify", mock_ct, "-o", tmp_path / "a", *args).returncode == 0
    assert kaapcli("modify", mock_ct, "-o", tmp_path / "b", *args).returncode == 0
    assert kaapcli("modify", mock_ct, "-o", tmp_path / "c", *args, "--uid-seed", "other").returncode == 0
    original = {(ds.SeriesInstanceUID, ds.SOPInstanceUID): ds for ds in map(read, dicom_files(mock_ct))}
    new = uid_table(tmp_path / "a")
    assert len({row[0] for row in new}) == 1  # one study stays one study
    assert len({row[1] for row in new}) == 2  # two series stay two series
    assert len({row[2] for row in new}) == len(original)
    old_uids = {u for key in original for u in key} | {ds.StudyInstanceUID for ds in original.values()}
    for study, series, sop, media in new:
        assert media == sop  # MediaStorageSOPInstanceUID follows SOPInstanceUID
        assert not {study, series, sop} & old_uids
        assert all(len(u) <= 64 and u.startswith("2.25.") for u in (study, series, sop))
    # The mapping is a function of the original UID: every file of an original series gets the same new one.
    pairs = {(ds.SeriesInstanceUID, new_ds.SeriesInstanceUID)
             for ds, new_ds in zip(map(read, dicom_files(mock_ct)), map(read, dicom_files(tmp_path / "a")),
                                   strict=True)}
    assert len(pairs) == 2
    assert sorted(uid_table(tmp_path / "b")) == sorted(new)  # deterministic across runs
    assert not {r[1] for r in uid_table(tmp_path / "c")} & {r[1] for r in new}  # --uid-seed changes them


def test_new_instance_uids_update_references(tmp_path: Path) -> None:
    src = Path(get_testdata_file("rtplan.dcm"))
    refs = [e.value for e in read(src).iterall() if e.keyword == "ReferencedSOPInstanceUID"]
    assert refs
    assert kaapcli("modify", src, "-o", tmp_path, "--new-uids", "instance", "-q").returncode == 0
    new_refs = [e.value for e in read(only_file(tmp_path)).iterall() if e.keyword == "ReferencedSOPInstanceUID"]
    assert len(new_refs) == len(refs) and not set(new_refs) & set(refs)
    assert new_refs == [dicom.uid_from(f"modify/instance/{r}") for r in refs]


# --------------------------------------------------------------------------- conditions, Kaapana string, VRs

def test_conditions_select_files_and_skipped_files_are_not_copied(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("modify", mock_ct, "-o", tmp_path, "-i", "PatientComments=hit", "--if", "SeriesNumber=1",
                   "--if", "Modality=C?", "--if", "SeriesDescription!=*2", "--if", "!PatientComments",
                   "--if", "StudyInstanceUID", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["status"] for r in records} == {"ok", "skipped"}
    written = dicom_files(tmp_path)
    assert len(written) == 8 and len(records) == 16
    assert {read(p).SeriesNumber for p in written} == {1}
    assert all(r["message"] == "condition not met: SeriesNumber=1" for r in records if r["status"] == "skipped")


@pytest.mark.parametrize("condition, holds", [
    ("Modality=CT", True), ("Modality=MR", False), ("Modality!=MR", True), ("Modality=C*", True),
    ("ImageType=ORIGINAL\\PRIMARY\\*", True), ("ImageType=DERIVED*", False),
    ("PatientComments", False), ("!PatientComments", True), ("PatientComments=", True), ("PatientComments!=", False),
    ("OtherPatientIDsSequence[*].PatientID=B?", True), ("OtherPatientIDsSequence[0].PatientID=B2", False),
    ("(0008,0060)=CT", True), ("SeriesNumber=2", True),
])
def test_condition_holds(condition: str, holds: bool) -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Modality, ds.ImageType, ds.SeriesNumber = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"], 2
    ds.OtherPatientIDsSequence = [Dataset(), Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID, ds.OtherPatientIDsSequence[1].PatientID = "A1", "B2"
    assert parse_edits(conditions=[condition]).conditions[0].holds(ds) is holds


def test_kaapana_tag_string(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("modify", first_slice(mock_ct), "-o", tmp_path,
                   "--kaapana-tags", "(0008,103E)=Renamed;(0010,4000)=inserted;(0012,0020)=kp-proj;")
    assert proc.returncode == 0, proc.stderr
    ds = read(only_file(tmp_path))
    assert (ds.SeriesDescription, ds.PatientComments, ds.ClinicalTrialProtocolID) == ("Renamed", "inserted", "kp-proj")


def test_private_element_needs_vr_and_gets_it(mock_ct: Path, tmp_path: Path) -> None:
    src = first_slice(mock_ct)
    bad = kaapcli("modify", src, "-o", tmp_path / "bad", "-i", "(0009,1001)=x")
    assert bad.returncode == 2 and "(0009,1001)=LO:x" in bad.stderr
    proc = kaapcli("modify", src, "-o", tmp_path / "ok", "-i", "(0009,0010)=ACME", "-i", "(0009,1001)=DS:1.5\\2")
    assert proc.returncode == 0, proc.stderr
    elem = read(only_file(tmp_path / "ok"))[0x00091001]
    assert elem.VR == "DS" and [float(v) for v in elem.value] == [1.5, 2.0]


def test_non_latin_value_switches_to_utf8(mock_ct: Path, tmp_path: Path) -> None:
    src = first_slice(mock_ct)
    assert read(src).SpecificCharacterSet == "ISO_IR 100"
    latin = kaapcli("modify", src, "-o", tmp_path / "l", "-i", "PatientName=Müller^Jörg")
    assert latin.returncode == 0 and read(only_file(tmp_path / "l")).SpecificCharacterSet == "ISO_IR 100"
    proc = kaapcli("modify", src, "-o", tmp_path / "u", "-i", "InstitutionName=東京病院", "-m", "PatientName=Müller")
    assert proc.returncode == 0 and "ISO_IR 192" in proc.stderr
    ds = read(only_file(tmp_path / "u"))
    assert (ds.SpecificCharacterSet, ds.InstitutionName, ds.PatientName) == ("ISO_IR 192", "東京病院", "Müller")
    assert dciodvfy_errors(only_file(tmp_path / "u")) == []


@pytest.mark.parametrize("options, says", [
    ({"inserts": ["StudyDate=notadate"]}, "not a valid DA"),
    ({"inserts": ["StudyDate=20240230"]}, "not a valid DA"),
    ({"inserts": ["StudyTime=2500"]}, "not a valid TM"),
    ({"inserts": ["SeriesNumber=1.5"]}, "IS"),
    ({"modifies": ["Modality=ct"]}, "CS"),
    ({"inserts": ["PatientName=a\\b"]}, "VM 1"),
    ({"inserts": ["ImageOrientationPatient=1\\0\\0"]}, "VM 6"),
    ({"inserts": ["Rows=70000"]}, "65535"),
    ({"inserts": ["PatientAge=12Y"]}, "nnnY"),
    ({"inserts": ["NoSuchTag=1"]}, "not a DICOM keyword"),
    ({"inserts": ["PatientName"]}, "TAG=VALUE"),
    ({"inserts": ["(0002,0010)=1.2.840.10008.1.2"]}, "file meta"),
    ({"erase": ["(0008,0000)"]}, "group lengths"),
    ({"inserts": ["PixelData=x"]}, "pixel data"),
    ({"inserts": ["(0009,1001)=x"]}, "(0009,1001)=LO:x"),
    ({"inserts": ["(0009,1001)=OB:x"]}, "binary"),
    ({"inserts": ["ReferencedImageSequence=x"]}, "sequence takes no value"),
    ({"inserts": ["ReferencedImageSequence[0]=x"]}, "not a sequence item"),
    ({"new_uids": ["patient"]}, "study, series, instance"),
    ({"conditions": ["!Modality=CT"]}, "--if"),
    ({"kaapana_tags": ["(0008,0060)=CT;(0010,0010)"]}, "TAG=VALUE"),
])
def test_bad_edits_are_usage_errors(options: dict[str, list[str]], says: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_edits(**options)
    assert says in f"{err.value.message} {err.value.hint}"


def test_bad_option_fails_before_any_file_is_touched(mock_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = kaapcli("modify", mock_ct, "-o", out, "-i", "PatientID=ok", "-i", "StudyDate=notadate")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kaapcli: error: -i 'StudyDate=notadate': 'notadate' is not a valid DA value (expected YYYYMMDD)"]
    assert not out.exists()
    nothing = kaapcli("modify", mock_ct, "-o", out)
    assert nothing.returncode == 2 and "nothing to do" in nothing.stderr and not out.exists()


def test_out_and_in_place_exclude_each_other(mock_ct: Path, tmp_path: Path) -> None:
    assert kaapcli("modify", mock_ct, "-i", "PatientID=1").returncode == 2
    assert kaapcli("modify", mock_ct, "-o", tmp_path, "--in-place", "-i", "PatientID=1").returncode == 2
    proc = kaapcli("modify", mock_ct, "-o", mock_ct, "-i", "PatientID=1")
    assert proc.returncode == 2 and "--in-place" in proc.stderr
    nested = kaapcli("modify", mock_ct / "MOCK-0007-0000", "-o", mock_ct, "-i", "PatientID=1")
    assert nested.returncode == 2 and "inside the output directory" in nested.stderr


# --------------------------------------------------------------------------- in place, re-runs, inputs

def test_in_place_is_atomic_per_file(mock_ct: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(mock_ct, tree)
    broken = tree / "broken.dcm"
    broken.write_bytes(first_slice(mock_ct).read_bytes()[:-500])  # cut inside PixelData
    files = dicom_files(tree)
    inodes = {p: p.stat().st_ino for p in files}
    broken_bytes = broken.read_bytes()
    proc = kaapcli("modify", tree, "--in-place", "-m", "PatientName=In^Place")
    assert proc.returncode == 1
    assert proc.stderr.count("error:") == 1 and f"{broken}: truncated file" in proc.stderr
    assert broken.read_bytes() == broken_bytes  # a failed item leaves its file as it was
    for path in files:
        if path != broken:
            assert read(path).PatientName == "In^Place"
            assert path.stat().st_ino != inodes[path]  # replaced by rename, never rewritten in place
    assert not [p for p in tree.rglob("*") if fsio.TMP_SUFFIX in p.name]  # no temporary files left


def test_rerun_is_up_to_date_and_dry_run_writes_nothing(mock_ct: Path, tmp_path: Path) -> None:
    dry = kaapcli("modify", mock_ct, "-o", tmp_path, "-i", "PatientID=1", "--dry-run")
    assert dry.returncode == 0 and dry.stdout == "" and "would write" in dry.stderr
    assert not tmp_path.joinpath("MOCK-0007-0000").exists()
    first = kaapcli("modify", mock_ct, "-o", tmp_path, "-i", "PatientID=1")
    again = kaapcli("modify", mock_ct, "-o", tmp_path, "-i", "PatientID=1")
    assert first.returncode == again.returncode == 0
    assert "16 up to date" in again.stderr and sorted(again.stdout.split()) == sorted(first.stdout.split())
    changed = kaapcli("modify", mock_ct, "-o", tmp_path, "-i", "PatientID=2")
    assert "up to date" not in changed.stderr
    assert {read(p).PatientID for p in dicom_files(tmp_path)} == {"2"}


@pytest.mark.parametrize("command", [["modify", "-i", "PatientID=1"], ["sort"]])
def test_rerun_typed_differently_is_up_to_date(command: list[str], mock_ct: Path, tmp_path: Path) -> None:
    """The manifest keys inputs by absolute path: relative instead of absolute, from another working directory,
    a re-run still finds every output up to date (it once rebuilt everything)."""
    out = tmp_path / "out"
    first = kaapcli(command[0], mock_ct, "-o", out, *command[1:])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = kaapcli(command[0], os.path.relpath(mock_ct, elsewhere), "-o", "../out", *command[1:], cwd=elsewhere)
    assert first.returncode == again.returncode == 0, again.stderr
    assert "16 up to date" in again.stderr
    assert sorted(Path(elsewhere, p).resolve() for p in again.stdout.split()) == \
        sorted(Path(p).resolve() for p in first.stdout.split())


def test_header_edit_copies_pixel_data_as_read(mock_ct: Path, tmp_path: Path) -> None:
    """Only the header is re-encoded: the output ends with the input's Pixel Data element, byte for byte, and
    edits that reach Pixel Data or what follows it still apply (the whole file is then read and written)."""
    src = first_slice(mock_ct)
    proc = kaapcli("modify", src, "-o", tmp_path / "a", "-m", "PatientName=Header^Only", "-e", "InstitutionName")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "a" / src.name
    pixel_bytes = len(read(src).PixelData) + 12  # the element: tag, VR, reserved, length, value
    assert out.read_bytes()[-pixel_bytes:] == src.read_bytes()[-pixel_bytes:]
    assert read(out).PatientName == "Header^Only" and "InstitutionName" not in read(out)
    assert read(out).file_meta.MediaStorageSOPInstanceUID == read(src).SOPInstanceUID
    assert dciodvfy_errors(out) == []
    erased = kaapcli("modify", src, "-o", tmp_path / "b", "-e", "PixelData")
    assert erased.returncode == 0 and "PixelData" not in read(tmp_path / "b" / src.name)
    after = kaapcli("modify", src, "-o", tmp_path / "c", "-i", "(7FE1,0010)=KAAPCLI TEST")
    assert after.returncode == 0, after.stderr
    written = read(tmp_path / "c" / src.name)
    assert written[0x7FE10010].value == "KAAPCLI TEST" and written.PixelData == read(src).PixelData


def test_single_files_and_stdin(mock_ct: Path, tmp_path: Path) -> None:
    a, b = dicom_files(mock_ct)[:2]
    proc = kaapcli("modify", "-", "-o", tmp_path, "-i", "PatientID=9", input=f"{a}\n{b}\n")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dicom_files(tmp_path)) == sorted([a.name, b.name])
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(a, clash / b.name)
    proc = kaapcli("modify", b, clash / b.name, "-o", tmp_path / "o2", "-i", "PatientID=9")
    # Two inputs, one output name: the engine keeps the first and fails the second (nothing is overwritten).
    assert proc.returncode == 1 and f"{clash / b.name}: {tmp_path / 'o2' / b.name} is also the output of {b}" \
        in proc.stderr
    assert read(tmp_path / "o2" / b.name).SOPInstanceUID == read(b).SOPInstanceUID


# --------------------------------------------------------------------------- pixel data and odd inputs

def test_pixel_data_and_transfer_syntax_are_kept(tmp_path: Path) -> None:
    names = ["JPEG2000.dcm", "MR_small_RLE.dcm", "JPEGLSNearLossless_08.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm"]
    sources = [Path(get_testdata_file(name)) for name in names]
    proc = kaapcli("modify", *sources, "-o", tmp_path, "-i", "PatientName=Pixel^Keeper", "--new-uids", "instance")
    assert proc.returncode == 0, proc.stderr
    for src in sources:
        before, after = read(src), read(tmp_path / src.name)
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        assert after.PixelData == before.PixelData  # the encoded bytes, never decoded
        assert after.PatientName == "Pixel^Keeper"


def test_every_pydicom_test_file_succeeds_or_fails_cleanly(tmp_path: Path) -> None:
    files = pydicom_test_files()
    root = Path(get_testdata_file("CT_small.dcm")).parent
    proc = kaapcli("modify", root, "-o", tmp_path, "-m", "PatientName=Test", "-i", "PatientID=T1",
                   "--new-uids", "series", "--format", "jsonl")
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["input"] for r in records} == {str(f) for f in files}
    failed = [r for r in records if r["status"] == "failed"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(failed)
    for record in failed:
        assert "\n" not in record["message"] and record["message"].startswith(record["input"] + ": ")
    names = {Path(r["input"]).name for r in failed}
    assert {"MR_truncated.dcm", "rtplan_truncated.dcm"} <= names  # truncated files are never written back
    assert sum(r["status"] == "ok" for r in records) > 100


# --------------------------------------------------------------------------- the byte editor

BYTE_EDITS = [
    {"modifies": ["PatientName=Bench^Mark"], "inserts": ["PatientComments=benchmark"], "erase": ["InstitutionName"]},
    {"inserts": ["StudyDescription=odd", "Rows=64", "SliceThickness=1.25", "ImageType=ORIGINAL\\PRIMARY\\AXIAL",
                 "(0009,0010)=LO:KAAPCLI", "(0009,1001)=UT:a\\b", "WindowCenter=40\\-600", "PatientWeight=",
                 "ReferencedFrameNumber=1\\2\\3", "RescaleSlope=1", "StudyTime=1230", "AcquisitionDateTime=2024"],
     "modifies": ["StudyDate=20240229", "PatientID=", "Manufacturer=x y", "StudyID=7"],
     "erase": ["AccessionNumber"]},
    {"erase": ["PatientName", "PatientID"], "modifies": ["PatientAge=045Y", "OperatorsName=A^B"],
     "kaapana_tags": ["(0008,0060)=OT;(0010,0040)=O"]},
]


def byte_and_pydicom_outputs(src: Path, out: Path, edits: object) -> tuple[bytes | None, bytes, list[str]]:
    """What the byte editor writes for ``src`` (None: it leaves the file to pydicom) and what pydicom's path writes."""
    from kaapcli.core.batch import Context, Item
    from kaapcli.core.modify import ModifyOperator, edit_bytes

    fast = ModifyOperator(edits)
    assert fast.byte_steps is not None
    notes = edit_bytes(fast.byte_steps, src, out / "bytes.dcm")
    slow = ModifyOperator(edits)
    slow.byte_steps = None
    outcome = slow.process(Item(src.name, (src,)), Context(out=out / "pydicom"))
    assert outcome.outputs, outcome.message
    assert notes is None or notes == outcome.warnings
    return (None if notes is None else (out / "bytes.dcm").read_bytes()), outcome.outputs[0].read_bytes(), \
        outcome.warnings


@pytest.mark.parametrize("options", BYTE_EDITS)
def test_byte_editor_writes_what_pydicom_writes(options: dict[str, list[str]], mock_ct: Path, tmp_path: Path) -> None:
    """The header edited as bytes (no pydicom in the process) is the file pydicom's read-edit-write makes, byte for
    byte: explicit and implicit VR, with and without sequences, pixel data native or encapsulated, or none."""
    edits = parse_edits(**options)
    implicit = tmp_path / "implicit.dcm"
    ds = read(first_slice(mock_ct))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(implicit, enforce_file_format=True, implicit_vr=True)
    sources = [first_slice(mock_ct), implicit] + [Path(get_testdata_file(name)) for name in (
        "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
        "rtplan.dcm", "rtdose.dcm", "emri_small.dcm", "SC_rgb.dcm", "waveform_ecg.dcm", "liver.dcm")]
    handled = 0
    for n, src in enumerate(sources):
        out = tmp_path / str(n)
        by_bytes, by_pydicom, _ = byte_and_pydicom_outputs(src, out, edits)
        if by_bytes is not None:
            handled += 1
            assert by_bytes == by_pydicom, src.name
    assert handled >= 10, handled


def test_byte_editor_leaves_odd_files_to_pydicom(mock_ct: Path, tmp_path: Path) -> None:
    """Truncated files, elements after Pixel Data, big endian, deflated, no preamble: pydicom's path (which
    fails the truncated ones), never a guess."""
    from kaapcli.core.modify import ModifyOperator, edit_bytes

    steps = ModifyOperator(parse_edits(modifies=["PatientName=X"])).byte_steps
    assert steps is not None
    src = first_slice(mock_ct)
    truncated, trailing = tmp_path / "truncated.dcm", tmp_path / "trailing.dcm"
    truncated.write_bytes(src.read_bytes()[:-100])
    trailing.write_bytes(src.read_bytes() + b"\xfc\xff\xfc\xffOB\0\0\2\0\0\0\0\0")  # (FFFC,FFFC) padding
    for path in [truncated, trailing] + [Path(get_testdata_file(name)) for name in (
            "MR_small_bigendian.dcm", "image_dfl.dcm", "no_meta.dcm", "rtplan_truncated.dcm")]:
        assert edit_bytes(steps, path, tmp_path / "out.dcm") is None, path.name
    assert not (tmp_path / "out.dcm").exists()
    proc = kaapcli("modify", truncated, "-o", tmp_path / "o", "-m", "PatientName=X")
    assert proc.returncode == 65 and "truncated" in proc.stderr and not (tmp_path / "o" / truncated.name).exists()


def test_what_the_byte_editor_does_not_do_goes_to_pydicom() -> None:
    from kaapcli.core.modify import byte_steps

    assert byte_steps(parse_edits(modifies=["PatientName=Bench^Mark"], erase=["InstitutionName"])) is not None
    for options in ({"modifies": ["PatientName=Jörg"]},
                    {"inserts": ["ReferencedSeriesSequence[0].SeriesInstanceUID=1.2"]},
                    {"inserts": ["SOPInstanceUID=1.2.3"]}, {"inserts": ["SpecificCharacterSet=ISO_IR 192"]},
                    {"new_uids": ["series"]}, {"conditions": ["Modality=CT"], "inserts": ["PatientID=1"]},
                    {"erase_private": True}, {"erase": ["ReferencedSeriesSequence[0]"]},
                    {"inserts": ["(0009,1001)=SQ:"]}, {"inserts": ["(7FE1,0010)=LO:after pixels"]}):
        assert byte_steps(parse_edits(**options)) is None, options  # type: ignore[arg-type]


def test_modify_of_plain_files_never_imports_pydicom(mock_ct: Path, tmp_path: Path) -> None:
    """Parsing the edits and editing a plain file need no pydicom (~0.3 s of a run of a few hundred files)."""
    code = ("import sys\nfrom kaapcli.cli.app import main\nsys.argv = ['kaapcli'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "assert 'pydicom' not in sys.modules, 'pydicom was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, "modify", str(mock_ct), "-o", str(tmp_path / "out"),
                           "-m", "PatientName=Bench^Mark", "-i", "PatientComments=benchmark", "-e", "InstitutionName",
                           "--workers", "1", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(dicom_files(tmp_path / "out")) == len(dicom_files(mock_ct))
    assert read(dicom_files(tmp_path / "out")[0]).PatientName == "Bench^Mark"


@pytest.mark.parametrize("vr", ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                                "UI", "UT", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"])
def test_values_accepted_without_pydicom_are_valid_for_pydicom(vr: str) -> None:
    """The pydicom-free check accepts a subset of what pydicom's validation does, and gives the same value."""
    from kaapcli.core.modify import _checked_value, _plain_value

    candidates = ["", " ", "A", "a b", "ABC_12 3", "x" * 16, "x" * 17, "X" * 64, "X" * 65, "0", "-0", "01", "1",
                  "-7", "+7", "1.5", "-1.25", "1.", ".5", "1e3", "1.2.840.10008.1.2", "1.02.3", "0.0", "20240229",
                  "20230229", "00000101", "2024", "20241301", "2359", "2400", "235960", "120000.123456",
                  "120000.1234567", "045Y", "45Y", "Doe^John", "Doe^John=Ideo", "a\\b", "tab\there", "new\nline",
                  "é", "65535", "65536",
                  "-32768", "-32769", "4294967295", "2147483648", "-2147483649", "999999999", "1000000000",
                  "18446744073709551615", "9223372036854775808", "1" * 17, "1.0000000000001"]
    accepted = 0
    for text in candidates:
        plain = _plain_value(vr, text)
        if plain is not None:
            accepted += 1
            assert _checked_value(vr, text) == plain, (vr, text)
    assert accepted


@pytest.mark.parametrize("options", BYTE_EDITS)
def test_byte_editor_matches_pydicom_on_every_pydicom_test_file(options: dict[str, list[str]], tmp_path: Path) -> None:
    """Over pydicom's ~180 test files (vendors, syntaxes, broken ones): every file the byte editor takes comes out
    as pydicom's path writes it, and a file pydicom's path fails is never one the byte editor wrote."""
    from kaapcli.exitcodes import KaapcliError

    edits = parse_edits(**options)
    handled = 0
    for n, src in enumerate(pydicom_test_files()):
        try:
            by_bytes, by_pydicom, _ = byte_and_pydicom_outputs(src, tmp_path / str(n), edits)
        except (KaapcliError, AssertionError):
            from kaapcli.core.modify import ModifyOperator, edit_bytes

            steps = ModifyOperator(edits).byte_steps
            assert steps is not None and edit_bytes(steps, src, tmp_path / f"{n}.dcm") is None, src.name
            continue
        if by_bytes is not None:
            handled += 1
            assert by_bytes == by_pydicom, src.name
    assert handled > 100


@pytest.mark.parametrize("vr", ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                                "UI", "UT", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"])
def test_byte_editor_encodes_values_as_pydicom_writes_them(vr: str) -> None:
    """Every value the byte editor takes (one or several, padded or not) is encoded as pydicom's writer does."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    from kaapcli.core.dicom import element_header
    from kaapcli.core.modify import _plain_value, value_bytes

    candidates = ["A", "ab", "a b ", "ABC_12 3", "X" * 64, "0", "-0", "1", "-7", "12", "1.5", "-1.25", "1.50",
                  "1.2.840.10008.1.2", "1.2.3", "20240229", "2024", "2359", "235959", "120000.123456", "12", "045Y",
                  "Doe^John", "Doe^John^^Dr^", "a\\b", "65535", "-32768", "4294967295", "999999999"]
    tag = 0x00091001  # private: the VR is the one given
    for text in candidates:
        parts = [text] if vr in ("LT", "ST", "UT") else text.split("\\")
        values = [_plain_value(vr, part) for part in parts]
        if any(v is None for v in values):
            continue
        value = values[0] if len(values) == 1 else values
        ds = Dataset()
        ds[tag] = DataElement(tag, vr, value)
        by_pydicom = dicom.encode_dataset(ds, implicit=False, little=True)
        data = value_bytes(vr, value)
        assert element_header(tag, vr, len(data), False) + data == by_pydicom, (vr, text)


def test_full_disk_fails_the_files_that_do_not_fit_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """The byte editor on a full disk: the files that fit are whole, the others fail with one line each (exit 73:
    all that failed could not be written), nothing half-written is left."""
    from tests.test_net_hostile import _mount_tmpfs

    src = tmp_path / "ct"
    assert kaapcli("mock", "-o", src, "--slices", "12", "--rows", "128", "--columns", "128", "-q").returncode == 0
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "256k")
    try:
        proc = kaapcli("modify", src, "-o", disk / "out", "-m", "PatientName=Full^Disk", "--format", "jsonl")
        records = [json.loads(line) for line in proc.stdout.splitlines()]
        written = [r for r in records if r["status"] == "ok"]
        failed = [r for r in records if r["status"] == "failed"]
        assert proc.returncode == 73 and written and failed and len(records) == 12, proc.stderr
        assert all("cannot write" in r["message"] for r in failed) and "Traceback" not in proc.stderr
        for record in written:
            assert read(Path(record["outputs"][0])).PatientName == "Full^Disk"
        assert not [p for p in (disk / "out").rglob("*") if "kaapcli-part" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
