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

from kaapcli.cli._indexopts import DatasetOpt, ExcludeTagOpt, IncludeTagOpt, IndexOpt, ProjectOpt
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
Token = Annotated[str | None, typer.Option(
    "--token", envvar="KAAPCLI_TOKEN", metavar="TOKEN", show_default=False, rich_help_panel=PANEL,
    help="DICOMweb: bearer token sent as 'Authorization: Bearer' (never printed; prefer the environment variable "
         "or a profile's token_env to the command line, where other users can read it).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr (errors still shown).")]
Layout = Annotated[str, typer.Option(
    "--layout", help="Path template of received files under OUT ({Keyword} fields of the dataset).")]
DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"

TLS_PANEL = "TLS options (PS3.15 B.1)"
TlsOn = Annotated[bool | None, typer.Option(
    "--tls/--no-tls", show_default="off, or the profile's tls", rich_help_panel=TLS_PANEL,
    help="DICOM over TLS. The peer's certificate is verified (--tls-ca, else the system's trust store).")]
TlsCert = Annotated[Path | None, typer.Option(
    "--tls-cert", metavar="PEM", show_default=False, rich_help_panel=TLS_PANEL,
    help="Our certificate (chain): required to receive; sent to a peer that asks for one.")]
TlsKey = Annotated[Path | None, typer.Option(
    "--tls-key", metavar="PEM", show_default=False, rich_help_panel=TLS_PANEL,
    help="The private key of --tls-cert (encrypted: its password in KAAPCLI_TLS_KEY_PASSWORD).")]
TlsCa = Annotated[Path | None, typer.Option(
    "--tls-ca", metavar="PEM", show_default=False, rich_help_panel=TLS_PANEL,
    help="CA certificates to verify the peer with; a receiver given them requires client certificates "
         "signed by them (mutual authentication).")]


class TlsVerify(str, Enum):
    host = "host"
    chain = "chain"


TlsCheck = Annotated[TlsVerify, typer.Option(
    "--tls-verify", rich_help_panel=TLS_PANEL,
    help="host: the peer's certificate must be trusted and name the host connected to; chain: trusted only "
         "(what DCMTK and Orthanc check).")]
AllowHost = Annotated[list[str] | None, typer.Option(
    "--allow-host", metavar="HOST|CIDR", show_default=False, rich_help_panel=PANEL,
    help="Accept connections only from these hosts or networks (repeatable; names are resolved at start).")]


class Level(str, Enum):
    patient = "patient"
    study = "study"
    series = "series"
    instance = "instance"


class Method(str, Enum):
    get = "get"
    move = "move"


class Decompress(str, Enum):
    never = "never"
    lossless = "lossless"
    lossy = "lossy"


class ServerType(str, Enum):
    orthanc = "orthanc"
    dcm4chee = "dcm4chee"


def _peer(ctx: typer.Context, text: str, token: str | None = None) -> Any:
    from kaapcli.core.net.peers import parse_peer

    return parse_peer(text, ctx.obj).with_token(token)


def _timeouts(timeout: float | None, connect: float | None) -> Any:
    from kaapcli.core.net.peers import Timeouts

    return Timeouts.of(timeout, connect)


def _aet(value: str, what: str) -> str:
    from kaapcli.core.net.peers import check_aet

    return check_aet(value, what)


def _tls(ctx: typer.Context, enabled: bool | None, cert: Path | None, key: Path | None, ca: Path | None,
         verify: TlsVerify, base: Any = None) -> Any:
    """TLS settings from the options over ``base`` (a profile's); None for plain TCP.  A --tls-* option given on
    the command line without TLS is a usage error rather than a silently unencrypted connection."""
    import os

    from click.core import ParameterSource

    from kaapcli.core.net.tls import TLS
    from kaapcli.exitcodes import UsageError

    def source(name: str) -> Any:
        return ctx.get_parameter_source(name)

    if not (base is not None if enabled is None else enabled):
        named = [f"--{name.replace('_', '-')}" for name, value in (("tls_cert", cert), ("tls_key", key),
                                                                    ("tls_ca", ca))
                 if value and source(name) is ParameterSource.COMMANDLINE]
        if named:
            raise UsageError(f"{named[0]} without --tls", hint="add --tls (or tls = true in the profile)")
        return None
    base = base or TLS()
    return TLS(cert=str(cert or base.cert), key=str(key or base.key), ca=str(ca or base.ca),
               verify=verify.value if source("tls_verify") not in (None, ParameterSource.DEFAULT) else base.verify,
               key_password=base.key_password or os.environ.get("KAAPCLI_TLS_KEY_PASSWORD", ""), where=base.where)


