"""Packaging, as a new user meets it: the README's Install section, step by step.

The wheel and the sdist are built (``python -m build``), the wheel is installed into a fresh venv outside the
repository (Debian's python3 when there is one, as in the Dockerfile; dependencies really installed, from pip's
cache when warm), and the installed kaapcli runs there: ``--help``, ``man kaapcli`` from the venv's
share/man, bash completion from its share/bash-completion, the Dockerfile's smoke commands.  The unpacked sdist
then runs its own tests/test_cli_contract.py (its sources, tests and generated docs checked together).

No Docker engine runs on the build machines: the Dockerfile is checked for consistency with the repository
(what it copies exists and is all the build needs, its packages exist in Debian, its entry point is kaapcli)
and its install and smoke steps are the ones run here outside Docker.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

import kaapcli

SDIST_MUST_HOLD = ["tests/conftest.py", "tests/peers.py", "tests/test_cli_contract.py", "man/kaapcli.1",
                   "completions/bash/kaapcli", "completions/zsh/_kaapcli", "completions/fish/kaapcli.fish",
                   "docs", "examples/Makefile", "benchmarks/bench_startup.py", "Makefile", "LICENSE", "README.md",
                   "pyproject.toml", "kaapcli/cli/_commands.py", "Dockerfile"]
SDIST_DIRS = ["kaapcli", "tests", "man", "completions", "docs", "examples", "benchmarks"]
WHEEL_DATA = ["share/man/man1/kaapcli.1", "share/bash-completion/completions/kaapcli",
              "share/zsh/site-functions/_kaapcli", "share/fish/vendor_completions.d/kaapcli.fish"]


def _run(cmd: list[str], timeout: float = 300, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _outside_env(venv: Path, home: Path) -> dict[str, str]:
    """A user's shell with the venv activated: nothing of this repository or of the test's interpreter."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "KAAPCLI_", "_KAAPCLI", "PYTEST"))}
    return {**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "VIRTUAL_ENV": str(venv),
            "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"), "NO_COLOR": "1"}


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _smoke_commands() -> str:
    """The Dockerfile's smoke step: the RUN that starts with ``kaapcli``."""
    runs = [args for instr, args in _dockerfile() if instr == "RUN" and args.startswith("kaapcli ")]
    assert len(runs) == 1, runs
    return runs[0]


