"""``kaapcli convert`` on real scanner files (tests/realdata.py) against dcm2niix: mosaics, 4-D, diffusion, sidecars."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import kaapcli
from tests.realdata import copy_series
from tests.test_convert import assert_same_world, dcm2niix


def companions(nii: Path) -> dict[str, Path]:
    """A converter's files beside ``nii``: {".nii.gz": ..., ".json": ..., ".bval"/".bvec" if written}."""
    stem = nii.name.removesuffix(".nii.gz")
    return {ext: nii.with_name(stem + ext) for ext in (".nii.gz", ".json", ".bval", ".bvec")
            if nii.with_name(stem + ext).exists()}


def run_dcm2niix(src: Path, out: Path) -> dict[str, Path]:
    return companions(dcm2niix(src, out))


def run_convert(src: Path, out: Path, *args: str) -> dict[str, Path]:
    proc = kaapcli("convert", src, "-o", out, "-q", *args)
    assert proc.returncode == 0, proc.stderr
    (nii,) = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".nii.gz")]
    return companions(nii)


def world_bvecs(bvec: Path, nii: Path) -> np.ndarray:
    """FSL bvecs as unit vectors in RAS world space (FSL: the first component is negated when det(affine) > 0)."""
    table = np.loadtxt(bvec).reshape(3, -1).T.copy()
    m = nib.load(nii).affine[:3, :3]
    m = m / np.linalg.norm(m, axis=0)
    if np.linalg.det(m) > 0:
        table[:, 0] *= -1
    return table @ m.T


def assert_same_directions(a: np.ndarray, b: np.ndarray) -> None:
    """Gradient directions equal up to sign (diffusion is symmetric), row by row."""
    for u, v in zip(a, b, strict=True):
        if np.linalg.norm(u) < 1e-6 or np.linalg.norm(v) < 1e-6:
            assert np.linalg.norm(u) < 1e-6 and np.linalg.norm(v) < 1e-6
        else:
            assert min(np.abs(u - v).max(), np.abs(u + v).max()) < 2e-4, (u, v)


def slice_times_by_position(nii: Path, times: list[float]) -> dict[float, float]:
    """SliceTiming keyed by each slice's world position along the slice axis (independent of slice order)."""
    img = nib.load(nii)
    normal = img.affine[:3, 2] / np.linalg.norm(img.affine[:3, 2])
    centres = [float(np.dot(img.affine[:3, :3] @ [0, 0, k] + img.affine[:3, 3], normal) * np.sign(normal[2] or 1))
               for k in range(img.shape[2])]
    return {round(c, 2): t for c, t in zip(centres, times, strict=True)}


def phase_world(nii: Path, direction: str) -> np.ndarray:
    """The world (RAS) unit vector a BIDS PhaseEncodingDirection (i, j-, ...) points to in this file."""
    axis = "ijk".index(direction[0])
    v = nib.load(nii).affine[:3, axis]
    return (-1 if direction.endswith("-") else 1) * v / np.linalg.norm(v)