def _route_logs(reporter: Reporter) -> None:
    """What the receiver logs from its threads becomes lines on stderr: ``error:`` (failed C-STOREs),
    ``warning:`` (refused connections and associations, aborted ones) and plain lines."""
    import logging

    class ToReporter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                reporter.error(text)
            elif record.levelno >= logging.WARNING:
                reporter.warning(text)
            else:
                reporter.info(text)

    logger = logging.getLogger("kaapcli.net")
    logger.handlers[:] = [ToReporter(logging.INFO)]
    logger.setLevel(logging.INFO)
    logger.propagate = False


# --------------------------------------------------------------------------- echo

def echo(
    ctx: typer.Context,
    peer: PeerArg,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    token: Token = None,
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_verify: TlsCheck = TlsVerify.host,
) -> None:
    """Check a peer: C-ECHO for DIMSE, a QIDO-RS probe for DICOMweb. Prints {"peer", "ok", "ms", "status"}."""
    from kaapcli.core.net import dicomweb, dimse

    target = _peer(ctx, peer, token)
    target = target.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, target.tls))
    timeouts = _timeouts(timeout, connect_timeout)
    if target.web:
        record = dicomweb.echo(target, timeouts)
    else:
        record = dimse.echo(target, _aet(calling_aet, "--calling-aet"), timeouts)
    Sink(Format.jsonl).record(record)
    if not record["ok"]:
        sys.stderr.write(f"kaapcli: error: {target}: answered {record['status']}\n")
    raise typer.Exit(0 if record["ok"] else 1)


# --------------------------------------------------------------------------- send

