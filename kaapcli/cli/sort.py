"""``kaapcli sort``: organize DICOM files into a tree named from their tags."""

from __future__ import annotations

from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, batch_inputs, execute

DEFAULT_TEMPLATE = ("{PatientID}/{StudyDate}_{StudyInstanceUID}/{Modality}_{SeriesNumber}_{SeriesInstanceUID}/"
                    "{SOPInstanceUID}.dcm")  # kept equal to kaapcli.core.sort.DEFAULT_TEMPLATE (a test checks)


@batch_command
def sort(
    inputs: Inputs,
    out: OutDir,
    template: Annotated[str, typer.Option(
        "--layout", help="Output path below OUT; {Keyword} fields are filled from each file's header "
                                 "(missing → unknown) and made safe as file names.")] = DEFAULT_TEMPLATE,
    link: Annotated[bool, typer.Option(
        "--link", help="Hard-link instead of copying (copies, with a warning, across file systems).")] = False,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the bytes exactly (the default).")] = False,
    *,
    run: RunOptions,
) -> None:
    """Copy (or hard-link) DICOM files into OUT/<layout>; only headers are read.

    Two different files that map to the same name: the second fails (nothing is overwritten);
    identical content is fine, so re-runs are safe.
    """
    from kaapcli.core import dicom
    from kaapcli.core.sort import SortOperator
    from kaapcli.exitcodes import UsageError

    if link and copy:
        raise UsageError("--link and --copy exclude each other")
    dicom.import_pydicom(pixels=False)  # files are copied or linked as they are: no pixel value is decoded
    op = SortOperator(template, link=link)
    summary = execute(op, batch_inputs(inputs, out), out, run, "sort", sources=inputs)
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(sort)
