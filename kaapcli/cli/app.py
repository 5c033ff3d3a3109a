"""The ``kaapcli`` application: discovers command modules, applies config, maps errors to exit codes."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import typer

import kaapcli
import kaapcli.cli
from kaapcli.exitcodes import ExitCode, KaapcliError

NOT_COMMANDS = {"app", "common", "gendocs"}

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


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(kaapcli.cli.__path__), key=lambda m: m.name):
        if info.name not in NOT_COMMANDS and not info.name.startswith("_"):
            try:
                module = importlib.import_module(f"kaapcli.cli.{info.name}")
                module.register(app)
            except Exception as exc:  # noqa: BLE001 - one broken module must not take every command down
                sys.stderr.write(f"kaapcli: warning: commands of {info.name} unavailable: "
                                 f"{type(exc).__name__}: {exc}\n")


_register_commands()


def click_command() -> click.Command:
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure becomes one line on stderr and an exit code of the table."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("KAAPCLI_DEBUG", "") not in ("", "0", "false", "no")
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `kaapcli ... | head` ends like any Unix tool
    signal.signal(signal.SIGTERM, _sigterm)
    if not debug:  # library warnings (pydicom's "Expected explicit VR", ...) are not our one-line messages
        warnings.simplefilter("ignore")
    try:
        result = click_command().main(args=args, prog_name="kaapcli", standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE if exc.exit_code == 2 else int(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.stderr.write("kaapcli: interrupted\n")
        return ExitCode.INTERRUPTED
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
