"""``kaapcli dcm2json``: Kaapana's series metadata JSON, one document per series (or per instance)."""

from __future__ import annotations

from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, run_batch


@batch_command
def dcm2json(
    inputs: Inputs,
    out: OutDir,
    per_instance: Annotated[bool, typer.Option(
        "--per-instance", help="One <SOPInstanceUID>.json per file instead of one <SeriesInstanceUID>.json "
        "per series.")] = False,
    legacy_names: Annotated[bool, typer.Option(
        "--legacy-names", help="Use Kaapana's legacy spellings where they differ from today's keywords "
        "(e.g. ImagePosition(Patient), FrameofReferenceUID).")] = False,
    tags: Annotated[str, typer.Option(
        "--tags", metavar="TAG,...", help="User tags written to '00000000 Tags_keyword'.")] = "",
    *,
    run: RunOptions,
) -> None:
    """Write Kaapana's metadata document ("meta" JSON) of each series: headers as "<GGGGEEEE> <Keyword>_<type>" keys.

    Derived fields (Timestamp, DerivedPatientAge, CuratedModality, annotation labels) go under group 00000000.
    A series' document comes from its first instance (lowest InstanceNumber), read headers-only.
    Malformed values are kept as text and reported as warnings.
    """
    from kaapcli.core import dicom
    from kaapcli.core.meta import Dcm2JsonOperator

    dicom.import_pydicom(pixels=False)  # headers only: no pixel value is decoded, so neither numpy nor requests
    op = Dcm2JsonOperator(per_instance=per_instance, legacy=legacy_names,
                          tags=tuple(t.strip() for t in tags.split(",") if t.strip()))
    run_batch(op, inputs, out, run)


def register(app: typer.Typer) -> None:
    app.command()(dcm2json)
