"""``kaapcli itk2dcm``: nnU-Net and basic folders → DICOM (dciodvfy-clean) → convert gives the same volumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.conftest import dciodvfy_errors, dicom_files, kaapcli


def volume(shape: tuple[int, int, int], seed: int, *, integral: bool, oblique: bool = False) -> sitk.Image:
    """A small blob volume (z, y, x) with a non-trivial grid: anisotropic spacing, offset origin, maybe oblique."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    values = 100 * np.exp(-((x - shape[2] / 2) ** 2 + (y - shape[1] / 2) ** 2) / 60) + rng.normal(0, 3, shape)
    values = np.rint(values - 50) if integral else values.astype(np.float32) / 7
    image = sitk.GetImageFromArray(values.astype(np.int16 if integral else np.float32))
    image.SetSpacing((0.9, 0.7, 3.0))
    image.SetOrigin((-12.5, 30.25, -40.0))
    if oblique:
        a = math.radians(20)
        image.SetDirection((math.cos(a), 0, math.sin(a), 0, 1, 0, -math.sin(a), 0, math.cos(a)))
    return image


def labels_for(image: sitk.Image) -> sitk.Image:
    values = sitk.GetArrayFromImage(image)
    labels = np.zeros(values.shape, np.uint8)
    labels[values > np.percentile(values, 90)] = 1
    labels[:, :3, :3] = 2
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("Dataset001_Test")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Dataset001_Test", "channel_names": {"0": "CT", "1": "T2"},
        "labels": {"background": 0, "liver": 1, "kidney": 2, "tumor": 3}, "numTraining": 1,
        "file_ending": ".nii.gz"}))
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir()
    ct = volume((5, 24, 20), 1, integral=True, oblique=True)
    sitk.WriteImage(ct, str(root / "imagesTr" / "case_001_0000.nii.gz"))
    mr = volume((5, 24, 20), 2, integral=False, oblique=True)
    sitk.WriteImage(mr, str(root / "imagesTr" / "case_001_0001.nii.gz"))
    sitk.WriteImage(labels_for(ct), str(root / "labelsTr" / "case_001.nii.gz"))
    sitk.WriteImage(volume((4, 16, 16), 3, integral=True), str(root / "imagesTs" / "case_002_0000.nii.gz"))
    sitk.WriteImage(volume((4, 16, 16), 4, integral=True), str(root / "imagesTs" / "case_002_0001.nii.gz"))
    return root


def series_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in dicom_files(root) if p.parent.parent != root})


