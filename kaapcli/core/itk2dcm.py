"""NIfTI datasets → DICOM (Kaapana's Itk2Dcm): images become CT/MR series, masks become DICOM SEG.

Two layouts, auto-detected (DESIGN §3.3):

- *nnU-Net v2*: ``dataset.json`` (``channel_names``, ``labels``, ``file_ending``) with
  ``imagesTr/`` and ``imagesTs/`` (``<case>_0000<ending>``, one file per channel) and ``labelsTr/``;
- *basic*: ``*.nii.gz`` (plus ``CaseXX_segmentation.nii.gz`` beside, or ``cases/`` + ``segs/``),
  optional ``meta_data.json`` (``global_tags``, ``series_tags`` keyed ``"gggg|eeee"``) and ``seg_info.json``.

Each case is one patient and one study; each channel one series; UIDs derive from the case
name and the seed, so a re-run writes the same files: ``OUT/<case>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
and the SEG as ``OUT/<case>/<SEG SeriesInstanceUID>.dcm``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.core.seg import SegInfo, masks_to_seg
from kaapcli.exitcodes import DataError, UsageError

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
NIFTI = re.compile(r"\.(nii\.gz|nii)$")


@dataclass(frozen=True)
class Channel:
    path: Path
    modality: str  # CT or MR
    description: str  # SeriesDescription
    tags: tuple[tuple[str, str], ...] = ()  # ("gggg|eeee", value) from meta_data.json


@dataclass(frozen=True)
class Case:
    name: str
    channels: tuple[Channel, ...]
    mask: Path | None = None


@dataclass
class Dataset:
    layout: str  # "nnunet" or "basic"
    cases: list[Case]
    seg_info: SegInfo = field(default_factory=SegInfo)


def _stem(path: Path) -> str:
    return NIFTI.sub("", path.name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _modality(channel_name: str) -> str:
    return "CT" if channel_name.strip().upper() == "CT" else "MR"


def scan_nnunet(root: Path) -> Dataset:
    doc = _read_json(root / "dataset.json")
    try:
        channels = {int(k): str(v) for k, v in doc["channel_names"].items()}
        ending = str(doc.get("file_ending", ".nii.gz"))
        labels = {int(v): str(k) for k, v in doc.get("labels", {}).items() if int(v) != 0}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{root / 'dataset.json'}: not an nnU-Net v2 dataset.json ({type(exc).__name__}: {exc})",
                        hint="needs channel_names, labels ({name: int}) and file_ending") from None
    if ending not in (".nii.gz", ".nii"):
        raise DataError(f"{root / 'dataset.json'}: file_ending {ending!r} not supported (NIfTI only)")
    cases = []
    for split in ("imagesTr", "imagesTs"):
        folder = root / split
        names = sorted({m.group(1) for p in (folder.glob(f"*{ending}") if folder.is_dir() else [])
                        if (m := re.fullmatch(rf"(.+)_(\d{{4}}){re.escape(ending)}", p.name))})
        for name in names:
            chans = []
            for index, channel in sorted(channels.items()):
                path = folder / f"{name}_{index:04d}{ending}"
                if not path.is_file():
                    raise DataError(f"{path}: channel {index} ({channel}) of case {name} missing")
                chans.append(Channel(path, _modality(channel), f"{doc.get('name', root.name)} {channel}"[:64]))
            label = root / "labelsTr" / f"{name}{ending}"
            cases.append(Case(name, tuple(chans), label if split == "imagesTr" and label.is_file() else None))
    info = SegInfo(algorithm="", labels=labels, body_part="")
    return Dataset("nnunet", cases, info)


def scan_basic(root: Path, modality: str) -> Dataset:
    meta = _read_json(root / "meta_data.json") if (root / "meta_data.json").is_file() else {}
    global_tags = {str(k): str(v) for k, v in (meta.get("global_tags") or {}).items()}
    series_tags = meta.get("series_tags") or {}
    if (root / "cases").is_dir():
        images = sorted(p for p in (root / "cases").iterdir() if NIFTI.search(p.name))
        masks = {_stem(p): p for p in (root / "segs").iterdir() if NIFTI.search(p.name)} \
            if (root / "segs").is_dir() else {}
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and NIFTI.search(p.name))
        images = [p for p in files if not _stem(p).endswith("_segmentation")]
        masks = {_stem(p)[: -len("_segmentation")]: p for p in files if _stem(p).endswith("_segmentation")}
    if not images:
        raise DataError(f"{root}: no NIfTI images (*.nii.gz, *.nii), no dataset.json",
                        hint="expected the basic layout or an nnU-Net v2 dataset folder")
    cases = []
    for path in images:
        tags = dict(global_tags)
        for key in (path.name, _stem(path), _stem(path) + ".nii"):
            tags.update({str(k): str(v) for k, v in (series_tags.get(key) or {}).items()})
        chan_modality = tags.pop("0008|0060", modality).upper()
        if chan_modality not in SOP_CLASSES:
            raise DataError(f"{path}: modality {chan_modality} not supported (CT or MR)")
        channel = Channel(path, chan_modality, tags.get("0008|103e", _stem(path))[:64], tuple(sorted(tags.items())))
        cases.append(Case(_stem(path), (channel,), masks.get(_stem(path))))
    info = SegInfo.load(root / "seg_info.json") if (root / "seg_info.json").is_file() else SegInfo()
    return Dataset("basic", cases, info)


def scan(root: Path, modality: str = "CT") -> Dataset:
    """Detect the layout of ``root`` and list its cases."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    return scan_nnunet(root) if (root / "dataset.json").is_file() else scan_basic(root, modality)


