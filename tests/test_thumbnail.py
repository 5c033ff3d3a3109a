"""thumbnail: size and aspect, windowing, colour and compressed pydicom files, SEG overlay, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.conftest import dicom_files, kaapcli, pydicom_test_files


def series_dir(root: Path) -> Path:
    return sorted({p.parent for p in dicom_files(root)})[0]


def png(out: Path, uid: str) -> np.ndarray:
    return np.asarray(Image.open(out / f"{uid}.png"))


def test_size_aspect_and_window(tmp_path: Path, mock_ct: Path) -> None:
    src = tmp_path / "series"
    shutil.copytree(series_dir(mock_ct), src)
    files = sorted(src.iterdir())
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    # Anisotropic pixels (rows 2x as far apart as columns) and a narrow window on every slice.
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [1.6, 0.8]
        ds.WindowCenter, ds.WindowWidth = 40, 100  # soft tissue: lungs black, bone white
        ds.save_as(f)
    proc = kaapcli("thumbnail", src, "-o", tmp_path / "out", "--size", "120")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "out" / f"{uid}.png")]
    img = png(tmp_path / "out", uid)
    assert img.shape == (120, 60)  # 64 rows x 1.6 mm tall, 64 columns x 0.8 mm wide
    # The window clips: air/lung (< -10 HU) all black, bone (> 90 HU) all white, few in between.
    assert (img == 0).mean() > 0.3 and (img == 255).sum() > 0
    # A wide window keeps more grey levels than the narrow one.
    for f in files:
        ds = pydicom.dcmread(f)
        ds.WindowWidth = 4000
        ds.save_as(f)
    wide = kaapcli("thumbnail", src, "-o", tmp_path / "wide", "--size", "120", "-q")
    assert wide.returncode == 0, wide.stderr
    assert (png(tmp_path / "wide", uid) == 255).sum() == 0 and (png(tmp_path / "wide", uid) == 0).mean() < 0.05


def test_pydicom_files_colour_compressed_and_broken(tmp_path: Path) -> None:
    proc = kaapcli("thumbnail", *pydicom_test_files(), "-o", tmp_path / "out", "--format", "jsonl", "-w", "2")
    assert proc.returncode == 1  # some of pydicom's files are broken on purpose
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) >= 25
    for r in [r for r in records if r["status"] == "failed"]:
        assert "\n" not in r["message"] and r["message"]
    # colour: a YBR JPEG (red square) and an RGB file come out as RGB PNGs with colour
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm"):
        ds = pydicom.dcmread(next(p for p in pydicom_test_files() if p.name == name), stop_before_pixels=True)
        img = png(tmp_path / "out", ds.SeriesInstanceUID)
        assert img.ndim == 3 and img.shape[2] == 3
        assert (np.ptp(img.astype(int), axis=2) > 100).any()


def test_truncated_and_non_dicom(tmp_path: Path, mock_ct: Path) -> None:
    good = dicom_files(series_dir(mock_ct))[0]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.txt").write_text("hello")
    proc = kaapcli("thumbnail", tmp_path, "-o", tmp_path / "out")
    assert proc.returncode == 65, proc.stderr  # the one item failed on bad data (notes.txt is not an item)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cut.dcm" in errors[0] and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_seg_overlay_is_coloured(tmp_path: Path, mock_ct: Path) -> None:
    hd = pytest.importorskip("highdicom")
    ref = series_dir(mock_ct)
    sources = sorted((pydicom.dcmread(p) for p in dicom_files(ref)), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(int) - 1024 for d in sources])
    body = hu > -500
    dense = hu > 100  # spine, kidneys, aorta: inside the body mask, so the segments overlap
    mask = np.stack([body, dense], axis=-1).astype(np.uint8)
    algo = hd.AlgorithmIdentificationSequence(name="threshold", version="1", family=hd.sr.CodedConcept(
        "123109", "DCM", "Manual Processing"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label, segmented_property_category=hd.sr.CodedConcept(
            "91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for i, (label, code, meaning) in enumerate([("body", "38266002", "Entire body"),
                                                    ("dense", "272673000", "Bone")])]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="kaapcli tests",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg_dir = tmp_path / "seg"
    seg_dir.mkdir()
    seg.save_as(seg_dir / "seg.dcm")
    no_ref = kaapcli("thumbnail", seg_dir, "-o", tmp_path / "out")
    assert no_ref.returncode == 65 and "--reference" in no_ref.stderr
    proc = kaapcli("thumbnail", seg_dir, "-o", tmp_path / "out", "--reference", mock_ct, "--size", "128")
    assert proc.returncode == 0, proc.stderr
    img = png(tmp_path / "out", seg.SeriesInstanceUID).astype(int)
    assert img.shape == (128, 128, 3)
    colour = np.ptp(img, axis=2) > 40
    assert colour.mean() > 0.2  # the body fill covers much of the slice
    # both segment colours appear as outlines, and their overlap mixes into a third colour
    colours = {tuple(c) for c in img[colour].reshape(-1, 3)}
    assert (230, 159, 0) in colours and (86, 180, 233) in colours
    assert len(colours) > 3
    # a legend in the lower left corner: a colour swatch per segment, white text on a dark box
    corner = img[-30:, :70]
    assert (np.all(corner == (230, 159, 0), axis=-1).sum() >= 16 and np.all(corner == (86, 180, 233), axis=-1).sum()
            >= 16)
    assert (np.all(corner > 150, axis=-1) & (np.ptp(corner, axis=-1) < 20)).sum() > 10  # white-ish text


def test_enhanced_ct_uses_the_window_of_its_functional_groups(tmp_path: Path, mock_ct: Path) -> None:
    """A legacy-converted enhanced CT keeps rescale and window only in its functional groups: its thumbnail
    equals the thumbnail of the classic slice it shows."""
    import highdicom as hd

    sources = [pydicom.dcmread(p) for p in dicom_files(series_dir(mock_ct))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=sources, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
        instance_number=1)
    assert "WindowCenter" not in enhanced and "RescaleIntercept" not in enhanced
    (tmp_path / "enh").mkdir()
    enhanced.save_as(tmp_path / "enh" / "enh.dcm")
    middle = enhanced.PerFrameFunctionalGroupsSequence[int(enhanced.NumberOfFrames) // 2]
    source_uid = middle.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
    (tmp_path / "one").mkdir()
    shutil.copy(next(p for p, ds in zip(dicom_files(series_dir(mock_ct)), sources, strict=True)
                     if ds.SOPInstanceUID == source_uid), tmp_path / "one" / "slice.dcm")
    for name in ("enh", "one"):
        proc = kaapcli("thumbnail", tmp_path / name, "-o", tmp_path / f"{name}-out", "--size", "64", "-q")
        assert proc.returncode == 0, proc.stderr
    ours = png(tmp_path / "enh-out", enhanced.SeriesInstanceUID)
    classic = png(tmp_path / "one-out", sources[0].SeriesInstanceUID)
    np.testing.assert_array_equal(ours, classic)
    assert 0 < ours.mean() < 200  # windowed (40/400 HU), not stretched to the percentiles


def _variants(ct: Path, mr: Path, dest: Path) -> dict[str, tuple[Path, bool]]:
    """Single files derived from a mock CT and MR slice: name -> (path, whether the numpy-free path takes it)."""
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    out: dict[str, tuple[Path, bool]] = {}
    rng = np.random.default_rng(5)

    def make(name: str, source: Path, fast: bool, change: Any = None, **save: Any) -> None:
        ds = pydicom.dcmread(source)
        if change is not None:
            change(ds, ds.pixel_array)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # one series per variant
        (dest / name).mkdir(parents=True)
        pydicom.dcmwrite(dest / name / "f.dcm", ds, **save)
        out[name] = (dest / name / "f.dcm", fast)

    def attrs(**values: Any) -> Any:
        def change(ds: Any, _: Any) -> None:
            for k, v in values.items():
                if v is None:
                    del ds[k]
                else:
                    setattr(ds, k, v)
        return change

    def high_bits(ds: Any, arr: Any) -> None:  # garbage above BitsStored (12): ignored
        ds.PixelData = (arr | (rng.integers(0, 16, arr.shape) << 12)).astype("<u2").tobytes()

    def signed12(ds: Any, arr: Any) -> None:
        values = np.clip(arr.astype(np.int32) - 1024, -2048, 2047)
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        ds.PixelData = ((values & 0xFFF) | (rng.integers(0, 16, arr.shape) << 12)).astype("<u2").tobytes()

    def signed16(ds: Any, arr: Any) -> None:
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 1, 16, 15, 0
        ds.PixelData = (arr.astype(np.int16) - 1024).astype("<i2").tobytes()

    def eight(signed: int) -> Any:
        def change(ds: Any, arr: Any) -> None:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, signed
            ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 0, 10, 150
            ds.PixelData = ((arr >> 4).astype(np.int16) - 128 * signed).astype("i1" if signed else "u1").tobytes()
        return change

    def frames(ds: Any, arr: Any) -> None:
        ds.NumberOfFrames = 3
        ds.PixelData = np.stack([arr, arr[::-1], arr[:, ::-1]]).astype("<u2").tobytes()

    def big_endian(ds: Any, arr: Any) -> None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = arr.astype(">u2").tobytes()

    make("ct", ct, True)
    make("mr", mr, True)
    make("monochrome1", ct, True, attrs(PhotometricInterpretation="MONOCHROME1"))
    make("rescale", ct, True, attrs(RescaleSlope=0.37, RescaleIntercept=-1000.25, WindowCenter=-600.5,
                                    WindowWidth=1500.3))
    make("negative-slope", ct, True, attrs(RescaleSlope=-2.0, RescaleIntercept=3000))
    make("no-rescale", ct, True, attrs(RescaleSlope=None, RescaleIntercept=None, WindowCenter=1100,
                                       WindowWidth=1))
    make("only-slope", ct, True, attrs(RescaleIntercept=None, WindowCenter=1000))
    make("non-square", ct, True, attrs(PixelSpacing=[1.6, 0.7]))
    make("aspect-ratio", mr, True, attrs(PixelSpacing=None, PixelAspectRatio=[3, 4]))
    make("two-windows", ct, True, attrs(WindowCenter=[-600, 40], WindowWidth=[1500, 400]))
    make("high-bits", ct, True, high_bits)
    make("signed12", ct, True, signed12)
    make("signed16", ct, True, signed16)
    make("eight", ct, True, eight(0))
    make("eight-signed", ct, True, eight(1))
    make("frames", mr, True, frames)
    make("implicit", ct, True, implicit_vr=True, little_endian=True,
         change=lambda ds, _: setattr(ds.file_meta, "TransferSyntaxUID", ImplicitVRLittleEndian))
    make("big-endian", mr, False, big_endian, implicit_vr=False, little_endian=False, force_encoding=True)
    make("no-window", ct, False, attrs(WindowCenter=None, WindowWidth=None))
    make("narrow-window", ct, False, attrs(WindowWidth=0.5))
    make("voi-lut", ct, False, lambda ds, _: setattr(ds, "VOILUTSequence", [pydicom.Dataset()]))
    return out


def test_numpy_free_thumbnail_equals_the_general_path(tmp_path: Path, mock_ct: Path) -> None:
    """The common case skips numpy; its PNG is pixel for pixel the general path's (pydicom's pixels through
    to_display and render), and every case it does not take falls back to that path."""
    from kaapcli.core import batch, dicomscan
    from kaapcli.core.thumbnail import ThumbnailOperator, display_size, frame_pixels, render, to_display, windowed

    mr = tmp_path / "mr"
    assert kaapcli("mock", "-o", mr, "--modality", "MR", "--slices", "1", "--rows", "40", "--columns", "56",
                   "-q").returncode == 0
    variants = _variants(dicom_files(series_dir(mock_ct))[3], dicom_files(mr)[0], tmp_path / "in")
    for name, (path, fast) in variants.items():
        ds = pydicom.dcmread(path)
        pixels = to_display(ds, frame_pixels(ds))
        expected = np.asarray(render(pixels, *display_size(ds, pixels.shape[0], pixels.shape[1], 50)))
        assert 0 < expected.mean() < 255, name  # a picture, not a blank: the comparison means something
        header = dicomscan.scan(path)
        image = windowed(header, 50) if header is not None else None
        assert (image is not None) == fast, name
        if image is not None:
            np.testing.assert_array_equal(np.asarray(image), expected, err_msg=name)
        summary = batch.run_batch(ThumbnailOperator(size=50), [path], tmp_path / "out" / name,
                                  batch.BatchOptions(workers=1))
        assert summary.exit_code == 0, name
        np.testing.assert_array_equal(png(tmp_path / "out" / name, ds.SeriesInstanceUID), expected, err_msg=name)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(variants["ct"][0].read_bytes()[:-100])
    assert windowed(dicomscan.scan(cut), 50) is None  # truncated pixel data: the general path reports it


@pytest.mark.filterwarnings("ignore:The pixel data is:UserWarning")  # pydicom on a file with excess padding
def test_numpy_free_thumbnail_equals_the_general_path_on_pydicom_files() -> None:
    """pydicom's test files (several vendors, syntaxes and bit depths): every one the numpy-free path takes
    renders as the general path renders it."""
    from kaapcli.core import dicomscan
    from kaapcli.core.thumbnail import display_size, frame_pixels, render, to_display, windowed

    taken = 0
    for path in pydicom_test_files():
        try:
            header = dicomscan.scan(path)
            image = windowed(header, 64) if header is not None else None
        except dicomscan.Unsupported:
            continue
        if image is None:
            continue
        taken += 1
        ds = pydicom.dcmread(path)
        pixels = to_display(ds, frame_pixels(ds))
        expected = render(pixels, *display_size(ds, pixels.shape[0], pixels.shape[1], 64))
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected), err_msg=path.name)
    assert taken >= 20
