"""The seeds' rule models through `kaapcli trigger` and `kaapcli runs`: hostile header values, the bugs of
issue #14, dcm-processor callbacks/workers/added_params, Kaapana trigger_rule.json, run control."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_files, kaapcli

HOSTILE_IDS = ["$(touch PWNED)", "`touch PWNED`; rm -rf /tmp/nothing", "../../escaped", "-rf",
               "a\0b/../../nul", "P" * 300, "x'; touch PWNED; '"]


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def records(journal: Path) -> list[dict]:
    return [json.loads(line) for line in kaapcli("runs", "--journal", journal).stdout.splitlines()]


@pytest.fixture(scope="module")
def one_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    proc = kaapcli("mock", "-o", out, "--slices", "2", "--rows", "16", "--columns", "16", "--seed", "11", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def petct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT and a PT series of one patient (seed 5), and a CT of another (seed 6)."""
    data = tmp_path_factory.mktemp("petct")
    for modality, seed in (("CT", 5), ("PT", 5), ("CT", 6)):
        proc = kaapcli("mock", "-o", data / f"{modality}{seed}", "--modality", modality, "--seed", str(seed),
                       "--slices", "2", "--rows", "16", "--columns", "16", "-q")
        assert proc.returncode == 0, proc.stderr
    return data


def hostile_copy(src: Path, dest: Path, patient_id: str) -> Path:
    for n, path in enumerate(dicom_files(src)):
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        target = dest / f"{n}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    return dest


# --------------------------------------------------------------------------- security

@pytest.mark.parametrize("script", [
    ["sh", "-c", "touch {out}/{patient_id}"],
    ["bash", "-ec", "echo {calling_aet}"],
    ["/bin/sh", "-c", "echo {series_uid}"],
    ["env", "A=1", "dash", "-c", "echo {patient_id}"],
    ["nice", "zsh", "-lc", "echo {called_aet}"],
    ["python3", "-c", "print('{patient_id}')"],
    ["find", ".", "-exec", "sh", "-c", "echo {study_uid}", ";"],
    ["awk", "BEGIN{print \"{patient_id}\"}"],
    ["perl", "-e", "print '{patient_id}'"],
    ["ssh", "-p", "22", "host", "ls", "{series_dir}"],
    ["flock", "/tmp/lock", "-c", "echo {patient_id}"],
])
def test_rules_check_refuses_placeholders_inside_scripts(tmp_path: Path, script: list[str]) -> None:
    proc = kaapcli("rules", "check", write(tmp_path / "r.json", [{"name": "bad", "run": script}]))
    assert proc.returncode == 78, proc.stderr
    assert "inside the script" in proc.stderr and "hint: read it from the environment instead" in proc.stderr
    assert "KAAPCLI_" in proc.stderr and "Traceback" not in proc.stderr


def test_script_reading_the_environment_or_positional_arguments_is_fine(tmp_path: Path) -> None:
    ok = write(tmp_path / "ok.json", [
        {"name": "env", "run": ["sh", "-c", 'touch "$KAAPCLI_OUT/$KAAPCLI_PATIENT_ID"']},
        {"name": "positional", "run": ["sh", "-c", 'touch "$1"', "sh", "{out}/{patient_id}"]},
        {"name": "script-file", "run": ["bash", "./process.sh", "{series_dir}", "{patient_id}"]}])
    proc = kaapcli("rules", "check", ok)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("patient_id", HOSTILE_IDS)
