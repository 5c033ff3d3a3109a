"""Generate the man page and shell completions from the app itself (``make docs``).

``python -m kaapcli.cli.gendocs`` rewrites ``man/kaapcli.1`` and ``completions/*``;
``--check`` exits 1 when the files on disk differ (a test runs it, so they never drift).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

import kaapcli
from kaapcli.exitcodes import EXIT_CODES

COMPLETIONS = {"bash": "bash/kaapcli", "zsh": "zsh/_kaapcli", "fish": "fish/kaapcli.fish"}  # as installed: share/...
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


def _walk(cmd: click.Command, path: list[str], hidden: bool = False) -> list[tuple[list[str], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            if hidden or not cmd.commands[name].hidden:
                out.extend(_walk(cmd.commands[name], [*path, name], hidden))
    return out


def _environment(root: click.Command) -> dict[str, str]:
    env = dict(EXTRA_ENVIRONMENT)
    for _path, cmd in _walk(root, []):
        for param in cmd.params:
            envvar = param.envvar
            for name in [envvar] if isinstance(envvar, str) else list(envvar or ()):
                if name and name not in env:
                    env[name] = getattr(param, "help", None) or f"Default of {param.opts[-1]}."
    return dict(sorted(env.items()))


def man_page(root: click.Group) -> str:
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
    ]
    ctx = click.Context(root, info_name="kaapcli", **root.context_settings)
    commands = [(path, cmd) for path, cmd in _walk(root, [])[1:] if not isinstance(cmd, click.Group)]
    for title, members in _panels(root).items():
        lines.append(f".SH {title.upper()} COMMANDS")
        for path, cmd in sorted((c for c in commands if c[0][0] in members), key=lambda c: members.index(c[0][0])):
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
              _roff("Config file: [defaults] option values and [pacs.NAME], [index.NAME], [s3.NAME] profiles.")]
    lines += _man_examples(root)
    lines += [".SH SEE ALSO", "dcmodify(1), storescu(1), storescp(1), dcm2json(1), dcm2niix(1), dciodvfy(1)", ""]
    return "\n".join(lines)


def _panels(root: click.Group) -> dict[str, list[str]]:
    """The panels of helpdata, over the commands the app has (a command in none: "Other commands")."""
    from kaapcli.cli.helpdata import PANELS

    visible = [name for name in sorted(root.commands) if not root.commands[name].hidden]
    panels = {title: [name for name in members if name in visible] for title, members in PANELS.items()}
    placed = {name for members in panels.values() for name in members}
    panels["Other commands"] = [name for name in visible if name not in placed]
    return {title: members for title, members in panels.items() if members}


def _man_examples(root: click.Group) -> list[str]:
    from kaapcli.cli.helpdata import EXAMPLES, LAYOUT

    lines = [".SH EXAMPLES", _roff("The examples of each command's --help, in the order of the commands above. "
                                   "They run as written against this layout:")]
    for name, meaning in LAYOUT:
        lines += [".TP", "\\fB" + _roff(name) + "\\fR", _roff(meaning)]
    order = [name for members in _panels(root).values() for name in members]
    for path in sorted(EXAMPLES, key=lambda p: (order.index(p.split()[0]) if p.split()[0] in order else len(order), p)):
        lines.append(".SS " + _roff(f"kaapcli {path}"))
        for line, what in EXAMPLES[path]:
            lines += [".TP", "\\fB" + _roff(line) + "\\fR", _roff(what)]
    return lines


def options_table(root: click.Group) -> str:
    """The README's "Shared options" table: each short option, then the shared long ones, and where they are."""
    from kaapcli.cli.vocabulary import SHARED, SHORT

    where: dict[str, list[str]] = {}
    for path, cmd in _walk(root, [])[1:]:
        if isinstance(cmd, click.Group):
            continue
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                for name in param.opts:
                    where.setdefault(name, []).append(" ".join(path))
    commands = [" ".join(path) for path, cmd in _walk(root, [])[1:] if not isinstance(cmd, click.Group)]
    rows = ["| option | means, in every command that has it | commands |", "|---|---|---|"]
    entries = [(f"`{short}`, `{long}`", meaning, short) for short, (long, meaning) in SHORT.items()]
    entries += [(f"`{long}`", meaning, long) for long, meaning in SHARED.items()]
    for option, meaning, name in entries:
        users = sorted(set(where.get(name, [])))
        others = sorted(set(commands) - set(users))
        if name == "-V":
            listed = "`kaapcli` itself"
        elif name == "-h" or not others:
            listed = "every command"
        elif len(others) < len(users):
            listed = "every command but " + ", ".join(others)
        else:
            listed = ", ".join(users)
        rows.append(f"| {option} | {meaning} | {listed} |")
    return "\n".join(rows) + "\n"


README_BEGIN = "<!-- shared-options: generated by make docs from kaapcli/cli/vocabulary.py -->\n"
README_END = "<!-- /shared-options -->\n"


def readme_with_options(readme: str, root: click.Group) -> str:
    """The README with its shared-options table regenerated (between the two markers)."""
    head, found, rest = readme.partition(README_BEGIN)
    if not found:
        return readme
    return head + README_BEGIN + options_table(root) + README_END + rest.partition(README_END)[2]


