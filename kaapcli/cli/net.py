"""DICOM networking commands: ``echo``, ``send``, ``receive``, ``query``, ``retrieve``, ``delete``.

A PEER is ``AET@host:port`` (DIMSE), an ``http(s)://`` DICOMweb root, or the name of a ``[pacs.NAME]``
profile of the config file. The work happens in :mod:`kaapcli.core.net`; this module parses and renders.
"""

from __future__ import annotations

import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from kaapcli.cli.common import Format, Inputs, OutDir, Reporter, Sink
from kaapcli.cli.rules import (
    AetConvention,
    Convention,
    JournalFile,
    LiveDags,
    LiveIndex,
    LiveJobs,
    LiveProject,
    LiveQueue,
    LiveRules,
    LiveStage,
    StageS3,
    queue_setup,
)

PANEL = "Network options"
PeerArg = Annotated[str, typer.Argument(
    metavar="PEER", help="AET@host:port, an http(s):// DICOMweb root, or a [pacs.NAME] profile name.",
    show_default=False)]
CallingAet = Annotated[str, typer.Option(
    "--calling-aet", envvar="KAAPCLI_CALLING_AET", help="Our AE title towards the peer.", rich_help_panel=PANEL)]
Timeout = Annotated[float | None, typer.Option(
    "--timeout", min=0.1, envvar="KAAPCLI_TIMEOUT", show_default="30 ACSE, 60 DIMSE/HTTP",
    help="Seconds to wait for association (ACSE), DIMSE and HTTP answers.", rich_help_panel=PANEL)]
