"""The ``kaapcli`` application: a root group that imports a command's module only when that command runs,
applies config, maps errors to exit codes.

The root is a plain click group (typer costs ~50 ms to import, more than the whole of ``kaapcli --help``);
each command module declares its commands with typer and is loaded on first use; only the command named is
built (typer inspects every parameter of what it builds), then given its examples and old option spellings
(``helpdata.py``, ``vocabulary.py``).  ``--help`` lists the commands in their panels
from the generated table ``kaapcli/cli/_commands.py`` (``make docs``; a test fails on drift), and
shell completion never reaches this module (``kaapcli/cli/complete.py`` answers it from the same table).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import click

import kaapcli
import kaapcli.cli
from kaapcli.cli.complete import COMPLETE_VAR
from kaapcli.exitcodes import ExitCode, KaapcliError

NOT_COMMANDS = {"app", "common", "complete", "gendocs", "helpdata", "vocabulary"}
HELP = ("Kaapana's DICOM processing operators as one Unix toolkit: each command reads files or directories "
        "and writes a directory.")
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def command_modules() -> list[str]:
    """The modules of ``kaapcli.cli`` that define commands (each has ``register(app)``)."""
    import pkgutil

    return sorted(info.name for info in pkgutil.iter_modules(kaapcli.cli.__path__)
                  if info.name not in NOT_COMMANDS and not info.name.startswith("_"))


class RootGroup(click.Group):
    """The commands of the generated table, each module imported when one of its commands is resolved."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.probes: dict[str, Any] = {}  # module -> the typer app its register() filled (None: it failed)
        self.modules: dict[str, str] = {}  # command name -> the module that defined it

    def load(self, module: str, name: str | None = None) -> None:
        """Import one command module and add its command ``name`` (default: all of them), built by typer, to the
        group.  typer inspects every parameter of what it builds (~4 ms a command): a run builds only its own."""
        import typer

        if module not in self.probes:
            self.probes[module] = typer.Typer(add_completion=False, rich_markup_mode=None,
                                              pretty_exceptions_enable=False)
            try:
                importlib.import_module(f"kaapcli.cli.{module}").register(self.probes[module])
            except Exception as exc:  # noqa: BLE001 - one broken module must not take every command down
                sys.stderr.write(f"kaapcli: warning: commands of {module} unavailable: {type(exc).__name__}: "
                                 f"{exc}\n")
                self.probes[module] = None
        probe = self.probes[module]
        if probe is None:
            return

        def wanted(command: str) -> bool:
            return command not in self.commands and name in (None, command)

        part = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
        part.registered_commands = [info for info in probe.registered_commands if wanted(
            info.name or typer.main.get_command_name(info.callback.__name__))]
        part.registered_groups = [info for info in probe.registered_groups if wanted(info.name)]
        if not part.registered_commands and not part.registered_groups:
            return
        from kaapcli.cli import vocabulary

        for command_name, command in typer.main.get_group(part).commands.items():
            _one_suggestion(command)
            _add_debug(command)
            _add_examples(command, command_name)
            vocabulary.apply(command, command_name)
            self.add_command(command, command_name)
            self.modules[command_name] = module

    def load_all(self) -> RootGroup:
        for module in command_modules():
            self.load(module)
        return self

    def list_commands(self, ctx: click.Context) -> list[str]:
        from kaapcli.cli._commands import COMMANDS

        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from kaapcli.cli._commands import COMMANDS

        if cmd_name not in self.commands:
            if cmd_name in COMMANDS:
                self.load(COMMANDS[cmd_name], cmd_name)
            else:  # a name the table does not know (a typo, or a command added since `make docs`): ask all
                self.load_all()
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands in the panels of the generated table (the README's groups), each with its short help;
        the commands not loaded yet are described from the table."""
        from kaapcli.cli._commands import LISTING, PANELS

        names = [name for name in self.list_commands(ctx) if name in self.commands or name in LISTING]
        commands = {name: self.commands.get(name) or click.Command(name, **LISTING[name]) for name in names}
        commands = {name: cmd for name, cmd in commands.items() if not cmd.hidden}
        if not commands:
            return
        width = max(len(name) for name in commands)  # one column for every panel
        limit = formatter.width - 6 - width
        placed = {name for members in PANELS.values() for name in members}
        panels = {**PANELS, "Other commands": [name for name in commands if name not in placed]}
        for title, members in panels.items():
            rows = [(name.ljust(width), commands[name].get_short_help_str(limit)) for name in members
                    if name in commands]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                              list[str]]:
        name = args[0]
        if self.get_command(ctx, name) is None and not ctx.resilient_parsing and not name.startswith("-"):
            raise no_such_command(name, self.list_commands(ctx), ctx)
        return super().resolve_command(ctx, args)


def no_such_command(name: str, names: list[str], ctx: click.Context) -> click.UsageError:
    """The error for an unknown command, with one "Did you mean": click's own (>= 8.4), else worded as typer does."""
    click_error = getattr(click.exceptions, "NoSuchCommand", None)
    if click_error is not None:
        return click_error(name, possibilities=names, ctx=ctx)  # type: ignore[no-any-return]
    from difflib import get_close_matches

    matches = get_close_matches(name, names)
    hint = f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
    return click.UsageError(f"No such command {name!r}.{hint}", ctx)


def _one_suggestion(command: click.Command) -> None:
    """typer 0.25 appends its "Did you mean" to click's: with a click that suggests by itself, typer's goes."""
    if isinstance(command, click.Group):
        if hasattr(click.exceptions, "NoSuchCommand") and hasattr(command, "suggest_commands"):
            command.suggest_commands = False
        for sub in command.commands.values():
            _one_suggestion(sub)


def _version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"kaapcli {kaapcli.__version__}")
        ctx.exit()


