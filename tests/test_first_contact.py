"""First contact: what --help, --version, a mistyped command, a Tab press and the progress bar cost and print.

Shell completion is answered from the generated table (kaapcli/cli/complete.py); these tests hold it to
click's own answers (typer's completion classes over the fully loaded app) and to its import budget.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from conftest import ROOT, kaapcli, kaapcli_on_terminal

from kaapcli.cli import complete
from kaapcli.cli._commands import COMMANDS, COMPLETION
from kaapcli.cli.app import click_command, command_modules

COMMAND_MODULES = {f"kaapcli.cli.{name}" for name in command_modules()}


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (printed on stderr, last line)."""
    probe = f"{code}\nimport sys; sys.stderr.write('\\n' + ' '.join(sorted(sys.modules)) + '\\n')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)
    return set(proc.stderr.strip().splitlines()[-1].split())


def test_completion_imports_no_command_module_nor_click() -> None:
    env = {complete.COMPLETE_VAR: "complete_bash", "COMP_WORDS": "kaapcli convert --t", "COMP_CWORD": "2"}
    loaded = _modules_after("from kaapcli.__main__ import main; main()", env)
    assert "kaapcli.cli._commands" in loaded  # it did answer from the table
    assert not loaded & COMMAND_MODULES
    assert not {"click", "typer", "rich", "pydicom", "typing"} & loaded


def test_help_and_version_import_no_command_module_nor_typer() -> None:
    for args in (["--help"], ["--version"], ["-V"], []):
        loaded = _modules_after(f"from kaapcli.cli.app import main; main({args!r})")
        assert not loaded & COMMAND_MODULES, args
        assert "typer" not in loaded and "rich" not in loaded, args


def test_a_run_imports_typer_and_only_its_own_command_module() -> None:
    loaded = _modules_after("from kaapcli.cli.app import main; main(['sort', '--help'])")
    assert loaded & COMMAND_MODULES == {"kaapcli.cli.sort"} and "typer" in loaded


UNRELATED = {"SimpleITK", "nibabel", "highdicom", "opensearchpy", "minio", "pynetdicom", "skimage", "scipy",
             "requests"}


