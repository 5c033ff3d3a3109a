"""``kaapcli anonymize``: PHI scan, keyed UIDs and references, determinism, markers, pixels, dates, map, guards.

Real peers: dciodvfy (dicom3tools) checks the de-identified objects; highdicom builds the SEG whose references
must survive; pydicom's bundled files (many vendors, syntaxes, broken files) are the inputs.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import re
import shutil
import sqlite3
from datetime import date
from pathlib import Path

import pydicom
import pytest
from conftest import dciodvfy_errors, dicom_files, kaapcli, pydicom_test_files

from kaapcli.core.anonymize import (
    Keyed,
    Options,
    conditional,
    is_well_known_uid,
    load_kaapana_tags,
    load_table,
    resolve,
)

KEY = "test-key-1"
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
DUMMIES = {"ANONYMIZED", "19000101", "000000", "19000101000000"}
CLASS_UIDS = re.compile(r"Class|TransferSyntax|CodingScheme|ContextUID|MappingResourceUID|SOPClasses")


def anonymize(*args: object, key: str = KEY) -> tuple[object, list[dict]]:
    proc = kaapcli("anonymize", *args, "--key", key, "--format", "jsonl", "-q")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, records


def text_values(elem: pydicom.DataElement) -> list[str]:
    """Every string value of an element, recursing into sequence items."""
    if elem.VR == "SQ":
        return [v for item in elem.value for e in item for v in text_values(e)]
    if elem.VR not in TEXT_VRS or elem.value in (None, ""):
        return []
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v).strip() for v in values if str(v).strip()]


def identifying_values(ds: pydicom.Dataset) -> set[str]:
    """Values the Basic Profile must not let through: elements whose Table E.1-1 action is not K/C (all
    their sequence items included), private elements, instance UIDs and the file meta instance UID.  Values
    that also sit in an attribute the profile keeps, and very short values, are not evidence of a leak."""
    table, options = load_table(), Options()
    found: set[str] = set()
    kept: set[str] = set()

    def walk(d: pydicom.Dataset) -> None:
        for elem in d:
            row = table.lookup(int(elem.tag))
            action = conditional(resolve(row, options)) if row else ""
            if elem.tag.is_private or action in ("X", "Z", "D") and elem.VR != "SQ" or action in ("X", "Z"):
                found.update(text_values(elem))
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and not CLASS_UIDS.search(elem.keyword or ""):
                found.update(v for v in text_values(elem) if not is_well_known_uid(v))
            elif action in ("", "K", "C"):
                kept.update(text_values(elem))
            else:
                found.update(text_values(elem))

    walk(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        found.add(str(meta.MediaStorageSOPInstanceUID))
    return {v for v in found if len(v) >= 4 and v not in DUMMIES and v.strip("0.^- ")
            and not is_well_known_uid(v) and not any(v in k for k in kept)}


def leaks(original: Path, output: Path) -> set[str]:
    """Identifying values of ``original`` found in ``output``: in its bytes (long values) or its parsed values."""
    ds = pydicom.dcmread(original, force=True)
    out_bytes = output.read_bytes()
    out_ds = pydicom.dcmread(output, force=True)
    parsed = {v for e in out_ds for v in text_values(e)}
    if getattr(out_ds, "file_meta", None) is not None:
        parsed |= {v for e in out_ds.file_meta for v in text_values(e)}
    return {v for v in identifying_values(ds)
            if v in parsed or len(v) >= 8 and v.encode("latin-1", "replace") in out_bytes}


@pytest.fixture(scope="module")
def pydicom_run(anonymized_pydicom: tuple[object, Path], distinct_pydicom_files: Path
                ) -> tuple[object, list[dict], Path]:
    proc, _ = anonymized_pydicom
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # type: ignore[attr-defined]
    return proc, records, distinct_pydicom_files


@pytest.fixture(scope="module")
def mock_run(mock_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("anon_mock")
    proc, records = anonymize(mock_ct, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return records, out


# --------------------------------------------------------------------------- PHI

def test_phi_scan_mock_and_pydicom_files(mock_run: tuple[list[dict], Path],
                                         pydicom_run: tuple[object, list[dict], Path]) -> None:
    records, _ = mock_run
    _, precords, _ = pydicom_run
    pairs = [(Path(r["input"]), Path(r["outputs"][0])) for r in records + precords if r["status"] == "ok"]
    assert len(pairs) > 100
    found = {str(src): sorted(leaks(src, out)) for src, out in pairs}
    assert {k: v for k, v in found.items() if v} == {}
    # The patient's identity in particular, whatever the table says.
    for src, out in pairs[:16]:
        ds = pydicom.dcmread(src, force=True)
        for value in (ds.get("PatientName"), ds.get("PatientID"), ds.get("StudyInstanceUID")):
            if value and len(str(value)) >= 6:
                assert str(value).encode() not in out.read_bytes(), (src, value)


def test_phi_scan_catches_a_leak(mock_ct: Path, tmp_path: Path) -> None:
    """The scan must fail on data that was not de-identified, or a green scan would prove nothing."""
    files = dicom_files(mock_ct)[:2]
    for src in files:
        copy = tmp_path / src.name
        shutil.copyfile(src, copy)
        found = leaks(src, copy)
        ds = pydicom.dcmread(src)
        assert str(ds.PatientName) in found and ds.SOPInstanceUID in found and ds.StudyDate in found


def test_rules_see_the_dictionary_vr_of_implicit_and_un_elements(mock_ct: Path, tmp_path: Path) -> None:
    """Kept elements are written back undecoded, so the VR the rules see must still be pydicom's: a date and a
    UID that Table E.1-1 does not list are caught by their VR even when the file does not state it."""
    from pydicom.uid import ImplicitVRLittleEndian

    date, uid = "20010203", "1.2.826.0.1.3680043.10.99.1234567"
    src = tmp_path / "in"
    src.mkdir()
    for n, syntax in enumerate(("implicit", "un")):
        ds = pydicom.dcmread(dicom_files(mock_ct)[n])
        if syntax == "implicit":
            ds.InstanceCreationDate, ds.AcquisitionUID = date, uid
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(src / "implicit.dcm", implicit_vr=True, little_endian=True)
        else:  # explicit VR little endian, both elements encoded as UN
            ds.add_new(0x00080012, "UN", date.encode())
            ds.add_new(0x00080017, "UN", uid.encode() + b"\0")
            ds.save_as(src / "un.dcm")
    proc, records = anonymize(src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert len(records) == 2
    for record in records:
        out = pydicom.dcmread(record["outputs"][0])
        assert out.InstanceCreationDate == "19000101", record["input"]
        assert out.AcquisitionUID.startswith("2.25."), record["input"]
        assert date.encode() not in Path(record["outputs"][0]).read_bytes()
        assert uid.encode() not in Path(record["outputs"][0]).read_bytes()


# --------------------------------------------------------------------------- UIDs and references

def _build_seg(series: list[Path], dest: Path) -> Path:
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    images = [pydicom.dcmread(p) for p in series]
    mask = np.zeros((len(images), images[0].Rows, images[0].Columns), dtype=bool)
    mask[:, 8:20, 8:20] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="box", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="SN-12345")
    seg.save_as(dest)
    return dest


def test_uids_consistent_and_seg_references_follow(mock_ct: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(mock_ct, src)
    by_series: dict[str, list[Path]] = {}
    for path in dicom_files(src):
        by_series.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID, []).append(path)
    first = sorted(by_series)[0]
    _build_seg(sorted(by_series[first]), src / "seg.dcm")
    proc, records = anonymize(src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    outs = [pydicom.dcmread(r["outputs"][0]) for r in records]
    seg = next(d for d in outs if d.Modality == "SEG")
    images = [d for d in outs if d.Modality == "CT"]
    series = {d.SeriesInstanceUID for d in images}
    assert len(series) == 2 and not series & set(by_series)  # two series in, two new series out
    assert len({d.StudyInstanceUID for d in outs}) == 1
    assert len({d.FrameOfReferenceUID for d in outs}) == 1
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in outs)
    expected_series = Keyed(KEY.encode()).uid(first)
    ref_series = seg.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == expected_series
    referenced = {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in images if d.SeriesInstanceUID == expected_series}
    frame_refs = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_refs <= referenced
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # class UIDs never remapped
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue  # codes intact
    new_errors = set(_errors(tmp_path / "out" / Path(records[-1]["outputs"][0]).relative_to(tmp_path / "out")))
    assert not new_errors - set(_errors(src / "seg.dcm"))


def test_rtstruct_references_remapped_consistently(tmp_path: Path) -> None:
    src = next(p for p in pydicom_test_files() if p.name == "rtstruct.dcm")
    proc, records = anonymize(src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    before, after = pydicom.dcmread(src, force=True), pydicom.dcmread(records[0]["outputs"][0])
    keyed = Keyed(KEY.encode())
    old_for = before.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    assert after.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == keyed.uid(old_for)
    assert {r.ReferencedFrameOfReferenceUID for r in after.StructureSetROISequence} == {keyed.uid(old_for)}
    study_before = before.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    study_after = after.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert study_after.ReferencedSOPInstanceUID == keyed.uid(study_before.ReferencedSOPInstanceUID)
    assert study_after.ReferencedSOPClassUID == study_before.ReferencedSOPClassUID
    series_before = study_before.RTReferencedSeriesSequence[0].SeriesInstanceUID
    assert study_after.RTReferencedSeriesSequence[0].SeriesInstanceUID == keyed.uid(series_before)
    assert after.StudyInstanceUID == keyed.uid(before.StudyInstanceUID)


def test_same_key_same_bytes_other_key_other_uids(mock_ct: Path, tmp_path: Path,
                                                  mock_run: tuple[list[dict], Path]) -> None:
    _, first = mock_run
    proc, _ = anonymize(mock_ct, "-o", tmp_path / "again", "-w", "1")
    assert proc.returncode == 0
    a = {p.relative_to(first): p.read_bytes() for p in dicom_files(first)}
    b = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in dicom_files(tmp_path / "again")}
    assert a == b and len(a) == 16
    proc, records = anonymize(mock_ct, "-o", tmp_path / "other", key="another-key")
    uids = {pydicom.dcmread(r["outputs"][0]).SOPInstanceUID for r in records}
    assert len(uids) == 16 and not uids & {pydicom.dcmread(first / p).SOPInstanceUID for p in a}
    assert {pydicom.dcmread(r["outputs"][0]).PatientID for r in records} != \
        {pydicom.dcmread(first / p).PatientID for p in a}


# --------------------------------------------------------------------------- markers, pixels, conformance

def _errors(path: Path) -> list[str]:
    """dciodvfy Error lines with the values stripped (de-identified values differ by design)."""
    return list(_cached_errors(str(path), path.stat().st_mtime_ns))


@functools.cache
def _cached_errors(path: str, mtime_ns: int) -> tuple[str, ...]:
    """Inputs are checked by several tests: dciodvfy runs once per file version."""
    return tuple(re.sub(r"=\s*<[^>]*>", "", line) for line in dciodvfy_errors(Path(path)))


def _new_errors(pairs: list[tuple[Path, Path]]) -> list[set[str]]:
    """dciodvfy Error lines of each output that its input did not have, two files at a time (dciodvfy is a
    subprocess: the threads only wait)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda pair: set(_errors(pair[1])) - set(_errors(pair[0])), pairs))