def _install_completion(ctx: click.Context, param: click.Parameter, value: bool) -> Any:
    if not value:  # click calls every option's callback, given or not
        return value
    from typer.completion import install_callback

    return install_callback(ctx, param, value)


def _show_completion(ctx: click.Context, param: click.Parameter, value: bool) -> Any:
    if not value:
        return value
    from typer.completion import show_callback

    return show_callback(ctx, param, value)


def _root(config: str | None) -> None:
    from pathlib import Path

    from kaapcli.core.config import load_config

    ctx = click.get_current_context()
    cfg = load_config(Path(config) if config is not None else None)
    ctx.obj = cfg
    # Config-file defaults sit below options and KAAPCLI_* variables: click's default_map does exactly that.
    name = ctx.invoked_subcommand
    command = ctx.command.get_command(ctx, name) if name and isinstance(ctx.command, click.Group) else None
    ctx.default_map = {name: default_map(command, cfg.defaults)} if name and command else {}


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


def root_group() -> RootGroup:
    flag: dict[str, Any] = {"is_flag": True, "expose_value": False, "is_eager": True}
    return RootGroup(name="kaapcli", help=HELP, callback=_root, no_args_is_help=True,
                     context_settings=CONTEXT_SETTINGS, params=[
        click.Option(["--config"], type=click.Path(), envvar="KAAPCLI_CONFIG", show_envvar=True,
                     help="Config file (default: ./kaapcli.toml, then ~/.config/kaapcli/config.toml)."),
        click.Option(["--version", "-V"], callback=_version, help="Print the version and exit.", **flag),
        click.Option(["--install-completion"], callback=_install_completion,
                     help="Install completion for the current shell.", **flag),
        click.Option(["--show-completion"], callback=_show_completion,
                     help="Show completion for the current shell, to copy it or customize the installation.", **flag),
    ])


def click_command(args: Sequence[str] | None = None) -> RootGroup:
    """The root command.  Given the arguments of a run, commands are loaded as they are resolved (a run imports
    only the module of the command it names); without (docs, tests), every command is loaded."""
    group = root_group()
    return group if args is not None else group.load_all()


def _add_examples(command: click.Command, path: str) -> None:
    """End the help of ``command`` (and of its subcommands) with its examples of ``helpdata.EXAMPLES``."""
    from kaapcli.cli.helpdata import EXAMPLES

    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            _add_examples(sub, f"{path} {name}")
    examples = EXAMPLES.get(path)
    if not examples:
        return
    epilog = command.format_epilog

    def format_epilog(ctx: click.Context, formatter: click.HelpFormatter) -> None:
        epilog(ctx, formatter)
        write_examples(formatter, examples)

    command.format_epilog = format_epilog  # type: ignore[method-assign]