def send(
    ctx: typer.Context,
    inputs: Inputs,
    to: Annotated[str, typer.Option("--to", metavar="PEER", show_default=False,
                                    help="Where to send: AET@host:port, an http(s) DICOMweb root (STOW-RS) "
                                         "or a [pacs.NAME] profile.")],
    associations: Annotated[int, typer.Option("--jobs", "-j", min=1, max=32,
                                              help="Parallel associations (or STOW-RS requests).")] = 1,
    resume: Annotated[Path | None, typer.Option(
        "--resume", metavar="LEDGER", help="JSON-lines ledger of acknowledged SOP Instance UIDs: skip those, "
        "append new ones.", show_default=False)] = None,
    decompress: Annotated[Decompress, typer.Option(
        "--decompress", help="When the peer refuses a compressed file's syntax: decode it (pixels verified "
        "identical) if it is lossless, also if lossy, or never (the file fails).")] = Decompress.lossless,
    dataset: Annotated[str | None, typer.Option(
        help="Kaapana: send as calling AE kp-DATASET.", show_default=False)] = None,
    project: Annotated[str | None, typer.Option(
        help="Kaapana: send to called AE kp-PROJECT.", show_default=False)] = None,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    token: Token = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Scan and report what would be sent.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="After sending, confirm by C-FIND (IMAGE level) that the "
                                         "peer lists every instance (Kaapana's check_arrival); a missing one fails."
                                         )] = False,
    fmt: Annotated[Format, typer.Option("--format", help="stdout: sent file paths, or one JSON record per file.")
                   ] = Format.paths,
    quiet: Quiet = False,
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_verify: TlsCheck = TlsVerify.host,
) -> None:
    """Send DICOM files (C-STORE, or STOW-RS for http peers) as they are encoded, without decoding them.

    Files are scanned first (file meta and element headers: a truncated file is refused locally), then sent
    over associations that propose exactly the SOP classes and transfer syntaxes they need. A file whose
    syntax the peer refuses is re-encoded in one it accepts only when its decoded pixels stay identical
    (byte order swapped, lossless compression decoded; see --decompress). Every status is checked: a failed
    or refused file is one error line and exit 1; an unreachable peer is exit 69.
    """
    import time

    from kaapcli.core import fsio
    from kaapcli.core.batch import BatchSummary, ItemResult
    from kaapcli.core.net import dicomweb, dimse
    from kaapcli.core.net.ledger import Ledger

    target = _peer(ctx, to, token)
    target = target.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, target.tls))
    calling = _aet(f"kp-{dataset}" if dataset else calling_aet, "calling AE title")
    if project:
        target = target.with_aet(_aet(f"kp-{project}", "called AE title"))
    timeouts = _timeouts(timeout, connect_timeout)
    files = fsio.collect_inputs(inputs)
    ledger = Ledger(resume) if resume else None
    summary = BatchSummary()
    start = time.perf_counter()
    lost: dict[str, int] = {}  # why an association broke -> files it took with it
    with Reporter(f"send → {target.address}", quiet) as reporter:
        sink = Sink(fmt, reporter)

        def on_result(result: ItemResult) -> None:
            summary.add(result)
            reporter.advance()
            if result.status == "failed" and result.reason == dimse.ASSOCIATION_LOST:
                cause = result.message.split(": not stored: ", 1)[-1]
                lost[cause] = lost.get(cause, 0) + 1  # said once below, not once per file
            elif result.status == "failed":
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
                summary.add(ItemResult(str(path), "skipped", reason="not-input", message="not DICOM"))
                continue
            try:
                # over DIMSE the element headers are walked as the file's turn comes, not before the first is sent
                inst = dimse.scan(path, check=dry_run or target.web)
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
        reporter.total(summary.reported + len(instances))

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
                               stop=stop, decompress=decompress.value)
            except KeyboardInterrupt:
                summary.interrupted = True
            finally:
                if ledger is not None:
                    ledger.close()
            if verify and not summary.interrupted:
                _verify(summary, target, calling, timeouts, reporter)
    for cause, count in lost.items():
        reporter.error(f"{cause}: {count} file{'s' if count > 1 else ''} not stored")
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
            summary.mark_failed(result, reason, int(ExitCode.ITEMS_FAILED))
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
    allow_host: AllowHost = None,
    max_associations: Annotated[int, typer.Option(
        "--max-associations", min=1, max=1024, help="Associations served at once; more are rejected "
        "(local limit exceeded).")] = 64,
    max_per_host: Annotated[int, typer.Option(
        "--max-per-host", min=1, max=1024, help="Associations served at once from one host.")] = 32,
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
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
) -> None:
    """Receive DICOM (Storage SCP) until SIGINT/SIGTERM: every dataset written to disk as sent, atomically.

    Prints each stored path on stdout as it is written. A series is complete after --series-timeout
    seconds without new instances; its receipt (calling AE = dataset, called AE = project, files) is
    written to OUT/.kaapcli/series/<SeriesInstanceUID>.json, then it is indexed (--index; a calling AE
    kp-<dataset> also adds it to that dataset), its rules run (--rules, at most --jobs at once, each
    run journalled; with --queue handed to `kaapcli worker`s) and --on-complete runs. A failing rule
    never stops the receiver.

    Every dataset's structure is checked as it arrives; one that is malformed, does not match its command or
    cannot be written is answered with a failure status (0xC000, 0xA900, 0xA700) and not kept. Connections
    are bounded (--max-associations, --max-per-host, --allow-host, --allow-aet, --timeout); refusals are
    warning lines. See docs/networking.md for the security model.
    """
    import time

    from kaapcli.core.net.peers import Timeouts
    from kaapcli.core.net.scp import Receiver, SeriesReceipt
    from kaapcli.exitcodes import UsageError

    settings = _tls(ctx, tls, tls_cert, tls_key, tls_ca, TlsVerify.host)
    if settings is not None and not (settings.cert and settings.key):
        raise UsageError("receive --tls needs --tls-cert and --tls-key (our certificate and its key)")
    reporter = Reporter("receive", quiet)
    _route_logs(reporter)
    sink = Sink(Format.paths)
    lock = threading.Lock()
    stdout_closed = threading.Event()

    def on_stored(path: Path) -> None:
        with lock:
            if stdout_closed.is_set():
                return
            try:
                sink.write_line(str(path))
            except BrokenPipeError:  # `kaapcli receive | head`: the file is stored; the receiver ends (141)
                stdout_closed.set()

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
                        allow_hosts=allow_host or [], series_timeout=series_timeout, timeouts=Timeouts.of(timeout),
                        on_stored=on_stored, hooks=hooks,
                        accept=rules_hook.accept if rules_hook and reject_unmatched else None,
                        ready=rules_hook.ready if rules_hook else None, max_associations=max_associations,
                        max_per_host=max_per_host, tls=settings)
    receiver.start()
    reporter.info(f"receiving as {receiver.aet} on {bind}:{receiver.port}{' (TLS)' if settings else ''} into "
                  f"{out} (Ctrl-C to stop)")
    try:
        while not stdout_closed.is_set():
            time.sleep(0.2)
            receiver.poll()
    except KeyboardInterrupt:  # SIGINT, and SIGTERM (cli/app.py turns it into KeyboardInterrupt)
        reporter.info("stopping: finishing in-flight associations")
    receiver.stop()
    if rules_hook is not None:
        rules_hook.close()  # let running rules finish
    failures = ", ".join(f"{n} x {status}" for status, n in sorted(receiver.failures.items()))
    refused = sum(receiver.refused.values())
    reporter.info(f"{receiver.stored} files received, {receiver.failed} failed" + (f" ({failures})" if failures else "")
                  + (f", {refused} connections refused" if refused else ""))
    raise typer.Exit(141 if stdout_closed.is_set() else 0)


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
        "--return", metavar="KEYWORD", show_default=False, help="Extra return key (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many matches.",
                                              show_default=False)] = None,
    worklist: Annotated[bool, typer.Option(
        "--worklist", help="Query a Modality Worklist (C-FIND, PS3.4 K); -k Modality=, ScheduledStationAETitle=, "
        "ScheduledProcedureStepStartDate= ... match inside the Scheduled Procedure Step.")] = False,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    token: Token = None,
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_verify: TlsCheck = TlsVerify.host,
) -> None:
    """Query a PACS (C-FIND study root, QIDO-RS for http) or a worklist: one DICOM JSON (PS3.18) object per match.

    `kaapcli query WLM@ris:104 --worklist -k ScheduledProcedureStepStartDate=20260101 > wl.jsonl` makes a
    list `kaapcli collect wl.jsonl` takes (its AccessionNumber, PatientID and StudyInstanceUID).
    A peer that breaks off after some matches were printed: exit 1 (none printed: 69) and one error line.
    """
    from kaapcli.core.net import dicomweb, dimse
    from kaapcli.core.net.query import Query
    from kaapcli.exitcodes import KaapcliError

    target = _peer(ctx, peer, token)
    target = target.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, target.tls))
    q = Query.parse("worklist" if worklist else level.value, key or [], ret or [], limit)
    timeouts = _timeouts(timeout, connect_timeout)
    sink = Sink(Format.jsonl)
    if target.web:
        matches = dicomweb.query(target, q, timeouts)
    else:
        matches = dimse.find(target, q, calling_aet=_aet(calling_aet, "--calling-aet"), timeouts=timeouts)
    printed = 0
    try:
        for record in matches:
            sink.record(record)
            printed += 1
    except KaapcliError as exc:
        if not printed:
            raise
        sys.stderr.write(f"kaapcli: error: {exc.message} (after {printed} matches)\n")
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------- retrieve

