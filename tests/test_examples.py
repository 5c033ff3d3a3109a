"""The examples pipeline runs end to end, in parallel, and a second run has nothing to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_examples_demo_runs_with_make_j2(tmp_path: Path) -> None:
    args = ["make", "-C", str(ROOT / "examples"), "-j2", "demo", f"KAAPCLI={sys.executable} -m kaapcli",
            f"OUT={tmp_path / 'out'}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    lists = sorted(p.name for p in (tmp_path / "out").glob("*.list"))
    assert "mock.list" in lists and "meta.list" in lists
    for listing in (tmp_path / "out").glob("*.list"):
        paths = listing.read_text().split()
        assert paths and all(Path(p).exists() for p in paths), listing
    targets = [str(tmp_path / "out" / name) for name in lists]
    again = subprocess.run([*args[:-3], *args[-2:], "--question", *targets], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, "a second make run should find everything up to date"