def write_examples(formatter: click.HelpFormatter, examples: Sequence[tuple[str, str]]) -> None:
    """An "Examples:" section: each command line as it is (never wrapped: it must paste), its purpose below."""
    import textwrap

    with formatter.section("Examples"):
        pad = " " * formatter.current_indent
        for line, what in examples:
            formatter.write(f"{pad}{line}\n")
            formatter.write(textwrap.indent(textwrap.fill(what, max(formatter.width - len(pad) - 4, 30)),
                                            pad + "    ") + "\n")


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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure becomes one line on stderr and an exit code of the table."""
    if COMPLETE_VAR in os.environ:  # a Tab press: answered from the generated table, no command module imported
        from kaapcli.cli.complete import respond

        return respond()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("KAAPCLI_DEBUG", "") not in ("", "0", "false", "no")
    # SIGPIPE stays ignored (Python's default): a write to a peer's closed socket is an EPIPE error the network code
    # reports, never a silent death; a closed stdout is handled below like a Unix tool killed by SIGPIPE.
    signal.signal(signal.SIGTERM, _sigterm)
    if not debug:  # library warnings (pydicom's "Expected explicit VR", ...) are not our one-line messages
        warnings.simplefilter("ignore")
    if "pydicom" not in sys.modules:
        sys.meta_path.insert(0, PydicomWithoutRequests())
    try:
        command = click_command(args)
        command.invoke = _pipe_errors_escape_click(command.invoke)  # type: ignore[method-assign]
        result = command.main(args=args, prog_name="kaapcli", standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE if exc.exit_code == 2 else int(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.stderr.write("kaapcli: interrupted\n")
        return ExitCode.INTERRUPTED
    except _BrokenPipe as exc:
        if _stdout_closed():
            return _quiet_exit_on_closed_stdout()
        if debug:
            traceback.print_exception(exc.__cause__ or exc)
        sys.stderr.write(f"kaapcli: internal error: {exc.__cause__} (rerun with --debug)\n")
        return ExitCode.SOFTWARE
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


class PydicomWithoutRequests:
    """An import hook: while pydicom is first imported, ``requests`` is not found.  pydicom imports requests
    (~60 ms) only to download its own test files, and falls back to urllib; every other import of requests
    (DICOMweb, OpenSearch) is untouched.  What core.dicom.import_pydicom does, for every command of a run."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> Any:
        if name != "pydicom":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or "requests" in sys.modules:
            return spec
        real = spec.loader

        class Loader:
            def __getattr__(self, attr: str) -> Any:
                return getattr(real, attr)

            def create_module(self, module_spec: Any) -> Any:
                return real.create_module(module_spec)

            def exec_module(self, module: Any) -> None:
                sys.modules["requests"] = None  # type: ignore[assignment]  # ``import requests`` raises ImportError
                try:
                    real.exec_module(module)
                finally:
                    del sys.modules["requests"]
                    module.__loader__ = module.__spec__.loader = real  # afterwards pydicom looks as imported

        spec.loader = Loader()  # type: ignore[assignment]
        return spec
STDOUT_CLOSED = 128 + 13  # the status of a process killed by SIGPIPE, as `kaapcli ... | head` expects


class _BrokenPipe(Exception):
    """A BrokenPipeError on its way out of a command (click would turn any EPIPE into a silent exit 1)."""


def _pipe_errors_escape_click(invoke: Any) -> Any:
    def wrapped(ctx: click.Context) -> Any:
        try:
            return invoke(ctx)
        except BrokenPipeError as exc:
            raise _BrokenPipe(str(exc)) from exc

    return wrapped


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone (a pipe's write end polls POLLERR, a socket's POLLHUP)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_exit_on_closed_stdout() -> int:
    # Python would report the closed pipe again when it flushes stdout at exit, and a process pool shutting down
    # behind it may print its own noise at exit: like a process killed by SIGPIPE, say nothing more.
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return STDOUT_CLOSED


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # finish like Ctrl-C: in-flight temp files removed, manifest saved
