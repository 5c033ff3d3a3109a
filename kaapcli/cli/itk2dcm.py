"""``kaapcli itk2dcm``: NIfTI datasets (basic or nnU-Net v2 layout) → DICOM image series and SEG."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, execute
from kaapcli.exitcodes import ExitCode


class ImageModality(str, Enum):
    CT = "CT"
    MR = "MR"


@batch_command
def itk2dcm(
    root: Annotated[Path, typer.Argument(
        help="Dataset folder: nnU-Net v2 (dataset.json, imagesTr/, imagesTs/, labelsTr/) or basic (*.nii.gz, "
             "meta_data.json, seg_info.json; masks as CaseXX_segmentation.nii.gz or cases/ + segs/).",
        show_default=False)],
    out: OutDir,
    seed: Annotated[int, typer.Option(help="Seed of the UIDs: same folder and seed, same UIDs.")] = 0,
    modality: Annotated[ImageModality, typer.Option(
        help="Modality of basic-layout images when meta_data.json does not set 0008|0060.")] = ImageModality.CT,
    *,
    run: RunOptions,
) -> None:
    """Turn each case into one DICOM study: one CT/MR series per image (channel), its mask as a DICOM SEG.

    Files: OUT/<case>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm and OUT/<case>/<SEG SeriesInstanceUID>.dcm.
    nnU-Net channels named CT become CT series, all others MR.  Integral voxel values are stored
    as they are; others are scaled onto 16 bits with RescaleSlope/Intercept.
    """
    from kaapcli.core.itk2dcm import Itk2DcmOperator, scan

    if not root.exists():
        from kaapcli.cli.common import fail

        fail(f"{root}: no such file or directory", code=ExitCode.NOINPUT)
    op = Itk2DcmOperator(scan(root, modality.value), seed=seed)
    summary = execute(op, [], out, run, "itk2dcm", items=op.items())
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(itk2dcm)
