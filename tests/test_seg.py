"""``kaapcli itk2seg`` / ``seg2itk``: round trips in world space, dciodvfy, RTSTRUCT rasterization, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from tests.conftest import dciodvfy_errors, dicom_files, kaapcli


@pytest.fixture(scope="module")
def ct(mock_ct: Path) -> Path:
    """One series of the mock CT (8 slices, 64x64)."""
    return sorted({p.parent for p in dicom_files(mock_ct)})[0]


@pytest.fixture(scope="module")
def image(ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image")
    proc = kaapcli("convert", ct, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("*.nii.gz"))


def write_labels(image: Path, dest: Path, labels: np.ndarray) -> Path:
    ref = sitk.ReadImage(str(image))
    mask = sitk.GetImageFromArray(labels.astype(np.uint8))
    mask.CopyInformation(ref)
    sitk.WriteImage(mask, str(dest))
    return dest


def phantom_labels(image: Path) -> np.ndarray:
    """liver (1), spine (2) by thresholds of the phantom; label 3 (aorta) left empty on purpose."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu > 40) & (hu < 100)] = 1
    labels[hu > 500] = 2
    return labels


SEG_INFO = {"algorithm": "threshold", "seg_info": [{"label_name": "liver", "label_int": "1"},
                                                   {"label_name": "spine", "label_int": "2"},
                                                   {"label_name": "aorta", "label_int": "3"}]}


