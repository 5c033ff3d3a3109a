"""The fast header reader and the NIfTI/CSA/gzip writers of the convert fast path, each against the library it
replaces: pydicom (header values, pixel arrays), nibabel (NIfTI-1 header, CSA headers), gzip (multi-member files)."""

from __future__ import annotations

import gzip
import io
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kaapcli.core import dicomscan, volume
from kaapcli.core.convert import json_value
from tests.conftest import dicom_files, pydicom_test_files
from tests.realdata import heudiconv_data, nibabel_data


def scannable(paths: list[Path]) -> list[tuple[Path, dicomscan.Header, pydicom.Dataset]]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - files pydicom itself cannot read are not compared
                continue
            header = dicomscan.scan(path)
            if header is not None:
                out.append((path, header, ds))
    return out


def same(ours: object, theirs: object) -> bool:
    a, b = json_value(ours) if ours is not None else None, json_value(theirs) if theirs is not None else None
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_values_equal_pydicom_on_its_test_files_and_real_scanner_files(mock_ct: Path) -> None:
    files = pydicom_test_files() + dicom_files(mock_ct)[:4]
    files += sorted((heudiconv_data()).rglob("*.dcm")) + sorted(nibabel_data().glob("*.dcm"))
    checked = scannable(files)
    assert len(checked) > 60  # most of pydicom's native little endian files, the mock, the Siemens files
    compared = 0
    for path, header, ds in checked:
        for keyword, (_tag, vr) in dicomscan.KEYWORDS.items():
            if keyword.endswith("PixelData"):
                continue
            if vr == "SQ":
                assert (keyword in header) == (keyword in ds), (path.name, keyword)
                continue
            try:
                ours = header.get(keyword)
            except dicomscan.Unsupported:
                continue  # left to pydicom: never a different value
            compared += 1
            assert same(ours, ds.get(keyword)), (path.name, keyword, ours, ds.get(keyword))
            if isinstance(ours, str | int):  # names and stack labels use str(): equal too
                assert str(ours) == str(ds.get(keyword)), (path.name, keyword)
    assert compared > 4000


def test_files_it_does_not_handle_are_left_to_pydicom(tmp_path: Path) -> None:
    names = ["MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm", "rtplan_truncated.dcm"]
    for name in names:  # big endian, encapsulated, deflated, truncated
        path = Path(pydicom.data.get_testdata_file(name))
        assert dicomscan.scan(path) is None or dicomscan.scan(path).pixel_offset < 0, name
        assert volume.scan_file(path) is None, name
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.InstanceNumber = "01"  # pydicom keeps "01": str() differs from int's, so the fast reader declines
    ds.save_as(tmp_path / "01.dcm")
    with pytest.raises(dicomscan.Unsupported):
        dicomscan.scan(tmp_path / "01.dcm").get("InstanceNumber")
    ds.SpecificCharacterSet, ds.InstitutionName = "ISO_IR 144", "Больница"  # Cyrillic: pydicom's job
    ds.save_as(tmp_path / "cyrillic.dcm")
    with pytest.raises(dicomscan.Unsupported):
        dicomscan.scan(tmp_path / "cyrillic.dcm").get("InstitutionName")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [0, 1])