@pytest.mark.parametrize("name, shape", [
    ("siemens_mb_dwi", (150, 152, 81, 3)),  # Siemens E11 multiband DWI mosaics, 3 files -> 4-D
    ("siemens_fmri_mosaic", (64, 64, 35)),  # Siemens B17 fMRI mosaic, oblique
    ("siemens_dti", (128, 128, 48, 2)),  # Siemens B17 DTI mosaics (nibabel's)
])
def test_mosaic_equals_dcm2niix(tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    src = copy_series(name, tmp_path / "in")
    ours = run_convert(src, tmp_path / "ours")
    theirs = run_dcm2niix(src, tmp_path / "ref")
    assert nib.load(ours[".nii.gz"]).shape == shape
    assert_same_world(ours[".nii.gz"], theirs[".nii.gz"])  # shape, affine within 1e-3 mm, every voxel
    meta = json.loads(ours[".json"].read_text())
    ref = json.loads(theirs[".json"].read_text())
    for key in ("EchoTime", "RepetitionTime"):
        assert meta[key] == pytest.approx(ref[key]), key
    assert meta["MosaicTiles"] == shape[2]
    # SliceTiming and PhaseEncodingDirection refer to voxel axes: compare them where they point in the world
    ours_t = slice_times_by_position(ours[".nii.gz"], meta["SliceTiming"])
    ref_t = slice_times_by_position(theirs[".nii.gz"], ref["SliceTiming"])
    assert ours_t.keys() == ref_t.keys()
    assert all(ours_t[k] == pytest.approx(ref_t[k], abs=1e-4) for k in ours_t)
    np.testing.assert_allclose(phase_world(ours[".nii.gz"], meta["PhaseEncodingDirection"]),
                               phase_world(theirs[".nii.gz"], ref["PhaseEncodingDirection"]), atol=1e-4)


def test_diffusion_tables_equal_dcm2niix(tmp_path: Path) -> None:
    src = copy_series("siemens_mb_dwi", tmp_path / "in")
    ours = run_convert(src, tmp_path / "ours")
    theirs = run_dcm2niix(src, tmp_path / "ref")
    assert ours[".bval"].read_text().split() == theirs[".bval"].read_text().split() == ["5", "5", "1500"]
    assert_same_directions(world_bvecs(ours[".bvec"], ours[".nii.gz"]),
                           world_bvecs(theirs[".bvec"], theirs[".nii.gz"]))
    meta = json.loads(ours[".json"].read_text())
    assert meta["Volumes"] == 3 and meta["Slices"] == 81 and len(meta["SOPInstanceUIDs"]) == 3


def test_diffusion_tables_from_csa_where_dcm2niix_writes_none(tmp_path: Path) -> None:
    """nibabel's b=0 file has no gradient tags, so dcm2niix (2022) writes no .bval; the CSA headers say b=0, 1000."""
    src = copy_series("siemens_dti", tmp_path / "in")
    ours = run_convert(src, tmp_path / "ours")
    assert ours[".bval"].read_text().split() == ["0", "1000"]
    world = world_bvecs(ours[".bvec"], ours[".nii.gz"])
    assert np.allclose(world[0], 0)
    lps = np.array([0.99997449, 0.00505012, -0.00505012])  # CSA DiffusionGradientDirection of the b=1000 file
    assert_same_directions(world[1:], (lps * [-1, -1, 1])[None, :])


def test_split_writes_one_file_per_volume(tmp_path: Path) -> None:
    src = copy_series("siemens_mb_dwi", tmp_path / "in")
    four_d = np.asarray(nib.load(run_convert(src, tmp_path / "4d")[".nii.gz"]).dataobj)
    proc = kaapcli("convert", src, "-o", tmp_path / "split", "--split", "-q")
    assert proc.returncode == 0, proc.stderr
    volumes = sorted(Path(p) for p in proc.stdout.split() if p.endswith(".nii.gz"))
    assert [p.name[-10:] for p in volumes] == ["_a1.nii.gz", "_a2.nii.gz", "_a3.nii.gz"]
    for v, path in enumerate(volumes):
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), four_d[..., v])
    assert not list((tmp_path / "split").glob("*.bval"))  # 3-D files: no diffusion tables


def test_enhanced_philips_equals_dcm2niix(tmp_path: Path) -> None:
    src = copy_series("philips_enhanced", tmp_path / "in")
    assert_same_world(run_convert(src, tmp_path / "ours")[".nii.gz"], run_dcm2niix(src, tmp_path / "ref")[".nii.gz"])


def test_single_slice_fieldmap_equals_dcm2niix(tmp_path: Path) -> None:
    src = copy_series("siemens_fieldmap", tmp_path / "in")
    assert_same_world(run_convert(src, tmp_path / "ours")[".nii.gz"], run_dcm2niix(src, tmp_path / "ref")[".nii.gz"])