def test_markers_and_conformance(mock_ct: Path, mock_run: tuple[list[dict], Path]) -> None:
    records, _ = mock_run
    for record in records[:3]:
        ds = pydicom.dcmread(record["outputs"][0])
        assert ds.PatientIdentityRemoved == "YES"
        assert "Basic Application Confidentiality Profile" in str(ds.DeidentificationMethod)
        codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
        assert codes == [("113100", "DCM")]
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.PatientID.startswith("ANON-") and ds.PatientName == ds.PatientID
        assert not set(_errors(Path(record["outputs"][0]))) - set(_errors(Path(record["input"])))


def test_dciodvfy_no_new_errors_on_pydicom_files(pydicom_run: tuple[object, list[dict], Path]) -> None:
    _, records, _ = pydicom_run
    names = {"CT_small.dcm", "MR_small.dcm", "test-SR.dcm", "rtplan.dcm", "rtstruct.dcm"}
    # dciodvfy cannot inflate Deflated Explicit VR files (it fails on the input too; DCMTK reads ours).
    pairs = {Path(r["input"]).name: (Path(r["input"]), Path(r["outputs"][0])) for r in records
             if r["status"] == "ok" and Path(r["input"]).name != "image_dfl.dcm"}
    checked = dict(zip(pairs, _new_errors(list(pairs.values())), strict=True))
    assert names <= set(checked) and len(checked) > 100
    assert {name: new for name, new in checked.items() if new} == {}


