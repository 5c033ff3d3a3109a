"""Shared CLI pieces: option bundles, the stdout sink, the stderr reporter, running a batch.

Every batch command is declared with :func:`batch_command`, which adds the same
``--workers --shard --force --dry-run --format -q --debug`` options to it (so they
mean the same everywhere) and hands the command a :class:`RunOptions`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from kaapcli.exitcodes import ExitCode, UsageError

if TYPE_CHECKING:  # keeps the engine import out of --help
    from kaapcli.core.batch import BatchSummary, ItemResult, Operator


class Format(str, Enum):
    paths = "paths"
    jsonl = "jsonl"


Inputs = Annotated[list[str], typer.Argument(
    help="DICOM files, directories (recursed, sorted) or - to read paths from stdin.", show_default=False)]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory.", show_default=False)]


def import_numpy() -> None:
    """Import numpy (for a command whose core module needs it) with OpenBLAS on one thread, the environment left
    as it was.  kaapcli's linear algebra is on 3x3 and 4x4 matrices, which OpenBLAS never splits over threads,
    yet starting its threads costs ~40 ms of CPU at every start (measured on 2 cores).  A user's own
    OPENBLAS_NUM_THREADS is respected; hooks and other children get the environment unchanged."""
    if "numpy" in sys.modules:
        return
    unset = "OPENBLAS_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        if unset:
            del os.environ["OPENBLAS_NUM_THREADS"]


def debug_enabled() -> bool:
    return os.environ.get("KAAPCLI_DEBUG", "") not in ("", "0", "false", "no")


@dataclass
class RunOptions:
    """The options every batch command shares."""

    workers: int | None = None
    shard: str | None = None
    force: bool = False
    dry_run: bool = False
    format: Format = Format.paths
    quiet: bool = False
    debug: bool = False

    def batch(self) -> Any:
        from kaapcli.core.batch import BatchOptions, parse_shard

        return BatchOptions(workers=self.workers, shard=parse_shard(self.shard) if self.shard else None,
                            force=self.force, dry_run=self.dry_run, debug=self.debug)


def _run_options_parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("workers", kw, default=None, annotation=Annotated[int | None, typer.Option(
            "--workers", "-w", min=1, envvar="KAAPCLI_WORKERS",
            help="Worker processes (default: the number of cores).", rich_help_panel="Batch options")]),
        inspect.Parameter("shard", kw, default=None, annotation=Annotated[str | None, typer.Option(
            "--shard", metavar="I/N", envvar="KAAPCLI_SHARD",
            help="Process only shard I of N (stable hash of each item; 1-based).",
            rich_help_panel="Batch options")]),
        inspect.Parameter("force", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--force", help="Rebuild outputs even when up to date.", rich_help_panel="Batch options")]),
        inspect.Parameter("dry_run", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--dry-run", "-n", help="Report what would be done; write nothing.", rich_help_panel="Batch options")]),
        inspect.Parameter("format", kw, default=Format.paths, annotation=Annotated[Format, typer.Option(
            "--format", help="stdout: output paths, or one JSON record per input item.",
            rich_help_panel="Batch options")]),
        inspect.Parameter("quiet", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--quiet", "-q", help="No progress or summary on stderr (errors still shown).",
            rich_help_panel="Batch options")]),
        inspect.Parameter("debug", kw, default=False, annotation=Annotated[bool, typer.Option(
            "--debug", envvar="KAAPCLI_DEBUG", help="Show tracebacks.", rich_help_panel="Batch options")]),
    ]


def batch_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the shared batch options; it receives them as ``run: RunOptions``."""
    extra = _run_options_parameters()
    names = [p.name for p in extra]
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations in fn's module
    params = [p.replace(annotation=hints.get(p.name, p.annotation))
              for p in sig.parameters.values() if p.name != "run"]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = RunOptions(**{name: kwargs.pop(name) for name in names})
        run.debug = run.debug or debug_enabled()
        return fn(*args, run=run, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params + extra}
    del wrapper.__wrapped__  # typer must see the new signature, not the original
    return wrapper


# --------------------------------------------------------------------------- stderr

class Reporter:
    """People-facing output on stderr: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, label: str, quiet: bool = False):
        self.quiet = quiet
        # decided without rich: importing it costs ~35 ms of every start, and pipes and CI logs never use it
        self.live = not quiet and sys.stderr.isatty() and os.environ.get("TERM", "") not in ("dumb", "unknown")
        self.console: Any = None
        if self.live:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False)
        self.progress: Any = None
        self.task: Any = None
        self.label = label
        self.files = self.nbytes = 0  # done so far, for the rate column

    def __enter__(self) -> Reporter:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), _rate_column(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console, transient=True,
                                     redirect_stdout=False, redirect_stderr=False)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=None, files=0, nbytes=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def total(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=n)

    def advance(self, nfiles: int = 1, nbytes: int = 0) -> None:
        """One item done, holding ``nfiles`` input files of ``nbytes`` bytes (for the rate column)."""
        self.files += nfiles
        self.nbytes += nbytes
        if self.progress is not None:
            self.progress.update(self.task, advance=1, files=self.files, nbytes=self.nbytes)

    def line(self, text: str, style: str = "") -> None:
        if self.live:
            self.console.print(text, style=style or None, markup=False, soft_wrap=True)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def error(self, text: str) -> None:
        self.line(f"error: {text}", "red")

    def warning(self, text: str) -> None:
        if not self.quiet:
            self.line(f"warning: {text}", "yellow")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.line(text)


def _rate_column() -> Any:
    """A progress column: files/s and MB/s since the start (rates of the work, not of the items: a
    per-series command advances the bar once per series)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.elapsed
            if not elapsed:
                return Text("")
            files, nbytes = task.fields.get("files", 0), task.fields.get("nbytes", 0)
            rate = f"{files / elapsed:.0f} files/s" + (f", {nbytes / 1e6 / elapsed:.1f} MB/s" if nbytes else "")
            return Text(rate, style="progress.data.speed")

    return RateColumn()


