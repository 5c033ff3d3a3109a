"""``kaapcli collect``: fetch the studies of a worklist CSV, optionally anonymize and forward them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kaapcli.cli.anonymize import _read_key
from kaapcli.cli.common import Format, Reporter, Sink
from kaapcli.cli.net import CallingAet, ConnectTimeout, Method, Timeout, _aet, _peer, _route_logs, _timeouts


def collect(
    ctx: typer.Context,
    worklist: Annotated[Path, typer.Argument(help="CSV with a header: AccessionNumber, or PatientID and StudyDate; "
                                             "or the JSON lines of `kaapcli query --worklist`.",
                                             show_default=False)],
    source: Annotated[str, typer.Option("--from", metavar="PEER", show_default=False,
                                        help="Where the studies are: AET@host:port, a DICOMweb root or a profile.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)],
    anonymize: Annotated[bool, typer.Option("--anonymize", help="De-identify (PS3.15 Basic Profile, keyed) "
                                            "into OUT/anonymized.")] = False,
    key: Annotated[str | None, typer.Option("--key", help="Anonymization key (or KAAPCLI_ANON_KEY).",
                                            show_default=False)] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Read the key from this file.",
                                                  show_default=False)] = None,
    forward: Annotated[str | None, typer.Option("--to", metavar="PEER", show_default=False,
                                                help="Forward the (anonymized) files to this peer.")] = None,
    method: Annotated[Method, typer.Option("--method", help="C-GET, or C-MOVE to a built-in receiver "
                                           "(DICOMweb peers: WADO-RS).")] = Method.get,
    aet: Annotated[str | None, typer.Option("--aet", help="C-MOVE destination AE title (default: calling AE).",
                                            show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="C-MOVE receiver port.")] = 11112,
    bind: Annotated[str, typer.Option("--bind", help="C-MOVE: address of the built-in receiver (a remote PACS "
                                      "needs one it can reach; it accepts only the --from peer).")] = "127.0.0.1",
    results: Annotated[Path | None, typer.Option(
        "--results", show_default=False, help="Result CSV, also the resume point (default: OUT/collect-results.csv).")
    ] = None,
    calling_aet: CallingAet = "KAAPCLI",
    timeout: Timeout = None,
    connect_timeout: ConnectTimeout = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (errors still shown).")] = False,
) -> None:
    """For each worklist row: find its studies, retrieve them into OUT/studies, optionally anonymize and forward.

    Writes one result row per input row (the input columns plus status ok|not-found|failed, studies,
    files, outputs, message) to the result CSV and prints its path. Re-running skips the rows already
    ok and retries the rest. Exit 1 when a row failed or found nothing.
    """
    from kaapcli.core import collect as c
    from kaapcli.core.net.fetch import Fetcher

    secret = _read_key(key, key_file) if anonymize else None
    peer = _peer(ctx, source)
    target = _peer(ctx, forward) if forward else None
    timeouts = _timeouts(timeout, connect_timeout)
    calling = _aet(calling_aet, "--calling-aet")
    columns, rows = c.read_worklist(worklist)
    results_path = results or out / "collect-results.csv"
    done = c.previous_results(results_path)
    reporter = Reporter("collect", quiet)
    _route_logs(reporter)
    anonymizer = _anonymizer(secret) if secret else None
    forwarder = _forwarder(target, calling, timeouts) if target else None
    by_key = {row.key: done.get(row.key) for row in rows}
    with Fetcher(peer, out / "studies", method=method.value, calling_aet=calling, timeouts=timeouts,
                 move_aet=_aet(aet or calling, "--aet"), bind=bind, port=port) as fetcher, reporter:
        todo = list(c.pending(rows, done))
        reporter.total(len(todo))
        for row in todo:
            result = c.collect_row(row, fetcher, out, anonymize=anonymizer, forward=forwarder)
            by_key[row.key] = result.csv_row()
            c.write_results(results_path, columns, [by_key[r.key] or {} for r in rows])  # after every row
            reporter.advance()
            if result.status != "ok":
                reporter.error(f"{worklist}: row {row.number}: {result.status}: {result.message}")
    final = [by_key[r.key] or {} for r in rows]
    c.write_results(results_path, columns, final)
    Sink(Format.paths).write_line(str(results_path))
    bad = sum(1 for r in final if r.get("status") != "ok")
    reporter.info(f"{len(rows)} rows, {len(rows) - len(todo)} already done, {bad} not ok")
    raise typer.Exit(1 if bad else 0)


def _anonymizer(secret: bytes) -> Any:
    from kaapcli.core.anonymize import AnonymizeOperator, Options
    from kaapcli.core.batch import BatchOptions, run_batch
    from kaapcli.exitcodes import KaapcliError

    op = AnonymizeOperator(secret, Options())

    def anonymize(files: list[Path], dest: Path) -> list[Path]:
        summary = run_batch(op, files, dest, BatchOptions())
        failed = [r.message for r in summary.results if r.status == "failed"]
        if failed:
            raise KaapcliError(f"anonymize: {len(failed)} files failed, first: {failed[0]}")
        return [Path(p) for r in summary.results for p in r.outputs]

    return anonymize


def _forwarder(target: Any, calling: str, timeouts: Any) -> Any:
    from kaapcli.core.net import dicomweb, dimse
    from kaapcli.exitcodes import KaapcliError

    def forward(files: list[Path]) -> None:
        results: list[Any] = []
        instances = [dimse.scan(p) for p in files]
        if target.web:
            dicomweb.stow(instances, target, timeouts, results.append)
        else:
            dimse.send(instances, target, calling_aet=calling, timeouts=timeouts, on_result=results.append)
        failed = [r.message for r in results if r.status == "failed"]
        if failed:
            raise KaapcliError(f"forward to {target}: {len(failed)} of {len(files)} failed, first: {failed[0]}")

    return forward


def register(app: typer.Typer) -> None:
    app.command()(collect)
