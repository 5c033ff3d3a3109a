"""Generate the man page and shell completions from the app itself (``make docs``).

``python -m kaapcli.cli.gendocs`` rewrites ``man/kaapcli.1`` and ``completions/*``;
``--check`` exits 1 when the files on disk differ (a test runs it, so they never drift).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

import kaapcli
from kaapcli.exitcodes import EXIT_CODES

COMPLETIONS = {"bash": "kaapcli.bash", "zsh": "_kaapcli", "fish": "kaapcli.fish"}
EXTRA_ENVIRONMENT = {
    "KAAPCLI_CONFIG": "Path of the config file (instead of ./kaapcli.toml, then ~/.config/kaapcli/config.toml).",
    "KAAPCLI_DEBUG": "Set to 1 to show Python tracebacks (same as --debug).",
    "KAAPCLI_STATE_DIR": "Where batch commands keep their manifests (default: a hidden .OUT.kaapcli beside OUT).",
    "NO_COLOR": "Disable colours on stderr.",
    "TERM": "TERM=dumb disables the progress bar.",
    "XDG_CONFIG_HOME": "Base directory of the user config file.",
    "XDG_DATA_HOME": "Base directory of the default embedded index (kaapcli/index.db).",
    "XDG_STATE_HOME": "Base of the manifests of output directories whose parent cannot be written.",
}


def _roff(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _walk(cmd: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            if not cmd.commands[name].hidden:
                out.extend(_walk(cmd.commands[name], [*path, name]))
    return out


def _environment(root: click.Command) -> dict[str, str]:
    env = dict(EXTRA_ENVIRONMENT)
    for _path, cmd in _walk(root, []):
        for param in cmd.params:
            names = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
            for name in names:
                if name and name not in env:
                    env[name] = getattr(param, "help", None) or f"Default of {param.opts[-1]}."
    return dict(sorted(env.items()))


def man_page(root: click.Command) -> str:
    lines = [
        f'.TH KAAPCLI 1 "" "kaapcli {kaapcli.__version__}" "User Commands"',
        ".SH NAME",
        "kaapcli \\- Kaapana's DICOM processing operators as one Unix toolkit",
        ".SH SYNOPSIS",
        ".B kaapcli",
        "[\\fB\\-\\-config\\fR \\fIFILE\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIINPUT\\fR...] "
        "[\\fB\\-o\\fR \\fIOUT\\fR]",
        ".SH DESCRIPTION",
        _roff(root.help or ""),
        ".PP",
        _roff("An INPUT is a file, a directory (recursed, sorted; hidden names skipped) or - to read paths "
              "from stdin. stdout carries data only (output paths, or JSON records with --format jsonl); "
              "progress and messages go to stderr."),
        ".SH COMMANDS",
    ]
    ctx = click.Context(root, info_name="kaapcli")
    for path, cmd in _walk(root, [])[1:]:
        if isinstance(cmd, click.Group):
            continue
        sub_ctx = click.Context(cmd, info_name=" ".join(path), parent=ctx)
        lines += [".SS " + _roff(" ".join(["kaapcli", *path])), _roff(cmd.help or cmd.short_help or ""), ".PP",
                  ".B Usage:", _roff(" ".join([sub_ctx.command_path, *cmd.collect_usage_pieces(sub_ctx)]))]
        for param in cmd.params:
            record = param.get_help_record(sub_ctx)
            if record:
                lines += [".TP", "\\fB" + _roff(record[0]) + "\\fR", _roff(record[1] or "")]
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_CODES.items():
        lines += [".TP", f"\\fB{int(code)}\\fR", _roff(meaning)]
    lines.append(".SH ENVIRONMENT")
    for name, meaning in _environment(root).items():
        lines += [".TP", f"\\fB{_roff(name)}\\fR", _roff(meaning)]
    lines += [".SH FILES", ".TP", "\\fB./kaapcli.toml\\fR, \\fB~/.config/kaapcli/config.toml\\fR",
              _roff("Config file: [defaults] option values and [pacs.NAME], [index.NAME], [s3.NAME] profiles."),
              ".SH SEE ALSO", "dcmodify(1), storescu(1), storescp(1), dcm2json(1), dcm2niix(1), dciodvfy(1)", ""]
    return "\n".join(lines)


def completion_script(shell: str) -> str:
    """Typer's completion shim: it calls back into ``kaapcli`` (``_KAAPCLI_COMPLETE=complete_<shell>``)."""
    from typer.completion import get_completion_script

    from kaapcli.cli.app import COMPLETE_VAR

    return get_completion_script(prog_name="kaapcli", complete_var=COMPLETE_VAR, shell=shell)


def command_table() -> str:
    """``kaapcli/cli/_commands.py``: which module defines each command, so a run imports only that one."""
    import typer

    from kaapcli.cli.app import command_modules

    lines = []
    for module in command_modules():
        probe = typer.Typer()
        importlib.import_module(f"kaapcli.cli.{module}").register(probe)
        lines += [f"    \"{name}\": \"{module}\",\n" for name in sorted(typer.main.get_group(probe).commands)]
    return ('"""Generated by ``make docs`` (kaapcli.cli.gendocs): command name → module of kaapcli.cli."""\n\n'
            "COMMANDS = {\n" + "".join(sorted(lines)) + "}\n")


def generated(root: click.Command) -> dict[Path, str]:
    files = {Path("man/kaapcli.1"): man_page(root), Path("kaapcli/cli/_commands.py"): command_table()}
    for shell, name in COMPLETIONS.items():
        files[Path("completions") / name] = completion_script(shell)
    return files


def main(argv: list[str]) -> int:
    from kaapcli.cli.app import click_command

    os.environ["COLUMNS"] = "100"  # help text wrapping must not depend on the terminal
    base = Path(argv[argv.index("--root") + 1]) if "--root" in argv else Path.cwd()
    stale = []
    for rel, text in generated(click_command()).items():
        path = base / rel
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        sys.stderr.write(f"out of date: {', '.join(stale)} (run `make docs`)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
