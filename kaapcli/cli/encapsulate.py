"""``kaapcli pdf2dcm / dcm2pdf / bin2dcm / dcm2bin``: documents and files carried in DICOM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, run_batch

Files = Annotated[list[str], typer.Argument(
    help="Files, directories (recursed, sorted) or - to read paths from stdin.", show_default=False)]
StudyFrom = Annotated[Path | None, typer.Option(
    "--study-from", help="A DICOM file or directory of the study to add to: patient and study are copied "
    "from its first DICOM file (the output is a new series of that study).", show_default=False)]
Keywords = Annotated[list[str] | None, typer.Option(
    "--key", "-k", metavar="Keyword=value",
    help="Set a DICOM attribute, e.g. -k PatientID=P1 (repeatable; overrides --study-from).", show_default=False)]


def _context(study_from: Path | None, keywords: list[str] | None) -> dict[str, str]:
    from kaapcli.core.encapsulate import parse_keywords, study_context

    return study_context(study_from, parse_keywords(keywords or []))


@batch_command
def pdf2dcm(
    inputs: Files,
    out: OutDir,
    study_from: StudyFrom = None,
    title: Annotated[str | None, typer.Option(
        help="DocumentTitle (default: the PDF's file name without .pdf).", show_default=False)] = None,
    keyword: Keywords = None,
    *,
    run: RunOptions,
) -> None:
    """Wrap PDFs as Encapsulated PDF instances: OUT/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.

    Walked files that are not PDFs are skipped; a *.pdf without a %PDF- header fails.
    """
    from kaapcli.core.encapsulate import PdfToDicom

    run_batch(PdfToDicom(_context(study_from, keyword), title), inputs, out, run)


@batch_command
def dcm2pdf(inputs: Inputs, out: OutDir, *, run: RunOptions) -> None:
    """Extract the PDFs of Encapsulated PDF instances, byte for byte: OUT/<SOPInstanceUID>.pdf.

    Other DICOM instances are skipped.
    """
    from kaapcli.core.encapsulate import DicomToPdf

    run_batch(DicomToPdf(), inputs, out, run)


@batch_command
def bin2dcm(
    inputs: Files,
    out: OutDir,
    chunk_mb: Annotated[float, typer.Option(
        "--chunk-mb", min=0.001, help="Largest part per DICOM instance, in MiB.")] = 100,
    study_from: StudyFrom = None,
    keyword: Keywords = None,
    *,
    run: RunOptions,
) -> None:
    """Carry any file in DICOM (Raw Data Storage), one series per file, one instance per part.

    Name, part number and count, size and SHA-256 (file and part) are recorded for dcm2bin.
    """
    from kaapcli.core.encapsulate import BinaryToDicom

    run_batch(BinaryToDicom(int(chunk_mb * 1024 * 1024), _context(study_from, keyword)), inputs, out, run)


@batch_command
def dcm2bin(inputs: Inputs, out: OutDir, *, run: RunOptions) -> None:
    """Restore the files bin2dcm carried: OUT/<original name>, every part checked against its SHA-256.

    A missing or corrupt part fails that file, naming the part.  Other DICOM instances are skipped.
    """
    from kaapcli.core.encapsulate import DicomToBinary

    run_batch(DicomToBinary(), inputs, out, run)


def register(app: typer.Typer) -> None:
    for command in (pdf2dcm, dcm2pdf, bin2dcm, dcm2bin):
        app.command()(command)
