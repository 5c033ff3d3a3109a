"""resample: onto NIfTI and DICOM reference grids, label maps stay labels, inputs untouched, bad inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tests.conftest import dicom_files, kaapcli


def write(array: np.ndarray, path: Path, spacing: tuple[float, ...] = (1.0, 1.0, 2.0),
          origin: tuple[float, ...] = (0.0, 0.0, 0.0)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def grid(img: sitk.Image) -> tuple[object, ...]:
    return (img.GetSize(), np.round(img.GetSpacing(), 4).tolist(), np.round(img.GetOrigin(), 4).tolist(),
            np.round(img.GetDirection(), 6).tolist())


def test_image_and_labels_onto_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = write(rng.normal(0, 100, (10, 20, 30)).astype(np.int16), tmp_path / "img.nii.gz")
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:8, 4:16, 4:26] = 1
    labels[4:6, 8:12, 10:20] = 7
    mask = write(labels, tmp_path / "mask.nii.gz")
    ref = sitk.Image(14, 11, 7, sitk.sitkFloat32)
    ref.SetSpacing((2.0, 1.5, 2.5))
    ref.SetOrigin((1.0, 1.0, 16.0))
    ref.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))  # a rotated grid: resampling must follow directions
    sitk.WriteImage(ref, str(tmp_path / "ref.nrrd"))
    before = {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in (image, mask)}
    proc = kaapcli("resample", image, mask, "-r", tmp_path / "ref.nrrd", "-o", tmp_path / "out",
                   "--interpolator", "linear")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(str(tmp_path / "out" / n) for n in ("img.nii.gz", "mask.nii.gz"))
    assert "mask.nii.gz: label image: resampled with nearest" in proc.stderr
    out_img = sitk.ReadImage(str(tmp_path / "out" / "img.nii.gz"))
    out_mask = sitk.ReadImage(str(tmp_path / "out" / "mask.nii.gz"))
    assert grid(out_img) == grid(ref) == grid(out_mask)
    assert out_img.GetPixelID() == sitk.sitkInt16 and out_mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(out_mask)).tolist()) == {0, 1, 7}
    # a voxel of the reference grid well inside the label 7 block keeps label 7
    point = (12.0, 10.0, 8.0)  # x, y, z mm: index (x=12, y=10, z=4) of the input
    assert labels[4, 10, 12] == 7
    assert out_mask.GetPixel(out_mask.TransformPhysicalPointToIndex(point)) == 7
    assert before == {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in (image, mask)}  # inputs untouched


def test_dicom_series_reference_and_input(tmp_path: Path, mock_ct: Path) -> None:
    series_dirs = sorted({p.parent for p in dicom_files(mock_ct)})
    ref_dir, other = series_dirs[0], series_dirs[1]
    blob = write(np.full((8, 8, 8), 5, np.int16), tmp_path / "blob.nii.gz", spacing=(8.0, 8.0, 2.5),
                 origin=(-25.0, -25.0, -8.0))
    proc = kaapcli("resample", blob, other, "-r", ref_dir, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ref_dir)))
    outputs = [Path(p) for p in proc.stdout.split()]
    assert sorted(p.name for p in outputs) == sorted(["blob.nii.gz", f"{other.name}.nii.gz"])
    for path in outputs:
        assert grid(sitk.ReadImage(str(path)))[:2] == grid(ref)[:2]


def test_bad_inputs_fail_cleanly(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 1000, (8, 10, 12)).astype(np.int16)  # barely compressible
    good = write(noise, tmp_path / "good.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not gzip at all")
    data = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) * 2 // 3])  # header intact, voxels missing
    proc = kaapcli("resample", tmp_path, "-r", good, "-o", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr
    assert any("junk.nii.gz" in e for e in errors) and any("cut.nii.gz" in e and "truncated" in e for e in errors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["good.nii.gz"]
    missing = kaapcli("resample", good, "-r", tmp_path / "nope.nii.gz", "-o", tmp_path / "out")
    assert missing.returncode == 66 and "nope.nii.gz" in missing.stderr


def oblique_series(src: Path, dest: Path) -> Path:
    """A copy of a mock series with an oblique orientation and positions no float32 holds exactly."""
    import math

    import pydicom

    dest.mkdir(parents=True)
    a = math.radians(13)
    row, col = np.array([1.0, 0, 0]), np.array([0, math.cos(a), math.sin(a)])
    normal = np.cross(row, col)
    files = sorted(dicom_files(src), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                          .ImagePositionPatient[2]))
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.7f}" for v in np.array([-38.1234567, -37.9876543, -36.2]) + k * 2.5 * normal]
        ds.PixelSpacing = ["0.7031249", "0.7031249"]
        ds.save_as(dest / path.name)
    return dest


def test_dicom_series_and_its_nifti_resample_alike(tmp_path: Path, mock_ct: Path) -> None:
    """One code path: the series read directly and its converted NIfTI give the same voxels, for every
    interpolator (integer results are rounded, not truncated)."""
    series = oblique_series(sorted({p.parent for p in dicom_files(mock_ct)})[0], tmp_path / "series")
    proc = kaapcli("convert", series, "-o", tmp_path / "nii", "-q")
    assert proc.returncode == 0, proc.stderr
    nifti = Path(proc.stdout.split()[0])
    source = sitk.ReadImage(str(nifti))
    ref = sitk.Image([40, 40, 9], sitk.sitkInt16)  # a 2 mm grid from the same corner: many exact half-way points
    ref.SetOrigin(source.GetOrigin())
    ref.SetDirection(source.GetDirection())
    ref.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    for interpolator in ("linear", "bspline", "sinc"):
        outs = []
        for name, src in (("dicom", series), ("nifti", nifti)):
            proc = kaapcli("resample", src, "-r", tmp_path / "ref.nii.gz", "-o", tmp_path / f"{name}-{interpolator}",
                           "--interpolator", interpolator, "-q")
            assert proc.returncode == 0, proc.stderr
            outs.append(sitk.GetArrayFromImage(sitk.ReadImage(proc.stdout.split()[0])))
        assert outs[0].dtype == np.int16
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=interpolator)


def test_rounding_not_truncation() -> None:
    from kaapcli.core.resample import resample_onto

    img = sitk.GetImageFromArray(np.array([[[0, 3]]], np.int16))  # halfway: 1.5 -> 2 (rint), not 1
    ref = sitk.Image([3, 1, 1], sitk.sitkInt16)
    ref.SetSpacing((0.5, 1, 1))
    out = sitk.GetArrayFromImage(resample_onto(img, ref, "linear", 0))
    assert out.tolist() == [[[0, 2, 3]]]
    big = sitk.GetImageFromArray(np.array([[[0, 0, 32767, 32767, 0, 0]]], np.int16))
    ringing = sitk.GetArrayFromImage(resample_onto(big, big, "sinc", 0))
    assert ringing.max() == 32767  # overshoot clipped to the type's range, never wrapped to negative