# --------------------------------------------------------------------------- writing images

def _read_image(path: Path) -> Any:

    from kaapcli.core.resample import read_scalar_volume

    image = read_scalar_volume(path)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise DataError(f"{path}: direction matrix is not orthonormal (sheared image)")
    return image


def stored_values(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored int array, slope, intercept): integral values as they are, others scaled onto 16 bits."""
    if np.issubdtype(values.dtype, np.integer) or np.all(np.mod(values, 1) == 0):
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if -32768 <= lo and hi <= 32767:
            return values.astype(np.int16), 1.0, 0.0
        if 0 <= lo and hi <= 65535:
            return values.astype(np.uint16), 1.0, 0.0
    lo, hi = float(np.min(values)), float(np.max(values))
    slope = (hi - lo) / 65535 if hi > lo else 1.0
    slope = float(f"{slope:.10g}")  # as written in the DS (16 characters)
    intercept = float(f"{lo:.10g}")
    return np.clip(np.rint((values - intercept) / slope), 0, 65535).astype(np.uint16), slope, intercept


def _ds(value: float) -> str:
    return f"{value:.10g}"


def write_series(image: Any, channel: Channel, case: str, index: int, out: Path, seed: int) -> list[Path]:
    """One CT or MR image series of ``image`` (one file per slice, geometry from the image)."""
    import SimpleITK as sitk
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset as PydicomDataset
    from pydicom.tag import Tag

    from kaapcli import __version__

    base = f"itk2dcm/{seed}/{case}"
    series_uid = dicom.uid_from(f"{base}/series/{index}")
    values = sitk.GetArrayFromImage(image)
    stored, slope, intercept = stored_values(values)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    sop_class = SOP_CLASSES[channel.modality]
    written = []
    for k in range(stored.shape[0]):
        sop_uid = dicom.uid_from(f"{base}/series/{index}/instance/{k}")
        ds = PydicomDataset()
        ds.file_meta = dicom.file_meta(sop_class, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = case, case, "", ""
        ds.StudyInstanceUID = dicom.uid_from(f"{base}/study")
        ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.AccessionNumber = ""
        ds.StudyID = "1"
        ds.Modality = channel.modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = index + 1
        ds.SeriesDescription = channel.description
        ds.FrameOfReferenceUID = dicom.uid_from(f"{base}/frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "kaapcli"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if channel.modality == "CT" else "OTHER"]
        ds.Laterality = ds.PatientPosition = ""  # unknown (Type 2C: present, empty)
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [_ds(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.SliceThickness = _ds(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        if channel.modality == "CT" or (slope, intercept) != (1.0, 0.0):  # MR only when values were scaled
            ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
        if channel.modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = ""
            ds.AcquisitionNumber = ""
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = ds.EchoTrainLength = ""
            ds.RepetitionTime = ""
        for key, value in channel.tags:  # meta_data.json: "gggg|eeee" → value, overriding the defaults
            group, element = (int(part, 16) for part in key.split("|"))
            tag = Tag(group, element)
            try:
                ds.add_new(tag, dictionary_VR(tag), value)
            except (KeyError, ValueError, TypeError) as exc:
                raise DataError(f"meta_data.json: cannot set {key}={value!r}: {exc}") from None
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        dest = out / series_uid / f"{sop_uid}.dcm"
        dicom.save(ds, dest)
        written.append(dest)
    return written


@dataclass
class Itk2DcmOperator(BaseOperator):
    """One item per case: its channels as image series, its mask as a SEG on the first channel."""

    dataset: Dataset
    seed: int = 0

    name = "itk2dcm"
    grouped = True
    supports_dry_run = True

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "layout": self.dataset.layout, "labels": self.dataset.seg_info.labels}

    def items(self) -> list[Item]:
        return [Item(case.name, tuple(c.path for c in case.channels) + ((case.mask,) if case.mask else ()))
                for case in self.dataset.cases]

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        case = next(c for c in self.dataset.cases if c.name == item.key)
        out = ctx.out / fsio.safe_name(case.name)
        if ctx.dry_run:
            what = f"{len(case.channels)} series" + (" and a SEG" if case.mask else "")
            return Outcome(message=f"would write {what} under {out}")
        images = [_read_image(c.path) for c in case.channels]  # all read before anything is written
        outputs: list[Path] = []
        series: list[list[Path]] = []
        for index, (image, channel) in enumerate(zip(images, case.channels, strict=True)):
            series.append(write_series(image, channel, case.name, index, out, self.seed))
            outputs += series[-1]
        warnings: list[str] = []
        if case.mask is not None:
            reference = [fsio.staged(p) for p in series[0]]  # written above, committed by the engine with the SEG
            seg, warnings = masks_to_seg([case.mask], reference, out, info=self.dataset.seg_info)
            outputs.append(seg)
        return Outcome(outputs=outputs, warnings=warnings)
