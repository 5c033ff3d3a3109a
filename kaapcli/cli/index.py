"""``kaapcli index | unindex | search | tag | dataset | stats | gallery``: the series metadata index.

One Lucene-style query language on two backends: an embedded SQLite file (default) and OpenSearch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kaapcli.cli.common import Format, Inputs, OutDir, Reporter, Sink

if TYPE_CHECKING:
    from kaapcli.core.index.base import Index
    from kaapcli.core.index.query import Node

PANEL = "Index"
IndexOpt = Annotated[str | None, typer.Option(
    "--index", envvar="KAAPCLI_INDEX", show_default=False, rich_help_panel=PANEL,
    help="A path (embedded SQLite index; default $XDG_DATA_HOME/kaapcli/index.db), an http(s):// OpenSearch "
         "URL, or the NAME of an [index.NAME] config profile.")]
ProjectOpt = Annotated[str | None, typer.Option(
    "--project", envvar="KAAPCLI_PROJECT", show_default=False, rich_help_panel=PANEL,
    help="Project (OpenSearch index project_NAME; default admin).")]
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
Tags:x, bare words as full text, * for everything."""


def _open(ctx: typer.Context, index: str | None, project: str | None, *, create: bool = False) -> Index:
    from kaapcli.core.index.base import open_index

    return open_index(index, project, config=ctx.find_root().obj, create=create)