def test_first_work_imports_only_what_its_path_needs(mock_ct: Path, tmp_path: Path) -> None:
    mock = _modules_after(f"from kaapcli.cli.app import main; main(['mock', '-o', {str(tmp_path / 'm')!r}, "
                          "'--slices', '1', '--rows', '16', '--columns', '16', '-q'])")
    assert {"pydicom", "numpy"} <= mock and not mock & UNRELATED, mock & UNRELATED
    meta = _modules_after(f"from kaapcli.cli.app import main; main(['dcm2json', {str(mock_ct)!r}, '-o', "
                          f"{str(tmp_path / 'j')!r}, '-q', '-w', '1'])")
    assert "pydicom" in meta and not meta & (UNRELATED | {"numpy"}), meta & (UNRELATED | {"numpy"})
    assert list((tmp_path / "j").glob("*.json"))
    tree = _modules_after(f"from kaapcli.cli.app import main; main(['sort', {str(mock_ct)!r}, '-o', "
                          f"{str(tmp_path / 's')!r}, '-q', '-w', '1'])")
    assert "pydicom" in tree and not tree & (UNRELATED | {"numpy"}), tree & (UNRELATED | {"numpy"})
    # requests stays importable for those who need it (DICOMweb, OpenSearch) after pydicom came without it,
    # and pydicom is left as if imported plainly (its own loader: package resources work)
    after = subprocess.run([sys.executable, "-c", "from kaapcli.cli.app import main; main(['mock', '-o', "
                            f"{str(tmp_path / 'm2')!r}, '--slices', '1', '--rows', '8', '--columns', '8', '-q']); "
                            "import requests, pydicom, importlib.resources as r; "
                            "assert type(pydicom.__spec__.loader).__name__ == 'SourceFileLoader'; "
                            "assert r.files('pydicom').joinpath('data').is_dir()"],
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 0, after.stderr


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_root_help_from_the_table_equals_the_loaded_apps(width: int) -> None:
    """`kaapcli --help` lists the commands from the generated table; it must read exactly as the app would."""
    lazy, loaded = click_command([]), click_command()
    texts = []
    for group in (lazy, loaded):
        ctx = click.Context(group, info_name="kaapcli", terminal_width=width, **group.context_settings)
        texts.append(group.get_help(ctx))
    assert texts[0] == texts[1]
    assert not lazy.commands  # the lazy one loaded nothing to say it
    assert re.search(r"^  convert +Convert each DICOM", texts[0], re.M)


def test_version_short_and_long() -> None:
    long, short = kaapcli("--version"), kaapcli("-V")
    assert long.returncode == short.returncode == 0
    assert short.stdout == long.stdout and re.fullmatch(r"kaapcli \d+\.\d+\.\d+\S*\n", long.stdout)


@pytest.mark.parametrize(("args", "suggestion"), [(["convrt"], "'convert'"), (["rules", "chek"], "'check'"),
                                                  (["s3", "pt"], "'put'")])
def test_a_mistyped_command_is_suggested_once(args: list[str], suggestion: str) -> None:
    proc = kaapcli(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("Did you mean") == 1 and suggestion in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_progress_bar_shows_files_and_megabytes_per_second(mock_ct: Path, tmp_path: Path) -> None:
    """On a terminal the bar carries the rate of the work done so far (16 files in 2 series here)."""
    code, _, terminal = kaapcli_on_terminal("dcm2json", mock_ct, "-o", tmp_path / "j", "-w", "1", columns=120)
    assert code == 0
    terminal = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal)
    assert re.search(r"2/2 +\d+ files/s, \d+\.\d MB/s", terminal), terminal


def test_a_command_not_in_the_table_yet_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between adding a command and `make docs` (or right after a merge) the command works all the same."""
    import kaapcli.cli._commands as table

    monkeypatch.setattr(table, "COMMANDS", {k: v for k, v in table.COMMANDS.items() if k != "sort"})
    root = click_command([])
    assert root.get_command(click.Context(root, info_name="kaapcli"), "sort") is not None


def test_the_table_names_every_command_of_the_app() -> None:
    root = click_command()
    assert set(COMMANDS) == set(root.commands)
    assert {name for name, _ in COMPLETION[""]["commands"]} == {n for n, c in root.commands.items() if not c.hidden}


# --------------------------------------------------------------------------- completion == click's answers

def _lines() -> Iterator[str]:
    """Command lines ending where Tab is pressed: every command path, its options and their values."""
    for path, node in COMPLETION.items():
        base = "kaapcli " + (f"{path} " if path else "")
        yield from (base, base + "-", base + "--", base + "--f", base + "x ", base + "x y --", base + "-- -")
        yield from (base + name[:2] for name, _ in node["commands"])
        for option in node["options"]:
            name = option["names"][-1]
            if option["nargs"]:
                yield from (f"{base}{name} ", f"{base}{name} x --", f"{base}{name}=")
                for value in option["values"][:2]:
                    yield from (f"{base}{name} {value[:1]}", f"{base}{option['names'][0]}={value[:1]}")
            else:
                yield from (f"{base}{name} -", f"{base}{name} ")


def _env(shell: str, line: str) -> dict[str, str]:
    if shell == "bash":
        return {"COMP_WORDS": line, "COMP_CWORD": str(len(line.split(" ")) - 1)}
    return {"_TYPER_COMPLETE_ARGS": line, "_TYPER_COMPLETE_FISH_ACTION": "get-args"}


def _values(shell: str, text: str) -> list[str]:
    """The offered values of one answer (help texts aside: typer renders them through rich, which eats
    "[index.NAME]" and wraps lines; ours are click's help strings as they are)."""
    if shell == "zsh":  # _arguments '*: :(("value":"help"\n"value"...))'
        inner = text.partition("((")[2].rpartition("))")[0]
        return [v.replace('""', '"') for v in re.findall(r'"((?:[^"]|"")*)"(?::"(?:[^"]|"")*")?', inner)]
    return [line.split("\t")[0] for line in text.splitlines() if line]


@pytest.fixture(scope="module")
def click_answers() -> Iterator[object]:
    from typer._completion_classes import BashComplete, ZshComplete

    root = click_command()
    # typer's fish answer runs help texts through rich, which wraps them onto lines of their own (bogus
    # candidates for fish): fish is held to click's values as the bash class prints them
    classes = {"bash": BashComplete, "zsh": ZshComplete, "fish": BashComplete}

    def answer(shell: str, line: str) -> str:
        saved = dict(os.environ)
        os.environ.update(_env("bash" if shell == "fish" else shell, line))
        try:
            return str(classes[shell](root, {}, "kaapcli", complete.COMPLETE_VAR).complete())
        finally:
            os.environ.clear()
            os.environ.update(saved)

    yield answer


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_answers_as_click_would(shell: str, click_answers: object) -> None:
    answer = click_answers  # type: ignore[assignment]
    compared = files = 0
    for line in _lines():
        words = line.split(" ")
        ours, code = complete.answer(shell, _env(shell, line))
        theirs = answer(shell, line)  # type: ignore[operator]
        if shell == "fish":
            theirs = theirs if theirs.strip() else ""
        if complete.completions(complete.split_words(" ".join(words[1:-1])), words[-1]) is None:
            # a path-typed value: click offers the typed word itself; we leave it to the shell's file completion
            files += 1
            offered = _values(shell, theirs)
            assert len(offered) <= 1 and set(offered) <= {"", words[-1], words[-1].partition("=")[2]}, line
            assert (ours, code) == {"bash": ("", 0), "zsh": ("_files", 0), "fish": ("", 0)}[shell], line
            continue
        compared += 1
        assert _values(shell, ours) == _values(shell, theirs), line
    assert compared > 1000 and files > 0


def test_completion_through_the_bash_shim(tmp_path: Path) -> None:
    """The generated bash shim, sourced by a real bash, completes through the `kaapcli` on PATH."""
    (tmp_path / "kaapcli").write_text(f"#!/bin/sh\nexec {sys.executable} -m kaapcli \"$@\"\n")
    (tmp_path / "kaapcli").chmod(0o755)
    shim = (ROOT / "completions" / "bash" / "kaapcli").read_text()
    script = (f"{shim}\nCOMP_WORDS=(kaapcli convert --to n); COMP_CWORD=3; _kaapcli_completion kaapcli\n"
              "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert proc.stdout.split() == ["nii.gz", "nii", "nrrd"], proc.stderr


def test_completion_formats_of_fish_and_powershell() -> None:
    def ask(shell: str, line: str, **extra: str) -> tuple[str, int]:
        return complete.answer(shell, {"_TYPER_COMPLETE_ARGS": line, **extra})

    text, code = ask("fish", "kaapcli con", _TYPER_COMPLETE_FISH_ACTION="get-args")
    assert code == 0 and text.splitlines()[0].startswith("concat-json\tConcatenate JSON")
    assert ask("fish", "kaapcli convert --to ", _TYPER_COMPLETE_FISH_ACTION="is-args")[1] == 0  # values of ours
    assert ask("fish", "kaapcli convert ", _TYPER_COMPLETE_FISH_ACTION="is-args")[1] == 1  # file names: fish's
    text, code = ask("powershell", "kaapcli convert --to", _TYPER_COMPLETE_WORD_TO_COMPLETE="")
    assert code == 0 and text.split() == ["nii.gz:::", "nii:::", "nrrd:::"]
    assert ask("zsh", "kaapcli --config ") == ("_files", 0)
    assert ask("tcsh", "kaapcli ")[1] == 1
    bad = subprocess.run([sys.executable, "-m", "kaapcli"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, complete.COMPLETE_VAR: "complete_bash", "COMP_WORDS": "kaapcli '",
                              "COMP_CWORD": "not a number"})
    assert bad.returncode == 1 and bad.stdout == bad.stderr == ""  # garbage in: no traceback on the line
