"""``kaapcli rules check``, ``kaapcli trigger`` and ``kaapcli runs``: rules over series, and the run journal."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from kaapcli.cli.common import Inputs, Reporter, RunOptions, batch_command, execute

RulesFile = Annotated[Path, typer.Option("--rules", help="Rules file (JSON or TOML).", show_default=False)]
JournalFile = Annotated[Path | None, typer.Option(
    "--journal", envvar="KAAPCLI_JOURNAL", show_default=False,
    help="Run journal (JSON lines; default: $XDG_DATA_HOME/kaapcli/runs.jsonl).")]
# The options of the live pipeline commands (receive, watch).
LiveRules = Annotated[Path | None, typer.Option(
    "--rules", show_default=False, help="Rules file: run the matching rules of each complete series.")]
LiveJobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Rules running at once.")]
LiveIndex = Annotated[str | None, typer.Option(
    "--index", show_default=False,
    help="Index each complete series here (a path, an http(s):// OpenSearch URL or a profile).")]
LiveProject = Annotated[str | None, typer.Option(
    "--project", show_default=False,
    help="Index project (default: with --aet-convention kp from a called AE title kp-<project>, else admin).")]
DagsFile = Annotated[Path | None, typer.Option(
    "--dags", envvar="KAAPCLI_DAGS", show_default=False,
    help="Kaapana: the DAG table of a trigger_rule.json (JSON/TOML: dag id -> command argv or rule fields).")]
LiveDags = DagsFile
QueuePanel = "Job queue (RQ on Redis)"
LiveQueue = Annotated[str | None, typer.Option(
    "--queue", envvar="KAAPCLI_QUEUE", metavar="URL|NAME", show_default=False, rich_help_panel=QueuePanel,
    help="Hand the runs to `kaapcli worker`s on this Redis (redis://HOST:PORT/DB, or a [queue.NAME] profile) "
         "instead of running them here; Redis down: they are journalled pending and enqueued when it is back.")]
LiveStage = Annotated[str | None, typer.Option(
    "--stage", metavar="s3://BUCKET/PREFIX", show_default=False, rich_help_panel=QueuePanel,
    help="With --queue, for workers without this file system: upload what each run reads there once; workers "
         "download it and upload what the run writes (S3 settings: --s3 or KAAPCLI_S3_*).")]
StageS3 = Annotated[str | None, typer.Option(
    "--s3", show_default=False, rich_help_panel=QueuePanel,
    help="The [s3.NAME] profile of --stage (else KAAPCLI_S3_ENDPOINT, _ACCESS_KEY, _SECRET_KEY).")]


class Convention(str, Enum):
    seed = "seed"
    kp = "kp"
    none = "none"


AetConvention = Annotated[Convention, typer.Option(
    "--aet-convention",
    help="What AE titles name in the index: seed = the called AE title is the dataset (Kaapana's "
         "`dcmsend --call <dataset>`); kp = called kp-<project>, calling kp-<dataset>; none.")]

def queue_setup(ctx: typer.Context, queue: str | None, stage: str | None, s3_profile: str | None,
                root: Path | None) -> tuple[Any, Any]:
    """``--queue``/``--stage``/``--s3`` → (QueueSettings or None, Stage or None); ``root`` is the tree whose
    paths --stage mirrors."""
    from kaapcli.exitcodes import ConfigError, UsageError

    if queue is None:
        if stage is not None:
            raise UsageError("--stage needs --queue: it ships series to queue workers")
        return None, None
    from kaapcli.core import queue as q

    config = ctx.find_root().obj
    settings = q.resolve_queue(queue, config)
    if stage is None:
        return settings, None
    profile = None
    if s3_profile:
        profile = config.profile("s3", s3_profile) if config is not None else None
        if profile is None:
            raise ConfigError(f"no [s3.{s3_profile}] profile in the config file")
    assert root is not None
    return settings, q.Stage(q.parse_stage(stage), str(root.absolute()), q.stage_settings(profile))


rules_app = typer.Typer(help="Check a rules file.", no_args_is_help=True)
runs_app = typer.Typer(help="The run journal: list runs, cancel one, retry one.", invoke_without_command=True)


@rules_app.command("check")
def check(path: Annotated[Path, typer.Argument(help="Rules file (JSON or TOML; a dcm-processor settings.json or "
                                                    "a Kaapana trigger_rule.json).")],
          dags: DagsFile = None) -> None:
    """Validate a rules file and print the rules in the order they run (one JSON line each).

    Refuses unknown keys and placeholders, missing dependencies, cycles, bad tags, expressions and
    queries, and any placeholder inside a shell or interpreter script (sh -c, python -c, ...).
    """
    from kaapcli.core import rules

    loaded = rules.run_order(rules.load_rules(path, dags))
    for rule in loaded:
        kind = "group" if rule.is_group_rule else "batch" if rule.is_batch_rule else "series"
        line = {"name": rule.name, "kind": kind, "sortPosition": rule.sort_position, "priority": rule.priority,
                "depends_on": list(rule.depends_on), "run": list(rule.run)}
        line.update({k: v for k, v in (("worker", rule.worker), ("callback", rule.callback), ("dag", rule.dag),
                                       ("description", rule.description)) if v})
        typer.echo(json.dumps(line))
    Reporter("rules").info(f"{path}: {len(loaded)} rules ok")


@batch_command
def trigger(ctx: typer.Context, inputs: Inputs, rules_file: RulesFile, journal: JournalFile = None,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Value of {out} in run arguments "
                                                     "(default: the study directory).")] = None,
            dags: DagsFile = None, queue: LiveQueue = None, stage: LiveStage = None, s3: StageS3 = None,
            wait: Annotated[bool, typer.Option(
                "--wait", rich_help_panel=QueuePanel,
                help="With --queue: wait until the workers finished every run; exit 1 if one did not succeed.")
            ] = False, *, run: RunOptions) -> None:
    """Batch mode: run the matching rules for every series found in INPUT.

    Series rules run once per matching series, in dependency, sortPosition and priority order, the
    series in parallel (--workers). Group rules (with "inputs") run once per complete group, and
    Kaapana DAGs with single_execution false once over all their series, after the series. A rule
    skipped because its dependency did not fire is no failure. Every run is appended to the journal;
    stdout lists the log file of each run. With --queue the runs go to queue workers instead (stdout:
    the run ids; with --wait, each run's host:log once it is over).
    """
    import os

    from kaapcli.core import fsio, rules

    loaded = rules.load_rules(rules_file, dags)
    journal_path = journal or rules.default_journal()
    files = fsio.collect_inputs(inputs)
    root = Path(os.path.commonpath([str(p.absolute()) for p in [*files, *([out] if out else [])]])) if files else None
    settings, staging = queue_setup(ctx, queue, stage, s3, root.parent if root and root.is_file() else root)
    dispatcher = None
    if settings is not None:
        from kaapcli.core.queue import Dispatcher

        dispatcher = Dispatcher(settings, rules.Journal(journal_path), staging, Reporter("queue", run.quiet).warning)
        dispatcher.sync()  # runs an earlier trigger left pending go first
    since = rules.now()
    op = rules.TriggerOperator(loaded, journal_path, out, queue=settings, stage=staging)
    summary = execute(op, files, None, run, "trigger")
    code = int(summary.exit_code)
    later = [r for r in loaded if r.is_group_rule or r.is_batch_rule]
    if later and not summary.interrupted:
        code = max(code, _run_group_rules(later, files, journal_path, out, run, dispatcher))
    if dispatcher is not None and not run.dry_run:
        code = max(code, _follow_queue(dispatcher, since, wait, run.quiet))
    raise typer.Exit(code)


def _follow_queue(dispatcher: Any, since: str, wait: bool, quiet: bool) -> int:
    """After ``trigger --queue``: hand over what is pending and print the run ids; with --wait, follow the runs
    to their end and print their logs (``host:path``: a log is on the worker that ran it)."""
    from kaapcli.core.runs import FAILED
    from kaapcli.exitcodes import ExitCode

    reporter = Reporter("queue", quiet)
    dispatcher.reload()
    dispatcher.sync()
    mine = [r.id for r in dispatcher.journal.records() if r.via == dispatcher.settings.label and r.start >= since]
    if not wait:
        for run_id in mine:
            typer.echo(run_id)
        pending = [r for r in dispatcher.open.values() if r.status == "pending"]
        if pending:
            reporter.warning(f"{len(pending)} runs pending ({pending[0].message}); `kaapcli runs sync --queue "
                             f"{dispatcher.settings.label}` or the next trigger or receive with this journal "
                             f"enqueues them")
            return int(ExitCode.TEMPFAIL)
        return 0
    records = dispatcher.wait(mine)
    bad = [r for r in records if r.status in FAILED]
    for record in records:
        if record.log:
            typer.echo(f"{record.host}:{record.log}")
    for record in bad:
        reporter.error(f"{record.rule}: {record.series_uid}: {record.status} on {record.host or '?'} "
                       f"({record.message}; log {record.host}:{record.log})")
    return 1 if bad else 0


def _run_group_rules(group_rules: list, files: list[Path], journal: Path, out: Path | None, run: RunOptions,
                     dispatcher: Any = None) -> int:
    """Group rules and Kaapana batch DAGs, over every series of the inputs (here, or on the queue)."""
    from kaapcli.core import dicom, fsio, rules
    from kaapcli.core.runs import FAILED, run_batch
    from kaapcli.exitcodes import KaapcliError

    reporter = Reporter("groups", run.quiet)
    by_series: dict[str, list[Path]] = {}
    for path in files:
        if fsio.is_dicom(path):
            try:
                by_series.setdefault(dicom.series_uid(path), []).append(path)
            except KaapcliError:
                continue  # already reported by the series pass
    if run.dry_run:
        reporter.info(f"{len(group_rules)} group rules over {len(by_series)} series: not run (dry run)")
        return 0
    groups = [r for r in group_rules if r.is_group_rule]
    runner = rules.RuleRunner(groups, journal, out, jobs=run.workers or 2, dispatcher=dispatcher)
    for paths in by_series.values():
        runner.series_complete(paths)
    records = runner.close()
    batch_rules = [r for r in group_rules if r.is_batch_rule]
    if batch_rules:
        tags = set().union(*(r.tags_needed() for r in batch_rules))
        series = [rules.series_from_files(sorted(paths), tags) for paths in by_series.values()]
        for firing in rules.batch_firings(batch_rules, series, out):
            jobs, decided = rules.plan([firing], runner.ctx)
            records += (dispatcher.submit(jobs, decided) if dispatcher is not None
                        else run_batch(jobs, runner.ctx.journal, decided))
    failed = False
    for record in records:
        if record.log:
            typer.echo(record.log)
        if record.status in FAILED:
            failed = True
            reporter.error(f"{record.rule}: {record.series_uid}: {record.status} ({record.message}; log {record.log})")
    return 1 if failed else 0


RunsQueue = Annotated[str | None, typer.Option(
    "--queue", envvar="KAAPCLI_QUEUE", metavar="URL|NAME", show_default=False,
    help="The queue of queued runs (redis://HOST:PORT/DB or a [queue.NAME] profile): first bring the journal up "
         "to date from it.")]


@runs_app.callback()
def runs(ctx: typer.Context, journal: JournalFile = None,
         failed: Annotated[bool, typer.Option("--failed", help="Only runs that failed, timed out or were "
                                                           "cancelled.")] = False,
         queue: RunsQueue = None,
         ) -> None:
    """List the runs of the journal: a table on a terminal, JSON lines when piped (secret-looking
    parameters masked). Runs handed to a queue show the host that ran them."""
    if ctx.invoked_subcommand is not None:
        return
    from kaapcli.core import rules
    from kaapcli.core.runs import FAILED, masked_env

    path = journal or rules.default_journal()
    if queue is not None:
        _sync(ctx, queue, path, strict=False)
    records = rules.Journal(path).records()
    for r in records:
        r.env = masked_env(r.env)
    if failed:
        records = [r for r in records if r.status in FAILED]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "rule", "series", "start", "end", "status", "exit", "host", "log")
        for r in records:
            table.add_row(r.id, r.rule, r.series_uid[-20:], r.start[:19], r.end[11:19], r.status,
                          "" if r.exit_code is None else str(r.exit_code), r.host, r.log)
        Console().print(table)
    else:
        from dataclasses import asdict

        for r in records:
            typer.echo(json.dumps(asdict(r), ensure_ascii=False))


def _sync(ctx: typer.Context, queue: str, journal: Path, strict: bool) -> Any:
    """Bring the journal up to date from a queue (and enqueue its pending runs); a Dispatcher."""
    from kaapcli.core import queue as q
    from kaapcli.core.runs import Journal
    from kaapcli.exitcodes import UnavailableError

    settings = q.resolve_queue(queue, ctx.find_root().obj)
    assert settings is not None
    dispatcher = q.Dispatcher(settings, Journal(journal))
    try:
        dispatcher.connection()
    except UnavailableError as exc:
        if strict:
            raise
        Reporter("runs").warning(f"{exc.message}: the journal may be behind the queue")
        return dispatcher
    dispatcher.sync()
    return dispatcher


@runs_app.command("sync")
def sync(ctx: typer.Context, queue: Annotated[str | None, typer.Option(
             "--queue", envvar="KAAPCLI_QUEUE", metavar="URL|NAME", show_default=False,
             help="The queue (redis://HOST:PORT/DB or a [queue.NAME] profile).")] = None,
         journal: JournalFile = None) -> None:
    """Enqueue the runs the journal holds pending for a queue (Redis was down when they were planned), and
    journal what its workers reported. Exit 69 when Redis is unreachable."""
    from kaapcli.exitcodes import UsageError

    if queue is None:
        raise UsageError("runs sync needs --queue URL (or KAAPCLI_QUEUE)")
    dispatcher = _sync(ctx, queue, journal or _default_journal(), strict=True)
    counts: dict[str, int] = {}
    for record in dispatcher.open.values():
        counts[record.status] = counts.get(record.status, 0) + 1
    Reporter("sync").info(f"{dispatcher.settings.label}: " + (", ".join(f"{n} {s}" for s, n in counts.items())
                                                              or "no open runs"))


@runs_app.command("cancel")
def cancel(ctx: typer.Context, run_id: Annotated[str, typer.Argument(help="Run id (from `kaapcli runs`).")],
           journal: JournalFile = None, queue: RunsQueue = None) -> None:
    """Stop a run: a queued one never starts, a running one's process group is killed (status cancelled), on
    this machine or, with --queue, on the worker that runs it."""
    from kaapcli.core import runs as jobs

    path = journal or _default_journal()
    record = jobs.Journal(path).find(run_id)
    if record is not None and record.via:
        from kaapcli.core import queue as q

        record = q.cancel_run(q.resolve_queue(queue, ctx.find_root().obj), jobs.Journal(path), run_id)
    else:
        record = jobs.cancel(jobs.Journal(path), run_id)
    Reporter("cancel").info(f"{record.rule}: {run_id} ({record.status}) cancelled")


@runs_app.command("retry")
def retry(ctx: typer.Context, run_id: Annotated[str, typer.Argument(help="Run id (from `kaapcli runs`).")],
          journal: JournalFile = None, queue: RunsQueue = None) -> None:
    """Run a journal entry again (same command, worker and parameters), then the runs that depended on it;
    each new run names the one it repeats (retry_of). stdout lists their log files; with --queue they go
    to the queue's workers instead (stdout: their run ids)."""
    from kaapcli.core import runs as jobs

    path = journal or _default_journal()
    reporter = Reporter("retry")
    if queue is not None:
        from kaapcli.core import queue as q

        settings = q.resolve_queue(queue, ctx.find_root().obj)
        assert settings is not None
        dispatcher = q.Dispatcher(settings, jobs.Journal(path), follow=False)
        records = jobs.retry(jobs.Journal(path), run_id, lambda batch, _journal: dispatcher.submit(batch))
        for record in records:
            typer.echo(record.id)
            reporter.info(f"{record.rule}: {record.status} on {settings.label} (retry of {record.retry_of})")
        raise typer.Exit(0 if all(r.status in ("queued", "pending", "skipped") for r in records) else 1)
    records = jobs.retry(jobs.Journal(path), run_id)
    for record in records:
        if record.log:
            typer.echo(record.log)
        reporter.info(f"{record.rule}: {record.status} ({record.message}; retry of {record.retry_of})")
    raise typer.Exit(0 if all(r.status == "ok" for r in records) else 1)


def _default_journal() -> Path:
    from kaapcli.core.rules import default_journal

    return default_journal()


def register(app: typer.Typer) -> None:
    app.add_typer(rules_app, name="rules")
    app.command()(trigger)
    app.add_typer(runs_app, name="runs")
