"""json2sr: TID 1500 reports that pass dciodvfy and read back with their values, codes and references."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import dciodvfy_errors, dicom_files, kaapcli
from pydicom.sr.codedict import codes

from kaapcli.core import sr as srcore

RADIOMICS = {"ct_seg": {
    "liver": {"Volume (mesh)": 1234.5678, "Approximate volume": 1240.0, "Surface area (mesh)": 456.75,
              "Mean": 63.125, "Energy": 1.5e9,
              "Maximum 3D diameter": 20.5, "diagnostics_Versions": "v3.1"},
    "kidney": {"Volume (mesh)": 99.0, "Skewness": -0.123456789012345},
}}


@pytest.fixture(scope="module")
def seg_case(tmp_path_factory: pytest.TempPathFactory, mock_ct: Path) -> tuple[Path, Path, pydicom.Dataset]:
    """A two-segment SEG (liver, kidney) made with highdicom on the first mock CT series."""
    series_dir = dicom_files(mock_ct)[0].parent
    images = sorted((pydicom.dcmread(f) for f in dicom_files(series_dir)),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((len(images), images[0].Rows, images[0].Columns), np.uint8)
    mask[1:4, 10:30, 10:30] = 1
    mask[3:6, 40:50, 40:50] = 2
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=label, segmented_property_category=codes.SCT.Organ,
        segmented_property_type=ptype, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, label, ptype in ((1, "liver", codes.SCT.Liver), (2, "kidney", codes.SCT.Kidney))]
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")
    seg_dir = tmp_path_factory.mktemp("seg")
    seg.save_as(seg_dir / "ct_seg.dcm")
    return series_dir, seg_dir, seg


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def groups_by_label(sr_path: Path) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    report = hd.sr.srread(sr_path)
    return {str(g.tracking_identifier).split("/")[-1]: g
            for g in report.content.get_volumetric_roi_measurement_groups()}


def measurement(group: object, meaning: str, derivation: str | None = None) -> object:
    found = [m for m in group.get_measurements()  # type: ignore[attr-defined]
             if m.name.meaning == meaning and (derivation is None or (m.derivation and m.derivation.meaning
                                                                        == derivation))]
    assert len(found) == 1, meaning
    return found[0]


def test_radiomics_json_to_conformant_sr(tmp_path: Path, seg_case: tuple[Path, Path, pydicom.Dataset]) -> None:
    series_dir, seg_dir, seg = seg_case
    measurements = write_json(tmp_path / "radiomics.json", RADIOMICS)
    proc = kaapcli("json2sr", measurements, "--seg", seg_dir, "--reference", series_dir, "-o", tmp_path / "sr")
    assert proc.returncode == 0, proc.stderr
    (sr_path,) = dicom_files(tmp_path / "sr")
    assert proc.stdout.split() == [str(sr_path)]
    assert "'diagnostics_Versions' is not a finite number" in proc.stderr  # a warning, not a failure
    assert dciodvfy_errors(sr_path) == []

    ds = pydicom.dcmread(sr_path)
    ct = pydicom.dcmread(dicom_files(series_dir)[0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (ds.PatientID, ds.StudyInstanceUID) == (ct.PatientID, ct.StudyInstanceUID)
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and ct.SOPInstanceUID in evidence

    groups = groups_by_label(sr_path)
    assert set(groups) == {"liver", "kidney"}
    for label, number in (("liver", 1), ("kidney", 2)):
        ref = groups[label].referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number]
        assert ref.source_series_for_segmentation.value == ct.SeriesInstanceUID
    liver = groups["liver"]
    assert liver.finding_type.value == codes.SCT.Liver.value

    volume = measurement(liver, "Volume of Mesh")
    assert (volume.name.value, volume.name.scheme_designator) == ("RNU0", "IBSI")  # CID 7469
    assert volume.value == pytest.approx(1234.5678) and volume.unit.value == "mm3"
    voxels = measurement(liver, "Volume from Voxel Summation")  # told apart from the mesh volume
    assert (voxels.name.value, voxels.name.scheme_designator) == ("YEKZ", "IBSI")
    assert voxels.value == pytest.approx(1240.0)
    assert measurement(liver, "Surface Area of Mesh").unit.value == "mm2"
    mean = measurement(liver, "Attenuation Coefficient", "Mean")
    assert (mean.name.value, mean.derivation.value, mean.unit.value) == ("112031", "373098007", "[hnsf'U]")
    assert mean.value == pytest.approx(63.125)
    diameter = measurement(liver, "Maximum 3D Diameter of a Mesh")
    assert diameter.value == pytest.approx(20.5) and diameter.unit.value == "mm"
    energy = measurement(liver, "Energy")
    assert energy.name.scheme_designator == "99KAAPCLI" and energy.value == pytest.approx(1.5e9)
    skew = measurement(groups["kidney"], "Attenuation Coefficient", "Skewness")
    assert skew.value == pytest.approx(-0.123456789012345, rel=1e-12)  # FloatingPointValue keeps full precision
    assert skew.unit.value == "1"


def test_dcmqi_measurements_document(tmp_path: Path, seg_case: tuple[Path, Path, pydicom.Dataset]) -> None:
    series_dir, seg_dir, seg = seg_case
    doc = {"Measurements": [{
        "TrackingIdentifier": "kidney", "ReferencedSegment": 2, "segmentationSOPInstanceUID": seg.SOPInstanceUID,
        "measurementItems": [{"value": "42.5",
                              "quantity": {"CodeValue": "118565006", "CodingSchemeDesignator": "SCT",
                                           "CodeMeaning": "Volume"},
                              "units": {"CodeValue": "mm3", "CodingSchemeDesignator": "UCUM",
                                        "CodeMeaning": "cubic millimeter"}}]}]}
    proc = kaapcli("json2sr", write_json(tmp_path / "m.json", doc), "--seg", seg_dir, "--reference", series_dir,
                   "-o", tmp_path / "sr")
    assert proc.returncode == 0, proc.stderr
    (sr_path,) = dicom_files(tmp_path / "sr")
    assert dciodvfy_errors(sr_path) == []
    kidney = groups_by_label(sr_path)["kidney"]
    assert kidney.referenced_segment.referenced_segment_numbers == [2]
    assert measurement(kidney, "Volume").value == pytest.approx(42.5)


def test_unknown_label_and_bad_json_fail_clearly(tmp_path: Path, seg_case: tuple[Path, Path, pydicom.Dataset]) -> None:
    series_dir, seg_dir, _ = seg_case
    unknown = write_json(tmp_path / "unknown.json", {"m": {"spleen": {"Volume (mesh)": 1.0}}})
    proc = kaapcli("json2sr", unknown, "--seg", seg_dir, "--reference", series_dir, "-o", tmp_path / "sr")
    assert proc.returncode == 65
    assert "m/spleen matches no segment of the SEG (segments: 1:liver, 2:kidney)" in proc.stderr
    assert dicom_files(tmp_path / "sr") == []

    bad = tmp_path / "bad"
    bad.mkdir()
    write_json(bad / "a.json", RADIOMICS)
    (bad / "b.json").write_text('{"m": {"liver":\n  {"Mean": 1.0,,}}}')
    proc = kaapcli("json2sr", bad, "--seg", seg_dir, "--reference", series_dir, "-o", tmp_path / "sr2")
    assert proc.returncode == 65
    assert "b.json: bad JSON at line 2 column" in proc.stderr and "Traceback" not in proc.stderr

    missing = kaapcli("json2sr", unknown, "--seg", tmp_path / "nope", "--reference", series_dir, "-o", tmp_path)
    assert missing.returncode == 66


def test_feature_codes() -> None:
    assert srcore.feature_concept("original_shape_MeshVolume", "CT")[0] == srcore.MESH_VOLUME
    assert srcore.feature_concept("original_shape_VoxelVolume", "CT")[0] == srcore.VOXEL_VOLUME
    assert srcore.feature_concept("Approximate volume", "CT")[0] == srcore.VOXEL_VOLUME
    assert srcore.feature_concept("Volume", "CT")[0] == srcore.VOLUME
    assert len({srcore.feature_concept(f, "CT")[0] for f in (
        "Volume (mesh)", "Approximate volume", "Surface area (mesh)", "Sphericity", "Maximum 3D diameter",
        "Major axis length", "Minor axis length", "Least axis length", "Elongation", "Flatness")}) == 10
    assert srcore.feature_concept("Mean", "MR")[0] == srcore.INTENSITY
    assert srcore.feature_concept("Mean", "MR")[2] == srcore.DERIVATIONS["mean"]
    code = srcore.private_code("Grey level non-uniformity normalised")
    assert code == srcore.private_code("Grey level non-uniformity normalised") and len(code[0]) <= 16
