"""kaapcli watch: a dropped series is taken when stable; Orthanc's StableSeries feed is followed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import dicom_files, kaapcli
from peers import orthanc  # noqa: F401 - fixture


def test_dropped_series_is_taken_when_stable_and_its_rules_run(mock_ct: Path, tmp_path: Path) -> None:
    inbox, store, marks = tmp_path / "inbox", tmp_path / "store", tmp_path / "marks"
    inbox.mkdir()
    marks.mkdir()
    rules = tmp_path / "rules.json"
    count = f'ls "$KAAPCLI_SERIES_DIR" | wc -l > {marks}/"$KAAPCLI_SERIES_UID"'
    rules.write_text(json.dumps([{"name": "mark", "run": ["sh", "-c", count]}]))
    proc = subprocess.Popen([sys.executable, "-m", "kaapcli", "watch", str(inbox), "-o", str(store), "--rules",
                             str(rules), "--journal", str(tmp_path / "j.jsonl"), "--stable", "0.3",
                             "--series-timeout", "0.5", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        series_dir = sorted({p.parent for p in dicom_files(mock_ct)})[0]
        files = sorted(series_dir.glob("*.dcm"))
        partial = inbox / "incoming.dcm"  # a file still being written is not taken
        partial.write_bytes(files[0].read_bytes()[:1000])
        for f in files:
            shutil.copy(f, inbox / f.name)
        (inbox / "readme.txt").write_text("not DICOM: left in place")
        time.sleep(0.2)
        partial.unlink()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(marks.iterdir()):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    stored = dicom_files(store)
    assert len(stored) == len(files) and sorted(stdout.split()) == sorted(map(str, stored))
    assert [m.read_text().strip() for m in marks.iterdir()] == [str(len(files))]
    assert sorted(p.name for p in inbox.iterdir()) == ["readme.txt"]  # taken files moved, the text file stays
    assert "readme.txt: not a DICOM file" in stderr


@pytest.mark.network
def test_orthanc_change_feed_stable_series_are_stored_and_indexed(orthanc, mock_ct: Path,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    orthanc.clear()
    sent = kaapcli("send", mock_ct, "--to", orthanc.dimse, "-q")
    assert sent.returncode == 0, sent.stderr
    series = {json.loads(line)["0020000E"]["Value"][0] for line in kaapcli(
        "query", orthanc.dimse, "-l", "series").stdout.splitlines()}
    assert len(series) == 2
    deadline = time.monotonic() + 30
    stable: set[str] = set()
    while time.monotonic() < deadline and len(stable) < 2:  # Orthanc's StableAge is 1 s in the fixture
        changes = requests.get(f"{orthanc.rest}/changes", params={"limit": 1000}, timeout=10).json()["Changes"]
        stable = {c["ID"] for c in changes if c["ChangeType"] == "StableSeries"}
        time.sleep(0.3)
    store = tmp_path / "store"
    index = tmp_path / "index.db"
    proc = kaapcli("watch", "--orthanc", orthanc.rest, "-o", store, "--once", "--interval", "0.1",
                   "--index", index, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stored_series = {p.parent.name for p in dicom_files(store)}
    assert series <= stored_series
    assert len([p for p in dicom_files(store) if p.parent.name in series]) == 16
    found = kaapcli("search", "Modality:CT", "--index", index, "--fields", "SeriesInstanceUID")
    assert series <= {json.loads(line)["0020000E SeriesInstanceUID_keyword"] for line in found.stdout.splitlines()}
    again = kaapcli("watch", "--orthanc", orthanc.rest, "-o", store, "--once", "--interval", "0.1")
    assert again.returncode == 0 and again.stdout == ""  # resumed after the last change: nothing new


def test_watch_usage_errors(tmp_path: Path) -> None:
    assert kaapcli("watch").returncode == 2
    assert kaapcli("watch", "--orthanc", "http://127.0.0.1:9").returncode == 2  # needs -o
    assert kaapcli("watch", tmp_path / "missing").returncode == 66
    dead = kaapcli("watch", "--orthanc", "http://127.0.0.1:9", "-o", tmp_path / "s", "--once")
    assert dead.returncode == 69 and "Orthanc http://127.0.0.1:9" in dead.stderr
