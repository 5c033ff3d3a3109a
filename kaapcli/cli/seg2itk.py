"""``kaapcli seg2itk``: DICOM SEG and RTSTRUCT → NIfTI masks in the referenced image's geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, run_batch
from kaapcli.cli.convert import VolumeFormat
from kaapcli.exitcodes import ExitCode


@batch_command
def seg2itk(
    inputs: Inputs,
    out: OutDir,
    labelmap: Annotated[bool, typer.Option(
        "--labelmap", help="One label map per input (value = segment number) instead of one mask per segment.")]
        = False,
    only: Annotated[str, typer.Option(
        "--filter", metavar="NAMES", help="Comma-separated segment names (or numbers) to keep.")] = "",
    reference: Annotated[Path | None, typer.Option(
        "--reference", "-r", help="Directory holding the referenced image series [default: the inputs, then "
                                  "each file's directory and its parent; else the SEG's own frame grid].",
        show_default=False)] = None,
    to: Annotated[VolumeFormat, typer.Option("--to", "-t", help="Mask file format.")] = VolumeFormat.nii_gz,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", min=0.0, max=1.0, help="FRACTIONAL SEGs: voxels with probability >= this are in the segment "
                                              "(uint8 0/1) [default: keep the probabilities as float32 0..1].",
        show_default=False)] = None,
    *,
    run: RunOptions,
) -> None:
    """Convert DICOM SEG and RTSTRUCT objects to NIfTI in the full geometry of the referenced series.

    Files: OUT/<stem>--<label_int>--<label_name>.<to> per segment (or OUT/<stem>.<to> with
    --labelmap) and OUT/<stem>-meta.json (seg_info, usable by itk2seg --seg-info).  With the
    referenced series (--reference, the inputs, or beside the file) every slice of it is present,
    empty ones included; without it a SEG's masks lie on the grid its own frames span (RTSTRUCT
    needs the series).  BINARY, FRACTIONAL and label-map SEGs are read.  RTSTRUCT contours are
    filled with the even-odd rule per slice (holes stay holes); contours beyond the image are
    clipped, with a warning.  Other files among the inputs (the image series themselves) are
    skipped and searched for references.
    """
    from kaapcli.cli.common import fail
    from kaapcli.core.seg import Seg2ItkOperator

    if reference is not None and not reference.exists():
        fail(f"--reference {reference}: no such file or directory", code=ExitCode.NOINPUT)
    roots = tuple(dict.fromkeys(Path(p) for p in inputs if p != "-"))
    op = Seg2ItkOperator(labelmap=labelmap, only=tuple(n.strip().lower() for n in only.split(",") if n.strip()),
                         reference=reference, roots=roots, fmt=to.value, threshold=threshold)
    run_batch(op, inputs, out, run)


def register(app: typer.Typer) -> None:
    app.command()(seg2itk)
