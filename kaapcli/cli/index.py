"""``kaapcli index | unindex | search | tag | dataset | stats | gallery | dashboard``: the series metadata index.

One Lucene-style query language on two backends: an embedded SQLite file (default) and OpenSearch.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperCommand

from kaapcli.cli._indexopts import IndexOpt, ProjectOpt
from kaapcli.cli.common import Format, Inputs, OutDir, Reporter, Sink

if TYPE_CHECKING:
    from kaapcli.core.index.base import Index
    from kaapcli.core.index.query import Node

SeriesOpt = Annotated[list[str] | None, typer.Option(
    "--series", show_default=False, help="A SeriesInstanceUID (repeatable; - reads UIDs from stdin).")]
StudyOpt = Annotated[list[str] | None, typer.Option(
    "--study", show_default=False, help="A StudyInstanceUID: all its series (repeatable).")]
QueryOpt = Annotated[str | None, typer.Option("--query", show_default=False, help="A query (see kaapcli search).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr (errors still shown).")]

QUERY_HELP = """\
Query language (the same on SQLite and OpenSearch): Modality:CT, "00080060 Modality_keyword":CT,
wildcards LUNG1-* and ?, -word / NOT, AND, OR (terms side by side are ANDed), ( ), "quoted phrase",
ranges StudyDate:[2020-01-01 TO 2020-12-31], Rows:>=512, { } exclusive, Field:* (field present),
Tags:x, Dataset:NAME (members of a dataset; Dataset:train-* patterns), bare words as full text,
* for everything."""


class SeriesFormat(str, Enum):
    jsonl = "jsonl"
    paths = "paths"
    dirs = "dirs"
    uids = "uids"
    csv = "csv"


class StatsFormat(str, Enum):
    chart = "chart"
    jsonl = "jsonl"
    csv = "csv"


SeriesFormatOpt = Annotated[SeriesFormat, typer.Option(
    "--format", help="stdout: documents (jsonl), every file of every series (paths, as recorded when indexed "
                     "from DICOM; gone or changed files are reported, not printed), their directories (dirs), "
                     "SeriesInstanceUIDs (uids), or a table (csv, of --fields).")]
FieldsOpt = Annotated[list[str] | None, typer.Option(
    "--fields", "-f", show_default=False,
    help="Only these fields (keywords or full keys; comma-separated or repeated); csv: its columns.")]


class QueryCommand(TyperCommand):
    """A command whose QUERY may start with ``-`` (``kaapcli search -CHEST``): every argument that starts with
    ``-`` but is none of the command's options is a query word, not an option (click would refuse it)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value: dict[str, bool] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for name in (*param.opts, *param.secondary_opts):
                    takes_value[name] = not (param.is_flag or param.count)
        options: list[str] = []
        words: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            name = arg.split("=", 1)[0]
            if arg == "--":
                words.extend(args[i + 1:])
                break
            if name in takes_value and arg.startswith("-"):
                options.append(arg)
                if takes_value[name] and "=" not in arg and i + 1 < len(args):
                    options.append(args[i + 1])  # its value, even when it starts with - (--sort -Rows)
                    i += 1
            else:
                words.append(arg)
            i += 1
        return super().parse_args(ctx, [*options, "--", *words] if words else options)


def _open(ctx: typer.Context, index: str | None, project: str | None, *, create: bool = False) -> Index:
    from kaapcli.core.index.base import open_index

    return open_index(index, project, config=ctx.find_root().obj, create=create)


def _uids(values: list[str] | None) -> list[str]:
    """UIDs given as values, or with ``-`` on stdin: UIDs or the JSON records of search / dataset show / query."""
    from kaapcli.core.index.export import series_uids

    out: list[str] = []
    for value in values or []:
        out.extend(series_uids(sys.stdin) if value == "-" else series_uids([value], "--series"))
    return list(dict.fromkeys(out))


def _selection(series: list[str] | None, study: list[str] | None, query: str | None) -> Node:
    """--series / --study / --query as one query node (several are ORed together)."""
    from kaapcli.core.index.query import STUDY_KEY, Field, Ids, Or, Term, parse
    from kaapcli.exitcodes import UsageError

    nodes: list[Any] = []
    if series:
        nodes.append(Ids(tuple(_uids(series))))
    for uid in _uids(study):
        nodes.append(Term(Field("StudyInstanceUID", (STUDY_KEY,)), uid))
    if query is not None:
        nodes.append(parse(query))
    if not nodes:
        raise UsageError("select series with --series UID, --study UID or --query Q")
    return nodes[0] if len(nodes) == 1 else Or(tuple(nodes))


