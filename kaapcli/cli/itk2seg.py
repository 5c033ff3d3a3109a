"""``kaapcli itk2seg``: NIfTI / NRRD masks → one binary DICOM SEG referencing an image series."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, execute
from kaapcli.exitcodes import ExitCode


class AlgorithmType(str, Enum):
    AUTOMATIC = "AUTOMATIC"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    MANUAL = "MANUAL"


@batch_command
def itk2seg(
    masks: Annotated[list[str], typer.Argument(
        help="Mask files (.nii.gz .nii .nrrd .mha): one label map, or one file per label; directories are "
             "recursed.", show_default=False)],
    out: OutDir,
    reference: Annotated[Path, typer.Option(
        "--reference", "-r", help="Directory (or files) of the DICOM image series the masks segment.",
        show_default=False)],
    seg_info: Annotated[Path | None, typer.Option(
        "--seg-info", help='seg_info.json: {"algorithm": ..., "seg_info": [{"label_name", "label_int"}]}.',
        show_default=False)] = None,
    skip_empty: Annotated[bool, typer.Option(
        "--skip-empty", help="Leave empty segments out (they are kept by default; always a warning).")] = False,
    algorithm: Annotated[str | None, typer.Option(
        help="Algorithm name [default: from seg_info].", show_default=False)] = None,
    algorithm_type: Annotated[AlgorithmType | None, typer.Option(
        help="[default: AUTOMATIC when an algorithm is named, else MANUAL]", show_default=False)] = None,
    description: Annotated[str, typer.Option(
        "--series-description", help="SeriesDescription [default: the algorithm name, else Segmentation].")] = "",
    *,
    run: RunOptions,
) -> None:
    """Write one binary DICOM SEG (OUT/<SeriesInstanceUID>.dcm) of all MASKS on the reference series.

    Each label value of each file is a segment, named from seg_info (by file name, then label_int),
    else after the file.  Names map to SNOMED CT codes (liver, spleen, kidney, lung, ...), else a
    generic Tissue code.  A mask in another geometry is resampled (nearest neighbour) onto the
    reference with a warning; one of the same grid but another size is refused.
    """
    from kaapcli.core import fsio
    from kaapcli.core.batch import Item
    from kaapcli.core.seg import Itk2SegOperator, SegInfo

    info = SegInfo.load(seg_info)
    if algorithm is not None:
        info.algorithm = algorithm
    if algorithm_type is not None:
        info.algorithm_type = algorithm_type.value
    op = Itk2SegOperator(reference_paths=tuple(p for p in fsio.collect_inputs([str(reference)]) if fsio.is_dicom(p)),
                         info=info, skip_empty=skip_empty, description=description)
    files = [p for p in fsio.collect_inputs(masks) if op.accepts(p)]
    if not files:
        from kaapcli.cli.common import fail

        fail("no mask files (.nii.gz .nii .nrrd .mha) among the inputs", code=ExitCode.NOINPUT)
    summary = execute(op, files, out, run, "itk2seg", items=[Item("|".join(map(str, files)), tuple(files))])
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(itk2seg)
