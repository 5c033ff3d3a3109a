"""``kaapcli convert``: geometry against dcm2niix, stack splitting, refusals, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import dicom_files, kaapcli, pydicom_test_files

SPACING = 2.5


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


ORIENTATIONS = {
    "axial": np.eye(3),
    # columns: row cosine, column cosine, normal (= row x column)
    "sagittal": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float).T,
    "coronal": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=float).T,
    "oblique": rotation("x", 17) @ rotation("y", -23) @ rotation("z", 8),
}


def reorient(src: Path, dest: Path, matrix: np.ndarray, *, shear: float = 0.0, drop: int | None = None) -> Path:
    """Copy a mock series, rewriting IOP/IPP consistently: row = M·x, column = M·y, slices along M·z.

    ``shear`` shifts each slice along the column direction (mm per slice: a gantry tilt);
    ``drop`` removes the slice of that index (a missing slice).
    """
    dest.mkdir(parents=True)
    files = sorted(dicom_files(src), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                          .ImagePositionPatient[2]))
    row, col, normal = matrix[:, 0], matrix[:, 1], matrix[:, 2]
    origin = np.array([-20.0, 15.0, 30.0])
    for k, path in enumerate(files):
        if k == drop:
            continue
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * SPACING * normal + k * shear * col]
        ds.save_as(dest / path.name)
    return dest


@pytest.fixture(scope="module")
def series(mock_ct: Path) -> Path:
    """The first series of the mock CT study (8 axial slices, 64x64)."""
    return sorted({p.parent for p in dicom_files(mock_ct)})[0]


def dcm2niix(src: Path, out: Path) -> Path:
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (apt-get install dcm2niix)")
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, "-z", "y", "-f", "%j", "-o", str(out), str(src)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (nii,) = sorted(out.glob("*.nii.gz"))
    return nii


def assert_same_world(ours: Path, theirs: Path) -> None:
    """Same shape, affine (within 1e-3 mm) and voxel values once both are in the closest RAS orientation."""
    a, b = nib.as_closest_canonical(nib.load(ours)), nib.as_closest_canonical(nib.load(theirs))
    assert a.shape == b.shape
    assert nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())


def convert_one(src: Path, out: Path, *args: str) -> Path:
    proc = kaapcli("convert", src, "-o", out, "-q", *args)
    assert proc.returncode == 0, proc.stderr
    (nii,) = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".nii.gz")]
    return nii


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_geometry_equals_dcm2niix(series: Path, tmp_path: Path, orientation: str) -> None:
    src = reorient(series, tmp_path / "in", ORIENTATIONS[orientation])
    ours = convert_one(src, tmp_path / "ours")
    assert_same_world(ours, dcm2niix(src, tmp_path / "ref"))
    img = nib.load(ours)
    assert img.get_data_dtype() == np.int16  # CT: integral HU
    assert int(img.header["sform_code"]) == 1
    meta = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    assert meta["Modality"] == "CT" and meta["Slices"] == 8 and meta["Resampled"] is False
    assert len(meta["SOPInstanceUIDs"]) == 8


def test_hu_values_and_default_name(series: Path, tmp_path: Path) -> None:
    ours = convert_one(series, tmp_path)
    uid = pydicom.dcmread(dicom_files(series)[0]).SeriesInstanceUID
    assert ours.name == f"{uid}.nii.gz"
    data = np.asarray(nib.load(ours).dataobj)
    first = min(dicom_files(series), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    ds = pydicom.dcmread(first)
    # voxel (i, j, 0) is column i, row j of the lowest slice, in HU
    np.testing.assert_array_equal(data[:, :, 0].T, ds.pixel_array.astype(np.int32) - 1024)


def test_missing_slice_refused_or_resampled(series: Path, tmp_path: Path) -> None:
    src = reorient(series, tmp_path / "in", ORIENTATIONS["axial"], drop=4)
    proc = kaapcli("convert", src, "-o", tmp_path / "out")
    assert proc.returncode == 65
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 missing slice" in errors[0] and "--resample" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.nii*"))
    ours = convert_one(src, tmp_path / "res", "--resample")
    img = nib.load(ours)
    assert img.shape == (64, 64, 8)
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, SPACING), atol=1e-5)
    # the interpolated slice lies between its neighbours
    data = np.asarray(img.dataobj, dtype=float)
    np.testing.assert_allclose(data[:, :, 4], (data[:, :, 3] + data[:, :, 5]) / 2, atol=0.51)


def test_gantry_tilt_refused_then_resampled(series: Path, tmp_path: Path) -> None:
    src = reorient(series, tmp_path / "in", ORIENTATIONS["axial"], shear=0.8)
    proc = kaapcli("convert", src, "-o", tmp_path / "out")
    assert proc.returncode == 65 and "gantry tilt" in proc.stderr
    proc = kaapcli("convert", src, "-o", tmp_path / "res", "--resample")
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "resampled" in proc.stderr
    img = nib.load(next((tmp_path / "res").glob("*.nii.gz")))
    # straightened: axes orthogonal, slices along the normal at 2.5 mm
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-0.8, -0.8, SPACING]), atol=1e-5)
    # slice k moved by k pixels along the rows: shifting it back recovers the source slice
    data = np.asarray(img.dataobj)
    src_files = sorted(dicom_files(src), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    last = pydicom.dcmread(src_files[3]).pixel_array.astype(np.int32) - 1024
    np.testing.assert_array_equal(data[:, 3:, 3].T, last[:-3, :])


def test_stacks_split_by_echo(tmp_path: Path) -> None:
    proc = kaapcli("mock", "-o", tmp_path / "mr", "--modality", "MR", "--slices", "4", "--rows", "32",
                   "--columns", "32", "-q")
    assert proc.returncode == 0
    files = dicom_files(tmp_path / "mr")
    for path in files:  # a second echo at the same positions, in the same series
        ds = pydicom.dcmread(path)
        ds.EchoNumbers = 1
        ds.save_as(path)
        ds.EchoNumbers = 2
        ds.EchoTime = 90
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.PixelData = (ds.pixel_array // 2).astype(np.uint16).tobytes()
        ds.save_as(path.with_name("e2-" + path.name))
    proc = kaapcli("convert", tmp_path / "mr", "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    names = sorted(Path(p).name for p in proc.stdout.split())
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    assert names == [f"{uid}_e1.json", f"{uid}_e1.nii.gz", f"{uid}_e2.json", f"{uid}_e2.nii.gz"]
    e1 = np.asarray(nib.load(tmp_path / "out" / f"{uid}_e1.nii.gz").dataobj)
    e2 = np.asarray(nib.load(tmp_path / "out" / f"{uid}_e2.nii.gz").dataobj)
    assert e1.shape == e2.shape == (32, 32, 4)
    np.testing.assert_array_equal(e2, e1 // 2)
    assert json.loads((tmp_path / "out" / f"{uid}_e2.json").read_text())["EchoTime"] == 0.09  # BIDS: seconds


def test_float_rescale_and_nrrd(series: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    src = tmp_path / "in"
    src.mkdir()
    for path in dicom_files(series):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-10.25"
        ds.save_as(src / path.name)
    nii = convert_one(src, tmp_path / "out")
    assert nib.load(nii).get_data_dtype() == np.float32
    proc = kaapcli("convert", src, "-o", tmp_path / "nrrd", "--to", "nrrd", "-q")
    assert proc.returncode == 0, proc.stderr
    image = sitk.ReadImage(next((tmp_path / "nrrd").glob("*.nrrd")))
    ds = pydicom.dcmread(dicom_files(src)[0])
    assert image.GetPixelIDValue() == sitk.sitkFloat32
    voxels = sitk.GetArrayFromImage(image)
    k = int(round(np.dot(np.subtract([float(v) for v in ds.ImagePositionPatient], image.GetOrigin()),
                         [0, 0, 1]) / SPACING))
    np.testing.assert_allclose(voxels[k], ds.pixel_array * 0.5 - 10.25)


def test_enhanced_multiframe_and_rle(series: Path, tmp_path: Path) -> None:
    """A legacy-converted enhanced CT (per-frame functional groups) and an RLE series equal the classic one."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import RLELossless

    classic = convert_one(series, tmp_path / "classic")
    datasets = [pydicom.dcmread(p) for p in dicom_files(series)]
    enhanced = LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=datasets[0].SeriesInstanceUID,
                                              series_number=9, sop_instance_uid=pydicom.uid.generate_uid(),
                                              instance_number=1)
    (tmp_path / "enh").mkdir()
    enhanced.save_as(tmp_path / "enh" / "enhanced.dcm")
    assert_same_world(convert_one(tmp_path / "enh", tmp_path / "enh-out"), classic)
    assert_same_world(dcm2niix(tmp_path / "enh", tmp_path / "enh-ref"), classic)
    (tmp_path / "rle").mkdir()
    for ds, path in zip(datasets, dicom_files(series), strict=True):
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "rle" / path.name)
    assert_same_world(convert_one(tmp_path / "rle", tmp_path / "rle-out"), classic)


