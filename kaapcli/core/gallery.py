"""A static HTML gallery of series: one card per series document, filtered client-side.

One self-contained ``index.html`` (inline CSS and JS, no network) plus ``thumbnails/`` copied from
``kaapcli thumbnail`` output.  Every value from a document is HTML-escaped (DICOM values are
attacker-controlled text), and a Content-Security-Policy admits only the page's own script (by
its hash), so even a missed escape could not run injected code.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.index.base import as_list, doc_id, lookup
from kaapcli.core.index.query import TAGS_KEY

# (label, key) of the metadata shown on a card, in order
CARD_FIELDS = (
    ("Patient", "00100020 PatientID_keyword"),
    ("Name", "00100010 PatientName_keyword_alphabetic"),
    ("Study date", "00080020 StudyDate_date"),
    ("Modality", "00080060 Modality_keyword"),
    ("Description", "0008103E SeriesDescription_keyword"),
    ("Body part", "00180015 BodyPartExamined_keyword"),
    ("Instances", "00000000 NumberOfInstances_integer"),
    ("Matrix", ""),  # Rows x Columns, composed below
    ("Series UID", "0020000E SeriesInstanceUID_keyword"),
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#f4f4f6;color:#222}
header{display:flex;gap:1rem;align-items:center;flex-wrap:wrap;margin-bottom:1rem}
h1{font-size:1.3rem;margin:0}
#filter{flex:1;min-width:16rem;font-size:1rem;padding:.4rem}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(15rem,1fr));gap:.8rem}
.card{background:#fff;border-radius:6px;box-shadow:0 1px 3px #0003;padding:.5rem;overflow-wrap:anywhere}
.card[hidden]{display:none}
.thumb{width:100%;aspect-ratio:1;object-fit:contain;background:#000;display:block}
.nothumb{display:flex;align-items:center;justify-content:center;color:#aaa;font-size:2rem}
dl{display:grid;grid-template-columns:auto 1fr;gap:.1rem .5rem;font-size:.8rem;margin:.4rem 0}
dt{color:#666}dd{margin:0}
.tag{display:inline-block;background:#dde8ff;border-radius:3px;padding:0 .3rem;margin:.1rem;font-size:.75rem}
"""

# Words typed in the box must all occur in a card's text; #q=words in the URL pre-fills the box.
SCRIPT = """
const box = document.getElementById('filter');
const cards = Array.from(document.querySelectorAll('.card'));
const counter = document.getElementById('count');
function apply() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const text = card.dataset.search;
    const hide = !words.every(w => text.includes(w));
    card.hidden = hide;
    if (!hide) shown++;
  }
  counter.textContent = shown + ' of ' + cards.length + ' series';
}
const m = location.hash.match(/^#q=(.*)$/);
if (m) box.value = decodeURIComponent(m[1]);
box.addEventListener('input', apply);
apply();
"""


def _text(value: Any) -> str:
    return ", ".join(str(v) for v in as_list(value))


def card_values(doc: dict[str, Any]) -> list[tuple[str, str]]:
    values = []
    for label, key in CARD_FIELDS:
        if key:
            text = _text(lookup(doc, key))
        else:
            rows, cols = _text(doc.get("00280010 Rows_integer")), _text(doc.get("00280011 Columns_integer"))
            text = f"{rows}\u00d7{cols}" if rows and cols else ""
        if text:
            values.append((label, text))
    return values


def _card(doc: dict[str, Any], thumb: str | None) -> str:
    esc = html.escape
    uid = doc_id(doc)
    values = card_values(doc)
    tags = [str(t) for t in as_list(doc.get(TAGS_KEY))]
    search = " ".join([v for _, v in values] + tags).lower()
    if thumb:
        image = f'<img class="thumb" src="{esc(thumb)}" alt="{esc(uid)}" loading="lazy">'
    else:
        modality = _text(doc.get("00080060 Modality_keyword")) or "?"
        image = f'<div class="thumb nothumb">{esc(modality)}</div>'
    rows = "".join(f"<dt>{esc(label)}</dt><dd>{esc(text)}</dd>" for label, text in values)
    chips = "".join(f'<span class="tag">{esc(t)}</span>' for t in tags)
    return (f'<article class="card" data-uid="{esc(uid)}" data-search="{esc(search)}">{image}'
            f"<dl>{rows}</dl><div>{chips}</div></article>")


def render(cards: Iterable[str], title: str) -> str:
    body = "\n".join(cards)
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{digest}'")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<input id="filter" type="search" placeholder="Filter: words in any field, e.g. CT chest" autofocus>
<span id="count"></span></header>
<main id="grid">
{body}
</main>
<script>{SCRIPT}</script>
</body></html>
"""


def build(docs: Iterable[dict[str, Any]], out: Path, *, thumbnails: Path | None = None,
          title: str = "kaapcli gallery") -> tuple[Path, int, int]:
    """Write ``out/index.html`` (+ ``out/thumbnails/``); returns (page, cards, thumbnails copied)."""
    cards: list[str] = []
    copied = 0
    for doc in docs:
        uid = doc_id(doc)
        thumb = None
        source = thumbnails / f"{uid}.png" if thumbnails else None
        if source is not None and source.is_file():
            name = f"thumbnails/{fsio.safe_name(uid)}.png"
            fsio.write_bytes(out / name, source.read_bytes())
            thumb = name
            copied += 1
        cards.append(_card(doc, thumb))
    page = out / "index.html"
    fsio.write_bytes(page, render(cards, title).encode())
    return page, len(cards), copied
