"""``kaapcli concat-json / zip / unzip / split / clean``: batch utilities of Kaapana's operator set."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kaapcli.cli.common import Format, OutDir, Reporter, RunOptions, Sink, batch_command, run_batch
from kaapcli.exitcodes import ExitCode

if TYPE_CHECKING:
    from kaapcli.core.split import Split

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr (errors still shown).")]
AnyInputs = Annotated[list[str], typer.Argument(
    help="Files, directories (recursed, sorted) or - to read paths from stdin.", show_default=False)]


def concat_json(
    inputs: AnyInputs,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="FILE.json (one array) or FILE.jsonl (one record per line).", show_default=False)],
    quiet: Quiet = False,
) -> None:
    """Concatenate JSON and JSON Lines files into one array or JSONL file, in input order, atomically.

    A .json file is one element; each line of a .jsonl/.ndjson file is one element.  A file that
    does not parse is reported with its line and column and left out (exit 1).
    """
    from kaapcli.core import fsio
    from kaapcli.core.jsonutil import concat_json as concat

    reporter = Reporter("concat-json", quiet)
    result = concat(fsio.collect_inputs(inputs), out)
    for failure in result.failures:
        reporter.error(failure)
    if result.files == 0:
        raise typer.Exit(int(ExitCode.DATAERR))
    Sink(Format.paths).write_line(str(out))
    skipped = f" ({result.skipped} not JSON)" if result.skipped else ""
    reporter.info(f"{result.files} files{skipped}, {result.records} records, {len(result.failures)} failed")
    raise typer.Exit(int(ExitCode.ITEMS_FAILED if result.failures else ExitCode.OK))


def zip_command(
    inputs: Annotated[list[Path], typer.Argument(
        help="Directories (stored relative to themselves) or files (stored by name).", show_default=False,
        readable=False)],  # checked by plan_entries/zip_files, which name what cannot be read (exit 66)
    out: Annotated[Path, typer.Option("--out", "-o", help="The archive to write.", show_default=False)],
    include: Annotated[list[str] | None, typer.Option(
        help="Only entries matching these globs (comma-separated, repeatable), e.g. '*.dcm,*.json'.",
        show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Leave out entries matching these globs (comma-separated, repeatable).", show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Write a deterministic zip: sorted entries, fixed timestamps and modes; the same tree gives the same bytes.

    Only regular files are stored (symlinks to files as the file; FIFOs, sockets, devices and broken links are
    left out with a warning); hidden files (names starting with '.') are not stored.  The archive is written
    atomically: an input or directory that cannot be read stops it, and nothing is written.
    """
    from kaapcli.core.archive import plan_entries, split_patterns, zip_files

    plan = plan_entries(inputs, out, split_patterns(include), split_patterns(exclude))
    reporter = Reporter("zip", quiet)
    for unusable in plan.skipped:
        reporter.warning(f"{unusable.path}: {unusable.reason}: not stored")
    if not plan.entries:
        reporter.warning("no files selected: writing an empty archive")
    result = zip_files(plan.entries, out)
    Sink(Format.paths).write_line(str(out))
    reporter.info(f"{result.entries} entries, {result.nbytes / 1e6:.0f} MB")


@batch_command
def unzip(
    inputs: Annotated[list[str], typer.Argument(
        help="Zip archives, directories holding them, or - to read paths from stdin.", show_default=False)],
    out: OutDir,
    *,
    run: RunOptions,
) -> None:
    """Extract archives into OUT, checking every entry first: no absolute paths, no '..', no symlinks.

    Each file is extracted atomically after its CRC-32 checks out; a corrupt archive fails cleanly.
    """
    from kaapcli.core.archive import Unzip

    run_batch(Unzip(), inputs, out, run)


class GroupBy(str, Enum):
    patient = "patient"
    study = "study"
    series = "series"


class SplitFormat(str, Enum):
    txt = "txt"
    json = "json"


