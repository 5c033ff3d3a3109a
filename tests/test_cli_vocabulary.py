"""One option vocabulary, the help panels and every command's examples (kaapcli/cli/vocabulary.py, helpdata.py)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest
from conftest import ROOT, kaapcli

from kaapcli.cli.app import click_command
from kaapcli.cli.gendocs import _walk
from kaapcli.cli.helpdata import EXAMPLES, LAYOUT, PANELS
from kaapcli.cli.vocabulary import REMOVED, RENAMED, SHARED, SHORT


@pytest.fixture(scope="module")
def root() -> click.Group:
    return click_command()


def leaf_commands(root: click.Group) -> dict[str, click.Command]:
    return {" ".join(path): cmd for path, cmd in _walk(root, [])[1:] if not isinstance(cmd, click.Group)}


def runnable_commands(root: click.Group) -> dict[str, click.Command]:
    """The commands that run: the leaves, and the groups that run without a subcommand (`kaapcli runs`)."""
    return {" ".join(path): cmd for path, cmd in _walk(root, [])[1:]
            if not isinstance(cmd, click.Group) or cmd.invoke_without_command}


def options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option)]


def test_a_short_option_means_one_thing_in_every_command(root: click.Group) -> None:
    meanings: dict[str, set[str]] = {}
    for path, cmd in leaf_commands(root).items():
        for option in options(cmd):
            longs = [o for o in option.opts if o.startswith("--")]
            for short in [o for o in option.opts + option.secondary_opts if not o.startswith("--")]:
                meanings.setdefault(short, set()).add(f"{longs[0] if longs else '?'} ({path})")
                assert short in SHORT, f"{path}: {short} is not in kaapcli/cli/vocabulary.py SHORT"
                assert SHORT[short][0] in option.opts, f"{path}: {short} is {longs}, elsewhere {SHORT[short][0]}"
    by_long = {short: {m.split(" ")[0] for m in found} for short, found in meanings.items()}
    assert all(len(longs) == 1 for longs in by_long.values()), by_long
    unused = set(SHORT) - set(meanings) - {"-h", "-V"}  # -h is click's help option, -V the root's
    assert not unused, f"vocabulary.SHORT lists letters no command has: {unused}"
    assert {"-V", "--version"} <= set(next(p for p in root.params if p.name == "version").opts)


def test_a_long_option_with_a_short_form_never_has_another_letter(root: click.Group) -> None:
    letters: dict[str, set[str]] = {}
    for cmd in leaf_commands(root).values():
        for option in options(cmd):
            longs = [o for o in option.opts if o.startswith("--")]
            shorts = [o for o in option.opts if not o.startswith("--")]
            for long in longs:
                letters.setdefault(long, set()).update(shorts or [""])
    for short, (long, _meaning) in SHORT.items():
        if long in letters:
            assert letters[long] <= {short, ""}, f"{long} is spelled {letters[long]}"
    assert set(SHARED).isdisjoint(long for long, _m in SHORT.values())


def test_old_spellings_are_hidden_and_never_mean_something_else(root: click.Group) -> None:
    commands = leaf_commands(root)
    everywhere = {name for cmd in commands.values() for option in options(cmd) for name in option.opts}
    for table in (RENAMED, REMOVED):
        for path, spellings in table.items():
            assert path in commands, path
            own = {name for option in options(commands[path]) for name in option.opts}
            for old, new in spellings.items():
                assert old not in own, f"{path} {old} is still declared"
                assert set(new.split("/")) <= own, f"{path}: {new} does not exist"
                # an old letter stays an alias only if no command gives it another meaning (long names may:
                # `worker --name` is a worker's name, `convert --name` the old spelling of --layout)
                if table is RENAMED and not old.startswith("--"):
                    assert old not in everywhere and old not in SHORT, (path, old)


def test_the_output_name_template_is_layout_everywhere(root: click.Group) -> None:
    commands = leaf_commands(root)
    with_template = {path for path, cmd in commands.items()
                     if any("template" in (o.help or "").lower() and o.type.name == "text" and "--layout" not in
                            o.opts and {"--name", "--template"} & set(o.opts) for o in options(cmd))}
    assert not with_template
    assert {p for p, cmd in commands.items() if any("--layout" in o.opts for o in options(cmd))} >= {
        "convert", "anonymize", "sort", "receive", "retrieve", "watch"}


def test_renamed_spellings_still_parse_with_a_warning(root: click.Group, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = click.Context(root, info_name="kaapcli")
    sort = root.get_command(ctx, "sort")
    assert sort is not None
    new = sort.make_context("sort", ["ct", "-o", "out", "--layout", "{PatientID}/{SOPInstanceUID}.dcm"], parent=ctx)
    old = sort.make_context("sort", ["ct", "-o", "out", "--template={PatientID}/{SOPInstanceUID}.dcm"], parent=ctx)
    assert old.params == new.params
    assert "sort --template is now --layout" in capsys.readouterr().err
    dashboard = root.get_command(ctx, "dashboard")
    assert dashboard is not None
    by_letter = dashboard.make_context("dashboard", ["-o", "d", "-FModality", "-q"], parent=ctx).params
    assert list(by_letter["field"]) == ["Modality"] and capsys.readouterr().err == ""  # -q: no warning either


def test_removed_spellings_are_usage_errors_naming_the_new_one(tmp_path: Path) -> None:
    proc = kaapcli("split", tmp_path, "-o", tmp_path / "s", "--format", "json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--format is no longer an option of kaapcli split: use --to/-t" in proc.stderr
    proc = kaapcli("s3", "rm", "-r", "s3://bucket/prefix")
    assert proc.returncode == 2 and "use -R/--recursive" in proc.stderr, proc.stderr
    proc = kaapcli("trigger", "-rrules.json", tmp_path)
    assert proc.returncode == 2 and "use --rules" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------- examples

LAYOUT_DIRS = ["ct", "nifti", "masks", "seg", "segs", "meta", "pdfdcm", "bindcm", "anon", "dropbox", "runs",
               "reports", "uploads", "cases", "nnunet", "thumbs", "radiomics", "run"]
LAYOUT_FILES = ["nifti/ct.nii.gz", "radiomics/ct-radiomics.json", "report.pdf", "model.zip", "upload.zip",
                "rules.json", "trigger_rule.json", "dags.json", "worklist.csv", "key", "node.toml", "sent.jsonl",
                "runs.jsonl", "meta.zip", "index.db"]


def parse_example(root: click.Group, argv: list[str]) -> str:
    """Parse one ``kaapcli ...`` command line as click would run it (no callback runs): its command path."""
    assert argv[0] == "kaapcli", argv
    ctx = root.make_context("kaapcli", argv[1:])
    cmd: click.Command = root
    path: list[str] = []
    while isinstance(cmd, click.Group):
        if cmd.invoke_without_command and not (ctx._protected_args if hasattr(ctx, "_protected_args") else
                                               ctx.protected_args) and not ctx.args:
            break  # the group runs by itself
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
        args = [*protected, *ctx.args]
        name, sub, rest = cmd.resolve_command(ctx, args)
        assert name is not None and sub is not None, argv
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub
    return " ".join(path)


def test_every_command_has_two_or_three_examples_that_parse(root: click.Group, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    commands = runnable_commands(root)
    assert set(EXAMPLES) == set(commands), (set(commands) - set(EXAMPLES), set(EXAMPLES) - set(commands))
    for directory in LAYOUT_DIRS:
        (tmp_path / directory).mkdir()
    for name in LAYOUT_FILES:
        (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)  # the layout's names, for the arguments click checks exist
    for path, examples in EXAMPLES.items():
        assert 2 <= len(examples) <= 3, path
        assert len({line for line, _what in examples}) == len(examples), path
        for line, what in examples:
            assert what.strip(), (path, line)
            parsed = []
            for segment in line.split(" | "):  # a pipe of kaapcli commands: each must parse
                try:
                    parsed.append(parse_example(root, shlex.split(segment)))
                except click.ClickException as exc:
                    pytest.fail(f"example of {path} does not parse: {segment}\n  {exc.format_message()}")
            assert path in parsed, (path, line)


def test_layout_names_the_example_paths() -> None:
    described = " ".join(name for name, _meaning in LAYOUT)
    for directory in ("ct/", "nifti/", "masks/", "seg/", "meta/"):
        assert directory in described


def test_help_ends_with_the_examples_and_the_root_groups_commands_by_panel(root: click.Group) -> None:
    help_text = kaapcli("convert", "--help").stdout
    examples = help_text[help_text.index("\nExamples:\n"):]
    for line, _what in EXAMPLES["convert"]:
        assert f"\n  {line}\n" in examples
    assert kaapcli("s3", "rm", "--help").stdout.count("\n  kaapcli s3 rm ") == len(EXAMPLES["s3 rm"])
    listing = kaapcli("--help").stdout
    titles = [m.group(1) for m in re.finditer(r"^(\w[\w ]*):$", listing, re.M)]
    assert titles == ["Options", *PANELS]
    sections = re.split(r"^\w[\w ]*:$", listing, flags=re.M)[2:]
    for (title, members), section in zip(PANELS.items(), sections, strict=True):
        listed = [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()]
        assert listed == [m for m in members if m in root.commands], title
    assert {name for members in PANELS.values() for name in members} == {
        name for name, cmd in root.commands.items() if not cmd.hidden}


def test_readme_command_table_has_the_panels_of_the_help() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| command | what it does | docs |"):]
    table = table[:table.index("\n\n")]
    commands = {name for members in PANELS.values() for name in members}
    grouped: dict[str, list[str]] = {}
    panel = ""
    for row in table.splitlines()[2:]:
        first = row.split("|")[1].strip()
        if first.startswith("**"):
            panel = first.strip("*")
            grouped[panel] = []
            continue
        for name in (code.split()[0] for code in re.findall(r"`([^`]+)`", first)):
            if name in commands:  # a command is in the group of its first row (receive --rules: a pipeline mode)
                grouped[panel].append(name)
                commands.discard(name)
    assert list(grouped) == list(PANELS)
    for title, members in PANELS.items():
        assert members == grouped[title], title


def test_help_of_the_root_imports_no_command_module() -> None:
    import subprocess
    import sys

    code = ("import sys; from kaapcli.cli.app import main; main(['--help']); "
            "print(sorted(m for m in sys.modules if m.startswith('kaapcli.cli.') and m not in "
            "('kaapcli.cli.app', 'kaapcli.cli.complete', 'kaapcli.cli._commands')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "100"})
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_a_run_builds_only_the_command_it_names() -> None:
    """typer builds a command by inspecting each parameter: resolving `send` builds `send`, not the other
    commands of its module, which are built when they are named (a group's subcommands with it)."""
    import click

    from kaapcli.cli.app import click_command

    root = click_command([])
    ctx = click.Context(root)
    assert root.get_command(ctx, "send") is not None and list(root.commands) == ["send"]
    assert root.get_command(ctx, "echo") is not None and sorted(root.commands) == ["echo", "send"]
    rules = root.get_command(ctx, "rules")
    assert isinstance(rules, click.Group) and "check" in rules.commands
    assert sorted(root.commands) == ["echo", "rules", "send"]
    assert set(root.load_all().commands) == set(click_command().commands)


def test_make_check_runs_ruff_mypy_the_drift_check_and_the_tests() -> None:
    """What CI runs (`.ci/run` = `make test` = system packages, venv, `make check`) keeps the habits."""
    makefile = (ROOT / "Makefile").read_text()
    check = re.search(r"^check: (.*)\n((?:\t.*\n)*)", makefile, re.M)
    assert check is not None
    assert set(check.group(1).split()) >= {"lint", "typecheck", "docs-check"}
    assert "pytest" in check.group(2)
    assert re.search(r"^typecheck: .*\n\t\$\(BIN\)/mypy kaapcli$", makefile, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"mypy>=[\d.]+,<[\d.]+"', pyproject), "mypy: a pinned range in the test extras"


# The examples that need nothing but the layout, in an order where each finds what the earlier ones wrote.
# Not run: mock's (hundreds of full-size slices), itk2dcm (an nnU-Net tree), and those that need a PACS, S3,
# OpenSearch, a rules file or a run journal (their options are parsed above all the same).
RUN_IN_ORDER = ["dcm2json", "sort", "convert", "itk2seg", "seg2itk", "merge-masks", "resample", "radiomics",
                "json2sr", "thumbnail", "modify", "anonymize", "phi-scan", "split", "concat-json", "zip", "unzip",
                "index", "tag add", "dataset add", "stats", "search", "dataset show", "dataset list", "tag remove",
                "unindex", "gallery", "dashboard", "dataset remove", "clean", "config show", "runs", "bin2dcm",
                "dcm2bin", "pdf2dcm", "dcm2pdf"]
NOT_OFFLINE = ("--index https://", "--mode fuse --labels liver,spleen", "kaapcli mock")


@pytest.mark.slow
def test_the_offline_examples_run_as_written_on_the_layout(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "XDG_DATA_HOME": str(tmp_path / "xdg"), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "NO_COLOR": "1"}
    env.pop("KAAPCLI_DEBUG", None)
    assert kaapcli("mock", "-o", tmp_path / "ct", "--slices", "6", "--rows", "48", "--columns", "48", "--seed", "1",
                   "-q").returncode == 0
    (tmp_path / "key").write_text("not-a-secret\n")
    (tmp_path / "node.toml").write_text("")
    (tmp_path / "runs.jsonl").write_text("")
    (tmp_path / "runs" / "old-run").mkdir(parents=True)
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    (tmp_path / "model.zip").write_bytes(b"weights" * 100)
    (tmp_path / "reports").mkdir()
    shutil.copy(tmp_path / "report.pdf", tmp_path / "reports" / "summary.pdf")
    before = {"itk2seg": [sys.executable, str(ROOT / "examples" / "threshold.py"), "nifti/ct.nii.gz", "-o", "masks"]}
    ran = 0
    for path in RUN_IN_ORDER:
        if path in before:
            subprocess.run(before[path], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
        if path == "unzip":
            (tmp_path / "uploads").mkdir()
            shutil.copy(tmp_path / "meta.zip", tmp_path / "upload.zip")
            shutil.copy(tmp_path / "ct.zip", tmp_path / "uploads" / "ct.zip")
        for line, _what in EXAMPLES[path]:
            if any(marker in line for marker in NOT_OFFLINE):
                continue
            proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=tmp_path, env=env, text=True,
                                  capture_output=True, timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stderr}"
            ran += 1
    assert ran >= 60
