"""The command contract of DESIGN §1, checked through the real CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, dicom_files, kaapcli, kaapcli_on_terminal

from kaapcli.exitcodes import EXIT_CODES


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    code = ("import sys; from kaapcli.cli.app import click_command; click_command(); "
            "heavy = {'pydicom', 'numpy', 'SimpleITK', 'nibabel', 'pynetdicom', 'highdicom', 'opensearchpy', "
            "'minio', 'PIL'} & set(sys.modules); print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    assert kaapcli("--help").returncode == 0


def test_a_run_imports_only_its_command_module(tmp_path: Path) -> None:
    """Start-up: `kaapcli [--config F] echo ...` imports kaapcli.cli.net, not the modules of unrelated commands."""
    (tmp_path / "k.toml").write_text("")
    code = (f"import sys; from kaapcli.cli.app import main; main(['--config', {str(tmp_path / 'k.toml')!r}, 'echo', "
            "'--help']); print(sorted(m for m in sys.modules if m.startswith('kaapcli.cli.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = proc.stdout.strip().splitlines()[-1]
    assert "'kaapcli.cli.net'" in loaded and "anonymize" not in loaded and "'kaapcli.cli.index'" not in loaded


def test_version_and_usage_errors_exit_2() -> None:
    assert kaapcli("--version").stdout.startswith("kaapcli ")
    bad = kaapcli("mock", "--no-such-option")
    assert bad.returncode == 2 and "No such option" in bad.stderr
    assert kaapcli("no-such-command").returncode == 2
    assert kaapcli("mock", "-o", "x", "--shard", "5/4").returncode == 2


def test_missing_input_exits_66(tmp_path: Path) -> None:
    proc = kaapcli("dcm2json", tmp_path / "missing", "-o", tmp_path / "out")
    assert proc.returncode == 66
    assert f"{tmp_path / 'missing'}: no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ok_some_failed_and_all_bad_exit_codes(mock_ct: Path, tmp_path: Path) -> None:
    good = kaapcli("dcm2json", mock_ct, "-o", tmp_path / "ok")
    assert good.returncode == 0, good.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    first = dicom_files(mock_ct)[0]
    (mixed / "good.dcm").write_bytes(first.read_bytes())
    (mixed / "truncated.dcm").write_bytes(first.read_bytes()[:400])
    (mixed / "readme.txt").write_text("not DICOM: skipped and counted")
    proc = kaapcli("dcm2json", mixed, "-o", tmp_path / "out", "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    status = {Path(r["input"]).name: r["status"] for r in records}
    assert status.get("truncated.dcm") == "failed"
    assert status.get("readme.txt") == "skipped"
    assert "truncated.dcm" in proc.stderr and "Traceback" not in proc.stderr
    only_bad = kaapcli("dcm2json", mixed / "truncated.dcm", "-o", tmp_path / "out2")
    assert only_bad.returncode == 65


def test_stdin_paths_and_pipeline(mock_ct: Path, tmp_path: Path) -> None:
    files = dicom_files(mock_ct)
    proc = kaapcli("dcm2json", "-", "-o", tmp_path / "meta", input="\n".join(map(str, files)) + "\n")
    assert proc.returncode == 0, proc.stderr
    outputs = proc.stdout.split()
    assert len(outputs) == 2 and all(Path(p).is_file() for p in outputs)  # two series


def test_stdout_stays_clean_under_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """stderr is a pseudo-terminal (progress bar drawn there); stdout is a pipe with paths only."""
    code, out, terminal = kaapcli_on_terminal("mock", "-o", tmp_path / "m", "--slices", "64", "--rows", "128",
                                              "--columns", "128", "-w", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 64 and all(Path(line).is_file() for line in lines)
    assert "\x1b[" not in out
    assert "64 files" in terminal  # the summary line went to the terminal, not to stdout


def test_sigkill_mid_write_leaves_no_partial_file_under_a_final_name(tmp_path: Path) -> None:
    import pydicom

    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "mock", "-o", str(out), "--slices", "400", "-w", "2",
                             "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(dicom_files(out)) < 20:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finals = dicom_files(out)
    assert 20 <= len(finals) < 400
    for path in finals:
        ds = pydicom.dcmread(path)
        assert len(ds.PixelData) == 512 * 512 * 2
    leftovers = [p for p in out.rglob(".*") if p.is_file() and ".kaapcli" not in p.parts]
    assert all(p.name.endswith(".kaapcli-part") for p in leftovers)
    rerun = kaapcli("mock", "-o", out, "--slices", "400", "-q")
    assert rerun.returncode == 0 and len(dicom_files(out)) == 400


def test_config_file_defaults_env_and_secrets(tmp_path: Path) -> None:
    (tmp_path / "kaapcli.toml").write_text(
        '[defaults]\nslices = 3\nrows = 16\ncolumns = 16\n\n'
        '[pacs.orthanc]\naet = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\npassword = "hunter2"\n'
        '[s3.minio]\nendpoint = "http://127.0.0.1:9000"\nsecret_key = "s3cr3t"\n')
    proc = kaapcli("mock", "-o", tmp_path / "m", cwd=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.split()) == 3  # slices from the config file
    assert len(kaapcli("mock", "-o", tmp_path / "m2", "--slices", "2", cwd=tmp_path).stdout.split()) == 2
    shown = kaapcli("config", "show", cwd=tmp_path, env={"KAAPCLI_S3_SECRET_KEY": "envsecret"})
    assert shown.returncode == 0
    assert "hunter2" not in shown.stdout and "s3cr3t" not in shown.stdout and "envsecret" not in shown.stdout
    data = json.loads(shown.stdout)
    assert data["profiles"]["pacs"]["orthanc"]["aet"] == "ORTHANC"
    (tmp_path / "bad.toml").write_text("[defaults\n")
    bad = kaapcli("--config", tmp_path / "bad.toml", "config", "show")
    assert bad.returncode == 78 and "invalid TOML" in bad.stderr


def test_generated_docs_do_not_drift() -> None:
    proc = subprocess.run([sys.executable, "-m", "kaapcli.cli.gendocs", "--check", "--root", str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_exit_code_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == {int(k): v for k, v in EXIT_CODES.items()}


@pytest.mark.parametrize("var", ["NO_COLOR", "TERM"])
def test_plain_stderr_when_not_a_terminal(var: str, tmp_path: Path) -> None:
    proc = kaapcli("mock", "-o", tmp_path / "m", "--slices", "2", "--rows", "16", "--columns", "16",
                   env={var: "dumb" if var == "TERM" else "1"})
    assert proc.returncode == 0
    assert "\x1b[" not in proc.stderr and proc.stderr.strip().endswith("0 failed")