def test_pixels_pass_through_byte_for_byte(pydicom_run: tuple[object, list[dict], Path],
                                           mock_run: tuple[list[dict], Path]) -> None:
    _, precords, _ = pydicom_run
    records, _ = mock_run
    compressed = 0
    for record in [r for r in precords if r["status"] == "ok"] + records[:2]:
        before = pydicom.dcmread(record["input"], force=True)
        if "PixelData" not in before:
            continue
        after = pydicom.dcmread(record["outputs"][0])
        assert after.PixelData == before.PixelData, record["input"]
        if getattr(before, "file_meta", None) is not None and "TransferSyntaxUID" in before.file_meta:
            syntax = before.file_meta.TransferSyntaxUID
            assert after.file_meta.TransferSyntaxUID == syntax
            compressed += syntax.is_compressed
    assert compressed >= 10  # JPEG, JPEG 2000, JPEG-LS, RLE inputs were among them


# --------------------------------------------------------------------------- options

def test_retain_dates_shift_is_one_offset_per_patient(mock_studies: Path, tmp_path: Path) -> None:
    proc, records = anonymize(mock_studies, "-o", tmp_path / "out", "--retain-dates", "shift")
    assert proc.returncode == 0, proc.stderr
    offsets: dict[str, set[int]] = {}
    for record in records:
        before, after = pydicom.dcmread(record["input"]), pydicom.dcmread(record["outputs"][0])
        for keyword in ("StudyDate", "SeriesDate", "ContentDate"):
            old = date.fromisoformat(str(before.get(keyword)))
            new = date.fromisoformat(str(after.get(keyword)))
            offsets.setdefault(after.PatientID, set()).add((old - new).days)
        assert after.StudyTime == before.StudyTime  # whole days: times of day stay
        assert after.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in [c.CodeValue for c in after.DeidentificationMethodCodeSequence]
    assert len(offsets) == 3
    assert all(len(days) == 1 and 0 < next(iter(days)) <= 3652 for days in offsets.values())


def test_map_records_pseudonyms(mock_studies: Path, tmp_path: Path) -> None:
    db = tmp_path / "map.sqlite"
    proc, records = anonymize(mock_studies, "-o", tmp_path / "out", "--map", db)
    assert proc.returncode == 0, proc.stderr
    rows = {(k, o): p for k, o, p in sqlite3.connect(db).execute("SELECT kind, original, pseudonym FROM pseudonyms")}
    for record in records:
        before, after = pydicom.dcmread(record["input"]), pydicom.dcmread(record["outputs"][0])
        assert rows[("patient_id", before.PatientID)] == after.PatientID
        assert rows[("accession", before.AccessionNumber)] == after.AccessionNumber
        assert rows[("study_uid", before.StudyInstanceUID)] == after.StudyInstanceUID
    assert len({o for (k, o) in rows if k == "patient_id"}) == 3
    proc, _ = anonymize(mock_studies, "-o", tmp_path / "nomap")
    assert not list(tmp_path.glob("nomap/**/*.sqlite"))