def test_hostile_patient_id_runs_nothing_and_writes_only_inside_out(one_series: Path, tmp_path: Path,
                                                                    patient_id: str) -> None:
    data = hostile_copy(one_series, tmp_path / "data", patient_id)
    out, cwd = tmp_path / "work" / "out", tmp_path / "work"
    out.mkdir(parents=True)
    rules = write(tmp_path / "r.json", [
        {"name": "touch", "run": ["touch", "{out}/{patient_id}.done"]},
        {"name": "mkdir", "run": ["mkdir", "-p", "{out}/{patient_id}/{series_uid}"]},
        {"name": "env", "run": ["sh", "-c", 'printf %s "$KAAPCLI_PATIENT_ID" > "$KAAPCLI_OUT/env.txt"']}])
    proc = kaapcli("trigger", "--rules", rules, data, "-o", out, "--journal", tmp_path / "j.jsonl", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    everything = [p for p in tmp_path.rglob("*") if "PWNED" in p.name or "escaped" in p.name or "nul" in p.name]
    inside = [p for p in everything if out in p.parents]
    assert everything == inside  # nothing outside {out}
    assert not list(tmp_path.rglob("PWNED"))  # and no command ran
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 3 and "env.txt" in written
    token = (out / "env.txt").read_text()
    assert f"{token}.done" in written and token in written
    assert "/" not in token and not token.startswith(("-", ".")) and len(token) <= 120 and "\0" not in token


# --------------------------------------------------------------------------- the bugs of issue #14

def test_dependent_skipped_because_its_dependency_did_not_fire_is_no_failure(one_series: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rules = write(tmp_path / "r.json", [  # the docs' example: thumb depends on seg-to-nifti, the data is CT
        {"name": "seg-to-nifti", "search_tags": {"0x0008,0x0060": "SEG,RTSTRUCT"}, "run": ["false"]},
        {"name": "thumb", "depends_on": ["seg-to-nifti"], "run": ["touch", "{out}/thumb"]},
        {"name": "ok", "run": ["touch", "{out}/ok"]}])
    proc = kaapcli("trigger", "--rules", rules, one_series, "-o", out, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ok"]
    status = {r["rule"]: r["status"] for r in records(tmp_path / "j.jsonl")}
    assert status == {"thumb": "skipped", "ok": "ok"}


def test_group_rule_requiring_a_sequence_fires(petct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rules = write(tmp_path / "r.json", [{
        "name": "petct", "inputs": {"ct": {"required_values": {"Modality": "^CT$"}},
                                    "pet": {"required_tags": ["RadiopharmaceuticalInformationSequence"],
                                            "required_values": {"Modality": "^PT$"}}},
        "run": ["touch", "{out}/{patient_id}"]}])
    proc = kaapcli("trigger", "--rules", rules, petct, "-o", out, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["MOCK-0005-0000"]


def test_dcm_processor_settings_keys_are_accepted(tmp_path: Path) -> None:
    settings = write(tmp_path / "settings.json", [  # a registry settings.json of dcm-processor
        {"jobName": "dcm2nii", "worker": "dcm2nii.worker", "callback": "dcm2nii.callback", "dependsOn": None,
         "priority": "default", "timeout": "1h", "params": {}, "sortPosition": 0,
         "description": "Dicom to Nifti Service"},
        {"jobName": "ms-sub", "worker": "ms_sub:worker", "callback": "ms_sub:callback", "dependsOn": "dcm2nii",
         "priority": "default", "timeout": "1h", "params": {}, "sortPosition": 0, "description": "subtraction"}])
    proc = kaapcli("rules", "check", settings)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["name"], r["description"], r["sortPosition"]) for r in lines] == [
        ("dcm2nii", "Dicom to Nifti Service", 0), ("ms-sub", "subtraction", 0)]


def test_sort_position_orders_independent_jobs(one_series: Path, tmp_path: Path) -> None:
    log = tmp_path / "order.txt"
    rules = write(tmp_path / "r.json", [
        {"name": f"job-{n}", "sortPosition": position, "run": ["sh", "-c", f'echo {n} >> "$1"', "sh", str(log)]}
        for n, position in (("a", 3), ("b", 1), ("c", 2))])
    proc = kaapcli("trigger", "--rules", rules, one_series, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["b", "c", "a"]


# --------------------------------------------------------------------------- dcm-processor

SERVICE = '''
import json, os, pathlib

def wanted(headers, params, added_params):
    if headers["Modality"] == "MR":
        raise RuntimeError("MR is not for us")
    return headers["Modality"] == "CT", {"level": params["level"]}

def convert(jobName, headers, params, added_params, out):
    pathlib.Path(out, "convert.json").write_text(json.dumps({"job": jobName, "added": added_params,
                                                             "patient": headers["PatientID"]}))
    return True, {"volume": "ct.nii.gz"}

def crash(**kwargs):
    os.abort()
'''


def test_callback_worker_depends_on_and_added_params(one_series: Path, tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    out = tmp_path / "out"
    out.mkdir()
    rules = write(tmp_path / "settings.json", [
        {"jobName": "convert", "callback": "svc:wanted", "worker": "svc:convert", "params": {"level": 3}},
        {"jobName": "report", "dependsOn": "convert",
         "run": ["sh", "-c", '{ cat "$KAAPCLI_ADDED_PARAMS_FILE"; echo; echo "$KAAPCLI_ADDED_PARAMS"; } > "$1"', "sh",
                 "{out}/report.json"]},
        {"jobName": "crashes", "worker": "svc:crash"},
        {"jobName": "after-crash", "dependsOn": "crashes", "run": ["touch", "{out}/never"]}])
    proc = kaapcli("trigger", "--rules", rules, one_series, "-o", out, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 1  # the crashing worker fails its series; the rest ran
    convert = json.loads((out / "convert.json").read_text())
    assert convert == {"job": "convert", "added": {"convert": {"level": 3}}, "patient": "MOCK-0011-0000"}
    file_copy, env_copy = (out / "report.json").read_text().splitlines()
    assert json.loads(file_copy) == json.loads(env_copy) == {"convert": {"level": 3, "volume": "ct.nii.gz"}}
    assert not (out / "never").exists()
    status = {r["rule"]: r["status"] for r in records(tmp_path / "j.jsonl")}
    assert status == {"convert": "ok", "report": "ok", "crashes": "failed", "after-crash": "skipped"}


def test_failing_callback_fails_its_rule_only(tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    data = tmp_path / "mr"
    assert kaapcli("mock", "-o", data, "--modality", "MR", "--slices", "2", "--rows", "16", "--columns", "16",
                   "-q").returncode == 0
    rules = write(tmp_path / "r.json", [{"name": "picky", "callback": "svc:wanted", "run": ["true"]},
                                        {"name": "other", "run": ["true"]}])
    proc = kaapcli("trigger", "--rules", rules, data, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    runs = {r["rule"]: r for r in records(tmp_path / "j.jsonl")}
    assert runs["picky"]["status"] == "failed" and runs["other"]["status"] == "ok"
    assert "MR is not for us" in Path(runs["picky"]["log"]).read_text()


# --------------------------------------------------------------------------- Kaapana

def test_kaapana_trigger_rule_json_with_a_dag_table(petct: Path, tmp_path: Path) -> None:
    trigger_rule = write(tmp_path / "dag_petct_trigger_rule.json", [
        {"search_tags": {"0x0008,0x0060": "PT"},
         "dag_ids": {"suv": {"fetch_method": "copy", "single_execution": True}}},
        {"search_tags": {}, "dag_ids": {"collect-metadata": {"fetch_method": "", "rest_call": {"global": {}},
                                                            "single_execution": False}}}])
    lister = ["sh", "-c", 'find "$KAAPCLI_BATCH_DIR" -name "*.dcm" | sort > "$1"', "sh"]
    dags = write(tmp_path / "dags.json", {"suv": [*lister, "{out}/suv-{series_uid}.txt"],
                                          "collect-metadata": [*lister, "{out}/all.txt"]})
    out = tmp_path / "out"
    out.mkdir()
    missing = kaapcli("rules", "check", trigger_rule)
    assert missing.returncode == 78 and "--dags" in missing.stderr
    proc = kaapcli("trigger", "--rules", trigger_rule, "--dags", dags, petct, "-o", out, "--journal",
                   tmp_path / "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    suv = list(out.glob("suv-*.txt"))
    assert len(suv) == 1  # one PT series, a run of its own
    copied = [Path(line) for line in suv[0].read_text().split()]
    assert len(copied) == 2 and all(p.parts[-3] == "get-input-data" or p.parent.name == "get-input-data"
                                    for p in copied)
    assert all(p.is_file() and not p.is_symlink() for p in copied)  # fetch_method copy
    everything = (out / "all.txt").read_text().split()
    assert len(everything) == 6  # single_execution false: one run over the three series of the batch
    assert len({Path(p).parent.parent.name for p in everything}) == 3


# --------------------------------------------------------------------------- journal and run control

def test_journal_is_private_and_runs_masks_secrets(one_series: Path, tmp_path: Path) -> None:
    journal = tmp_path / "state" / "runs.jsonl"
    rules = write(tmp_path / "r.json", [{"name": "a", "run": ["true"],
                                         "params": {"API_KEY": "k-123", "DB_PASSWORD": "pw", "MY_TOKEN": "t",
                                                    "CLIENT_SECRET_X": "s", "LEVEL": "3"}}])
    assert kaapcli("trigger", "--rules", rules, one_series, "--journal", journal).returncode == 0
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    assert stat.S_IMODE((journal.parent / "logs").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (journal.parent / "logs").iterdir())
    [run] = records(journal)
    assert {k: run["env"][k] for k in ("API_KEY", "DB_PASSWORD", "MY_TOKEN", "CLIENT_SECRET_X", "LEVEL")} == {
        "API_KEY": "****", "DB_PASSWORD": "****", "MY_TOKEN": "****", "CLIENT_SECRET_X": "****", "LEVEL": "3"}


def test_retry_reruns_dependents_and_links_them(one_series: Path, tmp_path: Path) -> None:
    flag, out = tmp_path / "flag", tmp_path / "out"
    out.mkdir()
    rules = write(tmp_path / "r.json", [
        {"name": "needs-flag", "run": ["test", "-e", str(flag)]},
        {"name": "next", "depends_on": ["needs-flag"], "run": ["touch", "{out}/next"]},
        {"name": "last", "depends_on": ["next"], "run": ["touch", "{out}/last"]},
        {"name": "unrelated", "run": ["true"]}])
    journal = tmp_path / "j.jsonl"
    assert kaapcli("trigger", "--rules", rules, one_series, "-o", out, "--journal", journal).returncode == 1
    first = {r["rule"]: r for r in records(journal)}
    assert [first[n]["status"] for n in ("needs-flag", "next", "last")] == ["failed", "skipped", "skipped"]
    flag.touch()
    retried = kaapcli("runs", "retry", first["needs-flag"]["id"], "--journal", journal)
    assert retried.returncode == 0, retried.stderr
    assert sorted(p.name for p in out.iterdir()) == ["last", "next"]
    new = [r for r in records(journal) if r["retry_of"]]
    assert {r["rule"]: r["retry_of"] for r in new} == {n: first[n]["id"] for n in ("needs-flag", "next", "last")}
    assert all(r["status"] == "ok" for r in new)
    assert kaapcli("runs", "retry", "nope", "--journal", journal).returncode == 2


def test_cancel_stops_a_running_and_a_queued_run(one_series: Path, tmp_path: Path) -> None:
    journal = tmp_path / "j.jsonl"
    rules = write(tmp_path / "r.json", [
        {"name": "slow", "run": ["sleep", "60"]},
        {"name": "queued", "depends_on": [], "sortPosition": 1000, "run": ["touch", str(tmp_path / "ran")]}])
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "trigger", "--rules", str(rules), str(one_series),
                             "--journal", str(journal)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = {r["rule"]: r for r in records(journal)} if journal.exists() else {}
            if state.get("slow", {}).get("status") == "running":
                break
            time.sleep(0.1)
        assert kaapcli("runs", "cancel", state["queued"]["id"], "--journal", journal).returncode == 0
        assert kaapcli("runs", "cancel", state["slow"]["id"], "--journal", journal).returncode == 0
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    final = {r["rule"]: r["status"] for r in records(journal)}
    assert final == {"slow": "cancelled", "queued": "cancelled"}
    assert not (tmp_path / "ran").exists()
    again = kaapcli("runs", "cancel", state["slow"]["id"], "--journal", journal)
    assert again.returncode == 2 and "nothing to cancel" in again.stderr
