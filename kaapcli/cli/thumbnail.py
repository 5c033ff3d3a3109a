"""``kaapcli thumbnail``: one PNG per series (middle slice, windowed, true aspect; SEG overlays)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, run_batch


@batch_command
def thumbnail(
    inputs: Inputs,
    out: OutDir,
    size: Annotated[int, typer.Option(min=8, max=4096, help="Longest side of the PNG, in pixels.")] = 300,
    reference: Annotated[Path | None, typer.Option(
        "--reference", "-r", help="Directory holding the series SEG/RTSTRUCT objects reference "
        "(default: search beside them).",
        show_default=False, exists=True, file_okay=False)] = None,
    *,
    run: RunOptions,
) -> None:
    """Write OUT/<SeriesInstanceUID>.png per series: the middle slice (or frame), windowed.

    Window: the first WindowCenter/WindowWidth, else the 1st..99th percentile; aspect from PixelSpacing.
    A SEG or RTSTRUCT is drawn over the referenced slice with the most labelled voxels:
    one colour per segment, translucent fill, opaque outline.
    """
    from kaapcli.core.thumbnail import ThumbnailOperator

    run_batch(ThumbnailOperator(size=size, reference=reference), inputs, out, run)


def register(app: typer.Typer) -> None:
    app.command()(thumbnail)
