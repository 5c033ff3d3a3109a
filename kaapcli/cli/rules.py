"""``kaapcli rules check``, ``kaapcli trigger`` and ``kaapcli runs``: rules over series, and the run journal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, Reporter, RunOptions, batch_command, execute

RulesFile = Annotated[Path, typer.Option("--rules", "-r", help="Rules file (JSON or TOML).", show_default=False)]
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
    help="Index project (default: from a called AE title kp-<project>, else admin).")]

rules_app = typer.Typer(help="Check a rules file.", no_args_is_help=True)
runs_app = typer.Typer(help="The run journal: list runs, retry one.", invoke_without_command=True)


@rules_app.command("check")
def check(path: Annotated[Path, typer.Argument(help="Rules file (JSON or TOML).")]) -> None:
    """Validate a rules file and print the rules in the order they run (one JSON line each)."""
    from kaapcli.core import rules

    loaded = rules.run_order(rules.load_rules(path))
    for rule in loaded:
        kind = "group" if rule.is_group_rule else "series"
        typer.echo(json.dumps({"name": rule.name, "kind": kind, "priority": rule.priority,
                               "depends_on": list(rule.depends_on), "run": list(rule.run)}))
    Reporter("rules").info(f"{path}: {len(loaded)} rules ok")


@batch_command
def trigger(inputs: Inputs, rules_file: RulesFile, journal: JournalFile = None,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Value of {out} in run arguments "
                                                     "(default: the study directory).")] = None,
            *, run: RunOptions) -> None:
    """Batch mode: run the matching rules for every series found in INPUT.

    Series rules run once per matching series, in dependency and priority order, the series in
    parallel (--workers). Group rules (with "inputs") run once per complete group, after the series.
    Every run is appended to the journal; stdout lists the log file of each run.
    """
    from kaapcli.core import fsio, rules

    loaded = rules.load_rules(rules_file)
    journal_path = journal or rules.default_journal()
    files = fsio.collect_inputs(inputs)
    op = rules.TriggerOperator(loaded, journal_path, out)
    summary = execute(op, files, None, run, "trigger")
    code = int(summary.exit_code)
    group_rules = [r for r in loaded if r.is_group_rule]
    if group_rules and not summary.interrupted:
        code = max(code, _run_group_rules(group_rules, files, journal_path, out, run))
    raise typer.Exit(code)


def _run_group_rules(group_rules: list, files: list[Path], journal: Path, out: Path | None, run: RunOptions) -> int:
    from kaapcli.core import dicom, fsio, rules
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
    runner = rules.RuleRunner(group_rules, journal, out, jobs=run.workers or 2)
    for paths in by_series.values():
        runner.series_complete(paths)
    failed = False
    for record in runner.close():
        typer.echo(record.log)
        if record.status != "ok":
            failed = True
            reporter.error(f"{record.rule}: {record.series_uid}: {record.status} ({record.message}; log {record.log})")
    return 1 if failed else 0


@runs_app.callback()
def runs(ctx: typer.Context, journal: JournalFile = None,
         failed: Annotated[bool, typer.Option("--failed", help="Only runs that failed or timed out.")] = False,
         ) -> None:
    """List the runs of the journal: a table on a terminal, JSON lines when piped."""
    if ctx.invoked_subcommand is not None:
        return
    from kaapcli.core import rules

    records = rules.Journal(journal or rules.default_journal()).records()
    if failed:
        records = [r for r in records if r.status in ("failed", "timeout")]
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


@runs_app.command("retry")
def retry(run_id: Annotated[str, typer.Argument(help="Run id (from `kaapcli runs`).")],
          journal: JournalFile = None) -> None:
    """Run one journal entry's command again (same argv and parameters); appends a new run."""
    from kaapcli.core import rules
    from kaapcli.exitcodes import UsageError

    j = rules.Journal(journal or rules.default_journal())
    match = [r for r in j.records() if r.id == run_id]
    if not match:
        raise UsageError(f"{j.path}: no run with id {run_id}")
    old = match[0]
    record = rules.execute(old.rule, old.series_uid, old.argv, j, env=old.env)
    typer.echo(record.log)
    Reporter("retry").info(f"{old.rule}: {record.status} ({record.message})")
    raise typer.Exit(0 if record.status == "ok" else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(rules_app, name="rules")
    app.command()(trigger)
    app.add_typer(runs_app, name="runs")
