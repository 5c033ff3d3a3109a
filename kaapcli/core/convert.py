"""DICOM image series → NIfTI / NRRD volumes with a JSON sidecar (Kaapana's DcmConverter).

One item per series (key = SeriesInstanceUID).  A series holding several stacks gives one
volume per stack, the stack suffix appended to the name; volumes repeating one grid (fMRI,
diffusion) are one 4-D volume, as dcm2niix writes them (``split``: one file per volume), with
``.bval``/``.bvec`` (FSL convention) when the headers carry diffusion weighting.  Every stack is
loaded and checked before anything is written, so a refused series leaves no partial output.
Each file is read once: the plan's header parse (``scan``, ``Item.notes``) gives where its pixels are,
and ``--to nii`` reads them into the mapped temporary output file itself (``volume.MappedNifti``).

Non-image objects met among the files (SEG, RTSTRUCT, SR, PDF, RT Plan, waveforms...) are
skipped with their SOP class as the reason; they never fail the batch.

Never: writes a tiled mosaic as an image, or a sidecar field the header does not say.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableSequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaapcli import __version__
from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome, SkipItem
from kaapcli.exitcodes import DataError

FORMATS = ("nii.gz", "nii", "nrrd")
DEFAULT_NAME = "{SeriesInstanceUID}"
SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map SEG

# Acquisition tags copied to the sidecar, under their DICOM keywords and in DICOM units.
SIDECAR_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName", "SoftwareVersions",
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDescription", "SeriesDescription",
    "ProtocolName", "SeriesNumber", "AcquisitionNumber", "StudyDate", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "BodyPartExamined", "PatientPosition", "ImageType", "SliceThickness",
    "SpacingBetweenSlices", "PixelSpacing", "KVP", "XRayTubeCurrent", "ExposureTime", "ConvolutionKernel",
    "ScanningSequence", "SequenceVariant", "SequenceName", "MRAcquisitionType", "EchoNumbers", "FlipAngle",
    "MagneticFieldStrength", "ImagingFrequency", "EchoTrainLength", "InPlanePhaseEncodingDirection",
    "Units", "DecayCorrection", "RescaleType",
)
# Written under their BIDS names in seconds (as dcm2niix), not in DICOM's milliseconds.
SECONDS_TAGS = ("EchoTime", "RepetitionTime", "InversionTime")


NON_IMAGE_HINTS = {  # what to run instead, by SOP class
    "1.2.840.10008.5.1.4.1.1.66.4": "kaapcli seg2itk", "1.2.840.10008.5.1.4.1.1.66.7": "kaapcli seg2itk",
    "1.2.840.10008.5.1.4.1.1.481.3": "kaapcli seg2itk", "1.2.840.10008.5.1.4.1.1.104.1": "kaapcli dcm2pdf",
    "1.2.840.10008.5.1.4.1.1.66": "kaapcli dcm2bin",
}


def _not_an_image(ds: Any) -> str:
    """The reason a non-image object is skipped: its SOP class, and the command that reads it."""
    from pydicom.uid import UID

    uid = str(ds.get("SOPClassUID", "") or "")
    name = UID(uid).name if uid else "no SOPClassUID"
    hint = NON_IMAGE_HINTS.get(uid)
    return f"not an image series ({name})" + (f": use {hint}" if hint else "")


def json_value(value: Any) -> Any:
    """A pydicom element value as plain JSON (numbers stay numbers, multi-values become lists)."""
    if isinstance(value, MutableSequence | tuple):  # pydicom's MultiValue is a MutableSequence
        return [json_value(v) for v in value]
    if isinstance(value, float):  # DS values are float subclasses
        return float(value)
    if isinstance(value, int):  # IS values are int subclasses
        return int(value)
    return str(value)


def _seconds(value: Any) -> float | None:
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return None
    return round(ms / 1000, 9) if np.isfinite(ms) and ms >= 0 else None


def bids_fields(vol: Any, header: Any = None) -> dict[str, Any]:
    """EchoTime, RepetitionTime, InversionTime (s), SliceTiming (s) and PhaseEncodingDirection where the header
    says them, named and signed as dcm2niix does for the voxel axes kaapcli writes (rows not flipped)."""
    from kaapcli.core import volume

    header, first = vol.header if header is None else header, vol.frames[0]
    doc: dict[str, Any] = {}
    sources = {"EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
               "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
               "InversionTime": ("MRModifierSequence", "InversionTimes")}
    for keyword in SECONDS_TAGS:
        value = header.get(keyword)
        if value in (None, ""):
            value = volume.fg_attr(volume.functional_groups(header, first.index if not first.mosaic else 0),
                                   *sources[keyword])
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                value = value[0] if len(value) else None
        seconds = _seconds(value)
        if seconds is not None:
            doc[keyword] = seconds
    times = [f.slice_time for f in vol.slices]
    if times and all(t is not None for t in times) and not vol.resampled:
        doc["SliceTiming"] = [round(float(t) / 1000, 6) for t in times]  # type: ignore[arg-type]
    axis = str(header.get("InPlanePhaseEncodingDirection", "") or volume.fg_attr(
        volume.functional_groups(header, first.index), "MRFOVGeometrySequence", "InPlanePhaseEncodingDirection") or "")
    three_d = str(header.get("MRAcquisitionType", "")).upper() == "3D"
    try:
        train = int(header.get("EchoTrainLength") or 0)
    except (TypeError, ValueError):
        train = 0
    if axis.upper() in ("ROW", "COL") and not (three_d and train <= 1):  # dcm2niix: 3-D with no echo train: none
        letter = "i" if axis.upper() == "ROW" else "j"
        positive = volume.csa_values(volume.siemens_csa(header), "PhaseEncodingDirectionPositive")
        try:
            polarity = int(positive[0]) if positive else -1
        except (TypeError, ValueError):
            polarity = -1
        if polarity in (0, 1):  # kaapcli keeps DICOM's row order: j runs down the rows (dcm2niix flips, so j-)
            doc["PhaseEncodingDirection"] = letter + ("" if polarity == 1 else "-")
        else:
            doc["PhaseEncodingAxis"] = letter
    return doc


def sidecar(volume: Any) -> dict[str, Any]:
    """The JSON sidecar of a converted volume: acquisition tags plus the grid actually written."""
    from kaapcli.core import dicomscan

    try:
        return _sidecar(volume, volume.header)
    except dicomscan.Unsupported:  # a value the fast header reader leaves to pydicom (e.g. another character set)
        return _sidecar(volume, dicom.read(volume.frames[0].path, stop_before_pixels=True))


def _sidecar(volume: Any, header: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for keyword in SIDECAR_TAGS:
        value = header.get(keyword)
        if value not in (None, ""):
            doc[keyword] = json_value(value)
    doc.update(bids_fields(volume, header))
    doc.update({
        "ImageOrientationPatientDICOM": [float(v) for v in volume.frames[0].orientation],
        "Stack": volume.suffix.lstrip("_"),
        "Slices": volume.size[2],
        **({"Volumes": volume.volumes} if volume.volumes > 1 else {}),
        **({"MosaicTiles": len(volume.slices)} if volume.frames[0].mosaic else {}),
        "VoxelSpacing": [round(float(v), 6) for v in volume.spacing[:3]],
        "DataType": str(volume.voxels.dtype),
        "RescaleApplied": True,
        "Resampled": volume.resampled,
        "SOPInstanceUIDs": [] if volume.resampled else list(dict.fromkeys(f.sop_uid for f in volume.frames)),
        "ConversionSoftware": "kaapcli",
        "ConversionSoftwareVersion": __version__,
    })
    return doc


def diffusion_tables(vol: Any) -> tuple[str, str] | None:
    """``.bval`` and ``.bvec`` texts of a 4-D volume whose headers give diffusion weighting, else None.

    FSL convention (as dcm2niix): one column per volume; bvec in the image's voxel axes, the first
    component negated when the voxel-to-world matrix has a positive determinant (always, for the
    row x column normal kaapcli sorts along).  A volume without a gradient is written 0 0 0.
    """
    if vol.volumes < 2:
        return None
    firsts = [vol.frames[v * len(vol.slices)] for v in range(vol.volumes)]
    if all(f.bvalue is None and f.gradient is None for f in firsts):
        return None
    affine = vol.affine
    axes = np.asarray(vol.geometry.direction, dtype=float)  # LPS columns: i, j, k
    flip = np.linalg.det(affine[:3, :3]) > 0
    bvals, bvecs = [], []
    for f in firsts:
        bvals.append(f.bvalue if f.bvalue is not None else 0.0)
        g = np.asarray(f.gradient if f.gradient is not None else (0.0, 0.0, 0.0), dtype=float)
        v = axes.T @ g
        if flip:
            v[0] = -v[0]
        bvecs.append(np.where(np.abs(v) < 1e-9, 0.0, v))
    table = np.array(bvecs).T
    bval = " ".join(f"{b:g}" for b in bvals) + "\n"
    bvec = "".join(" ".join(f"{x:.6g}" for x in row) + "\n" for row in table)
    return bval, bvec


@dataclass
class ConvertOperator(BaseOperator):
    """One volume (plus ``.json`` sidecar) per stack of each series."""

    fmt: str = "nii.gz"
    name_template: str = DEFAULT_NAME
    resample: bool = False
    level: int = 1  # gzip level of .nii.gz (see volume.write_image)
    split: bool = False  # one 3-D file per volume of a 4-D series (named by acquisition, as stacks are)

    name = "convert"
    grouped = True
    supports_dry_run = True

    def options(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "name": self.name_template, "resample": self.resample, "level": self.level,
                "split": self.split}

    def scan(self, path: Path) -> tuple[str | None, Any]:
        """The series of a file and, for files the fast header reader handles, their frames and pixel location:
        ``process`` then reads only their pixel bytes (each file read once)."""
        from kaapcli.core import volume

        try:
            scanned = volume.scan_file(path)
        except DataError:
            scanned = None  # read again when the series is processed, so the series fails naming this file
        if scanned is None:
            return self.group_key(path), None
        if str(scanned.frames[0].sop_class) in SEG_CLASSES:
            raise SkipItem(_not_an_image(volume.header_of(path)))
        return scanned.series_uid, scanned

    def group_key(self, path: Path) -> str | None:
        with warnings.catch_warnings():  # pydicom's reading warnings are reported once, when the item is read
            warnings.simplefilter("ignore")
            ds = dicom.read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Rows", "SOPClassUID"])
        if "Rows" not in ds or str(ds.get("SOPClassUID", "")) in SEG_CLASSES:
            raise SkipItem(_not_an_image(ds))
        return str(dicom.require(ds, "SeriesInstanceUID"))

    def destination(self, out: Path, header: Any, suffix: str) -> Path:
        from kaapcli.core import dicomscan

        if isinstance(header, dicomscan.Header) and not dicomscan.renders(header, dicom.template_fields(
                self.name_template)):
            header = dicom.read(header.path, stop_before_pixels=True)  # fields the fast reader does not render
        rel = fsio.render_template(self.name_template, dicom.template_values(header, self.name_template))
        return out / rel.parent / f"{rel.name}{suffix}.{self.fmt}"

    def process(self, item: Item, ctx: Context) -> Outcome:
        from kaapcli.core import volume

        assert ctx.out is not None
        if ctx.dry_run:  # headers and geometry only: what would be written, or why it would be refused
            planned = []
            for stack in volume.split_stacks(item.paths, four_d=not self.split):
                geometry = volume.stack_geometry(stack)
                if geometry.problem and not self.resample:
                    raise DataError(f"series {stack.label}: {geometry.problem}",
                                    hint="use --resample to resample onto a regular grid")
                header = dicom.read(stack.frames[0].path, stop_before_pixels=True)
                planned.append(str(self.destination(ctx.out, header, stack.suffix)))
            return Outcome(message="would write " + ", ".join(planned))
        mapped: dict[str, volume.MappedNifti] = {}  # per stack suffix: its .nii, the array its voxels are read into

        def allocate(stack: Any, header: Any, shape: tuple[int, ...], dtype: Any) -> Any:
            assert ctx.out is not None
            mapped[stack.suffix] = volume.MappedNifti(self.destination(ctx.out, header, stack.suffix))
            return mapped[stack.suffix].allocate(shape, dtype)

        try:
            return self._write(item, ctx.out, allocate if self.fmt == "nii" else None, mapped)
        finally:
            for mapping in mapped.values():
                mapping.discard()  # those not committed (a failure, or voxels that became another array)

    def _write(self, item: Item, out: Path, allocate: Any, mapped: dict[str, Any]) -> Outcome:
        from kaapcli.core import volume

        try:
            volumes = volume.load_series(item.paths, resample=self.resample, four_d=not self.split,
                                         scanned=item.notes or None, allocate=allocate)
        except DataError as exc:  # the engine names a one-file item already
            if len(item.paths) == 1:
                exc.message = exc.message.removeprefix(f"{item.paths[0]}: ")
            raise
        outputs: list[Path] = []
        warnings: list[str] = []
        for vol in volumes:
            dest = self.destination(out, vol.header, vol.suffix)
            volume.write_volume(vol, dest, level=self.level, mapped=mapped.get(vol.suffix))
            stem = dest.name[: -len(self.fmt) - 1]
            meta = dest.with_name(stem + ".json")
            fsio.write_json(meta, sidecar(vol))
            outputs += [dest, meta]
            tables = diffusion_tables(vol)
            if tables is not None:
                for ext, text in zip((".bval", ".bvec"), tables, strict=True):
                    fsio.write_bytes(dest.with_name(stem + ext), text.encode())
                    outputs.append(dest.with_name(stem + ext))
            warnings += [f"stack {vol.suffix.lstrip('_')}: {w}" if vol.suffix else w for w in vol.warnings]
        if len(volumes) > 1:
            warnings.append(f"series {item.key} holds {len(volumes)} stacks: written as "
                            + ", ".join(v.suffix.lstrip("_") for v in volumes))
        return Outcome(outputs=outputs, warnings=warnings)
