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
from kaapcli.cli.rules import JournalFile, LiveIndex, LiveJobs, LiveProject, LiveRules

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
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_verify: TlsCheck = TlsVerify.host,
) -> None:
    """Check a peer: C-ECHO for DIMSE, a QIDO-RS probe for DICOMweb. Prints {"peer", "ok", "ms", "status"}."""
    from kaapcli.core.net import dicomweb, dimse

    target = _peer(ctx, peer)
    target = target.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, target.tls))
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
            summary.results.append(result)
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
    for cause, count in lost.items():
        reporter.error(f"{cause}: {count} file{'s' if count > 1 else ''} not stored")
    summary.seconds = time.perf_counter() - start
    if summary.interrupted:
        reporter.error("interrupted")
    reporter.info(summary.line().replace("files", "files sent", 1) if not dry_run else summary.line())
    raise typer.Exit(int(summary.exit_code))


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
        help="Run CMD when a series is complete; placeholders {series_dir} {series_uid} {study_uid} "
             "{calling_aet} {called_aet}.")] = None,
    rules_file: LiveRules = None,
    jobs: LiveJobs = 2,
    journal: JournalFile = None,
    index: LiveIndex = None,
    project: LiveProject = None,
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
    run journalled) and --on-complete runs. A failing rule never stops the receiver.

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

    from kaapcli.core.hooks import IndexHook, RulesHook

    hooks: list[Any] = [announce]
    if index is not None:
        hooks.append(IndexHook(index, project, ctx.find_root().obj))
    rules_hook = RulesHook(rules_file, journal, None, jobs) if rules_file else None
    if rules_hook is not None:
        hooks.append(rules_hook)
    if on_complete:
        hooks.append(_command_hook(on_complete, reporter))
    allowed = [_aet(a, "--allow-aet") for a in allow_aet or []]
    receiver = Receiver(out, aet=_aet(aet, "--aet"), bind=bind, port=port, layout=layout, allow_aets=allowed,
                        allow_hosts=allow_host or [], series_timeout=series_timeout, timeouts=Timeouts.of(timeout),
                        on_stored=on_stored, hooks=hooks, max_associations=max_associations,
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


def _command_hook(template: str, reporter: Reporter) -> Any:
    import shlex
    import subprocess

    argv = shlex.split(template)

    def run_command(receipt: Any) -> None:
        values = receipt.placeholders()
        try:
            cmd = [arg.format_map(values) for arg in argv]
        except (KeyError, ValueError) as exc:
            reporter.error(f"--on-complete: bad placeholder {exc}")
            return
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
        if proc.returncode != 0:
            reporter.warning(f"--on-complete for series {receipt.series_uid} exited with {proc.returncode}")

    return run_command


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
    tls: TlsOn = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: TlsCa = None,
    tls_verify: TlsCheck = TlsVerify.host,
) -> None:
    """Query a PACS (C-FIND study root, QIDO-RS for http): one DICOM JSON (PS3.18) object per match.

    A peer that breaks off after some matches were printed: exit 1 (none printed: 69) and one error line.
    """
    from kaapcli.core.net import dicomweb, dimse
    from kaapcli.core.net.query import Query
    from kaapcli.exitcodes import KaapcliError

    target = _peer(ctx, peer)
    target = target.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, target.tls))
    q = Query.parse(level.value, key or [], ret or [], limit)
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

    Sub-operation counts are checked: anything failed, or fewer files than the peer reported, makes
    exit 1. `kaapcli query PEER -l series ... | kaapcli retrieve PEER --from-query - -o DIR` works.
    A peer that breaks off: exit 69, or 1 when some requests were done, and one error line.

    The C-MOVE receiver listens on --bind (default 127.0.0.1) and accepts only the PEER (its AE title and
    host, or --allow-aet / --allow-host): anything else pushing files is refused and reported.
    """
    from kaapcli.core.net.fetch import Fetcher
    from kaapcli.exitcodes import ExitCode, UnavailableError, UsageError

    target = _peer(ctx, peer)
    target = target.with_tls(_tls(ctx, tls, tls_cert, tls_key, tls_ca, tls_verify, target.tls))
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
    done = 0
    with Fetcher(target, out, method=method.value, calling_aet=calling, timeouts=timeouts, layout=layout,
                 move_aet=_aet(aet or calling, "--aet"), bind=bind, port=port, on_stored=on_stored,
                 allow_aets=[_aet(a, "--allow-aet") for a in allow_aet or []], allow_hosts=allow_host or []
                 ) as fetcher:
        for uids in requests:
            try:
                outcome = fetcher.fetch(uids)
            except UnavailableError as exc:
                if not done and not files:
                    raise
                reporter.error(f"{exc.message} ({len(requests) - done} of {len(requests)} requests not done)")
                failed += len(requests) - done
                break
            done += 1
            files += len(outcome.files)
            if fmt is Format.jsonl:
                sink.record(outcome.record())
            if not outcome.ok:
                failed += 1
                reporter.error(f"{outcome.request}: {outcome.message or 'failed'} ({outcome.completed} completed, "
                               f"{outcome.failed} failed, {outcome.warning} warning, {len(outcome.files)} received)")
    if fetcher.receiver is not None and fetcher.receiver.refused:
        reporter.warning(f"the C-MOVE receiver refused {sum(fetcher.receiver.refused.values())} connections")
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
