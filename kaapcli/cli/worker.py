"""``kaapcli worker``: an RQ worker that runs the rule jobs ``receive``/``watch``/``trigger --queue`` enqueue."""

from __future__ import annotations

from typing import Annotated

import typer

from kaapcli.cli.common import Reporter
from kaapcli.cli.rules import JournalFile

PANEL = "Object store (for --stage)"


def worker(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Option(
        "--queue", envvar="KAAPCLI_QUEUE", metavar="URL|NAME", show_default=False,
        help="The Redis of the queue: redis://[:PASSWORD@]HOST:PORT/DB, or a [queue.NAME] profile.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Jobs at once (worker processes).")] = 1,
    burst: Annotated[bool, typer.Option("--burst", help="Stop once the queues are empty (Slurm, CI).")] = False,
    listen: Annotated[list[str] | None, typer.Option(
        "--listen", metavar="QUEUE", show_default=False,
        help="Queues to take jobs from, first first (repeatable; default high, default, low). dcm-processor's "
             "queue names (\"priority\": \"gpu\") are queues too.")] = None,
    heartbeat: Annotated[float, typer.Option(
        "--heartbeat", min=1.0,
        help="Seconds: a job whose worker sent no heartbeat for this long counts as lost (retried or "
             "failed); workers heartbeat every third of it.")] = 30.0,
    journal: JournalFile = None,
    name: Annotated[str | None, typer.Option(
        "--name", show_default=False, help="Worker name prefix in the dashboard (default: the host name).")] = None,
    s3: Annotated[str | None, typer.Option(
        "--s3", show_default=False, rich_help_panel=PANEL,
        help="The [s3.NAME] profile for staged runs (else KAAPCLI_S3_ENDPOINT, _ACCESS_KEY, _SECRET_KEY).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings on stderr.")] = False,
) -> None:
    """Run the rule jobs of a queue (RQ on Redis), as many at once as --jobs, until SIGINT/SIGTERM.

    Each job runs as it would on the receiving node: the same command or Python worker, environment,
    placeholders and journal (--journal, on this machine; its logs too). Series reach the worker by a
    shared file system (the same paths) or, for runs enqueued with --stage, through S3. SIGTERM lets
    running jobs finish; a second one kills them. A job of a worker that died is retried (or failed)
    once its heartbeat expired (--heartbeat).
    """
    from kaapcli.core import queue as q
    from kaapcli.exitcodes import ConfigError, UsageError

    if queue is None:
        raise UsageError("worker needs --queue redis://HOST:PORT/DB (or KAAPCLI_QUEUE, or a [queue.NAME] profile)")
    config = ctx.find_root().obj
    settings = q.resolve_queue(queue, config)
    assert settings is not None
    s3_settings = None
    if s3 is not None:
        profile = config.profile("s3", s3) if config is not None else None
        if profile is None:
            raise ConfigError(f"no [s3.{s3}] profile in the config file")
        s3_settings = q.stage_settings(profile)
    queues = tuple(dict.fromkeys(x.strip() for item in listen or [] for x in item.split(",") if x.strip()))
    options = q.WorkerOptions(settings, queues or q.QUEUES, jobs, burst, heartbeat, journal, name or "", s3_settings,
                              quiet)
    reporter = Reporter("worker", quiet)
    reporter.info(f"{jobs} worker process{'es' if jobs > 1 else ''} on {settings.label}, queues "
                  f"{', '.join(options.queues)}{' (burst)' if burst else ''}")
    raise typer.Exit(q.serve(options, reporter.info))


def register(app: typer.Typer) -> None:
    app.command()(worker)