def _report_missing(reporter: Reporter, missing: list[str]) -> int:
    for uid in missing:
        reporter.error(f"series {uid}: not in the index")
    return 1 if missing else 0


# --------------------------------------------------------------------------- index / unindex

def index_cmd(
    ctx: typer.Context,
    inputs: Inputs,
    index: IndexOpt = None,
    project: ProjectOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite stored documents instead of merging.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1, envvar="KAAPCLI_WORKERS",
                                                help="Processes reading DICOM headers (default: cores).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Read and check inputs; write nothing.")] = False,
    source: Annotated[str | None, typer.Option(
        "--source", metavar="PACS", show_default=False,
        help="The [pacs.NAME] profile these series came from (recorded, so retrieve can pull them again).")] = None,
    format: Annotated[Format, typer.Option("--format", help="stdout: indexed SeriesInstanceUIDs, or one JSON "
                                                            "record per input.")] = Format.paths,
    quiet: QuietOpt = False,
) -> None:
    """Add series documents to the index: dcm2json output (.json, .jsonl) or DICOM files (read directly).

    By default a document is merged into the stored one with the same SeriesInstanceUID: keys of the new
    document replace stored values (lists included, objects merged key by key), keys it lacks are kept.
    --replace stores the new document as it is.  Re-running is idempotent.  For DICOM files the index also
    remembers where the files of each series are (search --format paths prints them) and the AE title
    their file meta names as sender.
    """
    from kaapcli.core import fsio
    from kaapcli.core.batch import default_workers
    from kaapcli.core.index.base import BULK_SIZE, SeriesFiles, Stored, WriteStats
    from kaapcli.core.index.ingest import read_sources
    from kaapcli.core.index.query import SOURCE_KEY
    from kaapcli.exitcodes import UsageError

    if source is not None and not (ctx.find_root().obj and ctx.find_root().obj.profile("pacs", source)):
        raise UsageError(f"--source {source}: no [pacs.{source}] profile in the configuration",
                         hint="--source names a configured PACS, so a retrieve never connects to a host from data")
    start = time.perf_counter()
    # what the imports made lives as long as the run: collections (one per few hundred documents) need not scan it
    # again and again, nor touch its pages in the forked readers
    gc.freeze()
    fsio.check_named(inputs)
    files = fsio.iter_files(inputs)  # streamed: neither the paths nor the documents pile up in memory
    stats = WriteStats()
    failed = skipped = ndocs = 0
    ix = None if dry_run else _open(ctx, index, project, create=True)
    if isinstance(getattr(ix, "path", None), Path):  # the index file (and its journals) may lie among the inputs
        files = _without_index_files(files, ix.path)  # type: ignore[union-attr]
    pending: list[Stored] = []
    pending_files: list[SeriesFiles] = []
    pending_uids: list[str] = []  # printed once written, a batch at a time

    def flush() -> None:
        if ix is not None and pending:
            nonlocal stats
            stats += ix.write(pending, replace=replace)
            ix.store_files(pending_files)
        sink.write_lines(pending_uids)
        pending.clear()
        pending_files.clear()
        pending_uids.clear()

    with Reporter("index", quiet) as reporter:
        sink = Sink(format, reporter)
        try:
            extra = {SOURCE_KEY: source} if source else None
            for item in read_sources(files, workers or default_workers(), extra):
                reporter.advance()
                if item.skipped:
                    skipped += 1
                    continue
                for error in item.errors:
                    reporter.error(error)
                for warning in item.warnings:
                    reporter.warning(warning)
                failed += len(item.errors)
                uids = [d.uid for d in item.docs]
                ndocs += len(uids)
                if format is Format.jsonl:
                    status = "failed" if item.errors and not uids else "ok"
                    sink.record({"input": item.label, "outputs": uids, "status": status,
                                 "message": "; ".join(item.errors)})
                else:
                    pending_uids.extend(uids)
                pending.extend(item.docs)
                pending_files.extend(item.files)
                if len(pending) >= BULK_SIZE:
                    flush()
            flush()
        finally:
            if ix is not None:
                ix.close()
        failed += len(stats.errors)
        for error in stats.errors:
            reporter.error(error)
        seconds = time.perf_counter() - start
        what = "would index" if dry_run else \
            f"{stats.added} added, {stats.updated} updated, {stats.unchanged} unchanged"
        not_inputs = f", {skipped} not JSON/DICOM" if skipped else ""
        reporter.info(f"{ndocs} documents ({what}){not_inputs}, {seconds:.1f} s, {failed} failed")
    if failed:
        raise typer.Exit(65 if ndocs == 0 else 1)