def _repository_files(tops: list[str]) -> list[str]:
    """The files under ``tops``: git's list in a clone, else (an unpacked sdist) what is on disk."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--", *tops], capture_output=True, text=True)
        if listed.returncode == 0:
            return [line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]
    return [str(p.relative_to(ROOT)) for top in tops for p in (ROOT / top).rglob("*")
            if p.is_file() and not any(part.startswith((".", "__pycache__")) or part == "out"
                                       for part in p.relative_to(ROOT).parts)]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=600)
    return out


@pytest.mark.slow
def test_wheel_and_sdist_install_and_run_outside_the_repository(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob(f"kaapcli-{kaapcli.__version__}-py3-none-any.whl"))
    sdist = next(dist.glob(f"kaapcli-{kaapcli.__version__}.tar.gz"))
    system_python = Path("/usr/bin/python3")
    python = str(system_python) if system_python.exists() else sys.executable
    venv = tmp_path / "venv"
    env = _outside_env(venv, tmp_path)
    # README, Install: python3 -m venv ~/.venvs/kaapcli && ~/.venvs/kaapcli/bin/pip install kaapcli-*.whl
    _run([python, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], timeout=900, cwd=tmp_path, env=env)

    where = _run(["python", "-c", "import kaapcli; print(kaapcli.__file__)"], cwd=tmp_path, env=env).stdout
    assert Path(where.strip()).is_relative_to(venv) and shutil.which("kaapcli", path=env["PATH"]) == str(
        venv / "bin" / "kaapcli")
    assert "Usage: kaapcli [OPTIONS] COMMAND" in _run(["kaapcli", "--help"], cwd=tmp_path, env=env).stdout
    assert _run(["kaapcli", "-V"], cwd=tmp_path, env=env).stdout == f"kaapcli {kaapcli.__version__}\n"

    # man kaapcli, from the venv's share/man
    for rel in WHEEL_DATA:
        assert (venv / rel).is_file(), rel
    man_env = {**env, "MANPATH": str(venv / "share" / "man"), "MANPAGER": "cat", "MANWIDTH": "100"}
    assert _run(["man", "-w", "kaapcli"], cwd=tmp_path, env=man_env).stdout.strip() == str(venv / WHEEL_DATA[0])
    page = _run(["man", "kaapcli"], cwd=tmp_path, env=man_env).stdout
    assert "EXIT STATUS" in page and "kaapcli dcm2json" in page

    # bash completion from the installed shim, answered by the installed kaapcli
    script = (f"source {venv / WHEEL_DATA[1]}\nCOMP_WORDS=(kaapcli dcm2); COMP_CWORD=1\n"
              "_kaapcli_completion kaapcli; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    assert _run(["bash", "-c", script], cwd=tmp_path, env=env).stdout.split() == ["dcm2bin", "dcm2json", "dcm2pdf"]

    # real work: the Dockerfile's smoke step (mock, then dcm2json), in a directory of the test
    smoke = _smoke_commands().replace("/tmp/smoke", str(tmp_path / "smoke")).replace(
        f" && rm -rf {tmp_path / 'smoke'}", "")
    _run(["sh", "-c", smoke], cwd=tmp_path, env=env)
    docs = [json.loads(p.read_text()) for p in (tmp_path / "smoke" / "meta").glob("*.json")]
    assert len(docs) == 1 and docs[0]["00080060 Modality_keyword"] == "CT"

    # the sdist holds what its own tests need, and they pass from it
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (Debian bookworm has 3.11.2)
            tar.extractall(tmp_path / "sdist", filter="data")
        else:
            tar.extractall(tmp_path / "sdist")  # noqa: S202 - our own sdist, just built
    source = tmp_path / "sdist" / f"kaapcli-{kaapcli.__version__}"
    for rel in SDIST_MUST_HOLD:
        assert (source / rel).exists(), rel
    for rel in _repository_files(SDIST_DIRS):  # every file of the package, tests, docs, ... directories
        assert (source / rel).is_file(), f"sdist lacks {rel}"
    _run([str(venv / "bin" / "pip"), "install", "-q", "pytest>=8", "pytest-timeout>=2.3"], timeout=600, env=env)
    tests = _run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests/test_cli_contract.py"], timeout=600, cwd=source, env=env)
    assert re.search(r"\d+ passed", tests.stdout) and "failed" not in tests.stdout


def test_dockerfile_builds_from_what_the_repository_holds() -> None:
    steps = _dockerfile()
    args = dict(a.split("=", 1) for instr, a in steps if instr == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for instr, a in steps if instr == "FROM"]
    assert bases and all(re.fullmatch(r"debian:[a-z]+-slim", b) for b in bases), bases

    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    copied: list[str] = []
    for instr, arguments in steps:
        if instr == "COPY" and not arguments.startswith("--from"):
            *sources, _dest = arguments.split()
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
                assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is in .dockerignore"
                copied.append(src.rstrip("/"))

    # what building the wheel reads must be in the build stage
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], *project["project"]["license-files"], "kaapcli"]
    needed += [src for sources in project["tool"]["setuptools"]["data-files"].values() for src in sources]
    for rel in needed:
        assert any(rel == c or rel.startswith(c + "/") for c in copied), f"the image build lacks {rel}"

    # the runtime packages exist in Debian, and the test machines install them too (so tests use the same tools)
    installs = [a for instr, a in steps if instr == "RUN" and "apt-get install" in a]
    runtime = set(installs[-1].split("--no-install-recommends", 1)[1].split("&&")[0].split())
    make_packages = set(re.search(r"^APT_PACKAGES = (.+)$", (ROOT / "Makefile").read_text(), re.M)[1].split())  # type: ignore[index]
    assert runtime - {"python3"} <= make_packages, runtime - make_packages
    for package in runtime:
        known = subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0 or subprocess.run(
            ["apt-cache", "show", package], capture_output=True).returncode == 0
        assert known, f"{package}: not a Debian package here"

    entry = [a for instr, a in steps if instr == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["kaapcli"]
    users = [a for instr, a in steps if instr == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert _smoke_commands().startswith("kaapcli --version && kaapcli mock ")


def test_readme_image_name_is_the_one_the_dockerfile_builds() -> None:
    readme = (ROOT / "README.md").read_text()
    tag = f"kaapcli:{kaapcli.__version__}"
    assert f"docker build -t {tag} ." in readme
    images = re.findall(r"^\s+image: (\S+)", readme, re.M)
    assert images and all(image.endswith(f"/{tag}") for image in images), images