def completion_script(shell: str) -> str:
    """Typer's completion shim: it calls back into ``kaapcli`` (``_KAAPCLI_COMPLETE=complete_<shell>``)."""
    from typer.completion import get_completion_script

    from kaapcli.cli.app import COMPLETE_VAR

    return get_completion_script(prog_name="kaapcli", complete_var=COMPLETE_VAR, shell=shell)


def _param_entry(param: click.Parameter, ctx: click.Context) -> dict[str, Any]:
    """What completion needs to know of one parameter (click's answers, computed once here)."""
    items = param.type.shell_complete(ctx, param, "")
    kinds = {item.type for item in items} & {"file", "dir"}
    entry: dict[str, Any] = {
        "nargs": 0 if isinstance(param, click.Option) and (param.is_flag or param.count) else param.nargs,
        "values": [] if kinds else [str(item.value) for item in items],
        "case_sensitive": getattr(param.type, "case_sensitive", True),
        "kind": kinds.pop() if kinds else "",
    }
    if isinstance(param, click.Option):
        entry = {"names": list(param.opts), "secondary": list(param.secondary_opts), **entry,
                 "multiple": param.multiple, "hidden": param.hidden, "help": param.help or ""}
    return entry


def command_table(root: click.Group) -> str:
    """``kaapcli/cli/_commands.py``: which module defines each command (a run imports only that one), the
    root listing of ``--help``, and what shell completion offers (answered without importing any command)."""
    from kaapcli.cli.app import RootGroup

    modules = root.modules if isinstance(root, RootGroup) else {}
    listing = {}
    for name in sorted(root.commands):
        cmd = root.commands[name]
        if not cmd.hidden:
            listing[name] = {"help": (cmd.help or "").partition("\n\n")[0], "short_help": cmd.short_help,
                             "deprecated": cmd.deprecated}
    completion = {}
    ctx = click.Context(root, info_name="kaapcli", **root.context_settings)  # -h, --help
    for path, cmd in _walk(root, [], hidden=True):
        sub_ctx = click.Context(cmd, info_name=path[-1] if path else "kaapcli", parent=ctx)
        params = cmd.get_params(sub_ctx)
        subs = cmd.commands if isinstance(cmd, click.Group) else {}
        order = cmd.list_commands(sub_ctx) if isinstance(cmd, click.Group) else []  # as click offers them
        completion[" ".join(path)] = {
            "options": [_param_entry(p, sub_ctx) for p in params if isinstance(p, click.Option)],
            "arguments": [_param_entry(p, sub_ctx) for p in params if isinstance(p, click.Argument)],
            "commands": [[name, subs[name].get_short_help_str()] for name in order if not subs[name].hidden],
            "subcommands": sorted(subs),
        }
    return ('"""Generated by ``make docs`` (kaapcli.cli.gendocs) from the app: do not edit.\n\n'
            "COMMANDS: command name -> module of kaapcli.cli.  LISTING: what root --help lists of each command.\n"
            "PANELS: the groups root --help lists them in (kaapcli/cli/helpdata.py).\n"
            "COMPLETION: per command path, its options, arguments and subcommands, for shell completion.\n"
            '"""\n\n'
            "from __future__ import annotations\n\n"
            "TYPE_CHECKING = False\n"
            "if TYPE_CHECKING:  # not imported at run time: completion answers in ~20 ms, typing costs 5\n"
            "    from typing import Any\n\n"
            f"COMMANDS: dict[str, str] = {_literal(dict(sorted(modules.items())))}\n\n"
            f"LISTING: dict[str, dict[str, Any]] = {_literal(listing)}\n\n"
            f"PANELS: dict[str, list[str]] = {_literal(_panels(root))}\n\n"
            f"COMPLETION: dict[str, dict[str, Any]] = {_literal(completion)}\n")


def _holds_dict(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return any(isinstance(v, dict) or _holds_dict(v) for v in items)


def _literal(value: Any, indent: int = 0) -> str:
    """A Python literal of dicts, lists and scalars: a dict or list holding no dict is one line (short diffs)."""
    pad = "    " * (indent + 1)
    nested = _holds_dict(value)
    end = "    " * indent
    if isinstance(value, dict) and (nested or indent == 0):
        return "{\n" + "".join(f"{pad}{k!r}: {_literal(v, indent + 1)},\n" for k, v in value.items()) + end + "}"
    if isinstance(value, list) and nested:
        return "[\n" + "".join(f"{pad}{_literal(v, indent + 1)},\n" for v in value) + end + "]"
    return repr(value)


def generated(root: click.Group, base: Path | None = None) -> dict[Path, str]:
    files = {Path("man/kaapcli.1"): man_page(root), Path("kaapcli/cli/_commands.py"): command_table(root)}
    for shell, name in COMPLETIONS.items():
        files[Path("completions") / name] = completion_script(shell)
    if base is not None and (base / "README.md").is_file():
        files[Path("README.md")] = readme_with_options((base / "README.md").read_text(), root)
    return files


def main(argv: list[str]) -> int:
    from kaapcli.cli.app import click_command

    os.environ["COLUMNS"] = "100"  # help text wrapping must not depend on the terminal
    base = Path(argv[argv.index("--root") + 1]) if "--root" in argv else Path.cwd()
    stale = []
    for rel, text in generated(click_command(), base).items():
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