def retrieve(
    ctx: typer.Context,
    out: OutDir,
    peer: Annotated[str | None, typer.Argument(
        metavar="[PEER]", show_default=False, help="AET@host:port, an http(s):// DICOMweb root, or a [pacs.NAME] "
        "profile name (default: where the index says each series came from).")] = None,
    from_peer: Annotated[str | None, typer.Option(
        "--from", metavar="PEER", show_default=False, help="The same as PEER (retrieve everything from there).")
    ] = None,
    key: KeysOpt = None,
    method: Annotated[Method, typer.Option("--method", help="DIMSE: C-GET, or C-MOVE to a built-in "
                                           "receiver. (http peers: WADO-RS.)")] = Method.get,
    from_query: Annotated[str | None, typer.Option(
        "--from-query", metavar="FILE", show_default=False,
        help="Retrieve each record of a `kaapcli query` JSON-lines file (- for stdin).")] = None,
    reference_of: Annotated[Path | None, typer.Option(
        "--reference-of", metavar="DIR", show_default=False,
        help="Retrieve the series the SEG/RTSTRUCT files in DIR reference.")] = None,
    dataset: DatasetOpt = None,
    include_tag: IncludeTagOpt = None,
    exclude_tag: ExcludeTagOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, show_default=False,
                                              help="At most N series (requests).")] = None,
    index: IndexOpt = None,
    project: ProjectOpt = None,
    aet: Annotated[str | None, typer.Option(
        "--aet", help="C-MOVE destination: the AE title the peer knows our receiver by (default: calling AE).",
        show_default=False)] = None,
    dest: Annotated[str | None, typer.Option(
        "--dest", metavar="AE", help="C-MOVE to this AE title (another node the peer knows) instead of a built-in "
        "receiver; the peer's sub-operation counters are checked. Implies --method move.", show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535,
                                      help="C-MOVE: port of the built-in receiver.")] = 11112,
    bind: Annotated[str, typer.Option("--bind", help="C-MOVE: address of the built-in receiver (a remote PACS "
                                      "needs one it can reach).")] = "127.0.0.1",
    allow_aet: Annotated[list[str] | None, typer.Option(
        "--allow-aet", show_default="the PEER's AE title", rich_help_panel=PANEL,
        help="C-MOVE: calling AE titles the built-in receiver accepts (repeatable).")] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", metavar="HOST|CIDR", show_default="the PEER's host", rich_help_panel=PANEL,
        help="C-MOVE: hosts or networks the built-in receiver accepts (repeatable).")] = None,
    layout: Layout = DEFAULT_LAYOUT,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    token: Token = None,
    fmt: Annotated[Format, typer.Option("--format", help="stdout: received file paths, or one JSON record per "
                                        "request with its sub-operation counts.")] = Format.paths,
    quiet: Quiet = False,
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_verify: TlsCheck = TlsVerify.host,
) -> None:
    """Retrieve studies, series or instances (C-GET, C-MOVE, or WADO-RS) into OUT.

    Sub-operation counts are checked: anything failed, nothing retrieved, fewer files than the peer
    reported or than its C-FIND listed makes exit 1. Series and instance requests carry the full
    hierarchical key (the study UID is looked up by C-FIND when not given), as strict SCPs require.
    `kaapcli query PEER -l series ... | kaapcli retrieve PEER --from-query - -o DIR` works, and so do
    `kaapcli search Q | kaapcli retrieve --from-query - -o DIR` and `kaapcli retrieve --dataset NAME -o DIR`:
    each series comes from the PACS the index recorded (a configured [pacs.NAME] profile), or from PEER.
    A peer that breaks off: exit 69, or 1 when some requests were done, and one error line.

    The C-MOVE receiver listens on --bind (default 127.0.0.1) and accepts only the PEER (its AE title and
    host, or --allow-aet / --allow-host): anything else pushing files is refused and reported.
    """
    from kaapcli.core.net import fetch
    from kaapcli.core.net.fetch import Fetcher
    from kaapcli.exitcodes import ExitCode, NoInputError, UnavailableError, UsageError

    if peer and from_peer and peer != from_peer:
        raise UsageError("give the peer once: PEER or --from PEER")
    given = peer or from_peer
    fallback = _peer(ctx, given, token) if given else None
    if fallback is not None:
        fallback = fallback.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, fallback.tls))
    timeouts = _timeouts(timeout, connect_timeout)
    calling = _aet(calling_aet, "--calling-aet")
    requests = _retrieve_requests(key or [], from_query, reference_of)
    requests += fetch.dataset_requests(ctx.obj, index, project, dataset, include_tag, exclude_tag, limit)
    requests = requests[:limit] if limit else requests
    if not requests:
        raise UsageError("nothing to retrieve",
                         hint="give -k SeriesInstanceUID=..., --from-query, --reference-of or --dataset")
    plan, unplaced = fetch.plan(requests, ctx.obj, fallback)
    if unplaced and not plan:
        raise UsageError(f"{unplaced[0]}{f' (and {len(unplaced) - 1} more)' if len(unplaced) > 1 else ''}",
                         hint="give PEER (or --from PEER), or a [pacs.NAME] profile for the source")
    reporter = Reporter("retrieve", quiet)
    _route_logs(reporter)
    sink = Sink(fmt)
    lock = threading.Lock()

    def on_stored(path: Path) -> None:
        if fmt is Format.paths:
            with lock:
                sink.write_line(str(path))

    failed, missing = len(unplaced), 0
    files = 0
    for line in unplaced:
        reporter.error(line)
    destination = _aet(dest, "--dest") if dest else None
    done = 0
    for target, batch in plan:
        with Fetcher(target, out, method="move" if destination else method.value, calling_aet=calling,
                     timeouts=timeouts, layout=layout, move_aet=_aet(aet or calling, "--aet"), bind=bind, port=port,
                     on_stored=on_stored, destination=destination,
                     allow_aets=[_aet(a, "--allow-aet") for a in allow_aet or []], allow_hosts=allow_host or []
                     ) as fetcher:
            for request in batch:
                try:
                    outcome = fetcher.fetch(request.uids)
                except NoInputError as exc:  # not on the peer: this request failed, the others go on
                    done, failed, missing = done + 1, failed + 1, missing + 1
                    reporter.error(exc.message)
                    if fmt is Format.jsonl:
                        sink.record({"request": " ".join(f"{k}={v}" for k, v in request.uids.items()), "ok": False,
                                     "received": 0, "message": exc.message})
                    continue
                except UnavailableError as exc:  # the peer broke off: the rest of its batch is not done
                    if not done and not files and len(plan) == 1:
                        raise
                    left = len(batch) - batch.index(request)
                    reporter.error(f"{exc.message} ({left} of {len(batch)} requests to {target} not done)")
                    failed += left
                    break
                done += 1
                files += outcome.arrived
                if fmt is Format.jsonl:
                    sink.record(outcome.record())
                if not outcome.ok:
                    failed += 1
                    why = outcome.message or outcome.shortfall() or "failed"
                    reporter.error(f"{outcome.request}: {why} ({outcome.completed} completed, {outcome.failed} "
                                   f"failed, {outcome.warning} warning, {len(outcome.files)} received)")
        if fetcher.receiver is not None and fetcher.receiver.refused:
            reporter.warning(f"the C-MOVE receiver refused {sum(fetcher.receiver.refused.values())} connections")
    where = f"instances stored at {destination} (the peer's count)" if destination else "files received"
    reporter.info(f"{len(requests)} requests, {files} {where}, {failed} requests failed")
    if missing == len(requests):
        raise typer.Exit(int(ExitCode.NOINPUT))
    raise typer.Exit(int(ExitCode.ITEMS_FAILED) if failed else 0)


