"""kaapcli dcm2json: Kaapana's series metadata JSON (DESIGN §3.1), checked against the data it came from,
against DCMTK's dcm2json (PS3.18 JSON) and over every file of pydicom's test data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from kaapcli.core.dicom import peek, peek_bytes
from kaapcli.core.fsio import is_dicom
from kaapcli.core.meta import instance_document, series_document
from kaapcli.exitcodes import DataError
from tests.conftest import dcmtk, dicom_files, kaapcli, pydicom_test_files

KEY_RE = re.compile(r"[0-9A-F]{8} [A-Za-z0-9]+_(keyword|date|time|datetime|integer|float|object)"
                    r"(_alphabetic|_ideographic|_phonetic)?")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
TIME_RE = re.compile(r"\d{2}:\d{2}:\d{2}\.\d{6}")
DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}")


def check_types(doc: dict[str, Any]) -> set[str]:
    """Assert every key follows the scheme and every value has its suffix's type; return the suffixes seen."""
    seen: set[str] = set()
    assert list(doc) == sorted(doc), "keys are sorted by tag"
    for key, value in doc.items():
        assert KEY_RE.fullmatch(key), key
        suffix = key.split("_", 1)[1]
        seen.add(suffix)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item is None:
                continue
            if suffix == "object":
                assert isinstance(item, dict), key
                seen |= check_types(item)
            elif suffix == "integer":
                assert isinstance(item, int) and not isinstance(item, bool), key
            elif suffix == "float":
                assert isinstance(item, float), key
            elif suffix == "date":
                assert DATE_RE.fullmatch(item), (key, item)
            elif suffix == "time":
                assert TIME_RE.fullmatch(item), (key, item)
            elif suffix == "datetime":
                assert DATETIME_RE.fullmatch(item), (key, item)
            else:
                assert isinstance(item, str), key
    return seen


