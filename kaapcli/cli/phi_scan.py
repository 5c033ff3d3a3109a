"""``kaapcli phi-scan``: report every residual identifier in a de-identified tree, one JSON line each."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Format, Reporter, Sink, debug_enabled
from kaapcli.exitcodes import NoInputError


class Kind(str, Enum):
    identifier = "identifier"
    name = "name"
    uid = "uid"
    date = "date"
    pattern = "pattern"
    private_tag = "private-tag"
    burned_in = "burned-in"
    visual_features = "visual-features"
    unmarked = "unmarked"
    unreadable = "unreadable"


def phi_scan(
    tree: Annotated[Path, typer.Argument(help="The de-identified tree (or one file).", show_default=False)],
    originals: Annotated[Path | None, typer.Option(
        "--originals", help="The tree the outputs were made from: every value of their identifying attributes "
        "is looked for in the outputs.", show_default=False)] = None,
    patterns: Annotated[Path | None, typer.Option(
        "--patterns", help="More identifying patterns: one Python regular expression a line (NAME<TAB>REGEX "
        "names it), looked for in every value, name and file.", show_default=False)] = None,
    allow: Annotated[list[Kind] | None, typer.Option(
        "--allow", help="Accept this kind of finding (repeatable), e.g. private-tag after --retain-safe-private, "
        "date after --retain-dates full.", show_default=False)] = None,
    show_values: Annotated[bool, typer.Option(
        "--show-values", help="Print the identifying values found (default: masked, D**^J***).")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", "-w", min=1, envvar="KAAPCLI_WORKERS",
        help="Worker processes (default: the number of cores).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr (errors still shown).")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="KAAPCLI_DEBUG", help="Show tracebacks.")] = False,
) -> None:
    """Scan a tree for residual identifiers; exit 1 when anything is found (a CI gate after anonymize).

    Every file is read, hidden ones included: DICOM elements (file meta and sequences too), file and folder
    names, sidecar and other files as text. Findings, one JSON line each on stdout
    ({"path", "kind", "where", "what", "value"}): values of the originals' identifying attributes (with
    --originals), private elements, BurnedInAnnotation or RecognizableVisualFeatures YES, objects not marked
    PatientIdentityRemoved YES, and names, dates, record numbers, phone numbers, e-mail addresses in free text.
    """
    import time

    from kaapcli.core.batch import BatchOptions
    from kaapcli.core.phi_scan import Finding, Identifiers, ScanRules, gather_identifiers, load_patterns, scan

    start = time.perf_counter()
    if originals is not None and not originals.exists():
        raise NoInputError(f"--originals {originals}: no such file or directory")
    options = BatchOptions(workers=workers, debug=debug or debug_enabled())
    rules = ScanRules(root=tree if tree.is_dir() else tree.parent,
                      patterns=load_patterns(patterns) if patterns else (), show_values=show_values)
    accepted = {k.value for k in allow or ()}
    counts = {"findings": 0, "errors": 0}
    with Reporter("phi-scan", quiet) as reporter:
        identifiers, errors = gather_identifiers(originals, options) if originals else (Identifiers(), [])
        for error in errors:
            reporter.warning(f"original not read: {error}")
        sink = Sink(Format.jsonl, reporter)

        def on_findings(findings: list[Finding]) -> None:
            for finding in findings:
                if finding.kind not in accepted:
                    counts["findings"] += 1
                    sink.record(finding.record())

        def on_error(message: str) -> None:
            counts["errors"] += 1
            reporter.error(message)

        nfiles = scan(tree, rules, identifiers, options, on_findings, on_error)
        reporter.info(f"{nfiles} files scanned, {counts['findings']} findings, {counts['errors']} not scanned, "
                      f"{time.perf_counter() - start:.1f} s")
    raise typer.Exit(1 if counts["findings"] or counts["errors"] else 0)


def register(app: typer.Typer) -> None:
    app.command("phi-scan")(phi_scan)
