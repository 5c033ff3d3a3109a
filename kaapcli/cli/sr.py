"""``kaapcli json2sr``: measurement JSON to a TID 1500 Measurement Report referencing SEG and series."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, execute


@batch_command
def json2sr(
    measurements: Annotated[Path, typer.Argument(
        help="JSON file or directory of JSON files: `kaapcli radiomics` output {mask: {label: {feature: value}}}, "
        "or a dcmqi/Kaapana TID 1500 document with \"Measurements\".", show_default=False)],
    seg: Annotated[Path, typer.Option(
        "--seg", help="DICOM SEG file or directory; labels are matched to SegmentLabel.", show_default=False)],
    reference: Annotated[Path, typer.Option(
        "--reference", help="Directory of the source series the SEG was made on.", show_default=False)],
    out: OutDir,
    title: Annotated[str, typer.Option(help="SeriesDescription of the SR.")] = "Imaging Measurement Report",
    *,
    run: RunOptions,
) -> None:
    """Write one Comprehensive 3D SR (TID 1500): OUT/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.

    One measurement group per (mask, label), referencing its SEG segment and the source series.
    Standard codes (SCT/DCM/UCUM) where they exist, private 99KAAPCLI codes otherwise.
    """
    from kaapcli.core.sr import MeasurementsToSR

    op = MeasurementsToSR(measurements, seg, reference, title)
    summary = execute(op, [], out, run, "json2sr", items=op.items())
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(json2sr)
