"""DICOM image series → NIfTI / NRRD volumes with a JSON sidecar (Kaapana's DcmConverter).

One item per series (key = SeriesInstanceUID).  A series holding several stacks gives one
volume per stack, the stack suffix appended to the name.  Every stack is loaded and checked
before anything is written, so a refused series leaves no partial output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaapcli import __version__
from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError

FORMATS = ("nii.gz", "nii", "nrrd")
DEFAULT_NAME = "{SeriesInstanceUID}"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Acquisition tags copied to the sidecar, under their DICOM keywords and in DICOM units.
SIDECAR_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName", "SoftwareVersions",
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDescription", "SeriesDescription",
    "ProtocolName", "SeriesNumber", "AcquisitionNumber", "StudyDate", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "BodyPartExamined", "PatientPosition", "ImageType", "SliceThickness",
    "SpacingBetweenSlices", "PixelSpacing", "KVP", "XRayTubeCurrent", "ExposureTime", "ConvolutionKernel",
    "ScanningSequence", "SequenceVariant", "SequenceName", "MRAcquisitionType", "RepetitionTime", "EchoTime",
    "EchoNumbers", "InversionTime", "FlipAngle", "MagneticFieldStrength", "ImagingFrequency", "EchoTrainLength",
    "Units", "DecayCorrection", "RescaleType",
)


def json_value(value: Any) -> Any:
    """A pydicom element value as plain JSON (numbers stay numbers, multi-values become lists)."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, float):  # DS values are float subclasses
        return float(value)
    if isinstance(value, int):  # IS values are int subclasses
        return int(value)
    return str(value)


def sidecar(volume: Any) -> dict[str, Any]:
    """The JSON sidecar of a converted volume: acquisition tags plus the grid actually written."""
    image = volume.image
    header = volume.header
    doc: dict[str, Any] = {}
    for keyword in SIDECAR_TAGS:
        value = header.get(keyword)
        if value not in (None, ""):
            doc[keyword] = json_value(value)
    doc.update({
        "ImageOrientationPatientDICOM": [float(v) for v in volume.frames[0].orientation],
        "Stack": volume.suffix.lstrip("_"),
        "Slices": image.GetSize()[2],
        "VoxelSpacing": [round(float(v), 6) for v in image.GetSpacing()],
        "DataType": str(np.dtype(_numpy_dtype(image))),
        "RescaleApplied": True,
        "Resampled": volume.resampled,
        "SOPInstanceUIDs": [] if volume.resampled else [f.sop_uid for f in volume.frames],
        "ConversionSoftware": "kaapcli",
        "ConversionSoftwareVersion": __version__,
    })
    return doc


def _numpy_dtype(image: Any) -> Any:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image).dtype


@dataclass
class ConvertOperator(BaseOperator):
    """One volume (plus ``.json`` sidecar) per stack of each series."""

    fmt: str = "nii.gz"
    name_template: str = DEFAULT_NAME
    resample: bool = False
    level: int = 1  # gzip level of .nii.gz (see volume.write_image)

    name = "convert"
    grouped = True
    supports_dry_run = True

    def options(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "name": self.name_template, "resample": self.resample, "level": self.level}

    def group_key(self, path: Path) -> str | None:
        with warnings.catch_warnings():  # pydicom's reading warnings are reported once, when the item is read
            warnings.simplefilter("ignore")
            ds = dicom.read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Rows", "SOPClassUID"])
        if "Rows" not in ds:  # SR, RTSTRUCT, RT Plan, waveforms...: not images, skipped like non-DICOM files
            return None
        if str(ds.get("SOPClassUID", "")) == SEG_STORAGE:
            raise DataError("a DICOM SEG, not an image series", hint="use kaapcli seg2itk")
        return str(dicom.require(ds, "SeriesInstanceUID"))

    def destination(self, out: Path, header: Any, suffix: str) -> Path:
        rel = fsio.render_template(self.name_template, dicom.template_values(header, self.name_template))
        return out / rel.parent / f"{rel.name}{suffix}.{self.fmt}"

    def process(self, item: Item, ctx: Context) -> Outcome:
        from kaapcli.core import volume

        assert ctx.out is not None
        if ctx.dry_run:  # headers and geometry only: what would be written, or why it would be refused
            planned = []
            for stack in volume.split_stacks(item.paths):
                geometry = volume.stack_geometry(stack)
                if geometry.problem and not self.resample:
                    raise DataError(f"series {stack.label}: {geometry.problem}",
                                    hint="use --resample to resample onto a regular grid")
                header = dicom.read(stack.frames[0].path, stop_before_pixels=True)
                planned.append(str(self.destination(ctx.out, header, stack.suffix)))
            return Outcome(message="would write " + ", ".join(planned))
        try:
            volumes = volume.load_series(item.paths, resample=self.resample)
        except DataError as exc:  # the engine names a one-file item already
            if len(item.paths) == 1:
                exc.message = exc.message.removeprefix(f"{item.paths[0]}: ")
            raise
        outputs: list[Path] = []
        warnings: list[str] = []
        for vol in volumes:
            dest = self.destination(ctx.out, vol.header, vol.suffix)
            volume.write_image(vol.image, dest, level=self.level)
            meta = dest.with_name(dest.name[: -len(self.fmt) - 1] + ".json")
            fsio.write_json(meta, sidecar(vol))
            outputs += [dest, meta]
            warnings += [f"stack {vol.suffix.lstrip('_')}: {w}" if vol.suffix else w for w in vol.warnings]
        if len(volumes) > 1:
            warnings.append(f"series {item.key} holds {len(volumes)} stacks: written as "
                            + ", ".join(v.suffix.lstrip("_") for v in volumes))
        return Outcome(outputs=outputs, warnings=warnings)
