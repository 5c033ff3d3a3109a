"""A receiving node: DCMTK storescu → kaapcli receive --rules --index; rules fire in order, runs are journalled."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import dcmtk, kaapcli, wait_for
from peers import receiver  # noqa: F401 - fixture

pytestmark = pytest.mark.network


def test_receiver_runs_rules_in_order_skips_dependents_and_indexes(receiver, mock_ct: Path,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([
        {"name": "first", "search_tags": {"0x0008,0x0060": "CT"},
         "run": ["sh", "-c", f'echo first "$KAAPCLI_CALLING_AET" "$KAAPCLI_CALLED_AET" >> {marks}/"$1"', "sh",
                 "{series_uid}"]},
        {"name": "second", "depends_on": ["first"],
         "run": ["sh", "-c", f'echo second >> {marks}/"$KAAPCLI_SERIES_UID"; exit 4']},
        {"name": "third", "depends_on": ["second"],
         "run": ["sh", "-c", f'echo third >> {marks}/"$KAAPCLI_SERIES_UID"']},
        {"name": "not-ct", "search_tags": {"Modality": "MR"}, "run": ["false"]},
    ]))
    journal = tmp_path / "runs.jsonl"
    index = tmp_path / "index.db"
    rx = receiver("--series-timeout", "0.5", "--rules", str(rules), "--journal", str(journal),
                  "--index", str(index), "--aet-convention", "kp")
    proc = subprocess.run([dcmtk("storescu"), "-aet", "kp-cohort1", "-aec", "kp-lung", "+sd", "+r", "+sp", "*.dcm",
                           "127.0.0.1", str(rx.port), str(mock_ct)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: len(list(marks.iterdir())) == 2 and all(
        m.read_text().count("\n") == 2 for m in marks.iterdir()))
    time.sleep(0.5)
    code, _, stderr = rx.finish(signal.SIGTERM)
    assert code == 0, stderr
    for mark in marks.iterdir():
        assert mark.read_text() == "first kp-cohort1 kp-lung\nsecond\n"  # third skipped: its dependency failed
    runs = [json.loads(line) for line in kaapcli("runs", "--journal", journal).stdout.splitlines()]
    statuses = sorted((r["rule"], r["status"]) for r in runs)
    assert statuses == sorted([("first", "ok")] * 2 + [("second", "failed")] * 2 + [("third", "skipped")] * 2)
    # indexed into project "lung" (called AE kp-lung), dataset "cohort1" (calling AE kp-cohort1)
    found = kaapcli("search", "Modality:CT", "--index", index, "--project", "lung", "--count")
    assert found.stdout.strip() == "2", found.stderr
    members = kaapcli("dataset", "show", "cohort1", "--index", index, "--project", "lung", "--format", "uids")
    assert sorted(members.stdout.split()) == sorted(m.name for m in marks.iterdir())
    # the index knows where the received files are, and which AE sent them
    paths = kaapcli("search", "*", "--format", "paths", "--index", index, "--project", "lung")
    assert paths.returncode == 0, paths.stderr
    received = sorted(str(p.absolute()) for p in rx.out.rglob("*.dcm"))
    assert sorted(paths.stdout.splitlines()) == received and len(received) == 16
    listed = kaapcli("search", "*", "--index", index, "--project", "lung").stdout
    docs = [json.loads(line) for line in listed.splitlines()]
    assert {d["00020016 SourceApplicationEntityTitle_keyword"] for d in docs} == {"kp-cohort1"}