def split(
    inputs: AnyInputs,
    out: OutDir,
    train: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of groups for training.")] = 0.8,
    seed: Annotated[int, typer.Option(help="Same seed, same split.")] = 1,
    by: Annotated[GroupBy, typer.Option(
        help="Group by patient, study or series: a group never lands on both sides.")] = GroupBy.patient,
    fmt: Annotated[SplitFormat, typer.Option(
        "--to", "-t", help="txt: train.txt and test.txt, one SeriesInstanceUID per line; json: split.json "
        "with patient, study and directory per series.")] = SplitFormat.txt,
    index: Annotated[str | None, typer.Option(
        "--index", metavar="TARGET", help="Also tag the series 'train' / 'test' in this index (path, URL or "
        "profile).", show_default=False)] = None,
    project: Annotated[str | None, typer.Option(help="Index project (default admin).", show_default=False)] = None,
    quiet: Quiet = False,
    *,
    ctx: typer.Context,
) -> None:
    """Split DICOM series into train and test, deterministically, without leaking a patient across sides."""
    from kaapcli.core import fsio
    from kaapcli.core.split import scan, split_series, write_split
    from kaapcli.exitcodes import NoInputError

    reporter = Reporter("split", quiet)
    unusable: list[str] = []
    files = fsio.collect_inputs(inputs, on_unusable=lambda u: unusable.append(f"{u.path}: {u.reason}") if u.failed
                                else None)
    found = scan(files)
    found.failures[:0] = unusable
    for failure in found.failures:
        reporter.error(failure)
    for warning in found.warnings:
        reporter.warning(warning)
    if not found.series:
        raise NoInputError("no DICOM series among the inputs")
    result = split_series(found.series, train, seed, by.value)
    meta = {"seed": seed, "train_fraction": train, "by": by.value}
    sink = Sink(Format.paths)
    for path in write_split(result, out, fmt.value, meta):
        sink.write_line(str(path))
    if index is not None:
        _tag_index(ctx, index, project, result, reporter)
    reporter.info(f"train: {len(result.train)} series ({result.groups(result.train, by.value)} {by.value} groups), "
                  f"test: {len(result.test)} series ({result.groups(result.test, by.value)} {by.value} groups)")
    raise typer.Exit(int(ExitCode.ITEMS_FAILED if found.failures else ExitCode.OK))


def _tag_index(ctx: typer.Context, target: str, project: str | None, result: Split, reporter: Reporter) -> None:
    from kaapcli.core.index.base import open_index
    from kaapcli.core.index.query import Ids

    with open_index(target, project, config=ctx.find_root().obj) as idx:
        for tag, other, side in (("train", "test", result.train), ("test", "train", result.test)):
            if not side:
                continue
            stats = idx.retag(Ids(tuple(s.uid for s in side)), add=[tag], remove=[other])
            for uid in stats.missing:
                reporter.warning(f"series {uid} is not in the index {idx.target}; not tagged")


def clean(
    root: Annotated[Path, typer.Argument(help="The directory whose run folders are cleaned.", show_default=False)],
    older_than: Annotated[str, typer.Option(
        "--older-than", help="Age of the newest file, e.g. 90s, 30m, 12h, 60d, 2w.", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print what would be removed; remove nothing.")]
    = False,
    quiet: Quiet = False,
) -> None:
    """Remove run folders (direct subdirectories of ROOT) whose newest file is older than the period.

    Prints each removed (or, with --dry-run, removable) folder on stdout.  Symlinks are never
    followed; ROOT may not be / or the home directory.
    """
    from kaapcli.core.clean import (
        Unknown,
        check_root,
        expired_runs,
        leftovers,
        parse_period,
        remove_leftover,
        remove_run,
    )
    from kaapcli.exitcodes import KaapcliError

    period = parse_period(older_than)
    root = check_root(root)
    reporter = Reporter("clean", quiet)
    sink = Sink(Format.paths)
    removed = failed = 0
    for trash in [] if dry_run else leftovers(root):
        try:
            remove_leftover(trash)
            reporter.info(f"{trash}: removed the rest of an interrupted clean")
        except KaapcliError as exc:
            reporter.error(exc.message)
            failed += 1
    for run in expired_runs(root, period):
        if isinstance(run, Unknown):
            reporter.error(run.reason)
            failed += 1
            continue
        if not dry_run:
            try:
                remove_run(run.path)
            except KaapcliError as exc:
                reporter.error(exc.message)
                failed += 1
                continue
        sink.write_line(str(run.path))
        removed += 1
    verb = "would remove" if dry_run else "removed"
    reporter.info(f"{verb} {removed} run folders older than {older_than}, {failed} failed")
    raise typer.Exit(int(ExitCode.ITEMS_FAILED if failed else ExitCode.OK))


def register(app: typer.Typer) -> None:
    app.command("concat-json")(concat_json)
    app.command("zip")(zip_command)
    app.command()(unzip)
    app.command()(split)
    app.command()(clean)
