"""``kaapcli seg2itk`` on SEGs written by other tools (dcmqi, highdicom): own geometry, label maps, FRACTIONAL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.conftest import dicom_files, kaapcli

DCMQI_BIN = Path(sys.executable).parent


def dcmqi(tool: str, *args: str | Path) -> None:
    exe = DCMQI_BIN / tool
    if not exe.exists():
        pytest.fail(f"dcmqi's {tool} not installed (pip install dcmqi: a test extra)")
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def world_voxels(image: sitk.Image) -> dict[tuple[float, float, float], float]:
    """Non-zero voxels keyed by their world (LPS) position: compares grids laid out differently."""
    values = sitk.GetArrayFromImage(image)
    return {tuple(round(v, 3) for v in image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))):
            float(values[k, j, i]) for k, j, i in zip(*np.nonzero(values), strict=True)}


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 12-slice CT, a 2-label mask on slices 3..8, and dcmqi's BINARY and LABELMAP SEGs of it."""
    root = tmp_path_factory.mktemp("dcmqi")
    proc = kaapcli("mock", "-o", root / "ct", "--series", "1", "--slices", "12", "--rows", "48", "--columns", "40",
                   "--seed", "3", "-q")
    assert proc.returncode == 0, proc.stderr
    ct = dicom_files(root / "ct")[0].parent
    proc = kaapcli("convert", ct, "-o", root / "img", "-q")
    assert proc.returncode == 0, proc.stderr
    image = sitk.ReadImage(str(next((root / "img").glob("*.nii.gz"))))
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    labels[3:6, 10:20, 5:15] = 1
    labels[5:9, 25:35, 20:30] = 2
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    sitk.WriteImage(mask, str(root / "mask.nrrd"))

    def attributes(number: int, name: str, code: str) -> dict[str, object]:
        return {"labelID": number, "SegmentDescription": name, "SegmentLabel": name, "SegmentAlgorithmType": "MANUAL",
                "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                          "CodeMeaning": "Anatomical Structure"},
                "SegmentedPropertyTypeCodeSequence": {"CodeValue": code, "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": name.capitalize()},
                "recommendedDisplayRGBValue": [200, 100, 50]}

    (root / "meta.json").write_text(json.dumps({
        "ContentCreatorName": "Test", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "dcmqi seg", "SeriesNumber": "300", "InstanceNumber": "1", "ContentLabel": "SEG",
        "ContentDescription": "test", "BodyPartExamined": "",
        "segmentAttributes": [[attributes(1, "liver", "10200004"), attributes(2, "spleen", "78961009")]]}))
    lone = root / "lone"  # SEGs away from their series: nothing to find beside them
    lone.mkdir()
    dcmqi("itkimage2segimage", "--inputImageList", root / "mask.nrrd", "--inputDICOMDirectory", ct,
          "--inputMetadata", root / "meta.json", "--outputDICOM", lone / "binary.dcm")
    dcmqi("bin2labelsegimage", "--inputDICOM", lone / "binary.dcm", "--outputDICOM", lone / "labelmap.dcm")
    (root / "dcmqi").mkdir()
    dcmqi("segimage2itkimage", "--inputDICOM", lone / "binary.dcm", "--outputDirectory", root / "dcmqi", "-t", "nrrd")
    return {"root": root, "ct": ct, "binary": lone / "binary.dcm", "labelmap": lone / "labelmap.dcm",
            "dcmqi": root / "dcmqi", "labels": root / "mask.nrrd"}


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_dcmqi_seg_without_reference_equals_segimage2itkimage(case: dict[str, Path], tmp_path: Path,
                                                              kind: str) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)  # nothing beside it or above it: no series to find
    seg = shutil.copy(case[kind], tmp_path / "a" / "b" / f"{kind}.dcm")
    if kind == "labelmap":
        assert pydicom.dcmread(seg).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    proc = kaapcli("seg2itk", seg, "-o", tmp_path / "out", "--to", "nrrd")
    assert proc.returncode == 0, proc.stderr
    assert "masks on the SEG's own grid (40x48x6)" in proc.stderr
    for number, name in ((1, "liver"), (2, "spleen")):
        ours = sitk.ReadImage(str(tmp_path / "out" / f"{kind}--{number}--{name}.nrrd"))
        theirs = sitk.ReadImage(str(case["dcmqi"] / f"{number}.nrrd"))  # dcmqi writes the label value
        assert ours.GetSize() == theirs.GetSize() == (40, 48, 6)  # slices 3..8: the frames' extent
        np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs) > 0)