def _retrieve_requests(keys: list[str], from_query: str | None, reference_of: Path | None) -> list[Any]:
    from kaapcli.core import dicom, fsio
    from kaapcli.core.net.dicomweb import parse_json_lines
    from kaapcli.core.net.fetch import Request, record_request
    from kaapcli.core.net.query import Query, referenced_series
    from kaapcli.exitcodes import KaapcliError, NoInputError, UsageError

    requests: list[Request] = []
    if keys:
        q = Query.parse("study", keys, [])
        uids = {k: v for k, v in q.keys.items() if k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        if not uids or len(uids) != len(q.keys):
            raise UsageError("-k for retrieve: only StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID")
        requests.append(Request(uids))
    if from_query:
        if from_query == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(from_query).read_text()
            except OSError as exc:
                raise NoInputError(f"{from_query}: cannot read: {exc.strerror}") from exc
        for n, record in enumerate(parse_json_lines(text), 1):
            request = record_request(record)  # a query (DICOM JSON) or search/dataset show record
            if request is None:
                raise UsageError(f"--from-query record {n}: no Study/Series/SOP Instance UID")
            requests.append(request)
    if reference_of is not None:
        for path in fsio.collect_inputs([str(reference_of)]):
            if not fsio.is_dicom(path):
                continue
            try:
                ds = dicom.read(path, stop_before_pixels=True)
            except KaapcliError as exc:
                sys.stderr.write(f"kaapcli: warning: {path}: {exc.message}\n")
                continue
            requests.extend(Request(r) for r in referenced_series(ds) if Request(r) not in requests)
        if not requests:
            raise NoInputError(f"{reference_of}: no SEG/RTSTRUCT with a referenced series found")
    return requests


# --------------------------------------------------------------------------- delete

def delete(
    ctx: typer.Context,
    peer: PeerArg,
    study: Annotated[list[str] | None, typer.Option("--study", help="StudyInstanceUID to delete (repeatable).",
                                                    show_default=False)] = None,
    series: Annotated[list[str] | None, typer.Option("--series", help="SeriesInstanceUID to delete (repeatable).",
                                                     show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask; required when stdin is not a terminal.")
                   ] = False,
    server_type: Annotated[ServerType | None, typer.Option(
        "--server-type", help="The PACS product (default: the profile's kind).", show_default=False)] = None,
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    token: Token = None,
) -> None:
    """Delete studies and series from a PACS through its REST API (Orthanc, dcm4chee-arc).

    Every named object is deleted or reported: one stderr line each; exit 1 when some could not be deleted,
    66 when none of them was found.
    """
    from kaapcli.core.net.admin import delete_all
    from kaapcli.exitcodes import ExitCode, UsageError

    targets = [("study", uid) for uid in study or []] + [("series", uid) for uid in series or []]
    if not targets:
        raise UsageError("give --study UID or --series UID (each repeatable)")
    target = _peer(ctx, peer, token)
    kind = server_type.value if server_type else target.kind
    what = ", ".join(f"{level} {uid}" for level, uid in targets)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {what} without --yes (stdin is not a terminal)")
        if not typer.confirm(f"Delete {what} on {target}?", err=True):
            raise typer.Exit(1)
    outcomes = delete_all(target, targets, kind=kind, timeouts=_timeouts(timeout, connect_timeout))
    for outcome in outcomes:
        if outcome.error is None:
            for line in outcome.done:
                sys.stderr.write(f"{line}\n")
        else:
            sys.stderr.write(f"kaapcli: error: {outcome.error.message}\n")
    errors = [o.error for o in outcomes if o.error is not None]
    if errors and len(errors) == len(outcomes):
        codes = {int(e.code) for e in errors}
        raise typer.Exit(codes.pop() if len(codes) == 1 else int(ExitCode.ITEMS_FAILED))
    raise typer.Exit(int(ExitCode.ITEMS_FAILED) if errors else 0)


def register(app: typer.Typer) -> None:
    for command in (echo, send, receive, query, retrieve, delete):
        app.command()(command)
