"""``kaapcli gallery``: a static page rendered by headless Chromium, its filter run by Chromium's JS engine,
and DICOM values that try to inject HTML staying inert text."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kaapcli.core.index.query import SERIES_KEY, TAGS_KEY
from tests.conftest import kaapcli

CHROMIUM = "/usr/bin/chromium"
PAYLOAD = '"><img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def dump_dom(page: str, tmp: Path) -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'profile'}", "--dump-dom", page],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_gallery_renders_filters_and_escapes(tmp_path: Path) -> None:
    from PIL import Image

    docs = [
        {SERIES_KEY: "1.2.1", "00080060 Modality_keyword": "CT", "0008103E SeriesDescription_keyword": "Chest CT",
         "00100020 PatientID_keyword": "P1", TAGS_KEY: ["lung"], "00280010 Rows_integer": 512,
         "00280011 Columns_integer": 512},
        {SERIES_KEY: "1.2.2", "00080060 Modality_keyword": "MR", "0008103E SeriesDescription_keyword": PAYLOAD,
         "00100020 PatientID_keyword": "P2<b>", TAGS_KEY: ["<i>tag</i>"]},
        {SERIES_KEY: "1.2.3", "00080060 Modality_keyword": "CT", "0008103E SeriesDescription_keyword": "Head"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    db = tmp_path / "i.db"
    assert kaapcli("index", tmp_path / "d.jsonl", "--index", db).returncode == 0
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    Image.new("L", (16, 16), 200).save(thumbs / "1.2.1.png")

    out = tmp_path / "gallery"
    proc = kaapcli("gallery", "-o", out, "--thumbnails", thumbs, "--index", db, "--title", "Lung <study>")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "index.html")
    assert "3 series, 1 thumbnails" in proc.stderr
    assert (out / "thumbnails" / "1.2.1.png").read_bytes() == (thumbs / "1.2.1.png").read_bytes()
    source = (out / "index.html").read_text()
    assert "http://" not in source and "https://" not in source  # nothing fetched from the network
    assert html.escape(PAYLOAD) in source and PAYLOAD not in source

    dom = dump_dom((out / "index.html").as_uri() + "#q=ct%20chest", tmp_path)
    cards = re.findall(r'<article class="card" data-uid="([^"]+)"[^>]*?( hidden="")?>', dom)
    assert [uid for uid, _ in cards] == ["1.2.1", "1.2.2", "1.2.3"]
    # the inline script ran in Chromium: only the card holding both words stays visible
    assert [(uid, bool(hidden)) for uid, hidden in cards] == [("1.2.1", False), ("1.2.2", True), ("1.2.3", True)]
    assert '<span id="count">1 of 3 series</span>' in dom
    assert "<title>Lung &lt;study&gt;</title>" in dom  # the injected script never set the title
    assert '<img src="x"' not in dom and "<script>document.title" not in dom
    assert "&lt;i&gt;tag&lt;/i&gt;" in dom and "P2&lt;b&gt;" in dom
    assert '<img class="thumb" src="thumbnails/1.2.1.png"' in dom
    assert dom.count('class="thumb nothumb"') == 2  # series without a thumbnail get a placeholder


def test_gallery_errors(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({SERIES_KEY: "1"}))
    db = tmp_path / "i.db"
    assert kaapcli("index", tmp_path / "d.json", "--index", db).returncode == 0
    proc = kaapcli("gallery", "-o", tmp_path / "g", "--thumbnails", tmp_path / "none", "--index", db)
    assert proc.returncode == 66 and "none: no such directory" in proc.stderr
    proc = kaapcli("gallery", "-o", tmp_path / "g", "--query", "Modality:(CT", "--index", db)
    assert proc.returncode == 2 and "position" in proc.stderr
    assert not (tmp_path / "g").exists()
    shutil.rmtree(tmp_path / "g", ignore_errors=True)