def read_docs(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def headers(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


@pytest.fixture()
def lenient_values():
    """Let tests put malformed values into datasets (pydicom validates on assignment)."""
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    config.settings.writing_validation_mode = mode


# --------------------------------------------------------------------------- CLI on mock CT

def test_one_document_per_series_from_the_first_instance(mock_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = kaapcli("dcm2json", mock_ct, "-o", out)
    assert proc.returncode == 0, proc.stderr
    files = dicom_files(mock_ct)
    by_series: dict[str, list[Dataset]] = {}
    for ds in headers(files):
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    docs = read_docs(out)
    assert set(docs) == set(by_series)
    assert sorted(proc.stdout.split()) == sorted(str(out / f"{uid}.json") for uid in by_series)

    for uid, members in by_series.items():
        doc = docs[uid]
        first = min(members, key=lambda d: int(d.InstanceNumber))
        assert doc["00080018 SOPInstanceUID_keyword"] == first.SOPInstanceUID
        assert doc["0020000E SeriesInstanceUID_keyword"] == uid
        assert doc["00200013 InstanceNumber_integer"] == 1
        assert doc["00000000 NumberOfInstances_integer"] == len(members) == 8
        assert check_types(doc) >= {"keyword", "date", "time", "integer", "float", "keyword_alphabetic"}
        # values as the dataset has them
        assert doc["00080060 Modality_keyword"] == "CT"
        assert doc["00080008 ImageType_keyword"] == list(first.ImageType)
        assert doc["00080020 StudyDate_date"] == f"{first.StudyDate[:4]}-{first.StudyDate[4:6]}-{first.StudyDate[6:]}"
        assert doc["00100010 PatientName_keyword_alphabetic"] == str(first.PatientName)
        assert doc["00200037 ImageOrientationPatient_float"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert doc["00280030 PixelSpacing_float"] == [0.8, 0.8]
        assert doc["00281052 RescaleIntercept_float"] == -1024.0
        assert doc["00280010 Rows_integer"] == 64
        assert not any("PixelData" in k for k in doc)
        # derived fields
        acquired = datetime.strptime(first.AcquisitionDate + first.AcquisitionTime, "%Y%m%d%H%M%S")
        assert doc["00000000 Timestamp_datetime"] == f"{acquired:%Y-%m-%d %H:%M:%S}.000000"
        assert doc["00000000 TimeTagUsed_keyword"] == "AcquisitionDate + AcquisitionTime"
        assert doc["00000000 DayOfWeek_integer"] == acquired.weekday()
        born, studied = (datetime.strptime(v, "%Y%m%d").date() for v in (first.PatientBirthDate, first.StudyDate))
        age = studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))
        assert doc["00000000 DerivedPatientAge_integer"] == age
        assert doc["00000000 CuratedModality_keyword"] == "CT"
        newest = max(f.stat().st_mtime for f in files if pydicom.dcmread(f, specific_tags=["SeriesInstanceUID"])
                     .SeriesInstanceUID == uid)
        arrived = datetime.fromtimestamp(newest, UTC)
        assert doc["00000000 TimestampArrived_datetime"] == f"{arrived:%Y-%m-%d %H:%M:%S.%f}"
        assert doc["00000000 TimestampArrived_date"] == f"{arrived:%Y-%m-%d}"
        assert doc["00000000 TimestampArrivedHour_integer"] == arrived.hour


def test_rerun_is_skipped_and_force_rebuilds(mock_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert kaapcli("dcm2json", mock_ct, "-o", out, "-q").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    again = kaapcli("dcm2json", mock_ct, "-o", out, "--format", "jsonl")
    assert again.returncode == 0, again.stderr
    records = [json.loads(line) for line in again.stdout.splitlines()]
    assert records and all(r["status"] == "skipped" for r in records)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == before
    forced = kaapcli("dcm2json", mock_ct, "-o", out, "--force", "--format", "jsonl")
    records = [json.loads(line) for line in forced.stdout.splitlines()]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert all(p.stat().st_mtime_ns != before[p] for p in out.glob("*.json"))


def test_per_instance_legacy_names_and_tags(mock_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = kaapcli("dcm2json", mock_ct, "-o", out, "--per-instance", "--legacy-names", "--tags", "train, lung")
    assert proc.returncode == 0, proc.stderr
    docs = read_docs(out)
    assert set(docs) == {ds.SOPInstanceUID for ds in headers(dicom_files(mock_ct))}
    for doc in docs.values():
        assert "00200032 ImagePosition(Patient)_float" in doc
        assert "00200032 ImagePositionPatient_float" not in doc
        assert "00200052 FrameofReferenceUID_keyword" in doc
        assert doc["00000000 Tags_keyword"] == ["train", "lung"]
        assert "00000000 NumberOfInstances_integer" not in doc  # a series aggregate


def test_several_studies_one_document_per_series(mock_ct: Path, mock_studies: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = kaapcli("dcm2json", mock_ct, mock_studies, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    series = {ds.SeriesInstanceUID for ds in headers(dicom_files(mock_ct) + dicom_files(mock_studies))}
    assert set(read_docs(out)) == series and len(series) == 5


def test_malformed_values_are_kept_as_text_with_a_warning(mock_ct: Path, tmp_path: Path, lenient_values) -> None:
    src = tmp_path / "in"
    src.mkdir()
    ds = pydicom.dcmread(dicom_files(mock_ct)[0])
    ds.SeriesNumber = "2.0"
    ds.StudyDate = "20201350"
    ds.AcquisitionTime = "25:00"
    ds.save_as(src / "bad.dcm")
    shutil.copy(Path(__file__), src / "notes.txt")  # a non-DICOM file met while walking: skipped, not an error
    out = tmp_path / "out"
    proc = kaapcli("dcm2json", src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = read_docs(out)[ds.SeriesInstanceUID]
    assert doc["00200011 SeriesNumber_keyword"] == "2.0"
    assert doc["00080020 StudyDate_keyword"] == "20201350"
    assert doc["00080032 AcquisitionTime_keyword"] == "25:00"
    assert "00080020 StudyDate_date" not in doc
    for text in ("SeriesNumber: malformed IS value '2.0'", "StudyDate: malformed DA value '20201350'",
                 "AcquisitionTime: malformed TM value '25:00'"):
        assert text in proc.stderr
    # the Timestamp falls back past the malformed acquisition time, the age past the malformed study date
    assert doc["00000000 TimeTagUsed_keyword"] == "AcquisitionDate + SeriesTime"
    assert "1 not DICOM" in proc.stderr


def test_broken_files_fail_cleanly_and_the_batch_goes_on(mock_ct: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(mock_ct, src)
    good = dicom_files(src)
    data = good[0].read_bytes()
    (src / "truncated.dcm").write_bytes(data[:600])
    (src / "garbage.dcm").write_bytes(data[:132] + b"\xff" * 200)
    # cut inside the last element before the pixel data, in a series of its own (a patched SeriesInstanceUID)
    uid = pydicom.dcmread(good[0]).SeriesInstanceUID.encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    header_end = len(data) - 64 * 64 * 2 - 12
    (src / "cut_header.dcm").write_bytes(data.replace(uid, other)[:header_end - 1])
    out = tmp_path / "out"
    proc = kaapcli("dcm2json", src, "-o", out)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, proc.stderr
    assert any("truncated.dcm: truncated file" in e for e in errors)
    assert any("cut_header.dcm: truncated file" in e for e in errors)
    assert any("garbage.dcm:" in e for e in errors)
    assert "Traceback" not in proc.stderr
    assert len(read_docs(out)) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".kaapcli-part")]


def test_values_agree_with_dcmtk_dcm2json(mock_ct: Path, tmp_path: Path) -> None:
    """DCMTK's dcm2json (PS3.18 JSON) read the same files: same dates, names, numbers, multi-values."""
    import pydicom.data

    exe = dcmtk("dcm2json")
    sources = [dicom_files(mock_ct)[0], Path(pydicom.data.get_testdata_file("CT_small.dcm"))]
    for n, source in enumerate(sources):
        (tmp_path / f"in{n}").mkdir()
        shutil.copy(source, tmp_path / f"in{n}" / "x.dcm")
    out = tmp_path / "out"
    assert kaapcli("dcm2json", *(tmp_path / f"in{n}" for n in range(len(sources))), "-o", out, "-q").returncode == 0
    docs = read_docs(out)
    for n in range(len(sources)):
        proc = subprocess.run([exe, str(tmp_path / f"in{n}" / "x.dcm")], capture_output=True, text=True, check=True)
        ref = {tag: element.get("Value") for tag, element in json.loads(proc.stdout).items()}
        ours = docs[ref["0020000E"][0]]
        da = ref["00080020"][0]
        assert ours["00080020 StudyDate_date"] == f"{da[:4]}-{da[4:6]}-{da[6:]}"
        assert ours["00100010 PatientName_keyword_alphabetic"] == ref["00100010"][0]["Alphabetic"]
        assert ours["00200037 ImageOrientationPatient_float"] == pytest.approx(ref["00200037"])
        assert ours["00200032 ImagePositionPatient_float"] == pytest.approx(ref["00200032"])
        assert ours["00280010 Rows_integer"] == ref["00280010"][0]
        assert ours["00080008 ImageType_keyword"] == ref["00080008"]
        assert ours["00080018 SOPInstanceUID_keyword"] == ref["00080018"][0]


# --------------------------------------------------------------------------- every pydicom test file

def test_every_pydicom_test_file(tmp_path: Path) -> None:
    files = pydicom_test_files()
    out = tmp_path / "out"
    proc = kaapcli("dcm2json", *files, "-o", out)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert all(len(e) < 400 for e in errors)

    readable: set[str] = set()  # series of the DICOM-looking files pydicom reads with a SeriesInstanceUID
    for f in files:
        if not is_dicom(f):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uid = pydicom.dcmread(f, stop_before_pixels=True, force=True).get("SeriesInstanceUID")
        except Exception:  # noqa: BLE001 - unreadable for pydicom: must be a failure for us too
            continue
        if uid:
            readable.add(str(uid))
    docs = read_docs(out)
    assert set(docs) == readable
    for uid, doc in docs.items():
        assert doc["0020000E SeriesInstanceUID_keyword"] == uid
        check_types(doc)
    assert len(errors) == int(re.search(r"(\d+) failed", proc.stderr)[1])


# --------------------------------------------------------------------------- library: instance_document

def test_person_names_sequences_and_binary_values() -> None:
    from pydicom.valuerep import PersonName

    ds = Dataset()
    ds.PatientName = PersonName("Yamada^Tarou=山田^太郎=やまだ^たろう")
    ds.OtherPatientNames = ["Doe^John", "Roe^Jane"]
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedStudySequence = Sequence([item])
    items = [Dataset(), Dataset()]
    items[0].CodeValue, items[1].CodeValue = "A", "B"
    ds.AnatomicRegionSequence = Sequence(items)
    ds.ReferencedImageSequence = Sequence([])
    ds.LargestImagePixelValue = 7
    ds.FrameIncrementPointer = 0x00181063
    ds.DiffusionGradientOrientation = [float("nan"), 0.0, float("inf")]  # FD: binary floats
    ds.EncapsulatedDocument = b"\x00\x01"
    ds.add_new(0x00091010, "LO", "private")
    doc, notes = instance_document(ds)
    assert doc["00100010 PatientName_keyword_alphabetic"] == "Yamada^Tarou"
    assert doc["00100010 PatientName_keyword_ideographic"] == "山田^太郎"
    assert doc["00100010 PatientName_keyword_phonetic"] == "やまだ^たろう"
    assert doc["00101001 OtherPatientNames_keyword_alphabetic"] == ["Doe^John", "Roe^Jane"]
    assert "00101001 OtherPatientNames_keyword_ideographic" not in doc
    assert doc["00081110 ReferencedStudySequence_object"] == {"00081155 ReferencedSOPInstanceUID_keyword": "1.2.3"}
    assert doc["00082218 AnatomicRegionSequence_object"] == [{"00080100 CodeValue_keyword": "A"},
                                                             {"00080100 CodeValue_keyword": "B"}]
    assert "00081140 ReferencedImageSequence_object" not in doc  # no items: no value
    assert doc["00280107 LargestImagePixelValue_integer"] == 7
    assert doc["00280009 FrameIncrementPointer_keyword"] == "00181063"
    assert doc["00189089 DiffusionGradientOrientation_float"] == [None, 0.0, None]
    assert sum("not valid JSON" in n for n in notes) == 2
    assert not any("EncapsulatedDocument" in k or k.startswith("0009") for k in doc)
    json.dumps(doc, allow_nan=False)  # strict JSON


def test_person_name_groups_decoded_from_a_file() -> None:
    """pydicom's Japanese sample (ISO 2022 IR 87): the three component groups, decoded; "^^^^" is no name."""
    import pydicom.data

    doc, notes = series_document([Path(pydicom.data.get_charset_files("chrH31.dcm")[0])])
    assert doc["00100010 PatientName_keyword_alphabetic"] == "Yamada^Tarou"
    assert doc["00100010 PatientName_keyword_ideographic"] == "山田^太郎"
    assert doc["00100010 PatientName_keyword_phonetic"] == "やまだ^たろう"
    assert not [k for k in doc if k.startswith("00080090 ReferringPhysicianName")]
    assert notes == []


def dated(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("values", "stamp", "used"), [
    ({"AcquisitionDateTime": "20200102030405.5", "AcquisitionDate": "20000101", "StudyDate": "19990101"},
     "2020-01-02 03:04:05.500000", "AcquisitionDateTime"),
    ({"AcquisitionDate": "20200102", "AcquisitionTime": "0304", "SeriesDate": "20190101", "SeriesTime": "1111"},
     "2020-01-02 03:04:00.000000", "AcquisitionDate + AcquisitionTime"),
    ({"SeriesDate": "20200102", "ContentTime": "101010", "StudyDate": "20190101", "StudyTime": "090000"},
     "2020-01-02 10:10:10.000000", "SeriesDate + ContentTime"),
    ({"StudyDate": "20200102", "StudyTime": "235959.123"}, "2020-01-02 23:59:59.123000", "StudyDate + StudyTime"),
    ({"ContentDate": "20200102"}, "2020-01-02 00:00:00.000000", "ContentDate"),
])
def test_timestamp_precedence(values: dict[str, str], stamp: str, used: str) -> None:
    doc, _ = instance_document(dated(**values))
    assert doc["00000000 Timestamp_datetime"] == stamp
    assert doc["00000000 TimeTagUsed_keyword"] == used
    assert doc["00000000 DayOfWeek_integer"] == datetime.strptime(stamp[:10], "%Y-%m-%d").weekday()


def test_timestamp_falls_back_to_arrival_and_is_absent_without_any_date() -> None:
    arrived = datetime(2024, 5, 6, 7, 8, 9)
    doc, _ = instance_document(dated(Modality="CT"), arrived=arrived)
    assert doc["00000000 Timestamp_datetime"] == "2024-05-06 07:08:09.000000"
    assert doc["00000000 TimeTagUsed_keyword"] == "TimestampArrived"
    assert doc["00000000 TimestampArrivedHour_integer"] == 7
    doc, _ = instance_document(dated(Modality="CT"))
    assert not [k for k in doc if "Timestamp" in k or "DayOfWeek" in k]


@pytest.mark.parametrize(("values", "age"), [
    ({"PatientBirthDate": "19800615", "StudyDate": "20200614", "PatientAge": "099Y"}, 39),  # birth date wins
    ({"PatientBirthDate": "19800615", "StudyDate": "20200615"}, 40),
    ({"PatientAge": "045Y"}, 45),
    ({"PatientAge": "018M"}, 1),
    ({"PatientAge": "012W"}, 0),  # twelve weeks, not twelve sevenths of a year
    ({"PatientAge": "104W"}, 1),
    ({"PatientAge": "400D"}, 1),
    ({"PatientBirthDate": "20300101", "StudyDate": "20200101", "PatientAge": "005Y"}, 5),  # impossible birth date
])
def test_derived_patient_age(values: dict[str, str], age: int) -> None:
    doc, _ = instance_document(dated(**values))
    assert doc["00000000 DerivedPatientAge_integer"] == age


def test_curated_modality_annotation_labels_and_kaapana_prefixes() -> None:
    doc, _ = instance_document(dated(Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert doc["00000000 CuratedModality_keyword"] == "XR"
    doc, _ = instance_document(dated(Modality="MR", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert doc["00000000 CuratedModality_keyword"] == "MR"

    seg = dated(Modality="SEG", ClinicalTrialSponsorName="kp-lung-study", ClinicalTrialProtocolID="kp-radiology")
    segments = []
    for number, label in enumerate(["liver", "lung, left", "aorta"], 1):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = label
        segments.append(item)
    seg.SegmentSequence = Sequence(segments)
    doc, _ = instance_document(seg)
    assert doc["00000000 AnnotationLabel_keyword"] == ["liver", "lung- left", "aorta"]
    assert doc["00000000 AnnotationLabelsList_keyword"] == "aorta,liver,lung- left"
    assert len(doc["00620002 SegmentSequence_object"]) == 3
    assert doc["00120010 ClinicalTrialSponsorName_keyword"] == "lung-study"
    assert doc["00120020 ClinicalTrialProtocolID_keyword"] == "radiology"

    rt = dated(Modality="RTSTRUCT")
    roi = Dataset()
    roi.ROIName = "PTV"
    rt.StructureSetROISequence = Sequence([roi])
    doc, _ = instance_document(rt)
    assert doc["00000000 AnnotationLabel_keyword"] == ["PTV"]
    assert doc["00000000 AnnotationLabelsList_keyword"] == "PTV"


# --------------------------------------------------------------------------- library: series_document, peek

def test_series_document_orders_by_instance_number_then_path(mock_ct: Path, tmp_path: Path) -> None:
    files = [f for f in dicom_files(mock_ct)
             if pydicom.dcmread(f).SeriesInstanceUID == pydicom.dcmread(dicom_files(mock_ct)[0]).SeriesInstanceUID]
    doc, notes = series_document(list(reversed(files)))
    assert doc["00200013 InstanceNumber_integer"] == 1 and notes == []
    assert doc["00000000 SeriesSizeBytes_integer"] == sum(f.stat().st_size for f in files)
    for f in files:  # peek agrees with pydicom on every file
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert peek(f, [0x0020000E, 0x00200013]) == {0x0020000E: ds.SeriesInstanceUID,
                                                      0x00200013: str(ds.InstanceNumber)}


def test_peek_walks_undefined_length_sequences_and_agrees_with_pydicom(tmp_path: Path) -> None:
    """Real headers carry undefined-length sequences (nested, with items of both kinds) before the UIDs; peek
    steps over them; on every explicit-VR-little-endian file of pydicom's test data it reads what pydicom reads."""
    import pydicom.data
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(source)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "T-D0050", "SRT"
    outer = Dataset()
    outer.ReferencedSOPInstanceUID = "1.2.3.999"  # a deeper (0008,1155): not a top-level value
    outer.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([outer, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    outer["AnatomicRegionSequence"].is_undefined_length = True
    outer.is_undefined_length_sequence_item = True
    target = tmp_path / "seq.dcm"
    ds.save_as(target, enforce_file_format=True)
    raw = target.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in raw  # a sequence delimiter was written: the case under test
    tags = [0x0020000D, 0x0020000E, 0x00080018, 0x00081155]
    assert peek(target, tags) == {0x0020000D: ds.StudyInstanceUID, 0x0020000E: ds.SeriesInstanceUID,
                                  0x00080018: ds.SOPInstanceUID}
    with pytest.raises(DataError):  # cut inside the sequence: the whole file is short
        peek_bytes(raw[:raw.index(b"T-D0050")], tags, whole=True)
    assert peek_bytes(raw[:raw.index(b"T-D0050")], tags) is None  # only a head: pydicom reads the rest
    agreed = 0
    for name in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):  # no download
        found = peek(Path(name), tags[:3])
        if found is None:
            continue
        header = pydicom.dcmread(name, stop_before_pixels=True, force=True)
        assert found == {tag: str(header[tag].value) for tag in tags[:3] if tag in header}, name
        agreed += 1
    assert agreed >= 20


def test_peek_declines_what_it_cannot_read_fast() -> None:
    import pydicom.data

    implicit = Path(pydicom.data.get_testdata_file("MR_small_implicit.dcm"))
    assert peek(implicit, [0x0020000E]) is None  # implicit VR: the caller falls back to pydicom
