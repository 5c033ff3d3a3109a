"""``kaapcli watch``: a folder (or Orthanc's change feed) as a source of series for rules and the index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kaapcli.cli import rules as live  # the options every live pipeline command shares
from kaapcli.cli.common import Format, Reporter, Sink
from kaapcli.cli.net import DEFAULT_LAYOUT, Layout


def watch(
    ctx: typer.Context,
    inbox: Annotated[Path | None, typer.Argument(help="Folder to watch (files are taken once stable).",
                                                 show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Store: taken files are moved here under --layout (default: they stay where they are).")] = None,
    orthanc: Annotated[str | None, typer.Option(
        "--orthanc", metavar="URL", show_default=False,
        help="Poll this Orthanc's /changes feed instead of a folder (needs -o; credentials from "
             "KAAPCLI_ORTHANC_USER / KAAPCLI_ORTHANC_PASSWORD).")] = None,
    rules_file: live.LiveRules = None,
    dags: live.LiveDags = None,
    jobs: live.LiveJobs = 2,
    journal: live.JournalFile = None,
    index: live.LiveIndex = None,
    project: live.LiveProject = None,
    queue: live.LiveQueue = None,
    stage: live.LiveStage = None,
    s3: live.StageS3 = None,
    aet_convention: live.AetConvention = live.Convention.seed,
    layout: Layout = DEFAULT_LAYOUT,
    stable: Annotated[float, typer.Option("--stable", min=0.0,
                                          help="A dropped file is taken after this many seconds unchanged.")] = 2.0,
    series_timeout: Annotated[float, typer.Option(
        "--series-timeout", min=0.0, help="A series is complete after this many seconds without new files.")] = 10.0,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between polls.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Take what is there (or the whole change feed), "
                                                      "complete every series, then exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Watch a folder (DIANA's folder watcher) or Orthanc's change feed (ObservableOrthanc).

    Complete series are indexed (--index) and their rules run (--rules; with --queue on `kaapcli
    worker`s), as by kaapcli receive; stdout lists each stored file. Runs until SIGINT/SIGTERM
    (exit 0), or with --once until done.
    """
    from kaapcli.core import watch as w
    from kaapcli.core.hooks import IndexHook, RulesHook
    from kaapcli.core.net.scp import Receiver
    from kaapcli.exitcodes import UsageError

    if (inbox is None) == (orthanc is None):
        raise UsageError("give a folder to watch, or --orthanc URL (not both)")
    if orthanc and out is None:
        raise UsageError("--orthanc needs -o STORE: where the series are written")
    if inbox is not None and not inbox.is_dir():
        from kaapcli.exitcodes import NoInputError

        raise NoInputError(f"{inbox}: no such directory")
    reporter = Reporter("watch", quiet)
    sink = Sink(Format.paths)
    hooks: list[Any] = [lambda r: reporter.info(f"series complete: {r.series_uid} ({r.instances} files)")]
    if index is not None:
        hooks.append(IndexHook(index, project, ctx.find_root().obj, aet_convention.value))
    store = out or inbox
    assert store is not None
    queue_settings, staging = live.queue_setup(ctx, queue, stage, s3, store)
    rules_hook = (RulesHook(rules_file, journal, None, jobs, dags=dags, config=ctx.find_root().obj,
                            queue=queue_settings, stage=staging, log=reporter.warning) if rules_file else None)
    if rules_hook is not None:
        hooks.append(rules_hook)
    receiver = Receiver(store, layout=layout, series_timeout=series_timeout, hooks=hooks,
                        on_stored=lambda p: sink.write_line(str(p)), ready=rules_hook.ready if rules_hook else None)
    try:
        if orthanc:
            source: Any = w.OrthancWatch(orthanc, receiver, auth=w.environ_auth())
            reporter.info(f"watching {orthanc}/changes into {store} (Ctrl-C to stop)")
            w.run_forever(source.poll, receiver, interval, lambda done: once and done)
        else:
            source = w.FolderWatch(inbox, receiver, store=out is not None, stable=stable,  # type: ignore[arg-type]
                                   on_error=reporter.error)
            reporter.info(f"watching {inbox} (Ctrl-C to stop)")
            w.run_forever(source.scan, receiver, interval, lambda settling: once and settling == 0)
    except KeyboardInterrupt:
        reporter.info("stopping")
    finally:
        if rules_hook is not None:
            rules_hook.close()
    reporter.info(f"{receiver.stored} files taken")
    raise typer.Exit(0)


def register(app: typer.Typer) -> None:
    app.command()(watch)