def test_nnunet_round_trip(nnunet: Path, tmp_path: Path) -> None:
    proc = kaapcli("itk2dcm", nnunet, "-o", tmp_path / "dcm", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert "tumor" in proc.stderr and "empty" in proc.stderr  # declared label absent from the mask: said so
    case1 = tmp_path / "dcm" / "case_001"
    (seg,) = case1.glob("*.dcm")
    files = dicom_files(tmp_path / "dcm")
    modalities = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in files}
    assert modalities == {"CT", "MR", "SEG"}
    checked = {}
    for path in files:  # one object of each kind through dciodvfy
        kind = pydicom.dcmread(path, stop_before_pixels=True).Modality
        if kind not in checked:
            checked[kind] = dciodvfy_errors(path)
    assert checked == {"CT": [], "MR": [], "SEG": []}
    study = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in dicom_files(case1)}
    assert len(study) == 1  # one study per case

    for series in series_dirs(tmp_path / "dcm"):  # each series converts back to the very same volume
        proc = kaapcli("convert", series, "-o", tmp_path / "nii", "-q")
        assert proc.returncode == 0, proc.stderr
        ours = nib.as_closest_canonical(nib.load(proc.stdout.split()[0]))
        ds = pydicom.dcmread(dicom_files(series)[0], stop_before_pixels=True)
        channel = ds.SeriesNumber - 1
        split = "imagesTr" if ds.PatientID == "case_001" else "imagesTs"
        source = nib.as_closest_canonical(nib.load(nnunet / split / f"{ds.PatientID}_{channel:04d}.nii.gz"))
        assert ours.shape == source.shape
        np.testing.assert_allclose(ours.affine, source.affine, atol=1e-3)
        if ds.Modality == "MR" and ds.PatientID == "case_001":  # float data, scaled onto 16 bits
            span = np.ptp(source.get_fdata())
            np.testing.assert_allclose(ours.get_fdata(), source.get_fdata(), atol=span / 65535)
        else:
            np.testing.assert_array_equal(ours.get_fdata(), source.get_fdata())

    proc = kaapcli("seg2itk", seg, "-o", tmp_path / "masks", "--labelmap", "-q")  # reference found beside it
    assert proc.returncode == 0, proc.stderr
    back = nib.as_closest_canonical(nib.load(next((tmp_path / "masks").glob("*.nii.gz"))))
    source = nib.as_closest_canonical(nib.load(nnunet / "labelsTr" / "case_001.nii.gz"))
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-3)
    np.testing.assert_array_equal(back.get_fdata(), source.get_fdata())
    names = [s.SegmentLabel for s in pydicom.dcmread(seg).SegmentSequence]
    assert names == ["liver", "kidney", "tumor"]

    again = kaapcli("itk2dcm", nnunet, "-o", tmp_path / "again", "--seed", "5", "-q")
    assert sorted(p.relative_to(tmp_path / "again") for p in dicom_files(tmp_path / "again")) == sorted(
        p.relative_to(tmp_path / "dcm") for p in files), again.stderr  # deterministic UIDs


@pytest.mark.parametrize("layout", ["beside", "cases-segs"])
def test_basic_layouts(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "basic"
    image = volume((4, 16, 18), 7, integral=True)
    images, masks = (root, root) if layout == "beside" else (root / "cases", root / "segs")
    images.mkdir(parents=True)
    masks.mkdir(exist_ok=True)
    sitk.WriteImage(image, str(images / "Case00.nii.gz"))
    mask_name = "Case00_segmentation.nii.gz" if layout == "beside" else "Case00.nii.gz"
    sitk.WriteImage(labels_for(image), str(masks / mask_name))
    (root / "meta_data.json").write_text(json.dumps({
        "global_tags": {"0008|0060": "MR"}, "series_tags": {"Case00.nii": {"0008|103e": "T2 axial"}}}))
    (root / "seg_info.json").write_text(json.dumps({
        "algorithm": "Ground truth", "seg_info": [{"label_name": "prostate", "label_int": "1"},
                                                  {"label_name": "bladder", "label_int": "2"}]}))
    proc = kaapcli("itk2dcm", root, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    files = dicom_files(tmp_path / "out")
    kinds: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kinds.setdefault(ds.Modality, []).append(ds)
    assert {k: len(v) for k, v in kinds.items()} == {"MR": 4, "SEG": 1}
    kinds = {k: v[0] for k, v in kinds.items()}
    assert kinds["MR"].SeriesDescription == "T2 axial" and kinds["MR"].PatientID == "Case00"
    assert [s.SegmentLabel for s in kinds["SEG"].SegmentSequence] == ["prostate", "bladder"]
    assert kinds["SEG"].SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "41216001"


def test_bad_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = kaapcli("itk2dcm", tmp_path / "empty", "-o", tmp_path / "out")
    assert proc.returncode == 65 and "no NIfTI images" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text('{"labels": {}}')
    proc = kaapcli("itk2dcm", bad, "-o", tmp_path / "out")
    assert proc.returncode == 65 and "channel_names" in proc.stderr and "Traceback" not in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "Case01.nii.gz").write_bytes(b"\x1f\x8b garbage")
    sitk.WriteImage(volume((3, 8, 8), 1, integral=True), str(broken / "Case02.nii.gz"))
    proc = kaapcli("itk2dcm", broken, "-o", tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Case01.nii.gz" in errors[0]
    assert not (tmp_path / "out" / "Case01").exists() and len(dicom_files(tmp_path / "out" / "Case02")) == 3