ConnectTimeout = Annotated[float | None, typer.Option(
    "--connect-timeout", min=0.1, show_default="10", help="Seconds to wait for the TCP connection.",
    rich_help_panel=PANEL)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr (errors still shown).")]
Layout = Annotated[str, typer.Option(
    "--layout", help="Path template of received files under OUT ({Keyword} fields of the dataset).")]
DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


class Level(str, Enum):
    patient = "patient"
    study = "study"
    series = "series"
    instance = "instance"


class Method(str, Enum):
    get = "get"
    move = "move"


class ServerType(str, Enum):
    orthanc = "orthanc"
    dcm4chee = "dcm4chee"


def _peer(ctx: typer.Context, text: str) -> Any:
    from kaapcli.core.net.peers import parse_peer

    return parse_peer(text, ctx.obj)


def _timeouts(timeout: float | None, connect: float | None) -> Any:
    from kaapcli.core.net.peers import Timeouts

    return Timeouts.of(timeout, connect)


def _aet(value: str, what: str) -> str:
    from kaapcli.core.net.peers import check_aet

    return check_aet(value, what)


def _route_logs(reporter: Reporter) -> None:
    """Errors the receiver logs from its threads become ``error:`` lines on stderr."""
    import logging

    class ToReporter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reporter.error(record.getMessage())

    logger = logging.getLogger("kaapcli.net")
    logger.handlers[:] = [ToReporter(logging.ERROR)]
    logger.propagate = False


# --------------------------------------------------------------------------- echo

def echo(
    ctx: typer.Context,
    peer: PeerArg,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
) -> None:
    """Check a peer: C-ECHO for DIMSE, a QIDO-RS probe for DICOMweb. Prints {"peer", "ok", "ms", "status"}."""
    from kaapcli.core.net import dicomweb, dimse

    target = _peer(ctx, peer)
    timeouts = _timeouts(timeout, connect_timeout)
    if target.web:
        record = dicomweb.echo(target, timeouts)
    else:
        record = dimse.echo(target, _aet(calling_aet, "--calling-aet"), timeouts)
    Sink(Format.jsonl).record(record)
    raise typer.Exit(0 if record["ok"] else 1)


# --------------------------------------------------------------------------- send

def send(
    ctx: typer.Context,
    inputs: Inputs,
    to: Annotated[str, typer.Option("--to", metavar="PEER", show_default=False,
                                    help="Where to send: AET@host:port, an http(s) DICOMweb root (STOW-RS) "
                                         "or a [pacs.NAME] profile.")],
    associations: Annotated[int, typer.Option("--associations", "-j", min=1, max=32,
                                              help="Parallel associations (or STOW-RS requests).")] = 1,
    resume: Annotated[Path | None, typer.Option(
        "--resume", metavar="LEDGER", help="JSON-lines ledger of acknowledged SOP Instance UIDs: skip those, "
        "append new ones.", show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Kaapana: send as calling AE kp-DATASET.", show_default=False)] = None,
    project: Annotated[str | None, typer.Option(
        help="Kaapana: send to called AE kp-PROJECT.", show_default=False)] = None,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Scan and report what would be sent.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="After sending, confirm by C-FIND (IMAGE level) that the "
                                         "peer lists every instance (Kaapana's check_arrival); a missing one fails."
                                         )] = False,
    fmt: Annotated[Format, typer.Option("--format", help="stdout: sent file paths, or one JSON record per file.")
                   ] = Format.paths,
    quiet: Quiet = False,
) -> None:
    """Send DICOM files (C-STORE, or STOW-RS for http peers) as they are encoded, without decoding them.

    Files are scanned first (file meta only), then sent over associations that propose exactly the SOP
    classes and transfer syntaxes they need. Every status is checked: a failed or refused file is one
    error line and exit 1; an unreachable peer is exit 69.
    """
    import time

    from kaapcli.core import fsio
    from kaapcli.core.batch import BatchSummary, ItemResult
    from kaapcli.core.net import dicomweb, dimse
    from kaapcli.core.net.ledger import Ledger

    target = _peer(ctx, to)
    calling = _aet(f"kp-{dataset}" if dataset else calling_aet, "calling AE title")
    if project:
        target = target.with_aet(_aet(f"kp-{project}", "called AE title"))
    timeouts = _timeouts(timeout, connect_timeout)
    files = fsio.collect_inputs(inputs)
    ledger = Ledger(resume) if resume else None
    summary = BatchSummary()
    start = time.perf_counter()
    with Reporter(f"send → {target.address}", quiet) as reporter:
        sink = Sink(fmt, reporter)

        def on_result(result: ItemResult) -> None:
            summary.results.append(result)
            reporter.advance()
            if result.status == "failed":
                reporter.error(result.message)
            for warning in result.warnings:
                reporter.warning(f"{result.input}: {warning}")
            if fmt is Format.jsonl:
                sink.record(result.record())
            elif result.status == "ok":
                sink.write_line(result.input)

        instances = []
        for path in files:
            if not fsio.is_dicom(path):
                summary.results.append(ItemResult(str(path), "skipped", reason="not-input", message="not DICOM"))
                continue
            try:
                inst = dimse.scan(path)
            except Exception as exc:  # noqa: BLE001 - a bad file is one failed item, never a crash
                from kaapcli.core.batch import describe_exception

                reason = getattr(exc, "message", None) or describe_exception(exc)
                on_result(ItemResult(str(path), "failed", message=f"{path}: {reason}", code=65))
                continue
            if ledger is not None and inst.sop_instance in ledger:
                on_result(ItemResult(str(path), "skipped", reason="up-to-date",
                                     message="already acknowledged (ledger)"))
                continue
            instances.append(inst)
        reporter.total(len(summary.results) + len(instances))

        def acknowledged(inst: Any, status: str) -> None:
            if ledger is not None:
                ledger.add(inst.sop_instance, target.address, status)

        if dry_run:
            for inst in instances:
                on_result(ItemResult(str(inst.path), "skipped", reason="dry-run", message="would send"))
        elif instances:
            stop = threading.Event()
            try:
                if target.web:
                    dicomweb.stow(instances, target, timeouts, on_result, acknowledged)
                else:
                    dimse.send(instances, target, calling_aet=calling, timeouts=timeouts,
                               associations=associations, on_result=on_result, acknowledged=acknowledged,
                               stop=stop)
            except KeyboardInterrupt:
                summary.interrupted = True
            finally:
                if ledger is not None:
                    ledger.close()
            if verify and not summary.interrupted:
                _verify(summary, target, calling, timeouts, reporter)
    summary.seconds = time.perf_counter() - start
    if summary.interrupted:
        reporter.error("interrupted")
    reporter.info(summary.line().replace("files", "files sent", 1) if not dry_run else summary.line())
    raise typer.Exit(int(summary.exit_code))


def _verify(summary: Any, target: Any, calling: str, timeouts: Any, reporter: Reporter) -> None:
    """``send --verify``: a sent file the peer does not list becomes a failed item."""
    from kaapcli.core.net import dimse
    from kaapcli.exitcodes import ExitCode, UsageError

    if target.web:
        raise UsageError("--verify asks by C-FIND: it needs a DIMSE peer (AET@host:port or a profile with aet)")
    sent = [r for r in summary.results if r.status == "ok"]
    missing = dimse.verify_arrival([Path(r.input) for r in sent], target, calling_aet=calling, timeouts=timeouts)
    for result in sent:
        reason = missing.get(Path(result.input))
        if reason:
            result.status, result.message, result.code = "failed", reason, ExitCode.ITEMS_FAILED
            reporter.error(reason)
    if not missing:
        reporter.info(f"verified: {target} lists all {len(sent)} instances")


# --------------------------------------------------------------------------- receive

def receive(
    ctx: typer.Context,
    out: OutDir,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535,
                                      help="TCP port to listen on (0: any free port, printed on stderr).")] = 11112,
    aet: Annotated[str, typer.Option("--aet", help="Our AE title (any called AE title is accepted).")] = "KAAPCLI",
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on.")] = "127.0.0.1",
    layout: Layout = DEFAULT_LAYOUT,
    allow_aet: Annotated[list[str] | None, typer.Option(
        "--allow-aet", help="Accept associations only from these calling AE titles (repeatable).",
        show_default=False)] = None,
    series_timeout: Annotated[float, typer.Option(
        "--series-timeout", min=0.0, help="A series is complete after this many seconds without new instances."
    )] = 10.0,
    on_complete: Annotated[str | None, typer.Option(
        "--on-complete", metavar="CMD", show_default=False,
        help="Run CMD (no shell) when a series is complete; placeholders {series_dir} {series_uid} {study_uid} "
             "{calling_aet} {called_aet} are path-safe tokens, also in $KAAPCLI_SERIES_UID etc.")] = None,
    rules_file: LiveRules = None,
    dags: LiveDags = None,
    reject_unmatched: Annotated[bool, typer.Option(
        "--reject-unmatched", help="Answer 0xB007 to, and do not store, an instance that no rule or input of "
                                   "--rules accepts (DicomNode).")] = False,
    aet_convention: AetConvention = Convention.seed,
    jobs: LiveJobs = 2,
    journal: JournalFile = None,
    index: LiveIndex = None,
    project: LiveProject = None,
    queue: LiveQueue = None,
    stage: LiveStage = None,
    s3: StageS3 = None,
    timeout: Timeout = None,
    quiet: Quiet = False,
) -> None:
    """Receive DICOM (Storage SCP) until SIGINT/SIGTERM: every dataset written to disk as sent, atomically.

    Prints each stored path on stdout as it is written. A series is complete after --series-timeout
    seconds without new instances; its receipt (calling AE = dataset, called AE = project, files) is
    written to OUT/.kaapcli/series/<SeriesInstanceUID>.json, then it is indexed (--index; a calling AE
    kp-<dataset> also adds it to that dataset), its rules run (--rules, at most --jobs at once, each
    run journalled; with --queue handed to `kaapcli worker`s) and --on-complete runs. A failing rule
    never stops the receiver.
    """
    import time

    from kaapcli.core.net.peers import Timeouts
    from kaapcli.core.net.scp import Receiver, SeriesReceipt

    reporter = Reporter("receive", quiet)
    _route_logs(reporter)
    sink = Sink(Format.paths)
    lock = threading.Lock()

    def on_stored(path: Path) -> None:
        with lock:
            sink.write_line(str(path))

    def announce(receipt: SeriesReceipt) -> None:
        reporter.info(f"series complete: {receipt.series_uid} ({receipt.instances} instances, "
                      f"{receipt.calling_aet} -> {receipt.called_aet}) in {receipt.series_dir}")

    from kaapcli.core.hooks import CommandHook, IndexHook, RulesHook
    from kaapcli.exitcodes import UsageError

    if reject_unmatched and rules_file is None:
        raise UsageError("--reject-unmatched needs --rules: the rules decide what is accepted")
    hooks: list[Any] = [announce]
    if index is not None:
        hooks.append(IndexHook(index, project, ctx.find_root().obj, aet_convention.value))
    command_hook = CommandHook(on_complete, reporter.warning) if on_complete else None  # refused before listening
    queue_settings, staging = queue_setup(ctx, queue, stage, s3, out)
    rules_hook = (RulesHook(rules_file, journal, None, jobs, dags=dags, aet=_aet(aet, "--aet"),
                            config=ctx.find_root().obj, queue=queue_settings, stage=staging, log=reporter.warning)
                  if rules_file else None)
    if rules_hook is not None:
        hooks.append(rules_hook)
    if command_hook is not None:
        hooks.append(command_hook)
    allowed = [_aet(a, "--allow-aet") for a in allow_aet or []]
    receiver = Receiver(out, aet=_aet(aet, "--aet"), bind=bind, port=port, layout=layout, allow_aets=allowed,
                        series_timeout=series_timeout, timeouts=Timeouts.of(timeout), on_stored=on_stored,
                        hooks=hooks, accept=rules_hook.accept if rules_hook and reject_unmatched else None,
                        ready=rules_hook.ready if rules_hook else None)
    receiver.start()
    reporter.info(f"receiving as {receiver.aet} on {bind}:{receiver.port} into {out} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(0.2)
            receiver.poll()
    except KeyboardInterrupt:  # SIGINT, and SIGTERM (cli/app.py turns it into KeyboardInterrupt)
        reporter.info("stopping: finishing in-flight associations")
    receiver.stop()
    if rules_hook is not None:
        rules_hook.close()  # let running rules finish
    reporter.info(f"{receiver.stored} files received, {receiver.failed} failed")
    raise typer.Exit(0)


# --------------------------------------------------------------------------- query

KeysOpt = Annotated[list[str] | None, typer.Option(
    "--key", "-k", metavar="KEYWORD=VALUE", show_default=False,
    help="Matching key (repeatable): exact, wildcards * ?, date ranges 20200101-20201231.")]


def query(
    ctx: typer.Context,
    peer: PeerArg,
    level: Annotated[Level, typer.Option("--level", "-l", help="Query level.")] = Level.study,
    key: KeysOpt = None,
    ret: Annotated[list[str] | None, typer.Option(
        "--return", "-r", metavar="KEYWORD", show_default=False, help="Extra return key (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many matches.",
                                              show_default=False)] = None,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
) -> None:
    """Query a PACS (C-FIND study root, QIDO-RS for http): one DICOM JSON (PS3.18) object per match."""
    from kaapcli.core.net import dicomweb, dimse
    from kaapcli.core.net.query import Query

    target = _peer(ctx, peer)
    q = Query.parse(level.value, key or [], ret or [], limit)
    timeouts = _timeouts(timeout, connect_timeout)
    sink = Sink(Format.jsonl)
    if target.web:
        matches = dicomweb.query(target, q, timeouts)
    else:
        matches = dimse.find(target, q, calling_aet=_aet(calling_aet, "--calling-aet"), timeouts=timeouts)
    for record in matches:
        sink.record(record)


# --------------------------------------------------------------------------- retrieve

def retrieve(
    ctx: typer.Context,
    peer: PeerArg,
    out: OutDir,
    key: KeysOpt = None,
    method: Annotated[Method, typer.Option("--method", "-m", help="DIMSE: C-GET, or C-MOVE to a built-in "
                                           "receiver. (http peers: WADO-RS.)")] = Method.get,
    from_query: Annotated[str | None, typer.Option(
        "--from-query", metavar="FILE", show_default=False,
        help="Retrieve each record of a `kaapcli query` JSON-lines file (- for stdin).")] = None,
    reference_of: Annotated[Path | None, typer.Option(
        "--reference-of", metavar="DIR", show_default=False,
        help="Retrieve the series the SEG/RTSTRUCT files in DIR reference.")] = None,
    aet: Annotated[str | None, typer.Option(
        "--aet", help="C-MOVE destination: the AE title the peer knows our receiver by (default: calling AE).",
        show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535,
                                      help="C-MOVE: port of the built-in receiver.")] = 11112,
    bind: Annotated[str, typer.Option("--bind", help="C-MOVE: address of the built-in receiver.")] = "0.0.0.0",
    layout: Layout = DEFAULT_LAYOUT,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    fmt: Annotated[Format, typer.Option("--format", help="stdout: received file paths, or one JSON record per "
                                        "request with its sub-operation counts.")] = Format.paths,
    quiet: Quiet = False,
) -> None:
    """Retrieve studies, series or instances (C-GET, C-MOVE, or WADO-RS) into OUT.

    Sub-operation counts are checked: anything failed, or fewer files than the peer reported, makes
    exit 1. `kaapcli query PEER -l series ... | kaapcli retrieve PEER --from-query - -o DIR` works.
    """
    from kaapcli.core.net.fetch import Fetcher
    from kaapcli.exitcodes import ExitCode, UsageError

    target = _peer(ctx, peer)
    timeouts = _timeouts(timeout, connect_timeout)
    calling = _aet(calling_aet, "--calling-aet")
    requests = _retrieve_requests(key or [], from_query, reference_of)
    if not requests:
        raise UsageError("nothing to retrieve", hint="give -k SeriesInstanceUID=..., --from-query or --reference-of")
    reporter = Reporter("retrieve", quiet)
    _route_logs(reporter)
    sink = Sink(fmt)
    lock = threading.Lock()

    def on_stored(path: Path) -> None:
        if fmt is Format.paths:
            with lock:
                sink.write_line(str(path))

    failed = 0
    files = 0
    with Fetcher(target, out, method=method.value, calling_aet=calling, timeouts=timeouts, layout=layout,
                 move_aet=_aet(aet or calling, "--aet"), bind=bind, port=port, on_stored=on_stored) as fetcher:
        for uids in requests:
            outcome = fetcher.fetch(uids)
            files += len(outcome.files)
            if fmt is Format.jsonl:
                sink.record(outcome.record())
            if not outcome.ok:
                failed += 1
                reporter.error(f"{outcome.request}: {outcome.message or 'failed'} ({outcome.completed} completed, "
                               f"{outcome.failed} failed, {outcome.warning} warning, {len(outcome.files)} received)")
    reporter.info(f"{len(requests)} requests, {files} files received, {failed} requests failed")
    raise typer.Exit(int(ExitCode.ITEMS_FAILED) if failed else 0)


def _retrieve_requests(keys: list[str], from_query: str | None, reference_of: Path | None) -> list[dict[str, str]]:
    from kaapcli.core import dicom, fsio
    from kaapcli.core.net.dicomweb import parse_json_lines
    from kaapcli.core.net.query import Query, referenced_series, uids_of
    from kaapcli.exitcodes import KaapcliError, NoInputError, UsageError

    requests: list[dict[str, str]] = []
    if keys:
        q = Query.parse("study", keys, [])
        uids = {k: v for k, v in q.keys.items() if k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        if not uids or len(uids) != len(q.keys):
            raise UsageError("-k for retrieve: only StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID")
        requests.append(uids)
    if from_query:
        if from_query == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(from_query).read_text()
            except OSError as exc:
                raise NoInputError(f"{from_query}: cannot read: {exc.strerror}") from exc
        for n, record in enumerate(parse_json_lines(text), 1):
            uids = uids_of(record)
            if not uids:
                raise UsageError(f"--from-query record {n}: no Study/Series/SOP Instance UID")
            requests.append(uids)
    if reference_of is not None:
        for path in fsio.collect_inputs([str(reference_of)]):
            if not fsio.is_dicom(path):
                continue
            try:
                ds = dicom.read(path, stop_before_pixels=True)
            except KaapcliError as exc:
                sys.stderr.write(f"kaapcli: warning: {path}: {exc.message}\n")
                continue
            requests.extend(r for r in referenced_series(ds) if r not in requests)
        if not requests:
            raise NoInputError(f"{reference_of}: no SEG/RTSTRUCT with a referenced series found")
    return requests


# --------------------------------------------------------------------------- delete

def delete(
    ctx: typer.Context,
    peer: PeerArg,
    study: Annotated[str | None, typer.Option("--study", help="StudyInstanceUID to delete.",
                                              show_default=False)] = None,
    series: Annotated[str | None, typer.Option("--series", help="SeriesInstanceUID to delete.",
                                               show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; required when stdin is not a terminal.")
                   ] = False,
    server_type: Annotated[ServerType | None, typer.Option(
        "--server-type", help="The PACS product (default: the profile's kind).", show_default=False)] = None,
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
) -> None:
    """Delete a study or series from a PACS through its REST API (Orthanc, dcm4chee-arc)."""
    from kaapcli.core.net.admin import delete as delete_on
    from kaapcli.exitcodes import UsageError

    if bool(study) == bool(series) and not (study and series):
        raise UsageError("give --study UID or --series UID")
    target = _peer(ctx, peer)
    kind = server_type.value if server_type else target.kind
    what = f"series {series}" if series else f"study {study}"
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {what} without --yes (stdin is not a terminal)")
        if not typer.confirm(f"Delete {what} on {target}?", err=True):
            raise typer.Exit(1)
    for line in delete_on(target, study=study, series=series, kind=kind, timeouts=_timeouts(timeout, connect_timeout)):
        sys.stderr.write(f"{line}\n")


def register(app: typer.Typer) -> None:
    for command in (echo, send, receive, query, retrieve, delete):
        app.command()(command)
