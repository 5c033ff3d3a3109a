"""``kaapcli mock``: synthetic, valid DICOM studies."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, execute


class Modality(str, Enum):
    CT = "CT"
    MR = "MR"
    PT = "PT"


@batch_command
def mock(
    out: OutDir,
    studies: Annotated[int, typer.Option(min=1, help="Studies (one patient each).")] = 1,
    series: Annotated[int, typer.Option(min=1, help="Series per study.")] = 1,
    slices: Annotated[int, typer.Option(min=1, help="Slices per series.")] = 20,
    modality: Annotated[Modality, typer.Option(help="Modality of the series.")] = Modality.CT,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same UIDs and bytes.")] = 0,
    rows: Annotated[int, typer.Option(min=8, help="Rows per slice.")] = 512,
    columns: Annotated[int, typer.Option(min=8, help="Columns per slice.")] = 512,
    *,
    run: RunOptions,
) -> None:
    """Write synthetic studies: a body phantom with organs, consistent geometry, UIDs from the seed.

    Files go to OUT/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.
    """
    from kaapcli.core.mock import MockOperator, MockSpec

    op = MockOperator(MockSpec(studies=studies, series=series, slices=slices, modality=modality.value,
                               seed=seed, rows=rows, columns=columns))
    summary = execute(op, [], out, run, "mock", items=op.items())
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(mock)