def test_xa_localizer_frames_of_three_orientations_stay_apart(tmp_path: Path) -> None:
    """dcm2niix stacks them into one volume ("slice orientation varies (localizer?)"), which no grid fits."""
    src = copy_series("siemens_xa_localizer", tmp_path / "in")
    proc = kaapcli("convert", src, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    outputs = [Path(p) for p in proc.stdout.split() if p.endswith(".nii.gz")]
    assert len(outputs) == 3
    ds = pydicom.dcmread(next(src.iterdir()))
    for path, frame in zip(sorted(outputs), ds.PerFrameFunctionalGroupsSequence, strict=True):
        img = nib.load(path)
        assert img.shape == (162, 162, 1)
        lps = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        np.testing.assert_allclose(img.affine[:3, 3], lps * [-1, -1, 1], atol=1e-3)


def test_odd_mosaic_tiles_and_shifted_copy(tmp_path: Path) -> None:
    """nibabel's 0.dcm/1.dcm: a 256x256 mosaic of 48 tiles (7 per row, 36 pixels: not a divisor) and a copy of it
    shifted by 3 mm.  Each becomes its own volume (they do not share a grid).  The first has dcm2niix's shape and
    affine; its tiles start on whole rows, as nibabel reads them (dcm2niix starts tile rows 256*256/7 pixels apart,
    mid-line, on such a matrix)."""
    src = copy_series("siemens_mosaic_odd", tmp_path / "in")
    proc = kaapcli("convert", src, "-o", tmp_path / "ours", "-q")
    assert proc.returncode == 0, proc.stderr
    first, second = sorted(Path(p) for p in proc.stdout.split() if p.endswith(".nii.gz"))
    theirs = nib.load(run_dcm2niix(src, tmp_path / "ref")[".nii.gz"])
    assert theirs.shape == (36, 36, 48, 2)
    ours = nib.load(first)
    a, b = nib.as_closest_canonical(ours), nib.as_closest_canonical(theirs.slicer[..., 0])
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    mosaic = pydicom.dcmread(src / "0.dcm").pixel_array
    data = np.asarray(ours.dataobj)
    for k in range(48):  # voxel (i, j, k) = column i, row j of tile k (the CSA normal agrees with row x column)
        r0, c0 = (k // 7) * 36, (k % 7) * 36
        np.testing.assert_array_equal(data[:, :, k].T, mosaic[r0:r0 + 36, c0:c0 + 36])
    a, b = nib.load(first).affine, nib.load(second).affine
    np.testing.assert_allclose(b[:3, 3] - a[:3, 3], [0, 0, 3], atol=1e-3)  # 1.dcm: ImagePositionPatient z + 3 mm


def test_mosaic_without_pixels_or_slice_count_fails_with_reason(tmp_path: Path) -> None:
    src = copy_series("siemens_mosaic_nopixels", tmp_path / "nopix")  # dcm2niix: "No valid DICOM images"
    proc = kaapcli("convert", src, "-o", tmp_path / "out")
    assert proc.returncode == 65  # bad input data
    assert "no pixel data" in proc.stderr.lower() and "Traceback" not in proc.stderr
    src = copy_series("siemens_fmri_mosaic", tmp_path / "nocsa")
    path = next(src.iterdir())
    ds = pydicom.dcmread(path)
    del ds[0x00291010]  # the CSA image header
    ds[0x0019100A].value = None  # and Siemens' public copy of the count
    ds.save_as(path)
    proc = kaapcli("convert", src, "-o", tmp_path / "out")
    assert proc.returncode == 65
    assert "MOSAIC without a usable NumberOfImagesInMosaic" in proc.stderr, proc.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_hostile_mosaic_count_is_checked_against_the_matrix(tmp_path: Path) -> None:
    from kaapcli.core import volume
    from kaapcli.exitcodes import DataError

    src = copy_series("siemens_fmri_mosaic", tmp_path / "in")
    ds = pydicom.dcmread(next(src.iterdir()), stop_before_pixels=True)
    del ds[0x00291010]
    ds[0x0019100A].value = 1000  # 32 tiles per row: more than a 20-pixel matrix holds
    ds.Rows = ds.Columns = 20
    with pytest.raises(DataError, match="cannot hold 1000 images"):
        volume.frames_of(ds, Path("x.dcm"))
    ds[0x0019100A].value = 65535  # 1x1-pixel tiles of a 65535-pixel matrix: 65535 frames from one header
    ds.Rows = ds.Columns = 65535
    with pytest.raises(DataError, match="claims 65535 images"):
        volume.frames_of(ds, Path("x.dcm"))


def test_study_folder_with_non_image_objects_exits_0(tmp_path: Path) -> None:
    """SEG, RTSTRUCT, SR and PDF among a study's files are skipped with the reason, not failed."""
    import highdicom as hd
    from pydicom.data import get_testdata_file
    from pydicom.sr.codedict import codes

    study = tmp_path / "study"
    image = copy_series("siemens_fieldmap", study / "mr")
    for name in ("rtstruct.dcm", "test-SR.dcm"):
        shutil.copy(get_testdata_file(name), study / name)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    assert kaapcli("pdf2dcm", pdf, "-o", study / "pdf", "-q").returncode == 0
    source = pydicom.dcmread(next(image.iterdir()))
    mask = np.zeros((1, source.Rows, source.Columns), bool)
    mask[0, 10:20, 10:20] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")
    seg.save_as(study / "seg.dcm")
    proc = kaapcli("convert", study, "-o", tmp_path / "out", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["seg.dcm"]["status"] == "skipped"
    assert "Segmentation Storage" in records["seg.dcm"]["message"] and "seg2itk" in records["seg.dcm"]["message"]
    for name in ("rtstruct.dcm", "test-SR.dcm"):
        assert records[name]["status"] == "skipped"
    assert sum(r["status"] == "ok" for r in records.values()) == 1
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
