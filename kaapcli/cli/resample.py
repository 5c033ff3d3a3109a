"""``kaapcli resample``: images and label maps onto the grid of a reference image."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, run_batch


class Interpolator(str, Enum):
    linear = "linear"
    nearest = "nearest"
    bspline = "bspline"
    sinc = "sinc"


class Kind(str, Enum):
    auto = "auto"
    image = "image"
    labels = "labels"


@batch_command
def resample(
    inputs: Annotated[list[str], typer.Argument(
        help="NIfTI/NRRD/MetaImage files, DICOM series, directories (recursed) or - for paths on stdin.",
        show_default=False)],
    out: OutDir,
    reference: Annotated[Path, typer.Option(
        "--reference", "-r", help="Image file, or DICOM file/directory of one series, whose grid to resample onto.",
        show_default=False)],
    interpolator: Annotated[Interpolator | None, typer.Option(
        help="Interpolator for intensity images (sinc: Hamming-windowed sinc) [default: linear; label images "
             "always use nearest].",
        show_default=False)] = None,
    kind: Annotated[Kind, typer.Option(
        help="auto: integer images with <= 256 non-negative values are label maps; or force image/labels.")]
        = Kind.auto,
    *,
    run: RunOptions,
) -> None:
    """Resample images and masks onto the reference grid (size, spacing, origin, direction).

    Files keep their name and format (OUT/<name>); DICOM series become OUT/<SeriesInstanceUID>.nii.gz.
    Label maps are resampled nearest-neighbour (a warning if another interpolator was asked for),
    outside voxels are 0 for labels and the image minimum for intensity images.  Inputs are never changed.
    """
    from kaapcli.core.resample import ResampleOperator, load_reference

    load_reference(reference)  # fail fast (and once) on a bad reference
    op = ResampleOperator(reference=reference, interpolator=interpolator.value if interpolator else None,
                          kind=kind.value)
    run_batch(op, inputs, out, run)


def register(app: typer.Typer) -> None:
    app.command()(resample)