def test_retain_options_keep_and_replace(mock_ct: Path, tmp_path: Path) -> None:
    proc, records = anonymize(mock_ct, "-o", tmp_path / "out", "--retain-uids", "--retain-patient-characteristics",
                              "--retain-device", "--keep", "StudyDescription", "--replace", "(0010,0010)=TRIAL^01",
                              "--replace", "ClinicalTrialSponsorName=ACME")
    assert proc.returncode == 0, proc.stderr
    before, after = pydicom.dcmread(records[0]["input"]), pydicom.dcmread(records[0]["outputs"][0])
    assert after.SOPInstanceUID == before.SOPInstanceUID and after.FrameOfReferenceUID == before.FrameOfReferenceUID
    assert after.PatientSex == before.PatientSex and after.PatientAge == before.PatientAge
    assert after.DeviceSerialNumber == before.DeviceSerialNumber
    assert after.StudyDescription == before.StudyDescription
    assert after.PatientName == "TRIAL^01" and after.ClinicalTrialSponsorName == "ACME"
    codes = {c.CodeValue for c in after.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113108", "113109", "113110"}


def test_kaapana_profile_touches_its_45_tags_only_and_writes_valid_objects(tmp_path: Path) -> None:
    """Kaapana erases its 45 tags; erasing SOP/Study/Series/Frame UIDs and Type 2 attributes left invalid objects
    whose file meta kept the original SOP Instance UID.  Now UIDs are keyed, Type 2 ones emptied."""
    src = next(p for p in pydicom_test_files() if p.name == "CT_small.dcm")
    proc, records = anonymize(src, "-o", tmp_path / "out", "--profile", "kaapana")
    assert proc.returncode == 0, proc.stderr
    before, after = pydicom.dcmread(src), pydicom.dcmread(records[0]["outputs"][0])
    tags = set(load_kaapana_tags())
    assert len(tags) == 45
    keyed = Keyed(KEY.encode())
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert after.get(keyword) == keyed.uid(before.get(keyword)), keyword
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "ReferringPhysicianName"):
        assert keyword in after and not after.get(keyword), keyword  # Type 2: present, empty
    for tag in {int(e.tag) for e in before} & tags:  # erased, or keyed (UIDs), or emptied (Type 2)
        assert tag not in after or after[tag].VR == "UI" or not after[tag].value, hex(tag)
    assert {int(e.tag) for e in before} - tags == {int(e.tag) for e in after} - tags  # everything else stays
    assert any(e.tag.is_private for e in after) and after.StudyDate == before.StudyDate
    assert not set(_errors(Path(records[0]["outputs"][0]))) - set(_errors(src))


# --------------------------------------------------------------------------- guards, errors, dry run

def test_burned_in_guard(mock_ct: Path, tmp_path: Path) -> None:
    src = dicom_files(mock_ct)[0]
    us = tmp_path / "in" / "us.dcm"
    us.parent.mkdir()
    ds = pydicom.dcmread(src)
    ds.Modality = "US"
    ds.save_as(us)
    proc = kaapcli("anonymize", us, "-o", tmp_path / "warn", "--key", KEY)
    assert proc.returncode == 0 and "burned-in" in proc.stderr and "us.dcm" in proc.stderr
    proc, records = anonymize(us, "-o", tmp_path / "fail", "--burned-in", "fail")
    assert proc.returncode == 65 and records[0]["status"] == "failed" and "us.dcm" in records[0]["message"]
    assert not list((tmp_path / "fail").rglob("*.dcm"))
    ds.BurnedInAnnotation = "NO"
    ds.save_as(us)
    proc = kaapcli("anonymize", us, "-o", tmp_path / "no", "--burned-in", "fail", "--key", KEY)
    assert proc.returncode == 0 and "burned-in" not in proc.stderr