def _without_index_files(files: Iterator[Path], db: Path) -> Iterator[Path]:
    """The input files less the SQLite index being written (made before the walk reaches its directory)."""
    import os

    real = os.path.realpath(db)
    names = {real + suffix for suffix in ("", "-wal", "-shm", "-journal")}
    for path in files:
        if path.name.startswith(db.name) and os.path.realpath(path) in names:
            continue
        yield path


def unindex(
    ctx: typer.Context,
    series: SeriesOpt = None,
    study: StudyOpt = None,
    query: QueryOpt = None,
    index: IndexOpt = None,
    project: ProjectOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Remove series documents from the index (they stay in datasets until removed there)."""
    node = _selection(series, study, query)
    with _open(ctx, index, project) as ix:
        removed = ix.delete(node)
    with Reporter("unindex", quiet) as reporter:
        reporter.info(f"{removed} series removed")


# --------------------------------------------------------------------------- search / stats

def _sort(text: str | None) -> Any:
    from kaapcli.core.index.base import Sort
    from kaapcli.core.index.query import field_keys

    if not text:
        return None
    descending = text.startswith("-")
    name = text.lstrip("-+")
    if name.lower().endswith((":desc", ":asc")):
        name, direction = name.rsplit(":", 1)
        descending = direction.lower() == "desc"
    return Sort(field_keys(name), descending)


def search(
    ctx: typer.Context,
    query: Annotated[list[str], typer.Argument(
        metavar="QUERY...", show_default=False,
        help="The query (several words are joined with spaces; a leading - excludes: -Tags:x); * for everything.")],
    count: Annotated[bool, typer.Option("--count", help="Print only the number of matching series.")] = False,
    fields: FieldsOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="At most N series.")] = None,
    sort: Annotated[str | None, typer.Option(
        "--sort", show_default=False, help="Sort by a field (-FIELD or FIELD:desc descending); "
                                           "default and tie-break: SeriesInstanceUID.")] = None,
    fmt: SeriesFormatOpt = SeriesFormat.jsonl,
    index: IndexOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Print the matching series: documents as JSON Lines, their files, directories, UIDs or CSV.

    `kaapcli search Q --format paths | kaapcli convert - -o nii` converts them; `kaapcli search Q | kaapcli
    retrieve --from-query - -o DIR` pulls them from the PACS they came from; `kaapcli search Q | kaapcli tag
    add T --series -` tags them.  Exit 1 when some series' files are gone or unknown (each is reported).
    """
    from kaapcli.core.index.query import parse

    node = parse(" ".join(query))
    order = _sort(sort)
    with _open(ctx, index, project) as ix:
        if count:
            Sink(Format.jsonl).write_line(str(ix.count(node)))
            return
        code = _export(ix, node, fmt, _field_names(fields), limit=limit, sort=order)
    raise typer.Exit(code)


def _field_names(fields: list[str] | None) -> list[str]:
    return [f.strip() for name in fields or [] for f in name.split(",") if f.strip()]


def _export(ix: Index, node: Node, fmt: SeriesFormat, fields: list[str], **options: Any) -> int:
    """Print the series of ``node``; problems on stderr; the exit code."""
    from kaapcli.core.index.export import STALE_HINT, export

    sink = Sink(Format.jsonl)
    with Reporter("search") as reporter:
        done = export(ix, node, fmt.value, sink.write_line, reporter.error, fields=fields, **options)
        if done.incomplete:
            reporter.line(f"hint: {STALE_HINT}")
    return 1 if done.incomplete else 0


search.__doc__ = f"{search.__doc__}\n\n{QUERY_HELP}"


def stats(
    ctx: typer.Context,
    field: Annotated[str, typer.Argument(
        help="A field: keyword (Modality) or full key; a date by year, month or day (StudyDate:month); "
             "Dataset: series per dataset.", show_default=False)],
    query: QueryOpt = None,
    top: Annotated[int | None, typer.Option("--top", min=1, help="Only the N most frequent values.")] = None,
    fmt: Annotated[StatsFormat | None, typer.Option(
        "--format", show_default="chart on a terminal, else jsonl",
        help="A bar chart, JSON Lines {\"value\", \"count\"}, or CSV value,count.")] = None,
    index: IndexOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Count series per value of a field (most frequent first; dates in time order).

    Series without the field are counted under the value null.
    """
    from kaapcli.core.index.export import cell, csv_row
    from kaapcli.core.index.query import MatchAll, parse, parse_facet

    facet = parse_facet(field)
    node = parse(query) if query else MatchAll()
    with _open(ctx, index, project) as ix:
        counts = ix.facet_counts(facet, node, top)
    chosen = fmt or (StatsFormat.chart if sys.stdout.isatty() else StatsFormat.jsonl)
    if chosen is StatsFormat.chart:
        _bar_chart(facet.label, counts)
        return
    sink = Sink(Format.jsonl)
    if chosen is StatsFormat.csv:
        sink.write_line("value,count")
        for value, n in counts:
            sink.write_line(csv_row([cell(value), str(n)]))
        return
    for value, n in counts:
        sink.record({"value": value, "count": n})


def _bar_chart(title: str, counts: list[tuple[Any, int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    width = max(10, min(50, console.width - 40))
    most = max((n for _, n in counts), default=1)
    table = Table(title=f"{title}: {sum(n for _, n in counts)} series", box=None, show_header=False)
    table.add_column(justify="right", overflow="fold", max_width=30)
    table.add_column(justify="right")
    table.add_column()
    for value, n in counts:
        label = "(none)" if value is None else str(value)
        table.add_row(label, str(n), "[cyan]" + "\u2588" * max(1, round(width * n / most)) + "[/]")
    console.print(table)


# --------------------------------------------------------------------------- tags

tag_app = typer.Typer(help="Add or remove tags (00000000 Tags_keyword) on series.", no_args_is_help=True)


def _retag(ctx: typer.Context, tags: list[str], remove: bool, series: list[str] | None, study: list[str] | None,
           query: str | None, from_field: list[str] | None, index: str | None, project: str | None,
           quiet: bool) -> None:
    from kaapcli.core.index.query import field_keys
    from kaapcli.exitcodes import UsageError

    if not tags and not from_field:
        raise UsageError("give at least one TAG or --from-field KEY")
    node = _selection(series, study, query)
    keys = [k for name in (from_field or []) for k in field_keys(name)]
    with _open(ctx, index, project) as ix:
        result = ix.retag(node, add=[] if remove else tags, remove=tags if remove else [], from_keys=keys) \
            if not (remove and keys) else _retag_from_field_remove(ix, node, tags, keys)
    with Reporter("tag", quiet) as reporter:
        code = _report_missing(reporter, result.missing)
        reporter.info(f"{result.updated} series changed, {result.unchanged} unchanged")
    raise typer.Exit(code)


def _retag_from_field_remove(ix: Index, node: Node, tags: list[str], keys: list[str]) -> Any:
    """``tag remove --from-field``: remove the tags named by each series' own field values."""
    from kaapcli.core.index.base import WriteStats, as_list, doc_id, lookup
    from kaapcli.core.index.query import SERIES_KEY, Ids

    total = WriteStats()
    for doc in ix.search(node, fields=[SERIES_KEY, *keys]):
        values = [str(v) for k in keys for v in as_list(lookup(doc, k))]
        total += ix.retag(Ids((doc_id(doc),)), remove=[*tags, *values])
    if isinstance(node, Ids):
        found = set(ix.uids(node))
        total.missing = [u for u in node.uids if u not in found]
    return total


FromFieldOpt = Annotated[list[str] | None, typer.Option(
    "--from-field", show_default=False, help="Use the value(s) of this field of each series as tag(s).")]
TagsArg = Annotated[list[str] | None, typer.Argument(help="Tags.", show_default=False)]


@tag_app.command("add")
def tag_add(ctx: typer.Context, tags: TagsArg = None, series: SeriesOpt = None, study: StudyOpt = None,
            query: QueryOpt = None, from_field: FromFieldOpt = None, index: IndexOpt = None,
            project: ProjectOpt = None, quiet: QuietOpt = False) -> None:
    """Add tags to the selected series (a series keeps each tag once, in the order added)."""
    _retag(ctx, tags or [], False, series, study, query, from_field, index, project, quiet)


@tag_app.command("remove")
def tag_remove(ctx: typer.Context, tags: TagsArg = None, series: SeriesOpt = None, study: StudyOpt = None,
               query: QueryOpt = None, from_field: FromFieldOpt = None, index: IndexOpt = None,
               project: ProjectOpt = None, quiet: QuietOpt = False) -> None:
    """Remove tags from the selected series."""
    _retag(ctx, tags or [], True, series, study, query, from_field, index, project, quiet)


# --------------------------------------------------------------------------- datasets

dataset_app = typer.Typer(help="Named lists of series (Kaapana's datasets).", no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="Dataset name.", show_default=False)]


@dataset_app.command("add")
def dataset_add(ctx: typer.Context, name: Annotated[str | None, typer.Argument(
                    help="Dataset name; with --from-field a template in which {} stands for the value "
                         "(default {}).", show_default=False)] = None,
                series: SeriesOpt = None, study: StudyOpt = None, query: QueryOpt = None,
                from_field: Annotated[list[str] | None, typer.Option(
                    "--from-field", show_default=False,
                    help="Name the dataset of each series from its value(s) of this field (Kaapana's "
                         "tags_to_add_from_file), e.g. --from-field BodyPartExamined.")] = None,
                index: IndexOpt = None, project: ProjectOpt = None, quiet: QuietOpt = False) -> None:
    """Add the selected series (they must be in the index) to a dataset, creating it."""
    from kaapcli.core.index.query import field_keys
    from kaapcli.exitcodes import UsageError

    node = _selection(series, study, query)
    if from_field:
        template = name or "{}"
        if "{}" not in template:
            raise UsageError(f"dataset name {template!r}: with --from-field, write {{}} where the value goes",
                             hint="e.g. kaapcli dataset add 'site-{}' --from-field InstitutionName --query '*'")
        keys = [k for f in from_field for k in field_keys(f)]
        problems: list[str] = []
        with _open(ctx, index, project) as ix:
            results = ix.datasets_from_field(node, keys, template, problems)
        with Reporter("dataset", quiet) as reporter:
            for problem in problems:
                reporter.warning(problem)
            for dataset, result in results.items():
                reporter.info(f"{dataset}: {result.added} series added, {result.unchanged} already in it")
            if not results:
                reporter.info("no dataset changed: no selected series has a value of " + ", ".join(from_field))
        raise typer.Exit(0)
    if not name:
        raise UsageError("give a dataset NAME (or --from-field FIELD)")
    with _open(ctx, index, project) as ix:
        result = ix.dataset_change(name, node)
    with Reporter("dataset", quiet) as reporter:
        code = _report_missing(reporter, result.missing)
        reporter.info(f"{name}: {result.added} series added, {result.unchanged} already in it")
    raise typer.Exit(code)


@dataset_app.command("remove")
def dataset_remove(ctx: typer.Context, name: NameArg, series: SeriesOpt = None, study: StudyOpt = None,
                   query: QueryOpt = None, index: IndexOpt = None, project: ProjectOpt = None,
                   quiet: QuietOpt = False) -> None:
    """Remove the selected series from a dataset; with no selection, delete the dataset."""
    from kaapcli.exitcodes import NoInputError

    selected = bool(series or study or query is not None)
    with _open(ctx, index, project) as ix:
        members = ix.dataset_members(name)
        if members is None:
            raise NoInputError(f"dataset {name!r} does not exist in {ix.target}")
        if not selected:
            ix.set_dataset(name, [])
            message = f"{name}: deleted ({len(members)} series)"
        else:
            result = ix.dataset_change(name, _selection(series, study, query), remove=True)
            message = f"{name}: {result.updated} series removed"
    with Reporter("dataset", quiet) as reporter:
        reporter.info(message)


@dataset_app.command("list")
def dataset_list(ctx: typer.Context, index: IndexOpt = None, project: ProjectOpt = None) -> None:
    """Print the datasets as JSON Lines {"name", "count"}."""
    sink = Sink(Format.jsonl)
    with _open(ctx, index, project) as ix:
        for name, n in ix.datasets().items():
            sink.record({"name": name, "count": n})


@dataset_app.command("show")
def dataset_show(ctx: typer.Context, name: NameArg, fmt: SeriesFormatOpt = SeriesFormat.jsonl,
                 fields: FieldsOpt = None, index: IndexOpt = None, project: ProjectOpt = None) -> None:
    """Print the series of a dataset, as search does (uids: every member, also those no longer indexed).

    Exit 1 when members are no longer in the index or their files are gone (each is reported).
    """
    from kaapcli.core.index.query import InDataset
    from kaapcli.exitcodes import NoInputError

    with _open(ctx, index, project) as ix:
        members = ix.dataset_members(name)
        if members is None:
            raise NoInputError(f"dataset {name!r} does not exist in {ix.target}")
        if fmt is SeriesFormat.uids:
            sink = Sink(Format.paths)
            for uid in members:
                sink.write_line(uid)
            return
        from kaapcli.core.index.export import STALE_HINT, export

        with Reporter("dataset") as reporter:
            done = export(ix, InDataset(name), fmt.value, Sink(Format.jsonl).write_line, reporter.error,
                          fields=_field_names(fields))
            gone = sorted(set(members) - set(done.uids or []))
            for uid in gone:
                reporter.error(f"series {uid}: in dataset {name!r} but no longer in the index")
            if done.incomplete:
                reporter.line(f"hint: {STALE_HINT}")
    raise typer.Exit(1 if gone or done.incomplete else 0)


# --------------------------------------------------------------------------- gallery

def gallery(
    ctx: typer.Context,
    out: OutDir,
    query: QueryOpt = None,
    thumbnails: Annotated[Path | None, typer.Option(
        "--thumbnails", show_default=False, file_okay=False,
        help="Directory of <SeriesInstanceUID>.png (kaapcli thumbnail output), copied beside the page.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N series.")] = None,
    sort: Annotated[str | None, typer.Option("--sort", show_default=False,
                                             help="Card order (as search --sort).")] = None,
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "kaapcli gallery",
    index: IndexOpt = None,
    project: ProjectOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a static HTML gallery (OUT/index.html): series by patient and study, with thumbnails, metadata,
    tags, datasets and SEG/RTSTRUCT segment legends.

    No server and no network: open the file in a browser.  The box filters with the query language
    (Modality:CT -Tags:excluded, wildcards, ranges, words) over the fields the page shows;
    index.html#q=QUERY pre-fills it.
    """
    from kaapcli.core import gallery as core_gallery
    from kaapcli.core.index.query import MatchAll, parse
    from kaapcli.exitcodes import NoInputError

    if thumbnails is not None and not thumbnails.is_dir():
        raise NoInputError(f"{thumbnails}: no such directory")
    node = parse(query) if query else MatchAll()
    with _open(ctx, index, project) as ix:
        docs = list(ix.search(node, limit=limit, sort=_sort(sort)))
        membership: dict[str, list[str]] = {}
        for dataset in ix.datasets():
            for uid in ix.dataset_members(dataset) or []:
                membership.setdefault(uid, []).append(dataset)
    if sort is None:  # series in their scanner order within a study
        docs.sort(key=lambda d: (_number(d.get("00200011 SeriesNumber_integer")), str(d.get(_SERIES))))
    page, cards, copied = core_gallery.build(docs, out, thumbnails=thumbnails, title=title, datasets=membership)
    Sink(Format.paths).write_line(str(page))
    with Reporter("gallery", quiet) as reporter:
        reporter.info(f"{cards} series, {copied} thumbnails")


_SERIES = "0020000E SeriesInstanceUID_keyword"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("inf")


def dashboard(
    ctx: typer.Context,
    out: OutDir,
    query: QueryOpt = None,
    field: Annotated[list[str] | None, typer.Option(
        "--fields", "-f", show_default=False,
        help="Chart these fields (repeatable or comma-separated; DATE:year|month|day, Dataset). Default: "
             "Modality, BodyPartExamined, Manufacturer, StudyDate:month, PatientSex, Tags, Dataset.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Bars per chart (the rest are summed up).")] = 15,
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "kaapcli dashboard",
    index: IndexOpt = None,
    project: ProjectOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a static HTML metadata dashboard (OUT/index.html): bar charts of the series matching a query.

    The numbers are those of kaapcli stats; the page has no script and loads nothing.
    """
    from kaapcli.core import dashboard as core_dashboard
    from kaapcli.core.index.query import MatchAll, parse, parse_facet

    facets = [parse_facet(f) for f in _field_names(field) or core_dashboard.DEFAULT_FACETS]
    node = parse(query) if query else MatchAll()
    with _open(ctx, index, project) as ix:
        page, total, charts = core_dashboard.build(ix, node, out, facets, query=query or "*", top=top, title=title)
    Sink(Format.paths).write_line(str(page))
    with Reporter("dashboard", quiet) as reporter:
        reporter.info(f"{total} series, {charts} charts")


def register(app: typer.Typer) -> None:
    app.command("index")(index_cmd)
    app.command()(unindex)
    app.command(cls=QueryCommand)(search)
    app.command()(stats)
    app.command()(gallery)
    app.command()(dashboard)
    app.add_typer(tag_app, name="tag")
    app.add_typer(dataset_app, name="dataset")
