"""One option vocabulary: what each short option means in every command, and the old spellings.

``SHORT`` is the whole list of short options: one letter, one long option, one meaning, in every command (a test
walks the loaded commands and fails on a letter that is missing here or means something else somewhere).
``SHARED`` adds the long-only options that mean the same wherever they appear.  The README's "Shared options"
table is generated from both (``make docs``).

``RENAMED`` spellings still work for one release, hidden from help and completion, with a warning on stderr;
``REMOVED`` spellings are a usage error naming the new one: an old short letter that now means something else
in other commands cannot stay an alias (it would bring the ambiguity back), and neither can ``split --format``
(every other ``--format`` chooses what stdout carries).  Both are applied to the arguments before click parses
them, so they work the same with any click version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

# letter -> (long option, meaning)
SHORT: dict[str, tuple[str, str]] = {
    "-o": ("--out", "where outputs go: a directory (a file for zip and concat-json)"),
    "-q": ("--quiet", "no progress, warnings or summary on stderr; errors are still shown"),
    "-n": ("--dry-run", "report what would be done, write nothing"),
    "-w": ("--workers", "how many workers: processes of the batch engine (default: usable cores), threads of s3 "
                        "transfers"),
    "-j": ("--jobs", "how many run at once: rules (receive, watch), associations or STOW-RS requests (send), "
                     "jobs (worker)"),
    "-t": ("--to", "file type of the outputs (convert, seg2itk: nii.gz, nii, nrrd; split: txt, json)"),
    "-r": ("--reference", "the image series (or image) that masks, SEGs or a resampling refer to"),
    "-k": ("--key", "a DICOM attribute KEYWORD=VALUE: a matching key (query, retrieve), an attribute to set "
                    "(pdf2dcm, bin2dcm), as DCMTK's findscu and img2dcm -k"),
    "-l": ("--level", "query/retrieve level: patient, study, series, instance"),
    "-i": ("--insert", "dcmodify -i: set TAG=VALUE, inserting it when absent"),
    "-m": ("--modify", "dcmodify -m: set TAG=VALUE only where it exists"),
    "-e": ("--erase", "dcmodify -e: erase TAG"),
    "-p": ("--port", "TCP port to listen on (receive; the built-in receiver of retrieve and collect)"),
    "-f": ("--fields", "which fields: columns of search and dataset show, charts of dashboard"),
    "-y": ("--yes", "do not ask for confirmation"),
    "-R": ("--recursive", "everything under a prefix (s3 rm), as rm -R"),
    "-h": ("--help", "show the help of a command, with examples"),
    "-V": ("--version", "print the version (kaapcli -V)"),
}

# long options without a letter that mean the same in every command that has them
SHARED: dict[str, str] = {
    "--format": "what stdout carries: paths (one per line) or jsonl (one record per item); search, dataset show, "
                "stats and retrieve add their own kinds",
    "--layout": "output path template below OUT from {DICOM keywords} (convert, anonymize, sort, receive, retrieve, "
                "watch)",
    "--shard": "I/N: only the items whose stable hash falls in shard I of N",
    "--force": "rebuild outputs that are up to date",
    "--debug": "tracebacks and library warnings (also KAAPCLI_DEBUG=1)",
    "--index": "the metadata index: a path, URL or [index.NAME] profile",
}

# command path -> {old spelling: new spelling}: accepted for one release, with a warning
RENAMED: dict[str, dict[str, str]] = {
    "anonymize": {"--name": "--layout"},
    "convert": {"--name": "--layout"},
    "sort": {"--template": "--layout"},
    "send": {"--associations": "--jobs"},
    "pdf2dcm": {"--keyword": "--key"},
    "bin2dcm": {"--keyword": "--key"},
    "dashboard": {"--field": "--fields", "-F": "--fields"},
}

# command path -> {old spelling: what to use now}: a usage error that says so
REMOVED: dict[str, dict[str, str]] = {
    "sort": {"-t": "--layout"},
    "gallery": {"-t": "--thumbnails"},
    "trigger": {"-r": "--rules"},
    "query": {"-r": "--return"},
    "radiomics": {"-m": "--masks"},
    "collect": {"-m": "--method"},
    "retrieve": {"-m": "--method"},
    "s3 ls": {"-l": "--long"},
    "s3 rm": {"-r": "-R/--recursive"},
    "split": {"--format": "--to/-t"},
}


def _spelling(token: str) -> str:
    """The option a command-line token names: ``--name=x`` -> ``--name``, ``-rFILE`` -> ``-r``."""
    if token.startswith("--"):
        return token.partition("=")[0]
    return token[:2] if token.startswith("-") and len(token) > 1 else token


def translate(path: str, args: Sequence[str], warn: Callable[[str], None]) -> list[str]:
    """The arguments with renamed spellings replaced by the new ones; a removed spelling is a usage error."""
    renamed, removed = RENAMED.get(path, {}), REMOVED.get(path, {})
    out: list[str] = []
    for position, token in enumerate(args):
        if token == "--":  # what follows is arguments, never options
            out.extend(args[position:])
            break
        spelling = _spelling(token)
        if spelling in removed:
            why = (f"{spelling} is {SHORT[spelling][0]} wherever it is used"
                   if spelling in SHORT else "--format is the shared stdout option")
            raise click.UsageError(f"{spelling} is no longer an option of kaapcli {path}: use {removed[spelling]} "
                                   f"({why})")
        if spelling in renamed:
            new = renamed[spelling]
            warn(f"kaapcli: warning: {path} {spelling} is now {new} (the old spelling goes in the next release)")
            token = new + token[len(spelling):] if token.startswith("--") else new + (
                "=" + token[2:] if len(token) > 2 else "")
        out.append(token)
    return out


def apply(command: click.Command, path: str) -> None:
    """Make ``command`` (and its subcommands) accept its renamed spellings and explain its removed ones."""
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            apply(sub, f"{path} {name}")
    if path not in RENAMED and path not in REMOVED:
        return
    parse = command.parse_args

    def parse_args(ctx: click.Context, args: list[str]) -> list[str]:
        quiet = "-q" in args or "--quiet" in args

        def warn(message: str) -> None:
            if not quiet:
                click.echo(message, err=True)

        try:
            translated = translate(path, args, warn)
        except click.UsageError as exc:
            exc.ctx = ctx
            raise
        return parse(ctx, translated)

    command.parse_args = parse_args  # type: ignore[method-assign]
