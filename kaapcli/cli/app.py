"""The ``kaapcli`` application: discovers command modules, applies config, maps errors to exit codes."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys
import traceback
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import click
import typer

import kaapcli
import kaapcli.cli
from kaapcli.exitcodes import ExitCode, KaapcliError

NOT_COMMANDS = {"app", "common", "gendocs"}
COMPLETE_VAR = "_KAAPCLI_COMPLETE"  # typer's shell completion calls back with it set

app = typer.Typer(
    name="kaapcli",
    help="Kaapana's DICOM processing operators as one Unix toolkit: each command reads files or "
         "directories and writes a directory.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kaapcli {kaapcli.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", envvar="KAAPCLI_CONFIG", help="Config file (default: ./kaapcli.toml, then "
        "~/.config/kaapcli/config.toml).", show_default=False)] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from kaapcli.core.config import load_config

    cfg = load_config(config)
    ctx.obj = cfg
    # Config-file defaults sit below options and KAAPCLI_* variables: click's default_map does exactly that.
    ctx.default_map = default_map(ctx.command, cfg.defaults)


def default_map(command: click.Command, defaults: dict[str, Any]) -> dict[str, Any]:
    """``[defaults]`` of the config file, spread over every (sub)command that has such a parameter."""
    result: dict[str, Any] = {}
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            result[name] = default_map(sub, defaults)
    else:
        for param in command.params:
            if param.name in defaults:
                result[param.name] = defaults[param.name]
    return result


def command_modules() -> list[str]:
    """The modules of ``kaapcli.cli`` that define commands (each has ``register(app)``)."""
    return sorted(info.name for info in pkgutil.iter_modules(kaapcli.cli.__path__)
                  if info.name not in NOT_COMMANDS and not info.name.startswith("_"))


_registered: set[str] = set()


def _register(modules: Iterable[str]) -> None:
    for name in modules:
        if name in _registered:
            continue
        _registered.add(name)
        try:
            importlib.import_module(f"kaapcli.cli.{name}").register(app)
        except Exception as exc:  # noqa: BLE001 - one broken module must not take every command down
            sys.stderr.write(f"kaapcli: warning: commands of {name} unavailable: {type(exc).__name__}: {exc}\n")


def click_command(args: Sequence[str] | None = None) -> click.Command:
    """The click command of the app.  Given the arguments of a run that names a command, only that command's
    module is imported (start-up time); otherwise (help, completion, docs) every command is."""
    from kaapcli.cli._commands import COMMANDS

    name = _command_name(args) if args is not None and COMPLETE_VAR not in os.environ else None
    _register([COMMANDS[name]] if name in COMMANDS else command_modules())
    command = typer.main.get_command(app)
    _add_debug(command)
    return command


def _enable_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        os.environ["KAAPCLI_DEBUG"] = "1"  # main() saw --debug already; commands that look at the variable see it


def _add_debug(command: click.Command) -> None:
    """Every command takes --debug (the batch commands declare their own): main() reads it from the arguments."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_debug(sub)
    if not any("--debug" in getattr(p, "opts", ()) for p in command.params):
        command.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, callback=_enable_debug,
                                           help="Show tracebacks and library warnings."))


def _command_name(args: Sequence[str]) -> str | None:
    """The command a run names: its first argument that is neither a root option nor an option's value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure becomes one line on stderr and an exit code of the table."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("KAAPCLI_DEBUG", "") not in ("", "0", "false", "no")
    signal.signal(signal.SIGTERM, _sigterm)
    if not debug:  # library warnings (pydicom's "Expected explicit VR", ...) are not our one-line messages
        warnings.simplefilter("ignore")
    try:
        result = click_command(args).main(args=args, prog_name="kaapcli", standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE if exc.exit_code == 2 else int(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.stderr.write("kaapcli: interrupted\n")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `kaapcli ... | head`: the reader is gone; end quietly, as SIGPIPE would
        return 128 + signal.SIGPIPE
    except KaapcliError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"kaapcli: error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        return int(exc.code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 70
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"kaapcli: internal error: {type(exc).__name__}: {exc} (rerun with --debug)\n")
        return ExitCode.SOFTWARE


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # finish like Ctrl-C: in-flight temp files removed, manifest saved