def test_no_key_is_a_usage_error_and_the_key_is_never_printed(mock_ct: Path, tmp_path: Path) -> None:
    proc = kaapcli("anonymize", mock_ct, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "hint:" in proc.stderr and "KAAPCLI_ANON_KEY" in proc.stderr
    secret = "very-secret-key-value"
    proc = kaapcli("anonymize", mock_ct, "-o", tmp_path / "out", "-n", env={"KAAPCLI_ANON_KEY": secret})
    assert proc.returncode == 0 and secret not in proc.stdout + proc.stderr
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    proc = kaapcli("anonymize", mock_ct, "-o", tmp_path / "kf", "--key-file", key_file, "--format", "jsonl")
    record = json.loads(proc.stdout.splitlines()[0])
    original = pydicom.dcmread(record["input"], stop_before_pixels=True).SOPInstanceUID
    assert Path(record["outputs"][0]).stem == Keyed(secret.encode()).uid(original)  # the file's key was used
    assert secret not in proc.stdout + proc.stderr


def test_all_pydicom_files_without_tracebacks(tmp_path: Path) -> None:
    root = Path(pydicom_test_files()[0]).parent
    proc, records = anonymize(root, "-o", tmp_path / "out", "--burned-in", "ignore")
    assert proc.returncode == 1  # some inputs are broken on purpose
    assert "Traceback" not in proc.stderr
    failed = {Path(r["input"]).name: r["message"] for r in records if r["status"] == "failed"}
    assert "truncated" in failed["MR_truncated.dcm"] and "MR_truncated.dcm" in failed["MR_truncated.dcm"]
    assert sum(r["status"] == "ok" for r in records) > 100
    for message in failed.values():
        assert "\n" not in message


def test_dry_run_lists_actions_and_writes_nothing(mock_ct: Path, tmp_path: Path) -> None:
    src = dicom_files(mock_ct)[0]
    proc = kaapcli("anonymize", src, "-o", tmp_path / "out", "--key", KEY, "--dry-run")
    assert proc.returncode == 0 and not (tmp_path / "out").exists()
    assert re.search(r"\(0010,0010\) PatientName\s+Z->D\s+keyed pseudonym", proc.stderr)
    assert re.search(r"\(0008,0018\) SOPInstanceUID\s+U\s+keyed UID", proc.stderr)
    assert re.search(r"\(0008,0016\) SOPClassUID\s+K$", proc.stderr, re.MULTILINE)
    assert "would write" in proc.stderr


def test_header_encoder_matches_pydicom_writer() -> None:
    """The header encoder (raw elements copied as read, ASCII strings encoded directly) gives exactly pydicom's bytes,
    for every pydicom test file it can read, after edits of the kinds de-identification makes."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    from kaapcli.core import dicom

    compared = 0
    for path in pydicom_test_files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable test files are covered elsewhere
            continue
        implicit, little = ds.original_encoding
        if implicit is None or (implicit and not little):
            continue
        for tag in list(ds.keys())[:: 3]:  # decode a third of the elements; edit the strings among them
            elem = ds[tag]
            if elem.VR in ("UI", "LO", "SH", "CS") and elem.value and tag != 0x00080005:
                elem.value = "1.2.3.4" if elem.VR == "UI" else "ÄNONYM" if elem.VR == "LO" else "X"
            elif elem.VR == "DA":
                elem.value = None
        if "PatientName" in ds:
            ds.PatientName = "Doe^John"
        expected = DicomBytesIO()
        expected.is_implicit_VR, expected.is_little_endian = implicit, little
        try:
            write_dataset(expected, ds)
        except (TypeError, ValueError):  # pydicom cannot write it either (e.g. read implicit, labelled explicit)
            continue
        assert dicom.encode_dataset(ds, implicit, little) == expected.getvalue(), path.name
        compared += 1
    assert compared > 50

    meta = dicom.file_meta("1.2.840.10008.5.1.4.1.1.2", "2.25.123", "1.2.840.10008.1.2.1")
    expected = DicomBytesIO()
    expected.is_implicit_VR, expected.is_little_endian = False, True
    write_file_meta_info(expected, meta)
    assert dicom.encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "2.25.123", "1.2.840.10008.1.2.1") \
        == b"\0" * 128 + b"DICM" + expected.getvalue()


# --------------------------------------------------------------------------- the 2026c table and newer attributes

def test_table_is_the_2026c_edition() -> None:
    from kaapcli.core.anonymize import TABLE_EDITION

    table = load_table()
    assert TABLE_EDITION == "2026c" and len(table.exact) + len(table.masks) == 655
    rows = {0x00100011: "X", 0x00100012: "X", 0x00100014: "X", 0x00100016: "X", 0x00100041: "X", 0x00100047: "X",
            0x00700006: "D", 0x0040B020: "X/D", 0x00100020: "Z/D", 0x00081301: "X", 0x00102162: "X"}
    for tag, basic in rows.items():
        row = table.lookup(tag)
        assert row is not None and row.basic == basic, hex(tag)
    assert table.lookup(0x60023000) is not None and table.lookup(0x50001234) is not None  # the masked rows


def _with_new_patient_attributes(src: Path) -> pydicom.Dataset:
    """CT_small plus the patient attributes of recent editions (pydicom 3.0 knows none of them, so they are added
    by tag and VR), one attribute of a future edition, an unlisted person name and two that must survive."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def code(value: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "LN", meaning
        return item

    ds = pydicom.dcmread(src)
    name = Dataset()
    name.add_new(0x00100012, "LT", "Johnny Secretname")  # Name to Use
    name.add_new(0x00100013, "UT", "prefers Johnny Secretname")  # Name to Use Comment
    ds.add_new(0x00100011, "SQ", Sequence([name]))  # Person Names to Use Sequence
    pronoun = Dataset()
    pronoun.add_new(0x00100015, "SQ", Sequence([code("LA29518-0", "he/him/his/himself")]))  # Pronoun Code Seq.
    pronoun.add_new(0x00100016, "UT", "pronoun comment Secretname")  # Pronoun Comment
    ds.add_new(0x00100014, "SQ", Sequence([pronoun]))  # Third Person Pronouns Sequence
    gender = Dataset()
    gender.add_new(0x00100044, "SQ", Sequence([code("LA22878-5", "Identifies as male")]))  # Gender Identity Code
    gender.add_new(0x00100045, "UT", "gender comment Secretname")  # Gender Identity Comment
    ds.add_new(0x00100041, "SQ", Sequence([gender]))  # Gender Identity Sequence
    ds.add_new(0x00100042, "UT", "sex parameters comment Secretname")
    ds.add_new(0x00100047, "UR", "http://example.org/Secretname")
    ds.add_new(0x00100099, "LO", "Future Secretname")  # an attribute no edition has defined yet
    ds.add_new(0x00380099, "LO", "Future visit Secretname")
    ds.add_new(0x00142006, "PN", "Secretname^Evaluator")  # Evaluator Name: a PN the table does not list
    ds.add_new(0x00102201, "LO", "Canine")  # Patient Species Description: Type 1C, identifies nobody
    ds.add_new(0x00102210, "CS", "QUADRUPED")
    return ds


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_newer_patient_attributes_and_future_ones_are_removed(tmp_path: Path, syntax: str) -> None:
    """Person Names to Use, pronouns, gender identity (2026c rows pydicom does not know), an attribute of the
    patient or visit group no edition lists yet, and an unlisted PN all leave; species information stays."""
    src = next(p for p in pydicom_test_files() if p.name == "CT_small.dcm")
    ds = _with_new_patient_attributes(src)
    path = tmp_path / "in" / f"{syntax}.dcm"
    path.parent.mkdir()
    if syntax == "implicit":  # pydicom then reads the unknown tags back as UN: they are matched by tag alone
        from pydicom.uid import ImplicitVRLittleEndian

        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True)
    else:
        ds.save_as(path)
    proc, records = anonymize(path, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = Path(records[0]["outputs"][0])
    after = pydicom.dcmread(out)
    gone = (0x00100011, 0x00100014, 0x00100041, 0x00100042, 0x00100047, 0x00100099, 0x00380099)
    assert not {hex(t) for t in gone} & {hex(int(e.tag)) for e in after}
    assert after[0x00142006].value == "ANONYMIZED"
    assert b"Secretname" not in out.read_bytes() and b"SECRETNAME" not in out.read_bytes()
    assert after[0x00102201].value == "Canine" and after[0x00102210].value == "QUADRUPED"


# --------------------------------------------------------------------------- waveforms and structured reports

CONCEPTS = ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence")


def _content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The SR content tree, depth first."""
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(_content_items(item))
    return items


def _codes(ds: pydicom.Dataset) -> list[tuple[str, str, str]]:
    """The coded concepts of the content tree (concept names, coded values, units), in order."""
    return [(code.CodeValue, code.CodingSchemeDesignator, code.get("CodeMeaning", ""))
            for item in _content_items(ds) for keyword in CONCEPTS for code in item.get(keyword, [])
            for code in [code] + list(code.get("MeasurementUnitsCodeSequence", []))]


def _warnings(path: Path) -> int:
    import subprocess

    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    return sum(line.startswith("Warning") for line in (proc.stdout + proc.stderr).splitlines())


def test_ecg_annotation_text_is_replaced_or_cleaned(tmp_path: Path) -> None:
    """The ECG's Unformatted Text Value (free text) was copied verbatim: now a dummy, or kept only when it holds
    nothing identifying (--clean-structured-content)."""
    src = next(p for p in pydicom_test_files() if p.name == "waveform_ecg.dcm")
    ds = pydicom.dcmread(src)
    ds.WaveformAnnotationSequence[1].UnformattedTextValue = "Pat. Rossi Mario, nato 23/01/1971, MRN 64234199"
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "ecg.dcm")
    texts_before = [i.get("UnformattedTextValue") for i in ds.WaveformAnnotationSequence]
    proc, records = anonymize(tmp_path / "in", "-o", tmp_path / "basic")
    assert proc.returncode == 0, proc.stderr
    after = pydicom.dcmread(records[0]["outputs"][0])
    texts = [i.get("UnformattedTextValue") for i in after.WaveformAnnotationSequence]
    assert [t is None for t in texts] == [t is None for t in texts_before]
    assert set(texts) - {None} == {"ANONYMIZED"}
    assert b"Rossi" not in Path(records[0]["outputs"][0]).read_bytes()
    assert not set(_errors(Path(records[0]["outputs"][0]))) - set(_errors(src))

    proc, records = anonymize(tmp_path / "in", "-o", tmp_path / "clean", "--clean-structured-content")
    after = pydicom.dcmread(records[0]["outputs"][0])
    texts = [i.get("UnformattedTextValue") for i in after.WaveformAnnotationSequence]
    assert texts[0] == texts_before[0] == "RITMO SINUSALE" and texts[1] == "ANONYMIZED"
    assert texts[2:] == texts_before[2:]
    assert "113104" in {c.CodeValue for c in after.DeidentificationMethodCodeSequence}


@pytest.mark.parametrize("name", ["test-SR.dcm", "reportsi.dcm"])
def test_sr_keeps_coded_concepts_and_cleans_identity(tmp_path: Path, name: str) -> None:
    """The Basic Profile used to replace every code of an SR with ANONYMIZED (dciodvfy warnings 38 -> 67 on
    test-SR.dcm); codes stay, text values, person names and dates do not, UID references are keyed."""
    src = next(p for p in pydicom_test_files() if p.name == name)
    proc, records = anonymize(src, "-o", tmp_path / "out", "--retain-dates", "shift")
    assert proc.returncode == 0, proc.stderr
    out = Path(records[0]["outputs"][0])
    before, after = pydicom.dcmread(src), pydicom.dcmread(out)
    del after.DeidentificationMethodCodeSequence  # the codes the de-identifier adds
    assert _codes(after) == _codes(before) and len(_codes(before)) > 5
    keyed = Keyed(KEY.encode())
    offset = keyed.day_offset(before.PatientID or str(before.PatientName) or before.StudyInstanceUID)
    old_items, new_items = _content_items(before), _content_items(after)
    assert len(old_items) == len(new_items)  # the tree keeps its shape
    seen = set()
    for old, new in zip(old_items, new_items, strict=True):
        for keyword in ("ValueType", "RelationshipType"):
            assert old.get(keyword) == new.get(keyword)
        for keyword in ("TextValue", "PersonName"):
            if old.get(keyword):
                assert new.get(keyword) == "ANONYMIZED", (keyword, new.get(keyword))
                seen.add(keyword)
        if old.get("DateTime"):
            moved = date.fromisoformat(str(old.DateTime)[:8]) - date.fromisoformat(str(new.DateTime)[:8])
            assert moved.days == offset and str(new.DateTime)[8:] == str(old.DateTime)[8:]
            seen.add("DateTime")
        if old.get("UID"):
            assert new.UID == keyed.uid(old.UID)
            seen.add("UID")
        for ref_old, ref_new in zip(old.get("ReferencedSOPSequence", []), new.get("ReferencedSOPSequence", []),
                                    strict=True):
            uid = str(ref_old.ReferencedSOPInstanceUID)
            assert ref_new.ReferencedSOPInstanceUID == (uid if is_well_known_uid(uid) else keyed.uid(uid))
            assert ref_new.ReferencedSOPClassUID == ref_old.ReferencedSOPClassUID
            seen.add("ReferencedSOPInstanceUID")
    assert {"TextValue", "ReferencedSOPInstanceUID"} <= seen
    assert _warnings(out) <= _warnings(src) + 1  # was 38 -> 67 (test-SR) and 5 -> 15 (reportsi)
    assert not set(_errors(out)) - set(_errors(src))


def test_sr_references_follow_the_images_they_point_at(mock_ct: Path, tmp_path: Path) -> None:
    """An SR referencing CT images, de-identified with them, still references the same (remapped) images."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    src = tmp_path / "in"
    shutil.copytree(mock_ct, src)
    images = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_files(src)[:2]]
    sr = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == "test-SR.dcm"))
    sr.StudyInstanceUID = images[0].StudyInstanceUID
    refs = [i for i in sr.iterall() if i.keyword == "ReferencedSOPSequence"]
    for elem, image in zip(refs, images, strict=False):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
        elem.value = Sequence([item])
    sr.save_as(src / "sr.dcm")
    proc, records = anonymize(src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    outs = {r["input"]: pydicom.dcmread(r["outputs"][0], stop_before_pixels=True) for r in records}
    sr_after = outs[str(src / "sr.dcm")]
    new_uids = {outs[str(p)].SOPInstanceUID for p in dicom_files(src)[:2]}
    referenced = {i.ReferencedSOPInstanceUID for i in sr_after.iterall() if i.keyword == "ReferencedSOPSequence"
                  for i in i.value}
    assert new_uids <= referenced
    assert sr_after.StudyInstanceUID == outs[str(dicom_files(src)[0])].StudyInstanceUID


# --------------------------------------------------------------------------- every profile writes valid objects

def test_dciodvfy_no_new_errors_with_kaapana_profile_and_realistic_pseudonyms(
        distinct_pydicom_files: Path, tmp_path: Path) -> None:
    pairs = {}
    for label, args in (("kaapana", ["--profile", "kaapana"]),
                        ("realistic", ["--pseudonyms", "realistic", "--retain-dates", "shift",
                                       "--clean-structured-content"])):
        _, records = anonymize(distinct_pydicom_files, "-o", tmp_path / label, "--burned-in", "ignore", *args)
        for record in records:
            src = Path(record["input"])
            if record["status"] == "ok" and src.name != "image_dfl.dcm":  # dciodvfy cannot inflate either way
                before = pydicom.dcmread(src, stop_before_pixels=True, force=True)
                out = pydicom.dcmread(record["outputs"][0], stop_before_pixels=True)
                for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                    assert out.get(keyword) or not before.get(keyword), (keyword, record)
                assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID, record
                pairs[(label, src.name)] = (src, Path(record["outputs"][0]))
    checked = dict(zip(pairs, _new_errors(list(pairs.values())), strict=True))
    assert len(checked) > 200
    assert {key: new for key, new in checked.items() if new} == {}


# --------------------------------------------------------------------------- the map, realistic pseudonyms, modes

def test_map_and_its_wal_files_are_private_and_stay_out_of_the_trees(mock_ct: Path, tmp_path: Path) -> None:
    import os
    import stat

    db = tmp_path / "keys" / "map.sqlite"
    old = os.umask(0o022)
    try:
        proc, _ = anonymize(mock_ct, "-o", tmp_path / "out", "--map", db, "-w", "2")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    parts = [db, db.with_name("map.sqlite-wal"), db.with_name("map.sqlite-shm")]
    assert all(p.exists() for p in parts[:2])
    for part in parts:
        if part.exists():
            assert stat.S_IMODE(part.stat().st_mode) == 0o600, part
    os.chmod(db, 0o644)  # a map made before: tightened on the next run
    anonymize(mock_ct, "-o", tmp_path / "out", "--map", db)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for where in (tmp_path / "out" / "map.sqlite", mock_ct / "map.sqlite"):
        proc, _ = anonymize(mock_ct, "-o", tmp_path / "out", "--map", where)
        assert proc.returncode == 2 and "hint:" in proc.stderr and not where.exists(), proc.stderr


def test_realistic_pseudonyms_are_keyed_names_of_the_sex_and_shifted_birth_dates(mock_studies: Path,
                                                                                 tmp_path: Path) -> None:
    from kaapcli.core.anonymize import load_names

    names = load_names()
    proc, records = anonymize(mock_studies, "-o", tmp_path / "a", "--pseudonyms", "realistic", "--retain-dates",
                              "shift")
    assert proc.returncode == 0, proc.stderr
    pseudonyms = {}
    for record in records:
        before, after = pydicom.dcmread(record["input"]), pydicom.dcmread(record["outputs"][0])
        family, given, initial = str(after.PatientName).split("^")
        assert family in names["family"] and len(initial) == 1
        assert given in names["male" if before.PatientSex == "M" else "female"], (before.PatientSex, given)
        age = date.fromisoformat(before.StudyDate) - date.fromisoformat(before.PatientBirthDate)
        assert date.fromisoformat(after.StudyDate) - date.fromisoformat(after.PatientBirthDate) == age
        assert after.PatientBirthDate != before.PatientBirthDate and after.PatientID.startswith("ANON-")
        pseudonyms.setdefault(before.PatientID, set()).add(str(after.PatientName))
        assert "realistic" in str(after.DeidentificationMethod)
    assert len(pseudonyms) == 3 and all(len(v) == 1 for v in pseudonyms.values())  # one name per patient
    _, again = anonymize(mock_studies, "-o", tmp_path / "b", "--pseudonyms", "realistic", "--retain-dates", "shift")
    assert [Path(r["outputs"][0]).read_bytes() for r in again] == [Path(r["outputs"][0]).read_bytes() for r in records]
    _, other = anonymize(mock_studies, "-o", tmp_path / "c", "--pseudonyms", "realistic", key="other-key")
    assert {str(pydicom.dcmread(r["outputs"][0]).PatientName) for r in other} != \
        {n for v in pseudonyms.values() for n in v}
    _, default = anonymize(mock_studies, "-o", tmp_path / "d")
    ds = pydicom.dcmread(default[0]["outputs"][0])
    assert ds.PatientName == ds.PatientID and ds.PatientID.startswith("ANON-") and not ds.PatientBirthDate


def test_single_slice_mode_takes_the_first_file_of_each_series(mock_ct: Path, tmp_path: Path) -> None:
    proc, records = anonymize(mock_ct, "-o", tmp_path / "out", "--mode", "single-slice")
    assert proc.returncode == 0, proc.stderr
    assert len(records) == 2 and len(dicom_files(tmp_path / "out")) == 2
    by_series: dict[str, list[Path]] = {}
    for path in dicom_files(mock_ct):
        by_series.setdefault(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID, []).append(path)
    keyed = Keyed(KEY.encode())
    expected = {keyed.uid(pydicom.dcmread(sorted(paths)[0], stop_before_pixels=True).SOPInstanceUID)
                for paths in by_series.values()}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in dicom_files(tmp_path / "out")} == expected
    assert not set(by_series) & {r["input"] for r in records}  # logs name the series by its keyed UID


def test_in_place_overwrites_atomically_and_only_when_asked(mock_ct: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(mock_ct, data)
    before = {p: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in dicom_files(data)}
    for args in ([data, "-o", data], [data, "-o", tmp_path], [data]):
        proc = kaapcli("anonymize", *args, "--key", KEY)
        assert proc.returncode == 2 and "--in-place" in proc.stderr, args
    assert {p: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in dicom_files(data)} == before
    proc, records = anonymize(data, "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert sorted(Path(r["outputs"][0]) for r in records) == sorted(before)  # the names are kept
    keyed = Keyed(KEY.encode())
    for path, uid in before.items():
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == keyed.uid(uid) and ds.PatientIdentityRemoved == "YES"
    assert not [p for p in data.rglob("*.kaapcli-part")]  # no temporary files left
    proc, records = anonymize(data, "--in-place")  # a second run would map the UIDs again: it is skipped
    assert proc.returncode == 0 and {r["status"] for r in records} == {"skipped"}
    assert all(pydicom.dcmread(p).SOPInstanceUID == keyed.uid(uid) for p, uid in before.items())
