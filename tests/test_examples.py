"""The examples pipeline runs end to end, in parallel, and a second run has nothing to do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_examples_demo_runs_with_make_j2(tmp_path: Path) -> None:
    args = ["make", "-C", str(ROOT / "examples"), "-j2", "demo", f"KAAPCLI={sys.executable} -m kaapcli",
            f"PYTHON={sys.executable}", f"OUT={tmp_path / 'out'}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    lists = sorted(p.name for p in (tmp_path / "out").glob("*.list"))
    assert {"mock.list", "anon.list", "seg.list", "sr.list", "meta.list", "gallery.list"} <= set(lists)
    found = [json.loads(line) for line in (tmp_path / "out" / "search.jsonl").read_text().splitlines()]
    assert [doc["00080060 Modality_keyword"] for doc in found] == ["SEG"]
    assert found[0]["00000000 AnnotationLabelsList_keyword"] == "liver"
    for listing in (tmp_path / "out").glob("*.list"):
        paths = listing.read_text().split()
        if listing.name == "index.list":  # kaapcli index prints the indexed series UIDs
            assert len(paths) == 3
            continue
        assert paths and all(Path(p).exists() for p in paths), listing
    targets = [str(tmp_path / "out" / name) for name in lists]
    again = subprocess.run([*args[:4], *args[5:], "--question", *targets], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, "a second make run should find everything up to date"
