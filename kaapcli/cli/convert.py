"""``kaapcli convert``: DICOM image series → NIfTI / NRRD volumes with a JSON sidecar."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, import_numpy, run_batch


class VolumeFormat(str, Enum):
    nii_gz = "nii.gz"
    nii = "nii"
    nrrd = "nrrd"


@batch_command
def convert(
    inputs: Inputs,
    out: OutDir,
    to: Annotated[VolumeFormat, typer.Option(
        "--to", "-t", help="Volume file format (--format is the shared stdout option).")] = VolumeFormat.nii_gz,
    name: Annotated[str, typer.Option(
        "--layout", help="Output name template of {DICOM keywords}, may hold '/' for subdirectories.")]
        = "{SeriesInstanceUID}",
    resample: Annotated[bool, typer.Option(
        "--resample", help="Resample irregular spacing, missing slices or gantry tilt onto a regular grid "
                           "instead of refusing the series.")] = False,
    level: Annotated[int, typer.Option(
        "--level", min=1, max=9, help="gzip level of .nii.gz (1: fast; 9: ~1-2% smaller on CT).")] = 1,
    split: Annotated[bool, typer.Option(
        "--split", help="One 3-D file per volume of a 4-D series (fMRI, diffusion) instead of one 4-D file.")]
        = False,
    *,
    run: RunOptions,
) -> None:
    """Convert each DICOM image series to one volume per stack, plus a JSON sidecar of acquisition tags.

    Files: OUT/<name>.<to> and OUT/<name>.json.  A series holding several stacks (orientations,
    echoes, image types) gives one volume per stack, named <name>_<stack>.  Volumes repeating one
    grid (fMRI, diffusion) are one 4-D file, plus <name>.bval/.bvec (FSL) for diffusion.  Siemens
    mosaics are unpacked into slices.  SEG, RTSTRUCT, SR, PDF and other non-image objects are
    skipped with the reason.  Values are rescaled (int16 when integral, float32 otherwise).  Voxel
    order is ITK's (columns, rows, slices along the normal); world geometry equals dcm2niix's.
    """
    import_numpy()
    from kaapcli.core.convert import ConvertOperator

    run_batch(ConvertOperator(fmt=to.value, name_template=name, resample=resample, level=level, split=split),
              inputs, out, run)


def register(app: typer.Typer) -> None:
    app.command()(convert)