def test_dcmqi_seg_with_reference_has_the_full_extent(case: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("binary", "labelmap"):
        proc = kaapcli("seg2itk", case[kind], "-r", case["ct"], "-o", tmp_path / kind, "--labelmap")
        assert proc.returncode == 0, proc.stderr
        back = sitk.ReadImage(str(tmp_path / kind / f"{kind}.nii.gz"))
        labels = sitk.ReadImage(str(case["labels"]))
        assert back.GetSize() == labels.GetSize() == (40, 48, 12)  # every slice, empty ones included
        np.testing.assert_allclose(back.GetOrigin(), labels.GetOrigin(), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))


def highdicom_seg(ct: Path, dest: Path, kind: str, pixel_array: np.ndarray, slices: list[int]) -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(p) for p in dicom_files(ct)), key=lambda d: float(d.ImagePositionPatient[2]))
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="net", version="1", family=codes.DCM.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=[sources[k] for k in slices], pixel_array=pixel_array,
        segmentation_type=getattr(hd.seg.SegmentationTypeValues, kind), segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        max_fractional_value=255)
    seg.save_as(dest)
    return dest


def test_highdicom_seg_without_reference_equals_its_get_volume(case: dict[str, Path], tmp_path: Path) -> None:
    import highdicom as hd

    mask = np.zeros((4, 48, 40), bool)
    mask[:, 5:30, 8:20] = True
    mask[2, :, :] = False  # an empty frame inside: highdicom leaves it out, the grid keeps the slice
    (tmp_path / "a" / "b").mkdir(parents=True)
    seg = highdicom_seg(case["ct"], tmp_path / "a" / "b" / "hd.dcm", "BINARY", mask, [2, 3, 4, 5])
    proc = kaapcli("seg2itk", seg, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    ours = sitk.ReadImage(str(tmp_path / "out" / "hd--1--tumour.nii.gz"))
    assert ours.GetSize() == (40, 48, 4)
    volume = hd.seg.segread(seg).get_volume(combine_segments=True)
    theirs = {tuple(round(float(v), 3) for v in (volume.affine @ [*idx, 1])[:3]): 1.0
              for idx in zip(*np.nonzero(volume.array), strict=True)}
    assert world_voxels(ours) == theirs


def test_fractional_seg_keeps_probabilities_or_thresholds(case: dict[str, Path], tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 40, dtype=np.float32)[None, None, :] * np.ones((3, 48, 1), np.float32)
    seg = highdicom_seg(case["ct"], tmp_path / "frac.dcm", "FRACTIONAL", ramp, [4, 5, 6])
    proc = kaapcli("seg2itk", seg, "-r", case["ct"], "-o", tmp_path / "keep")
    assert proc.returncode == 0, proc.stderr
    keep = sitk.ReadImage(str(tmp_path / "keep" / "frac--1--tumour.nii.gz"))
    values = sitk.GetArrayFromImage(keep)
    assert values.dtype == np.float32 and values.shape == (12, 48, 40)
    np.testing.assert_allclose(values[4:7], ramp, atol=0.5 / 255)  # stored as 0..255: half a step
    assert not values[:4].any() and not values[7:].any()
    meta = json.loads((tmp_path / "keep" / "frac-meta.json").read_text())
    assert meta["SegmentationType"] == "FRACTIONAL" and meta["values"] == "probability 0..1"

    proc = kaapcli("seg2itk", seg, "-r", case["ct"], "-o", tmp_path / "cut", "--threshold", "0.75")
    assert proc.returncode == 0, proc.stderr
    cut = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cut" / "frac--1--tumour.nii.gz")))
    assert cut.dtype == np.uint8
    np.testing.assert_array_equal(cut[4:7], (np.round(ramp * 255) / 255 >= 0.75).astype(np.uint8))

    proc = kaapcli("seg2itk", seg, "-r", case["ct"], "-o", tmp_path / "lm", "--labelmap")
    assert proc.returncode == 65 and "--threshold" in proc.stderr and "Traceback" not in proc.stderr