def test_bad_inputs_fail_cleanly(tmp_path: Path) -> None:
    """Every pydicom test file: converted or one clean error line per item; never a traceback."""
    src = tmp_path / "in"
    src.mkdir()
    for path in pydicom_test_files():
        shutil.copy(path, src / path.name)
    (src / "notes.txt").write_text("not dicom")
    truncated = pydicom_test_files()[0].read_bytes()  # 693_J2KI.dcm, cut in its pixel data
    (src / "truncated.dcm").write_bytes(truncated[: len(truncated) // 2])
    proc = kaapcli("convert", src, "-o", tmp_path / "out", "--format", "jsonl", "-w", "2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    failed = [r for r in records if r["status"] == "failed"]
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and failed
    assert any("CT_small" in r["input"] or r["outputs"] for r in ok)
    for record in failed:
        assert "\n" not in record["message"] and record["message"]
    messages = " ".join(r["message"] for r in failed)
    assert "truncated.dcm" in messages
    assert "colour images" in messages  # RGB secondary captures are refused with a reason
    assert "rtstruct.dcm" not in messages  # not an image: skipped, like a non-DICOM file
    assert "UserWarning" not in proc.stderr  # pydicom's warnings become one-line item warnings
    # every written volume has a sidecar and nothing half-written remains
    written = [p for p in (tmp_path / "out").rglob("*") if ".kaapcli" not in p.parts]
    assert not [p for p in written if p.name.endswith(".kaapcli-part")]
    assert len([p for p in written if p.name.endswith(".nii.gz")]) == len([p for p in written
                                                                          if p.suffix == ".json"])


def test_wrong_option(tmp_path: Path) -> None:
    proc = kaapcli("convert", tmp_path, "-o", tmp_path / "out", "--to", "png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr



def test_classic_time_series_is_one_4d_volume_as_dcm2niix(tmp_path: Path) -> None:
    """Four acquisitions of one MR stack (fMRI-like): one 4-D file as dcm2niix, pixdim[4] = TR in seconds."""
    proc = kaapcli("mock", "-o", tmp_path / "src", "--modality", "MR", "--slices", "6", "--rows", "32", "--columns",
                   "32", "--seed", "9", "-q")
    assert proc.returncode == 0, proc.stderr
    src = dicom_files(tmp_path / "src")
    fmri = tmp_path / "fmri"
    fmri.mkdir()
    for t in range(4):
        for k, path in enumerate(src):
            ds = pydicom.dcmread(path)
            ds.AcquisitionNumber = t + 1
            ds.InstanceNumber = t * len(src) + int(ds.InstanceNumber)  # scanners number slices in space order
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{777000 + t * 100 + k}"
            ds.PixelData = (ds.pixel_array.astype(np.int32) + 10 * t).astype(ds.pixel_array.dtype).tobytes()
            ds.RepetitionTime = 2000
            ds.save_as(fmri / f"t{t}-{k}.dcm")
    ours = convert_one(fmri, tmp_path / "ours")
    assert_same_world(ours, dcm2niix(fmri, tmp_path / "ref"))
    img = nib.load(ours)
    assert img.shape == (32, 32, 6, 4) and img.header.get_zooms()[3] == pytest.approx(2.0)
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data[..., 3] - data[..., 0], 30)  # volumes in acquisition order
    meta = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    assert meta["Volumes"] == 4 and meta["RepetitionTime"] == 2.0 and len(meta["SOPInstanceUIDs"]) == 24
