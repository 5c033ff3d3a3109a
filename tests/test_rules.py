"""Rules files, kaapcli trigger, the run journal and DicomNode-style group rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import kaapcli


def write_rules(path: Path, rules: list[dict]) -> Path:
    path.write_text(json.dumps(rules))
    return path


@pytest.mark.parametrize(("rule", "message"), [
    ({"name": "a", "run": "echo"}, "'run' must be a non-empty list"),
    ({"name": "a", "run": ["echo", "{nope}"]}, "unknown placeholder {nope}"),
    ({"name": "a", "run": ["echo"], "colour": "red"}, "unknown key(s) colour"),
    ({"name": "a", "run": ["echo"], "depends_on": ["b"]}, "depends_on 'b': no such rule"),
    ({"name": "a", "run": ["echo"], "search_tags": {"NotAKeyword": "x"}}, "NotAKeyword"),
    ({"name": "a", "run": ["echo"], "inputs": {"ct": {"required_values": {"Modality": "("}}}},
     "bad regular expression"),
])
def test_rules_check_explains_errors(tmp_path: Path, rule: dict, message: str) -> None:
    proc = kaapcli("rules", "check", write_rules(tmp_path / "r.json", [rule]))
    assert proc.returncode == 78
    assert message in proc.stderr and "rule 1 ('a')" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rules_check_rejects_cycles_and_accepts_toml(tmp_path: Path) -> None:
    cyc = write_rules(tmp_path / "c.json", [{"name": "a", "run": ["true"], "depends_on": ["b"]},
                                            {"name": "b", "run": ["true"], "depends_on": ["a"]}])
    proc = kaapcli("rules", "check", cyc)
    assert proc.returncode == 78 and "cycle" in proc.stderr
    toml = tmp_path / "r.toml"
    toml.write_text('[[rules]]\nname = "x"\nrun = ["true"]\nsearch_tags = { "0x0008,0x0060" = "CT" }\n')
    ok = kaapcli("rules", "check", toml)
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "x"


def test_trigger_runs_matching_rules_in_order_skips_dependents_and_journals(mock_studies: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rules = write_rules(tmp_path / "r.json", [
        {"name": "first", "search_tags": {"0x0008,0x0060": "MR,CT"}, "priority": 1,
         "run": ["sh", "-c", 'echo "$KAAPCLI_SERIES_UID" "$KAAPCLI_PATIENT_ID" $WHO >> "$1"', "sh",
                 "{out}/{series_uid}.txt"],
         "params": {"WHO": "first"}},
        {"name": "second", "depends_on": ["first"], "priority": 9,
         "run": ["sh", "-c", 'echo second >> "$KAAPCLI_OUT/$KAAPCLI_SERIES_UID.txt"; exit 3']},
        {"name": "third", "depends_on": ["second"],
         "run": ["sh", "-c", 'echo third >> "$KAAPCLI_OUT/$KAAPCLI_SERIES_UID.txt"']},
        {"name": "never", "search_tags": {"Modality": "SEG,RTSTRUCT"}, "run": ["false"]},
    ])
    journal = tmp_path / "runs.jsonl"
    proc = kaapcli("trigger", "--rules", rules, mock_studies, "-o", out, "--journal", journal)
    assert proc.returncode == 1  # 'second' fails on every series
    written = sorted(out.glob("*.txt"))
    assert len(written) == 3  # three series
    for path in written:
        lines = path.read_text().split("\n")
        assert lines[0].split()[0] == path.stem and lines[0].endswith(" first")
        assert lines[1] == "second" and "third" not in path.read_text()
    listed = kaapcli("runs", "--journal", journal)
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    by_rule: dict[str, list[str]] = {}
    for r in records:
        by_rule.setdefault(r["rule"], []).append(r["status"])
    assert by_rule == {"first": ["ok"] * 3, "second": ["failed"] * 3, "third": ["skipped"] * 3}
    failed = [json.loads(line) for line in kaapcli("runs", "--failed", "--journal", journal).stdout.splitlines()]
    assert {r["rule"] for r in failed} == {"second"} and all(r["exit_code"] == 3 for r in failed)
    assert all(Path(r["log"]).is_file() for r in failed)


def test_runs_retry_and_timeout(mock_studies: Path, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    rules = write_rules(tmp_path / "r.json", [
        {"name": "needs-flag", "run": ["sh", "-c", f"test -e {flag}"]},
        {"name": "slow", "run": ["sleep", "30"], "timeout": 0.5},
    ])
    journal = tmp_path / "runs.jsonl"
    one_series = sorted(p for p in mock_studies.rglob("*.dcm"))[:1]
    proc = kaapcli("trigger", "--rules", rules, *one_series, "--journal", journal)
    assert proc.returncode == 1
    records = [json.loads(line) for line in kaapcli("runs", "--journal", journal).stdout.splitlines()]
    status = {r["rule"]: r["status"] for r in records}
    assert status == {"needs-flag": "failed", "slow": "timeout"}
    flag.touch()
    failed_id = next(r["id"] for r in records if r["rule"] == "needs-flag")
    retried = kaapcli("runs", "retry", failed_id, "--journal", journal)
    assert retried.returncode == 0
    assert kaapcli("runs", "retry", "nope", "--journal", journal).returncode == 2


def test_group_rule_fires_only_when_every_input_of_a_patient_is_present(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for modality, seed in (("CT", 5), ("PT", 5), ("CT", 6)):  # seed 5: CT + PT of one patient; seed 6: CT only
        proc = kaapcli("mock", "-o", data / f"{modality}{seed}", "--modality", modality, "--seed", str(seed),
                       "--slices", "2", "--rows", "16", "--columns", "16", "-q")
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    out.mkdir()
    rules = write_rules(tmp_path / "r.json", [{
        "name": "petct", "inputs": {"ct": {"required_values": {"Modality": "^CT$"}},
                                    "pet": {"required_values": {"Modality": "^PT$"}}},
        "run": ["sh", "-c", 'echo "$KAAPCLI_PATIENT_ID" "$1" "$2" > "$KAAPCLI_OUT/$KAAPCLI_PATIENT_ID.txt"', "sh",
                "{input_ct}", "{input_pet}"]}])
    proc = kaapcli("trigger", "--rules", rules, data, "-o", out, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    fired = sorted(p.name for p in out.iterdir())
    assert fired == ["MOCK-0005-0000.txt"]
    patient, ct_dir, pet_dir = (out / fired[0]).read_text().split()
    assert "CT5" in ct_dir and "PT5" in pet_dir
    shutil.rmtree(data / "PT5")
    (out / fired[0]).unlink()
    again = kaapcli("trigger", "--rules", rules, data, "-o", out, "--journal", tmp_path / "j.jsonl")
    assert again.returncode == 0 and not list(out.iterdir())


def test_match_uses_the_index_query_language(mock_studies: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    series = sorted({p.parent for p in mock_studies.rglob("*.dcm")})
    import pydicom

    wanted = pydicom.dcmread(next(series[1].glob("*.dcm")), stop_before_pixels=True).PatientID
    rules = write_rules(tmp_path / "r.json", [
        {"name": "one-patient", "match": f'PatientID:"{wanted}" AND Rows:>=32 AND -Modality:MR',
         "run": ["sh", "-c", 'echo "$KAAPCLI_PATIENT_ID" > "$KAAPCLI_OUT/$KAAPCLI_SERIES_UID.txt"']},
        {"name": "none", "match": "Rows:>512", "run": ["false"]}])
    assert kaapcli("rules", "check", rules).returncode == 0
    proc = kaapcli("trigger", "--rules", rules, mock_studies, "-o", out, "--journal", tmp_path / "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert [p.read_text().strip() for p in out.iterdir()] == [wanted]
    bad = write_rules(tmp_path / "bad.json", [{"name": "b", "match": "Modality:(CT", "run": ["true"]}])
    checked = kaapcli("rules", "check", bad)
    assert checked.returncode == 78 and "match" in checked.stderr and "position" in checked.stderr