# --------------------------------------------------------------------------- stdout

class Sink:
    """The one place data goes to stdout: output paths, or JSON records.

    Lines are written as bytes: a file name that is not UTF-8 goes out as the bytes it has on disk, so the next
    command of a pipe opens the same file.  A reader that goes away (``| head``) ends the run quietly (exit 141).
    """

    def __init__(self, fmt: Format, reporter: Reporter | None = None):
        self.fmt = fmt
        # When stdout and stderr are the same terminal, data lines go through the live console so the
        # bar is redrawn below them; when stdout is a pipe, it gets plain lines only.
        self.via_console = reporter is not None and reporter.live and sys.stdout.isatty()
        self.reporter = reporter

    def write_line(self, text: str) -> None:
        if self.via_console and self.reporter is not None:
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self.reporter.console.print(shown, markup=False, highlight=False, soft_wrap=True)
            return
        # A reader that went away raises BrokenPipeError here; main() ends the run quietly with 141
        raw = getattr(sys.stdout, "buffer", None)
        if raw is not None:
            sys.stdout.flush()
            raw.write(os.fsencode(text) + b"\n")
            raw.flush()
        else:
            sys.stdout.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\n")
            sys.stdout.flush()

    def write_lines(self, lines: list[str]) -> None:
        """Several lines at once: one write when stdout is no console (a batch of thousands costs one call)."""
        raw = getattr(sys.stdout, "buffer", None)
        if self.via_console or raw is None:
            for text in lines:
                self.write_line(text)
        elif lines:
            sys.stdout.flush()
            raw.write(b"".join(os.fsencode(text) + b"\n" for text in lines))
            raw.flush()

    def record(self, obj: dict[str, Any]) -> None:
        from kaapcli.core.fsio import dumps

        self.write_line(dumps(obj))

    def result(self, result: ItemResult) -> None:
        if self.fmt is Format.jsonl:
            self.record(result.record())
        elif result.status == "ok" or result.reason == "up-to-date":
            for path in result.outputs:
                self.write_line(path)


def fail(message: str, code: ExitCode = ExitCode.USAGE, hint: str = "") -> NoReturn:
    from kaapcli.exitcodes import KaapcliError

    raise KaapcliError(message, code=code, hint=hint)


# --------------------------------------------------------------------------- running a batch

def run_batch(op: Operator, inputs: Sequence[str], out: Path | None, run: RunOptions,
              label: str | None = None) -> NoReturn:
    """Stream ``inputs`` through the batch engine with ``op``, render, and exit with its code."""
    summary = execute(op, batch_inputs(inputs, out), out, run, label or op.name, sources=inputs)
    raise typer.Exit(int(summary.exit_code))


def batch_inputs(inputs: Sequence[str], out: Path | None) -> Iterator[Any]:
    """The input entries of a batch command: named inputs checked first (missing or not a regular file or
    directory: exit 66; inside OUT: exit 2), then walked lazily, OUT and its run state left out."""
    from kaapcli.core import fsio

    fsio.check_named(inputs)
    prune: list[Path] = []
    if out is not None:
        fsio.check_not_inside(inputs, out)
        prune = [out, fsio.state_dir(out)]
    return fsio.iter_inputs(inputs, prune=prune)


def execute(op: Operator, files: Iterable[Any], out: Path | None, run: RunOptions, label: str,
            items: Iterable[Any] | None = None, sources: Sequence[str] = ()) -> BatchSummary:
    from kaapcli.core import batch

    if run.shard:
        batch.parse_shard(run.shard)  # validate before any work
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"{out}: output exists and is not a directory")
    detailed = [0]  # dry-run plans shown in full: the first (and with --debug every) one, the others one line each
    with Reporter(label, run.quiet) as reporter:
        sink = Sink(run.format, reporter)

        def on_result(result: ItemResult) -> None:
            reporter.advance(0 if result.reason == "not-input" else result.nfiles, result.nbytes)
            if result.status == "failed":
                reporter.error(result.message)
            for warning in result.warnings:
                reporter.warning(f"{result.input}: {warning}")
            if run.dry_run and result.message and result.status != "failed":
                first, *rest = result.message.splitlines()
                if rest and (run.debug or not detailed[0]):
                    detailed[0] += 1
                    reporter.info(f"{result.input}: {first}\n" + "\n".join(rest))
                else:
                    reporter.info(f"{result.input}: {first}" + (f" ({len(rest)} more lines: --debug or --format "
                                                                 "jsonl)" if rest else ""))
            sink.result(result)

        summary = batch.run_batch(op, files, out, run.batch(), items=items,
                                  on_total=reporter.total, on_result=on_result, keep_results=False)
    if summary.interrupted:
        done = summary.count("ok") + summary.count("failed")
        rolled = f"; {summary.rolled_back} in flight were not written" if summary.rolled_back else ""
        reporter.error(f"interrupted after {done} items{rolled}: everything reported is on disk and recorded, "
                       "a re-run continues from there")
    if summary.no_input:
        where = ", ".join(("stdin" if s == "-" else s) for s in sources) or "the inputs"
        skipped = summary.count("skipped", "not-input") + summary.count("skipped", "not-regular")
        reporter.error(f"no {getattr(op, 'input_kind', 'DICOM input')} found in {where}"
                       + (f" ({skipped} other file{'s' if skipped != 1 else ''} skipped)" if skipped else ""))
    reporter.info(summary.line())
    return summary
