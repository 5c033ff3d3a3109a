"""Shell completion answered from the generated table (``COMPLETION`` in ``kaapcli/cli/_commands.py``).

A Tab press runs ``kaapcli`` with ``_KAAPCLI_COMPLETE=complete_<shell>`` (the shims in ``completions/``, typer's
protocol).  Loading the app for it would import click, typer and every command module (0.3-0.65 s a press);
this module imports neither click nor typer nor any command module and answers as click would:

1. split the words typed so far (shell quoting) into the complete arguments and the incomplete word;
2. walk the arguments through the table: subcommands descend, options are noted (with their values skipped);
3. the incomplete word gets: option names when it starts with ``-``; else an option's values when it follows an
   option that takes one; else an argument's values; else the group's subcommands;
4. print them in the shell's format (bash: one per line; zsh: an ``_arguments`` spec; fish: value<TAB>help).

Where click would offer file names (path-typed parameters), the shell's own file completion is used instead.
A test compares every answer with click's (typer's completion classes on the full app).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~5 ms to import, a sixth of a completion request
    from typing import Any

COMPLETE_VAR = "_KAAPCLI_COMPLETE"  # what the completion shims set (typer's name for prog "kaapcli")


def split_words(text: str) -> list[str]:
    """Shell-like splitting that keeps an unterminated quote's text as the last word (as click does)."""
    import shlex

    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    words: list[str] = []
    try:
        words.extend(lexer)
    except ValueError:
        words.append(lexer.token)
    return words


def _option(node: dict[str, Any], arg: str) -> dict[str, Any] | None:
    """The option an argument names: ``--name``, ``--name=value``, or a short option with its value attached."""
    name = arg.partition("=")[0] if arg.startswith("--") else arg
    for option in node["options"]:
        if name in option["names"] or name in option["secondary"]:
            return option
    if not arg.startswith("--") and len(arg) > 2:
        return _option(node, arg[:2])
    return None


def completions(args: list[str], incomplete: str) -> list[tuple[str, str]] | None:
    """``(value, help)`` pairs for the incomplete word after ``args``; None: file names (the shell's own)."""
    from kaapcli.cli._commands import COMPLETION

    path: list[str] = []
    node = COMPLETION[""]
    given: set[str] = set()
    positionals = 0
    args = list(args)
    if incomplete == "=":
        incomplete = ""
    elif "=" in incomplete and incomplete.startswith("-"):
        name, _, incomplete = incomplete.partition("=")
        args.append(name)
    options_end = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--" and not options_end:
            options_end = True
        elif arg.startswith("-") and len(arg) > 1 and not options_end:
            option = _option(node, arg)
            if option is not None:
                given.add(option["names"][0])
                attached = "=" in arg or (not arg.startswith("--") and len(arg) > 2)
                if option["nargs"] and not attached:
                    i += min(option["nargs"], len(args) - i)
        elif node["subcommands"] and not positionals:
            if arg not in node["subcommands"]:
                break  # as click: an unknown command leaves the group's context current
            path.append(arg)
            node = COMPLETION[" ".join(path)]
            given, positionals = set(), 0
        else:
            positionals += 1

    if "--" not in args and incomplete.startswith("-"):
        return _own(node, incomplete, given)
    for option in node["options"]:  # the last complete words are an option that still wants its value
        last = None
        for back, arg in enumerate(reversed(args)):
            if back + 1 > option["nargs"]:
                break
            if arg.startswith("-"):
                last = arg
                break
        if last is not None and last in option["names"]:
            return _values(option, incomplete)
    remaining = positionals
    for argument in node["arguments"]:
        if argument["nargs"] == -1 or remaining < argument["nargs"]:
            return _values(argument, incomplete)
        remaining -= argument["nargs"]
    return _own(node, incomplete, given)


def _own(node: dict[str, Any], incomplete: str, given: set[str]) -> list[tuple[str, str]]:
    """What a command itself offers: its subcommands, and its options not given yet (for a word like ``-``)."""
    found = [(name, c_help) for name, c_help in node["commands"] if name.startswith(incomplete)]
    if incomplete and not incomplete[0].isalnum():
        for option in node["options"]:
            if option["hidden"] or (not option["multiple"] and option["names"][0] in given):
                continue
            found += [(name, option["help"]) for name in option["names"] + option["secondary"]
                      if name.startswith(incomplete)]
    return found


def _values(param: dict[str, Any], incomplete: str) -> list[tuple[str, str]] | None:
    if param["kind"]:
        return None
    if param["case_sensitive"]:
        return [(value, "") for value in param["values"] if value.startswith(incomplete)]
    return [(value, "") for value in param["values"] if value.lower().startswith(incomplete.lower())]


def _zsh_escape(text: str) -> str:
    return (text.replace('"', '""').replace("'", "''").replace("$", "\\$").replace("`", "\\`")
            .replace(":", r"\\:"))


def answer(shell: str, environ: dict[str, str] | os._Environ[str]) -> tuple[str, int]:
    """The text to print and the exit code for one completion request of ``shell``."""
    if shell == "bash":
        words = split_words(environ.get("COMP_WORDS", ""))
        cword = int(environ.get("COMP_CWORD", "0") or 0)
        args, incomplete = words[1:cword], (words[cword] if cword < len(words) else "")
    else:
        line = environ.get("_TYPER_COMPLETE_ARGS", "")
        words = split_words(line)[1:]
        if shell in ("powershell", "pwsh"):
            incomplete = environ.get("_TYPER_COMPLETE_WORD_TO_COMPLETE", "")
            args = words[:-1] if incomplete else words
        elif words and not line.endswith(" "):
            args, incomplete = words[:-1], words[-1]
        else:
            args, incomplete = words, ""
    items = completions(args, incomplete) or []
    if shell == "bash":  # an empty answer lets `complete -o default` complete file names
        return "\n".join(value for value, _ in items), 0
    if shell == "zsh":
        if not items:
            return "_files", 0
        specs = "\n".join(f'"{_zsh_escape(v)}":"{_zsh_escape(h)}"' if h else f'"{_zsh_escape(v)}"' for v, h in items)
        return f"_arguments '*: :(({specs}))'", 0
    if shell == "fish":
        if environ.get("_TYPER_COMPLETE_FISH_ACTION", "") == "is-args":
            return "", 0 if items else 1  # 1: no values of ours, fish completes file names
        return "\n".join(f"{v}\t{''.join(' ' if c.isspace() else c for c in h)}" if h else v for v, h in items), 0
    if shell in ("powershell", "pwsh"):
        return "\n".join(f"{v}:::{h or ' '}" for v, h in items), 0
    return f"Shell {shell} not supported.", 1


def respond() -> int:
    """Answer the request in ``$_KAAPCLI_COMPLETE`` (``complete_<shell>``, or ``source_<shell>`` for the shim)."""
    instruction, _, shell = os.environ[COMPLETE_VAR].partition("_")
    if instruction == "source":
        from kaapcli.cli.gendocs import completion_script

        sys.stdout.write(completion_script(shell) + "\n")
        return 0
    if instruction != "complete":
        sys.stderr.write(f'Completion instruction "{instruction}" not supported.\n')
        return 1
    try:
        text, code = answer(shell, os.environ)
    except Exception:  # noqa: BLE001 - a Tab press prints no traceback into the user's command line
        if os.environ.get("KAAPCLI_DEBUG", "") not in ("", "0", "false", "no"):
            raise
        return 1
    if text:
        stream = sys.stdout if code == 0 else sys.stderr
        stream.write(text + "\n")
    return code
