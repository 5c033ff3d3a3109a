"""``kaapcli rules check``, ``kaapcli trigger`` and ``kaapcli runs``: rules over series, and the run journal."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

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


class Convention(str, Enum):
    seed = "seed"
    kp = "kp"
    none = "none"


AetConvention = Annotated[Convention, typer.Option(
    "--aet-convention",
    help="What AE titles name in the index: seed = the called AE title is the dataset (Kaapana's "
         "`dcmsend --call <dataset>`); kp = called kp-<project>, calling kp-<dataset>; none.")]

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
def trigger(inputs: Inputs, rules_file: RulesFile, journal: JournalFile = None,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Value of {out} in run arguments "
                                                     "(default: the study directory).")] = None,
            dags: DagsFile = None, *, run: RunOptions) -> None:
    """Batch mode: run the matching rules for every series found in INPUT.

    Series rules run once per matching series, in dependency, sortPosition and priority order, the
    series in parallel (--workers). Group rules (with "inputs") run once per complete group, and
    Kaapana DAGs with single_execution false once over all their series, after the series. A rule
    skipped because its dependency did not fire is no failure. Every run is appended to the journal;
    stdout lists the log file of each run.
    """
    from kaapcli.core import fsio, rules

    loaded = rules.load_rules(rules_file, dags)
    journal_path = journal or rules.default_journal()
    files = fsio.collect_inputs(inputs)
    op = rules.TriggerOperator(loaded, journal_path, out)
    summary = execute(op, files, None, run, "trigger")
    code = int(summary.exit_code)
    later = [r for r in loaded if r.is_group_rule or r.is_batch_rule]
    if later and not summary.interrupted:
        code = max(code, _run_group_rules(later, files, journal_path, out, run))
    raise typer.Exit(code)


def _run_group_rules(group_rules: list, files: list[Path], journal: Path, out: Path | None, run: RunOptions) -> int:
    """Group rules and Kaapana batch DAGs, over every series of the inputs."""
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
    runner = rules.RuleRunner(groups, journal, out, jobs=run.workers or 2)
    for paths in by_series.values():
        runner.series_complete(paths)
    records = runner.close()
    batch_rules = [r for r in group_rules if r.is_batch_rule]
    if batch_rules:
        tags = set().union(*(r.tags_needed() for r in batch_rules))
        series = [rules.series_from_files(sorted(paths), tags) for paths in by_series.values()]
        for firing in rules.batch_firings(batch_rules, series, out):
            jobs, decided = rules.plan([firing], runner.ctx)
            records += run_batch(jobs, runner.ctx.journal, decided)
    failed = False
    for record in records:
        if record.log:
            typer.echo(record.log)
        if record.status in FAILED:
            failed = True
            reporter.error(f"{record.rule}: {record.series_uid}: {record.status} ({record.message}; log {record.log})")
    return 1 if failed else 0


@runs_app.callback()
def runs(ctx: typer.Context, journal: JournalFile = None,
         failed: Annotated[bool, typer.Option("--failed", help="Only runs that failed, timed out or were "
                                                           "cancelled.")] = False,
         ) -> None:
    """List the runs of the journal: a table on a terminal, JSON lines when piped (secret-looking
    parameters masked)."""
    if ctx.invoked_subcommand is not None:
        return
    from kaapcli.core import rules
    from kaapcli.core.runs import FAILED, masked_env

    records = rules.Journal(journal or rules.default_journal()).records()
    for r in records:
        r.env = masked_env(r.env)
    if failed:
        records = [r for r in records if r.status in FAILED]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "rule", "series", "start", "end", "status", "exit", "log")
        for r in records:
            table.add_row(r.id, r.rule, r.series_uid[-20:], r.start[:19], r.end[11:19], r.status,
                          "" if r.exit_code is None else str(r.exit_code), r.log)
        Console().print(table)
    else:
        from dataclasses import asdict

        for r in records:
            typer.echo(json.dumps(asdict(r), ensure_ascii=False))


@runs_app.command("cancel")
def cancel(run_id: Annotated[str, typer.Argument(help="Run id (from `kaapcli runs`).")],
           journal: JournalFile = None) -> None:
    """Stop a run: a queued one never starts, a running one's process group is killed (status cancelled)."""
    from kaapcli.core import runs as jobs

    record = jobs.cancel(jobs.Journal(journal or _default_journal()), run_id)
    Reporter("cancel").info(f"{record.rule}: {run_id} ({record.status}) cancelled")


@runs_app.command("retry")
def retry(run_id: Annotated[str, typer.Argument(help="Run id (from `kaapcli runs`).")],
          journal: JournalFile = None) -> None:
    """Run a journal entry again (same command, worker and parameters), then the runs that depended on it;
    each new run names the one it repeats (retry_of). stdout lists their log files."""
    from kaapcli.core import runs as jobs

    records = jobs.retry(jobs.Journal(journal or _default_journal()), run_id)
    reporter = Reporter("retry")
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