def _uids(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        if value == "-":
            out.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            out.extend(v for v in value.replace(",", " ").split() if v)
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
    format: Annotated[Format, typer.Option("--format", help="stdout: indexed SeriesInstanceUIDs, or one JSON "
                                                            "record per input.")] = Format.paths,
    quiet: QuietOpt = False,
) -> None:
    """Add series documents to the index: dcm2json output (.json, .jsonl) or DICOM files (read directly).

    By default a document is merged into the stored one with the same SeriesInstanceUID: keys of the new
    document replace stored values (lists included, objects merged key by key), keys it lacks are kept.
    --replace stores the new document as it is.  Re-running is idempotent.
    """
    from kaapcli.core import fsio
    from kaapcli.core.batch import default_workers
    from kaapcli.core.index.base import BULK_SIZE, Stored, WriteStats
    from kaapcli.core.index.ingest import read_sources

    start = time.perf_counter()
    files = fsio.collect_inputs(inputs)
    stats = WriteStats()
    failed = skipped = ndocs = 0
    ix = None if dry_run else _open(ctx, index, project, create=True)
    pending: list[Stored] = []

    def flush() -> None:
        if ix is not None and pending:
            nonlocal stats
            stats += ix.write(pending, replace=replace)
        pending.clear()

    with Reporter("index", quiet) as reporter:
        sink = Sink(format, reporter)
        reporter.total(len(files))
        try:
            for source in read_sources(files, workers or default_workers()):
                reporter.advance()
                if source.skipped:
                    skipped += 1
                    continue
                for error in source.errors:
                    reporter.error(error)
                for warning in source.warnings:
                    reporter.warning(warning)
                failed += len(source.errors)
                uids = [d.uid for d in source.docs]
                ndocs += len(uids)
                if format is Format.jsonl:
                    status = "failed" if source.errors and not uids else "ok"
                    sink.record({"input": source.label, "outputs": uids, "status": status,
                                 "message": "; ".join(source.errors)})
                else:
                    for uid in uids:
                        sink.write_line(uid)
                pending.extend(source.docs)
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
        extra = f", {skipped} not JSON/DICOM" if skipped else ""
        reporter.info(f"{ndocs} documents ({what}){extra}, {seconds:.1f} s, {failed} failed")
    if failed:
        raise typer.Exit(65 if ndocs == 0 else 1)


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
    query: Annotated[str, typer.Argument(help="The query; * for everything.", show_default=False)],
    count: Annotated[bool, typer.Option("--count", help="Print only the number of matching series.")] = False,
    fields: Annotated[list[str] | None, typer.Option(
        "--fields", "-f", show_default=False,
        help="Only these fields (keywords or full keys; comma-separated or repeated).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="At most N documents.")] = None,
    sort: Annotated[str | None, typer.Option(
        "--sort", show_default=False, help="Sort by a field (-FIELD or FIELD:desc descending); "
                                           "default and tie-break: SeriesInstanceUID.")] = None,
    index: IndexOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Print matching series documents as JSON Lines (or their number with --count)."""
    from kaapcli.core.index.query import field_keys, parse

    node = parse(query)
    keys = [k for name in (fields or []) for f in name.split(",") if f.strip() for k in field_keys(f.strip())]
    order = _sort(sort)
    sink = Sink(Format.jsonl)
    with _open(ctx, index, project) as ix:
        if count:
            sink.write_line(str(ix.count(node)))
            return
        for doc in ix.search(node, fields=keys or None, limit=limit, sort=order):
            sink.record(doc)


search.__doc__ = f"{search.__doc__}\n\n{QUERY_HELP}"


def stats(
    ctx: typer.Context,
    field: Annotated[str, typer.Argument(help="A field: keyword (Modality) or full key.", show_default=False)],
    query: QueryOpt = None,
    top: Annotated[int | None, typer.Option("--top", min=1, help="Only the N most frequent values.")] = None,
    index: IndexOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Count series per value of a field: a bar chart on a terminal, JSON Lines {"value", "count"} when piped.

    Series without the field are counted under the value null.
    """
    from kaapcli.core.index.query import And, Exists, MatchAll, Not, parse, resolve_field

    resolved = resolve_field(field)
    node = parse(query) if query else MatchAll()
    with _open(ctx, index, project) as ix:
        counts: list[tuple[Any, int]] = list(ix.value_counts(resolved.keys, node, top))
        absent = ix.count(And((node, Not(Exists(resolved))))) if top is None or len(counts) < top else 0
    if absent:  # series without the field count as the value null, in order of frequency
        counts.append((None, absent))
        counts.sort(key=lambda vc: -vc[1])
    if sys.stdout.isatty():
        _bar_chart(resolved.name, counts)
        return
    sink = Sink(Format.jsonl)
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
def dataset_add(ctx: typer.Context, name: NameArg, series: SeriesOpt = None, study: StudyOpt = None,
                query: QueryOpt = None, index: IndexOpt = None, project: ProjectOpt = None,
                quiet: QuietOpt = False) -> None:
    """Add the selected series (they must be in the index) to a dataset, creating it."""
    node = _selection(series, study, query)
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
def dataset_show(ctx: typer.Context, name: NameArg, index: IndexOpt = None, project: ProjectOpt = None) -> None:
    """Print the SeriesInstanceUIDs of a dataset, one per line."""
    from kaapcli.exitcodes import NoInputError

    sink = Sink(Format.paths)
    with _open(ctx, index, project) as ix:
        members = ix.dataset_members(name)
        if members is None:
            raise NoInputError(f"dataset {name!r} does not exist in {ix.target}")
    for uid in members:
        sink.write_line(uid)


# --------------------------------------------------------------------------- gallery

def gallery(
    ctx: typer.Context,
    out: OutDir,
    query: QueryOpt = None,
    thumbnails: Annotated[Path | None, typer.Option(
        "--thumbnails", "-t", show_default=False, file_okay=False,
        help="Directory of <SeriesInstanceUID>.png (kaapcli thumbnail output), copied beside the page.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N series.")] = None,
    sort: Annotated[str | None, typer.Option("--sort", show_default=False,
                                             help="Card order (as search --sort).")] = None,
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "kaapcli gallery",
    index: IndexOpt = None,
    project: ProjectOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a static HTML gallery (OUT/index.html): a card per series with thumbnail, metadata and tags.

    No server and no network: open the file in a browser; the text box filters cards (index.html#q=words
    pre-fills it).
    """
    from kaapcli.core import gallery as core_gallery
    from kaapcli.core.index.query import MatchAll, parse
    from kaapcli.exitcodes import NoInputError

    if thumbnails is not None and not thumbnails.is_dir():
        raise NoInputError(f"{thumbnails}: no such directory")
    node = parse(query) if query else MatchAll()
    with _open(ctx, index, project) as ix:
        docs = list(ix.search(node, limit=limit, sort=_sort(sort)))
    page, cards, copied = core_gallery.build(docs, out, thumbnails=thumbnails, title=title)
    Sink(Format.paths).write_line(str(page))
    with Reporter("gallery", quiet) as reporter:
        reporter.info(f"{cards} series, {copied} thumbnails")


def register(app: typer.Typer) -> None:
    app.command("index")(index_cmd)
    app.command()(unindex)
    app.command()(search)
    app.command()(stats)
    app.command()(gallery)
    app.add_typer(tag_app, name="tag")
    app.add_typer(dataset_app, name="dataset")