def test_pixels_equal_pydicom_with_junk_in_the_unused_bits(tmp_path: Path, syntax: str, signed: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """BitsStored 12 of 16: pydicom masks (unsigned) or sign-extends (signed) the 4 high bits; so does kaapcli."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(1)
    values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, (ds.Rows, ds.Columns))
    raw = (values.astype(np.int64) & 0x0FFF) | (rng.integers(0, 16, values.shape) << 12)  # junk above bit 11
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, 12, 11
    ds.PixelData = raw.astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "junk.dcm", enforce_file_format=True)
    expected = pydicom.dcmread(tmp_path / "junk.dcm").pixel_array
    np.testing.assert_array_equal(dicomscan.pixel_array(dicomscan.scan(tmp_path / "junk.dcm")), expected)
    fast = volume.load_series([tmp_path / "junk.dcm"])[0].voxels
    monkeypatch.setattr(volume, "scan_file", lambda path: None)  # through pydicom
    slow = volume.load_series([tmp_path / "junk.dcm"])[0].voxels
    assert fast.dtype == slow.dtype
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(fast[0], expected.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept))


@pytest.mark.parametrize(("signed", "bits", "slopes", "intercepts", "in_threads"), [
    (0, 12, [1, 1, 1], [-1024] * 3, True),  # a CT: one add per plane, in the thread that read it
    (0, 12, [1, 2, -3], [-1024, 0, 7], True),  # a rescale per frame
    (1, 12, [1, 1, 1], [0, 0, 0], True),  # identity: the stored values as they are
    (0, 15, [1, 1, 1], [-1024] * 3, True),  # 15 bits: every rescaled value fits int16, whatever was stored
    (0, 16, [1, 1, 1], [-1024] * 3, False),  # 16 bits: the values read decide the type
    (1, 16, [-1, 1, 1], [0, 0, 100], False),
])
def test_rescale_in_the_reading_threads_equals_the_rescale_after_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signed: int, bits: int, slopes: list[int],
        intercepts: list[int], in_threads: bool) -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(bits * 2 + signed)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, bits, bits - 1
    expected = []
    for k, (slope, intercept) in enumerate(zip(slopes, intercepts, strict=True)):
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
        values = rng.integers(low, high, (ds.Rows, ds.Columns))
        raw = values & (2**bits - 1) | (rng.integers(0, 2 ** (16 - bits), values.shape) << bits)  # junk above
        expected.append(values * slope + intercept)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.ImagePositionPatient, ds.InstanceNumber, ds.SOPInstanceUID = [0, 0, 2.0 * k], k + 1, f"2.25.{k + 1}"
        ds.PixelData = raw.astype(np.uint16).tobytes()
        ds.save_as(tmp_path / f"{k}.dcm", enforce_file_format=True)
    paths = sorted(tmp_path.glob("*.dcm"))
    planned = []
    rescale_of = volume._int16_rescale
    monkeypatch.setattr(volume, "_int16_rescale", lambda *args: planned.append(rescale_of(*args)) or planned[-1])
    threads = volume.load_series(paths)[0].voxels
    assert (planned[0] is not None) == in_threads
    monkeypatch.setattr(volume, "_int16_rescale", lambda *args: None)
    after = volume.load_series(paths)[0].voxels
    monkeypatch.setattr(volume, "scan_file", lambda path: None)  # through pydicom
    slow = volume.load_series(paths)[0].voxels
    assert threads.dtype == after.dtype == slow.dtype
    np.testing.assert_array_equal(threads, after)
    np.testing.assert_array_equal(threads, slow)
    np.testing.assert_array_equal(threads, np.stack(expected))


def test_fast_path_volumes_equal_the_pydicom_path(tmp_path: Path, mock_ct: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    """Every stack, voxel, geometry and sidecar is the same whichever reader read the files."""
    from kaapcli.core.convert import sidecar
    from tests.realdata import copy_series

    series = [sorted(p.parent for p in dicom_files(mock_ct))[0]]
    series += [copy_series("siemens_mb_dwi", tmp_path / "dwi"), copy_series("siemens_fmri_mosaic", tmp_path / "fmri")]
    for folder in series:
        paths = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
        fast = volume.load_series(paths, four_d=True)
        with monkeypatch.context() as m:
            m.setattr(volume, "scan_file", lambda path: None)
            m.setattr(volume, "header_of", lambda path: pydicom.dcmread(path, stop_before_pixels=True))
            slow = volume.load_series(paths, four_d=True)
        assert [v.suffix for v in fast] == [v.suffix for v in slow]
        for a, b in zip(fast, slow, strict=True):
            assert isinstance(a.header, dicomscan.Header) and isinstance(b.header, pydicom.Dataset)
            assert a.voxels.dtype == b.voxels.dtype and a.voxels.shape == b.voxels.shape
            np.testing.assert_array_equal(a.voxels, b.voxels)
            np.testing.assert_array_equal(a.affine, b.affine)
            assert a.frames == b.frames
            assert sidecar(a) == sidecar(b)


def test_csa_header_equals_nibabel() -> None:
    with warnings.catch_warnings():  # nibabel warns that its DICOM wrappers are experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader

    files = sorted(heudiconv_data().rglob("*.dcm")) + sorted(nibabel_data().glob("*.dcm"))
    compared = 0
    for path in files:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        try:
            theirs = csareader.get_csa_header(ds, "image")
        except csareader.CSAError:
            theirs = None
        ours = volume.siemens_csa(ds)
        assert (theirs is None) == (ours is None), path.name
        header = dicomscan.scan(path)
        if header is not None:
            assert volume.siemens_csa(header) == ours, path.name
        for name, tag in (theirs or {"tags": {}})["tags"].items():
            items = [i.decode("latin-1") if isinstance(i, bytes) else i for i in tag["items"]]
            assert ours is not None and ours["tags"][name]["items"] == items, (path.name, name)
            compared += 1
    assert compared > 1000
    assert volume.parse_csa(b"SV10\4\3\2\1" + (5000).to_bytes(4, "little") + bytes(8)) is None  # tag count: damaged


@pytest.mark.parametrize("dims", [3, 4])
@pytest.mark.parametrize("dtype", ["int16", "uint16", "float32", "uint8", "int32"])
def test_nifti_header_equals_nibabels(dims: int, dtype: str) -> None:
    rng = np.random.default_rng(dims * 10 + len(dtype))
    for _ in range(5):
        q, _r = np.linalg.qr(rng.normal(size=(3, 3)))  # any orthonormal direction, either handedness
        spacing = rng.uniform(0.3, 5, 3)
        origin = rng.uniform(-300, 300, 3)
        shape = tuple(int(n) for n in rng.integers(1, 40, dims))
        zooms = (*spacing, 2.5)[:dims]
        affine = volume.ras_affine(q, spacing, origin)
        img = nib.Nifti1Image(np.zeros(shape, dtype=dtype), affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_zooms(zooms)
        img.header["vox_offset"] = 352
        expected = bytes(img.header.binaryblock) + b"\0\0\0\0"
        assert volume.nifti1_header(shape, dtype, affine, zooms) == expected


def test_gzip_members_are_one_standard_file_and_byte_stable() -> None:
    voxels = np.random.default_rng(3).integers(-1000, 1000, (7, 33, 40)).astype(np.int16)
    voxels[2] = 0  # an empty plane shares the precomputed member
    head = b"h" * 352
    for level in (1, 2, 6, 9):
        data = b"".join(volume.gzip_members(head, voxels, level))
        assert data == b"".join(volume.gzip_members(head, voxels, level))
        assert gzip.decompress(data) == head + voxels.tobytes()
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:  # the stdlib's streaming reader, member after member
            assert fh.read() == head + voxels.tobytes()
