"""``kaapcli gallery`` and ``kaapcli dashboard``: static pages rendered by headless Chromium.  The gallery's
filter runs in Chromium's JS engine and must show exactly the series ``kaapcli search`` finds for the same
query; DICOM values that try to inject HTML stay inert text; screenshots are measured (thumbnail colours
after a filter, bar lengths of the dashboard)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from kaapcli.core.index.query import SERIES_KEY, TAGS_KEY
from kaapcli.core.thumbnail import PALETTE
from tests.conftest import kaapcli

CHROMIUM = "/usr/bin/chromium"
PAYLOAD = '"><img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
MOD, DESC, PID, STUDY, DATE = ("00080060 Modality_keyword", "0008103E SeriesDescription_keyword",
                               "00100020 PatientID_keyword", "0020000D StudyInstanceUID_keyword",
                               "00080020 StudyDate_date")
ROWS, COLS, COUNT = "00280010 Rows_integer", "00280011 Columns_integer", "00000000 NumberOfInstances_integer"


def chromium(tmp: Path, page: str, *extra: str) -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed")
    profile = tmp / f"profile-{abs(hash((page, extra)))}"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *extra, page],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def dump_dom(page: str, tmp: Path) -> str:
    return chromium(tmp, page, "--dump-dom")


def visible(dom: str) -> list[str]:
    return [uid for uid, hidden in re.findall(r'<article class="card" data-uid="([^"]+)"[^>]*?( hidden="")?>', dom)
            if not hidden]


def pixels(png: Path) -> dict[tuple[int, int, int], int]:
    from PIL import Image

    counts: dict[tuple[int, int, int], int] = {}
    image = Image.open(png).convert("RGB")
    for colour in (image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)):
        counts[colour] = counts.get(colour, 0) + 1  # type: ignore[index]
    return counts


def index(tmp: Path, docs: list[dict[str, Any]]) -> Path:
    (tmp / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    db = tmp / "i.db"
    proc = kaapcli("index", tmp / "d.jsonl", "--index", db)
    assert proc.returncode == 0, proc.stderr
    return db


def test_gallery_renders_filters_and_escapes(tmp_path: Path) -> None:
    from PIL import Image

    docs = [
        {SERIES_KEY: "1.2.1", MOD: "CT", DESC: "Chest CT", PID: "P1", TAGS_KEY: ["lung"], ROWS: 512, COLS: 512},
        {SERIES_KEY: "1.2.2", MOD: "MR", DESC: PAYLOAD, PID: "P2<b>", TAGS_KEY: ["<i>tag</i>"]},
        {SERIES_KEY: "1.2.3", MOD: "CT", DESC: "Head"},
    ]
    db = index(tmp_path, docs)
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
    assert [uid for uid, _ in cards] == ["1.2.3", "1.2.1", "1.2.2"]  # by patient: (none), P1, P2<b>
    # the inline script ran in Chromium: only the card holding both words stays visible
    assert visible(dom) == ["1.2.1"]
    assert '<span id="count">1 of 3 series</span>' in dom
    assert "<title>Lung &lt;study&gt;</title>" in dom  # the injected script never set the title
    assert '<img src="x"' not in dom and "<script>document.title" not in dom
    assert "&lt;i&gt;tag&lt;/i&gt;" in dom and "Patient P2&lt;b&gt;" in dom
    assert '<img class="thumb" src="thumbnails/1.2.1.png"' in dom
    assert dom.count('class="thumb nothumb"') == 2  # series without a thumbnail get a placeholder
    assert len(re.findall(r'<section class="patient" hidden="">', dom)) == 2  # groups without a shown card


SEG_ITEMS = [{"00620004 SegmentNumber_integer": 1, "00620005 SegmentLabel_keyword": "liver"},
             {"00620004 SegmentNumber_integer": 2, "00620005 SegmentLabel_keyword": "<b>spleen</b>"}]


def cohort() -> list[dict[str, Any]]:
    """Two patients, three studies, CT/MR/SEG series with tags, dates, numbers and segment labels."""
    docs: list[dict[str, Any]] = []
    for i in range(8):
        doc: dict[str, Any] = {
            SERIES_KEY: f"1.9.{i}", PID: f"P{i % 2}", STUDY: f"2.{i % 3}", DATE: f"2020-{i % 3 * 4 + 1:02d}-1{i}",
            MOD: ["CT", "MR", "CT", "SEG"][i % 4], DESC: ["LUNG1 chest", "brain T1", "LUNG2 abdomen", "seg"][i % 4],
            ROWS: [512, 256][i % 2], COLS: 512, COUNT: [120, 40, 300, 1][i % 4],
            "00200011 SeriesNumber_integer": i + 1,
        }
        if i % 3 == 0:
            doc[TAGS_KEY] = ["excluded"] if i % 2 else ["reviewed", "excluded"]
        if doc[MOD] == "SEG":
            doc["00620002 SegmentSequence_object"] = SEG_ITEMS if i == 3 else SEG_ITEMS[0]
            doc["00000000 AnnotationLabel_keyword"] = [s["00620005 SegmentLabel_keyword"] for s in SEG_ITEMS]
        docs.append(doc)
    return docs


# each combines constructs: fields, negation, wildcards, bare words, inclusive and exclusive date ranges (a
# date bound covers its day), numeric comparison, Dataset:, a quoted value, groups, presence
QUERIES = ["Modality:CT -Tags:excluded", "SeriesDescription:LUNG2* OR chest",
           "StudyDate:[2020-01-01 TO 2020-05-10] OR lung1*", "StudyDate:{2020-01-10 TO *} AND NumberOfInstances:>=120",
           '-Dataset:train AND AnnotationLabel:"<b>spleen</b>"', "modality:(CT OR MR) AND Rows:512 AND -Tags:*"]


def test_gallery_filter_shows_what_search_finds(tmp_path: Path) -> None:
    docs = cohort()
    db = index(tmp_path, docs)
    assert kaapcli("dataset", "add", "train", "--query", "Rows:512", "--index", db).returncode == 0
    out = tmp_path / "gallery"
    assert kaapcli("gallery", "-o", out, "--index", db).returncode == 0

    def both(query: str) -> tuple[list[str], list[str]]:
        found = kaapcli("search", query, "--format", "uids", "--index", db)
        assert found.returncode == 0, found.stderr
        dom = dump_dom((out / "index.html").as_uri() + "#q=" + quote(query), tmp_path)
        return sorted(found.stdout.split()), sorted(visible(dom))

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(QUERIES, pool.map(both, QUERIES), strict=True))
    for query, (expected, shown) in results.items():
        assert shown == expected, query
    assert all(0 < len(results[q][0]) < len(docs) for q in QUERIES)  # each query selects some, not all
    # grouping: patients in order, studies by date within them; segment legends in thumbnail colours
    dom = dump_dom((out / "index.html").as_uri() + "#q=Foo:1", tmp_path)
    assert "unknown field 'Foo' (this page filters by Modality, SeriesDescription" in dom
    assert len(visible(dom)) == len(docs)  # a query the page cannot read hides nothing
    patients = re.findall(r"<h2>Patient (P\d)", dom)
    assert patients == ["P0", "P1"]
    legend = re.search(r'data-uid="1.9.3".*?<ul class="legend">(.*?)</ul>', dom)
    assert legend is not None
    swatches = re.findall(r'background: ?(#[0-9a-f]{6}|rgb\([^)]*\));?"></span>([^<]*(?:&lt;[^<]*)*)', legend[1])
    colours = ["#{:02x}{:02x}{:02x}".format(*PALETTE[0]), "#{:02x}{:02x}{:02x}".format(*PALETTE[1])]
    assert [label for _, label in swatches] == ["liver", "&lt;b&gt;spleen&lt;/b&gt;"]
    assert [_css_hex(c) for c, _ in swatches] == colours
    dom = dump_dom((out / "index.html").as_uri() + "#q=" + quote("Modality:(CT"), tmp_path)
    assert "query syntax error at position 13: expected ')', found end of query" in dom


def _css_hex(value: str) -> str:
    if value.startswith("#"):
        return value
    r, g, b = (int(x) for x in re.findall(r"\d+", value))
    return f"#{r:02x}{g:02x}{b:02x}"


def test_gallery_screenshot_after_a_filter(tmp_path: Path) -> None:
    """Each series' thumbnail is one solid colour: after #q=Modality:MR the screenshot shows MR's colour and
    the SEG legend's, and not CT's."""
    from PIL import Image

    docs = [{SERIES_KEY: "1.1", MOD: "CT", PID: "P1"}, {SERIES_KEY: "1.2", MOD: "MR", PID: "P1"},
            {SERIES_KEY: "1.3", MOD: "SEG", PID: "P2", "00620002 SegmentSequence_object": SEG_ITEMS}]
    db = index(tmp_path, docs)
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    colours = {"1.1": (220, 20, 20), "1.2": (20, 200, 20), "1.3": (30, 30, 30)}
    for uid, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(thumbs / f"{uid}.png")
    out = tmp_path / "gallery"
    assert kaapcli("gallery", "-o", out, "--thumbnails", thumbs, "--index", db).returncode == 0
    shot = tmp_path / "shot.png"
    chromium(tmp_path, (out / "index.html").as_uri() + "#q=" + quote("Modality:MR OR Modality:SEG"),
             f"--screenshot={shot}", "--window-size=1000,1400", "--hide-scrollbars")
    seen = pixels(shot)
    assert seen.get(colours["1.2"], 0) > 5000  # the MR thumbnail is drawn
    assert seen.get(colours["1.1"], 0) == 0  # the CT card is filtered out
    assert seen.get(PALETTE[0], 0) > 20 and seen.get(PALETTE[1], 0) > 20  # the SEG legend's swatches


def test_dashboard_counts_and_screenshot(tmp_path: Path) -> None:
    docs = cohort()
    db = index(tmp_path, docs)
    assert kaapcli("dataset", "add", "train", "--query", "Rows:512", "--index", db).returncode == 0
    out = tmp_path / "dash"
    proc = kaapcli("dashboard", "-o", out, "--index", db, "--query", "-Modality:SEG", "--title", "Cohort <1>")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out / "index.html") and "6 series, 7 charts" in proc.stderr
    source = (out / "index.html").read_text()
    assert "<script" not in source and "http" not in source.replace('http-equiv', '')
    dom = dump_dom((out / "index.html").as_uri(), tmp_path)
    facets = re.findall(r'<section class="chart" data-facet="([^"]+)">', dom)
    assert facets == ["Modality", "BodyPartExamined", "Manufacturer", "StudyDate by month", "PatientSex", "Tags",
                      "Dataset"]
    chosen = [d for d in docs if d[MOD] != "SEG"]

    def rows(facet: str) -> list[tuple[str, int]]:
        section = re.search(rf'data-facet="{facet}">(.*?)</section>', dom)
        assert section is not None
        return [(label, int(n)) for label, n in re.findall(r'<td class="label"[^>]*>([^<]*)</td>.*?'
                                                           r'<td class="count">(\d+)</td>', section[1])]

    assert rows("Modality") == [("CT", 4), ("MR", 2)]
    tagged = [t for d in chosen for t in d.get(TAGS_KEY, [])]
    assert rows("Tags") == [("excluded", tagged.count("excluded")), ("reviewed", tagged.count("reviewed")),
                            ("(none)", sum(TAGS_KEY not in d for d in chosen))]  # series without a value last
    assert rows("Dataset") == [("train", sum(d[ROWS] == 512 for d in chosen)), ("(none)", 2)]
    assert rows("BodyPartExamined") == [("(none)", 6)]
    months = re.findall(r'<div class="column" style="height:[\d.]+%" title="([\d-]+): (\d+)">', dom)
    expected: dict[str, int] = {}
    for d in chosen:
        expected[d[DATE][:7]] = expected.get(d[DATE][:7], 0) + 1
    assert [(m, int(n)) for m, n in months] == sorted(expected.items())

    only = tmp_path / "only"
    assert kaapcli("dashboard", "-o", only, "--index", db, "-F", "Modality").returncode == 0
    shot = tmp_path / "dash.png"
    chromium(tmp_path, (only / "index.html").as_uri(), f"--screenshot={shot}", "--window-size=800,400",
             "--hide-scrollbars")
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    bar = (0x2F, 0x6F, 0xDE)
    widths = []  # bar lengths, row by row, in the order drawn (CT 4, MR 2, SEG 2)
    previous = 0
    for y in range(image.height):
        width = sum(1 for x in range(image.width) if image.getpixel((x, y)) == bar)
        if width and not previous:
            widths.append(width)
        previous = width
    assert len(widths) == 3, widths
    assert abs(widths[0] / widths[1] - 2.0) < 0.05 and abs(widths[1] - widths[2]) <= 1


def test_gallery_and_dashboard_errors(tmp_path: Path) -> None:
    db = index(tmp_path, [{SERIES_KEY: "1"}])
    proc = kaapcli("gallery", "-o", tmp_path / "g", "--thumbnails", tmp_path / "none", "--index", db)
    assert proc.returncode == 66 and "none: no such directory" in proc.stderr
    proc = kaapcli("gallery", "-o", tmp_path / "g", "--query", "Modality:(CT", "--index", db)
    assert proc.returncode == 2 and "position" in proc.stderr
    assert not (tmp_path / "g").exists()
    proc = kaapcli("dashboard", "-o", tmp_path / "d", "-F", "Modality:month", "--index", db)
    assert proc.returncode == 2 and "only date and datetime fields" in proc.stderr
    assert not (tmp_path / "d").exists()
    shutil.rmtree(tmp_path / "g", ignore_errors=True)