def test_labelmap_round_trip(ct: Path, image: Path, tmp_path: Path) -> None:
    labels = phantom_labels(image)
    assert (labels == 1).any() and (labels == 2).any()
    mask = write_labels(image, tmp_path / "labels.nii.gz", labels)
    (tmp_path / "seg_info.json").write_text(json.dumps(SEG_INFO))
    proc = kaapcli("itk2seg", mask, "-r", ct, "-o", tmp_path / "seg", "--seg-info", tmp_path / "seg_info.json")
    assert proc.returncode == 0, proc.stderr
    assert "segment 3 (aorta" in proc.stderr and "empty" in proc.stderr  # kept, with a warning
    (seg_path,) = [Path(p) for p in proc.stdout.split()]
    assert dciodvfy_errors(seg_path) == []
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in ds.SegmentSequence}
    assert codes == {"liver": "10200004", "spine": "421060004", "aorta": "15825003"}  # SNOMED CT
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(dicom_files(ct)[0]).SeriesInstanceUID

    proc = kaapcli("seg2itk", seg_path, "-r", ct, "-o", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    stem = seg_path.name[:-4]
    reference = nib.load(image)
    for number, name in ((1, "liver"), (2, "spine"), (3, "aorta")):
        back = nib.load(tmp_path / "back" / f"{stem}--{number}--{name}.nii.gz")
        assert back.shape == reference.shape  # full geometry, empty frames included
        np.testing.assert_allclose(back.affine, reference.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(back.dataobj).T, labels == number)
    meta = json.loads((tmp_path / "back" / f"{stem}-meta.json").read_text())
    assert meta["seg_info"] == SEG_INFO["seg_info"] and meta["algorithm"] == "threshold"

    proc = kaapcli("seg2itk", seg_path, "-r", ct, "-o", tmp_path / "lm", "--labelmap", "--filter", "spine,liver")
    assert proc.returncode == 0, proc.stderr
    back = np.asarray(nib.load(tmp_path / "lm" / f"{stem}.nii.gz").dataobj).T
    np.testing.assert_array_equal(back, labels)


def test_one_file_per_label_and_skip_empty(ct: Path, image: Path, tmp_path: Path) -> None:
    labels = phantom_labels(image)
    liver = write_labels(image, tmp_path / "liver.nii.gz", labels == 1)
    empty = write_labels(image, tmp_path / "kidney.nii.gz", np.zeros_like(labels))
    proc = kaapcli("itk2seg", liver, empty, "-r", ct, "-o", tmp_path / "seg", "--skip-empty")
    assert proc.returncode == 0, proc.stderr
    assert "kidney" in proc.stderr and "empty" in proc.stderr
    ds = pydicom.dcmread(proc.stdout.strip())
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver"]
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"  # no algorithm named
    assert dciodvfy_errors(Path(proc.stdout.strip())) == []


def test_mask_in_other_geometry_is_resampled(ct: Path, image: Path, tmp_path: Path) -> None:
    labels = phantom_labels(image)
    fine = write_labels(image, tmp_path / "fine.nii.gz", labels == 1)
    # the same mask on a grid twice as fine in-plane: nearest neighbour brings it back exactly
    ref = sitk.ReadImage(str(fine))
    grid = sitk.Image([2 * ref.GetSize()[0], 2 * ref.GetSize()[1], ref.GetSize()[2]], sitk.sitkUInt8)
    grid.SetDirection(ref.GetDirection())
    grid.SetSpacing([ref.GetSpacing()[0] / 2, ref.GetSpacing()[1] / 2, ref.GetSpacing()[2]])
    grid.SetOrigin([o - s / 4 for o, s in zip(ref.GetOrigin()[:2], ref.GetSpacing()[:2], strict=True)]
                   + [ref.GetOrigin()[2]])
    sitk.WriteImage(sitk.Resample(ref, grid, sitk.Transform(), sitk.sitkNearestNeighbor), str(tmp_path / "x2.nii.gz"))
    proc = kaapcli("itk2seg", tmp_path / "x2.nii.gz", "-r", ct, "-o", tmp_path / "seg")
    assert proc.returncode == 0, proc.stderr
    assert "resampled (nearest neighbour)" in proc.stderr
    proc = kaapcli("seg2itk", proc.stdout.strip(), "-r", ct, "-o", tmp_path / "back", "-q")
    back = next((tmp_path / "back").glob("*--1--*.nii.gz"))
    np.testing.assert_array_equal(np.asarray(nib.load(back).dataobj).T, labels == 1)


def test_bad_masks_fail_cleanly(ct: Path, image: Path, tmp_path: Path) -> None:
    ref = sitk.ReadImage(str(image))
    small = sitk.Image([10, 10, 3], sitk.sitkUInt8)  # same origin and spacing, another size: another series'
    small.CopyInformation(sitk.Image([10, 10, 3], sitk.sitkUInt8))
    small.SetOrigin(ref.GetOrigin())
    small.SetSpacing(ref.GetSpacing())
    sitk.WriteImage(small, str(tmp_path / "small.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    for bad, reason in (("small.nii.gz", "differs from the reference"), ("junk.nii.gz", "cannot read image")):
        proc = kaapcli("itk2seg", tmp_path / bad, "-r", ct, "-o", tmp_path / "out")
        assert proc.returncode == 65, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and bad in errors[0] and reason in errors[0]
        assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.dcm"))
    proc = kaapcli("itk2seg", tmp_path / "small.nii.gz", "-r", tmp_path / "nope", "-o", tmp_path / "out")
    assert proc.returncode == 66 and "Traceback" not in proc.stderr


def test_seg_without_reference(ct: Path, image: Path, tmp_path: Path) -> None:
    mask = write_labels(image, tmp_path / "liver.nii.gz", phantom_labels(image) == 1)
    proc = kaapcli("itk2seg", mask, "-r", ct, "-o", tmp_path / "seg", "-q")
    assert proc.returncode == 0, proc.stderr
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(proc.stdout.strip(), lonely / "seg.dcm")
    proc = kaapcli("seg2itk", lonely, "-o", tmp_path / "own")
    assert proc.returncode == 0, proc.stderr  # as dcmqi and highdicom: the SEG's own frames give the grid
    uid = pydicom.dcmread(dicom_files(ct)[0]).SeriesInstanceUID
    assert f"referenced series {uid} not found: masks on the SEG's own grid" in proc.stderr
    # found among the inputs when the series is given with it: the full grid of the series
    proc = kaapcli("seg2itk", lonely, ct, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    own, full = (nib.load(next((tmp_path / d).glob("*--1--*.nii.gz"))) for d in ("own", "out"))
    data = np.asarray(full.dataobj)
    k = np.flatnonzero(data.any(axis=(0, 1)))
    assert own.shape[2] == k[-1] - k[0] + 1  # the frames written: the slices holding the liver
    np.testing.assert_array_equal(np.asarray(own.dataobj), data[:, :, k[0]:k[-1] + 1])
    np.testing.assert_allclose(own.affine[:3, :3], full.affine[:3, :3], atol=1e-4)
    np.testing.assert_allclose(own.affine[:3, 3], (full.affine @ [0, 0, k[0], 1])[:3], atol=1e-4)
    assert json.loads(next((tmp_path / "own").glob("*-meta.json")).read_text())["geometry"] == "SEG frames"


def reference_for_rtstruct(tmp_path: Path) -> Path:
    """A CT series matching pydicom's rtstruct.dcm, which names no images: same series and frame of
    reference UIDs; axial slices at z = -210 ... -170 mm (contours lie at -200, -190, -180), 8 mm pixels
    from -252 mm so the 400 x 300 mm body contour fits."""
    rt = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    frame_ref = rt.ReferencedFrameOfReferenceSequence[0]
    series_uid = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    proc = kaapcli("mock", "-o", tmp_path / "mock", "--slices", "5", "--rows", "64", "--columns", "64", "-q")
    assert proc.returncode == 0
    out = tmp_path / "ref"
    out.mkdir()
    for path in dicom_files(tmp_path / "mock"):
        ds = pydicom.dcmread(path)
        k = ds.InstanceNumber - 1
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uid, frame_ref.FrameOfReferenceUID
        ds.PixelSpacing = [8, 8]
        ds.ImagePositionPatient = [-252, -252, -210 + 10 * k]
        ds.SliceThickness = ds.SpacingBetweenSlices = 10
        ds.save_as(out / path.name)
    return out


def centres_inside(lo: float, hi: float) -> np.ndarray:
    """Pixel indices (8 mm from -252 mm) whose centres lie strictly inside (lo, hi)."""
    centres = -252 + 8 * np.arange(64)
    return (centres > lo) & (centres < hi)


def test_pydicom_rtstruct_rasterizes(tmp_path: Path) -> None:
    ref = reference_for_rtstruct(tmp_path)
    proc = kaapcli("seg2itk", get_testdata_file("rtstruct.dcm"), "-r", ref, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "ROI 2 (Isocenter 1) is empty" in proc.stderr  # POINT ROIs: no area, said so
    body = nib.load(tmp_path / "out" / "rtstruct--1--patient.nii.gz")
    assert body.shape == (64, 64, 5)
    data = np.asarray(body.dataobj).T  # (slices, rows, columns)
    assert not data[0].any() and not data[4].any()  # z = -210 and -170: no contour
    rt = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    first = np.asarray(rt.ROIContourSequence[0].ContourSequence[0].ContourData, float).reshape(-1, 3)
    assert len(first) == 5  # a closed rectangle: the pixels inside are those with centres inside
    expected = np.outer(centres_inside(first[:, 1].min(), first[:, 1].max()),
                        centres_inside(first[:, 0].min(), first[:, 0].max()))
    np.testing.assert_array_equal(data[1], expected)
    assert data[2].any() and data[3].any()


def test_rtstruct_holes_clipping_and_empty(tmp_path: Path) -> None:
    """Even-odd: a contour inside another is a hole; a contour beyond the image is clipped, with warnings.

    Edges avoid pixel centres (-252 + 8 n mm), where inside/outside is a convention."""
    ref = reference_for_rtstruct(tmp_path)
    rt = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)

    def square(half: float, z: float, cx: float = 0) -> list[float]:
        return [v for x, y in ((cx - half, -half), (cx + half, -half), (cx + half, half), (cx - half, half))
                for v in (x, y, z)]

    contours = rt.ROIContourSequence[0].ContourSequence
    contours[0].ContourData, contours[0].NumberOfContourPoints = square(102, -200), 4
    contours[1].ContourData, contours[1].NumberOfContourPoints = square(42, -200), 4  # hole, same slice
    contours[2].ContourData, contours[2].NumberOfContourPoints = square(102, -180, cx=251), 4  # beyond +x
    rt.save_as(tmp_path / "holes.dcm")
    proc = kaapcli("seg2itk", tmp_path / "holes.dcm", "-r", ref, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "1 contour(s) extend beyond the image: clipped" in proc.stderr
    data = np.asarray(nib.load(tmp_path / "out" / "holes--1--patient.nii.gz").dataobj).T
    ring = np.outer(centres_inside(-102, 102), centres_inside(-102, 102)) & ~np.outer(
        centres_inside(-42, 42), centres_inside(-42, 42))
    np.testing.assert_array_equal(data[1], ring)
    np.testing.assert_array_equal(data[3], np.outer(centres_inside(-102, 102), centres_inside(149, 353)))
    assert not data[2].any()


def test_non_segmentation_inputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_truncated.dcm", "rtplan.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    (src / "notes.txt").write_text("hello")
    proc = kaapcli("seg2itk", src, "-o", tmp_path / "out")
    assert proc.returncode == 66 and "Traceback" not in proc.stderr  # no input at all (as dcm2niix): 66
    assert proc.stdout == "" and f"no DICOM SEG or RTSTRUCT found in {src}" in proc.stderr
