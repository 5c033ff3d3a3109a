"""A static HTML gallery of series: cards grouped by patient and study, filtered in the page.

One self-contained ``index.html`` (inline CSS and JS, no network) plus ``thumbnails/`` copied from
``kaapcli thumbnail`` output.  Steps: group the documents by patient, then study (by date); one card
per series with its thumbnail, metadata, tags, datasets and — for SEG and RTSTRUCT — a legend of its
segments in the colours ``kaapcli thumbnail`` draws them in; then the filter script, which parses the
index's query language (fields, wildcards, ranges, ``-``/NOT, AND/OR, bare words) and evaluates it on
the fields the page shows, as :mod:`kaapcli.core.index.sqlite` does on the whole document.

It never trusts a value: every value from a document is HTML-escaped (DICOM values are
attacker-controlled text), the values the filter reads are JSON in an escaped attribute, and a
Content-Security-Policy admits only the page's own script (by its hash), so even a missed escape
could not run injected code.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.index.base import as_list, doc_id, lookup
from kaapcli.core.index.query import TAGS_KEY

# (label on the card, filter field name, document key, filter type) of the metadata a card shows
CARD_FIELDS = (
    ("Modality", "Modality", "00080060 Modality_keyword", "text"),
    ("Description", "SeriesDescription", "0008103E SeriesDescription_keyword", "text"),
    ("Series", "SeriesNumber", "00200011 SeriesNumber_integer", "number"),
    ("Body part", "BodyPartExamined", "00180015 BodyPartExamined_keyword", "text"),
    ("Instances", "NumberOfInstances", "00000000 NumberOfInstances_integer", "number"),
    ("Rows", "Rows", "00280010 Rows_integer", "number"),
    ("Columns", "Columns", "00280011 Columns_integer", "number"),
    ("Manufacturer", "Manufacturer", "00080070 Manufacturer_keyword", "text"),
    ("Series UID", "SeriesInstanceUID", "0020000E SeriesInstanceUID_keyword", "text"),
)
# shown in the patient and study headings
GROUP_FIELDS = (
    ("PatientID", "00100020 PatientID_keyword", "text"),
    ("PatientName", "00100010 PatientName_keyword_alphabetic", "text"),
    ("PatientSex", "00100040 PatientSex_keyword", "text"),
    ("StudyDate", "00080020 StudyDate_date", "date"),
    ("StudyDescription", "00081030 StudyDescription_keyword", "text"),
    ("StudyInstanceUID", "0020000D StudyInstanceUID_keyword", "text"),
)
LIST_FIELDS = (("Tags", "text"), ("Dataset", "text"), ("AnnotationLabel", "text"))
FILTER_FIELDS = {name: kind for _, name, _, kind in CARD_FIELDS} | \
    {name: kind for name, _, kind in GROUP_FIELDS} | dict(LIST_FIELDS)
SEGMENT_SEQUENCES = (  # (sequence key, number key, label key): SEG segments, RTSTRUCT ROIs
    ("00620002 SegmentSequence_object", "00620004 SegmentNumber_integer", "00620005 SegmentLabel_keyword"),
    ("30060020 StructureSetROISequence_object", "30060022 ROINumber_integer", "30060026 ROIName_keyword"),
)
ANNOTATION_KEY = "00000000 AnnotationLabel_keyword"

STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#f4f4f6;color:#222}
header{display:flex;gap:1rem;align-items:center;flex-wrap:wrap;margin-bottom:1rem}
h1{font-size:1.3rem;margin:0}
#filter{flex:1;min-width:16rem;font-size:1rem;padding:.4rem}
#error{color:#b00020;flex-basis:100%}
.patient{margin-bottom:1.2rem}
.patient>h2{font-size:1.05rem;margin:.2rem 0;border-bottom:1px solid #ccc}
.study>h3{font-size:.9rem;margin:.5rem 0;color:#444;font-weight:600}
.uid{font-weight:normal;color:#888;font-size:.75rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(15rem,1fr));gap:.8rem}
.card{background:#fff;border-radius:6px;box-shadow:0 1px 3px #0003;padding:.5rem;overflow-wrap:anywhere}
[hidden]{display:none !important}
.thumb{width:100%;aspect-ratio:1;object-fit:contain;background:#000;display:block}
.nothumb{display:flex;align-items:center;justify-content:center;color:#aaa;font-size:2rem}
dl{display:grid;grid-template-columns:auto 1fr;gap:.1rem .5rem;font-size:.8rem;margin:.4rem 0}
dt{color:#666}dd{margin:0}
.tag,.dataset{display:inline-block;border-radius:3px;padding:0 .3rem;margin:.1rem;font-size:.75rem}
.tag{background:#dde8ff}.dataset{background:#e3f4e0}
.legend{list-style:none;padding:0;margin:.3rem 0;font-size:.8rem}
.legend li{display:flex;align-items:center;gap:.3rem}
.swatch{display:inline-block;width:.9rem;height:.9rem;border-radius:2px;border:1px solid #0005}
"""

# The index's query language over the fields the page shows (FIELDS), evaluated as the embedded index
# does: field values whole and case-sensitive, numbers as numbers, a date bound covering its whole day,
# bare words as case- and accent-insensitive tokens of any shown value.  #q=... in the URL pre-fills it.
SCRIPT = r"""
const FIELDS = __FIELDS__;
const box = document.getElementById('filter');
const counter = document.getElementById('count');
const errorLine = document.getElementById('error');
const cards = Array.from(document.querySelectorAll('.card'));
const data = cards.map(c => JSON.parse(c.dataset.fields));
const MAX = '\u{10ffff}';
const canonical = {};
for (const name of Object.keys(FIELDS)) canonical[name.toLowerCase()] = name;

function tokens(s) {
  return (String(s).normalize('NFKD').replace(/\p{M}/gu, '').toLowerCase().match(/[\p{L}\p{N}]+/gu) || []);
}
const quote = ch => ch.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
function globRegex(pattern, flags) {
  let out = '';
  for (let i = 0; i < pattern.length; i++) {
    const ch = pattern[i];
    if (ch === '\\' && i + 1 < pattern.length) { out += quote(pattern[++i]); continue; }
    out += ch === '*' ? '[\\s\\S]*' : ch === '?' ? '[\\s\\S]' : quote(ch);
  }
  return new RegExp('^' + out + '$', flags);
}

function parse(text) {
  let pos = 0;
  const fail = (p, m) => { throw new Error('query syntax error at position ' + (p + 1) + ': ' + m); };
  const found = () => pos < text.length ? "'" + text[pos] + "'" : 'end of query';
  const ws = () => { while (pos < text.length && /\s/.test(text[pos])) pos++; };
  const peek = () => { ws(); return pos < text.length ? text[pos] : ''; };
  function keyword(...words) {
    ws();
    for (const w of words) {
      const end = pos + w.length;
      if (text.startsWith(w, pos) && (!/^[A-Z]+$/.test(w) || end >= text.length || /[\s()]/.test(text[end]))) {
        pos = end; return w;
      }
    }
    return null;
  }
  function expect(ch) { if (peek() !== ch) fail(pos, "expected '" + ch + "', found " + found()); pos++; }
  function word(allowColon) {
    ws();
    const start = pos;
    let lit = '', pat = '', wild = false;
    while (pos < text.length) {
      const ch = text[pos];
      if (ch === '\\') {
        if (pos + 1 >= text.length) fail(pos, 'dangling backslash');
        const e = text[pos + 1];
        lit += e; pat += '*?\\'.includes(e) ? '\\' + e : e; pos += 2; continue;
      }
      if (/\s/.test(ch) || ('()[]{}":'.includes(ch) && !(ch === ':' && allowColon))) break;
      if (ch === '*' || ch === '?') wild = true;
      lit += ch; pat += ch; pos++;
    }
    if (pos === start) fail(pos, 'expected a term, found ' + found());
    return {lit, pat, wild, start};
  }
  function phrase() {
    ws();
    const start = pos++;
    let out = '';
    while (pos < text.length && text[pos] !== '"') {
      if (text[pos] === '\\' && pos + 1 < text.length) pos++;
      out += text[pos++];
    }
    if (pos >= text.length) fail(start, 'unterminated quoted phrase');
    pos++;
    return out;
  }
  function field(name, start) {
    const f = canonical[name.toLowerCase()];
    if (!f) throw new Error('query error at position ' + (start + 1) + ": unknown field '" + name +
                            "' (this page filters by " + Object.keys(FIELDS).join(', ') + ')');
    return f;
  }
  function or() {
    const nodes = [and()];
    while (keyword('OR', '||')) nodes.push(and());
    return nodes.length === 1 ? nodes[0] : {op: 'or', nodes};
  }
  function atOr() { const save = pos; const hit = keyword('OR', '||') !== null; pos = save; return hit; }
  function and() {
    const nodes = [unary()];
    for (;;) {
      if (keyword('AND', '&&')) { nodes.push(unary()); continue; }
      const n = peek();
      if (n === '' || n === ')' || atOr()) break;
      nodes.push(unary());
    }
    return nodes.length === 1 ? nodes[0] : {op: 'and', nodes};
  }
  function unary() {
    if (keyword('NOT')) return {op: 'not', node: unary()};
    const n = peek();
    if (n === '-' || n === '!') { pos++; return {op: 'not', node: unary()}; }
    if (n === '+') pos++;
    return primary();
  }
  function primary() {
    const n = peek();
    if (n === '(') { pos++; const node = or(); expect(')'); return node; }
    if (n === '"') {
      const start = pos, t = phrase();
      if (text[pos] === ':') { pos++; return value(field(t, start)); }
      return {op: 'text', value: t};
    }
    if (n === '' || n === ')') fail(pos, 'expected a term, found ' + (n === '' ? 'end of query' : "')'"));
    if ('[]{}:'.includes(n)) fail(pos, "unexpected '" + n + "'");
    const w = word(false);
    if (text[pos] === ':') {
      pos++;
      if (w.wild) fail(w.start, 'wildcards are not allowed in field names');
      return value(field(w.lit, w.start));
    }
    if (w.pat === '*') return {op: 'all'};
    return w.wild ? {op: 'textwild', re: globRegex(w.pat, 'i')} : {op: 'text', value: w.lit};
  }
  function value(f) {
    const n = peek(), start = pos;
    if (n === '(') { pos++; const node = group(f); expect(')'); return node; }
    if (n === '[' || n === '{') return range(f);
    for (const op of ['>=', '<=', '>', '<']) {
      if (text.startsWith(op, pos)) {
        pos += op.length;
        const b = bound();
        if (b === null) fail(pos - 1, op + ' needs a value');
        return check(op[0] === '>' ? {op: 'range', f, low: b, high: null, incLow: op === '>=', incHigh: true}
                                   : {op: 'range', f, low: null, high: b, incLow: true, incHigh: op === '<='}, start);
      }
    }
    if (n === '"') return check({op: 'term', f, value: phrase()}, start);
    if (n === '' || ')]}'.includes(n)) fail(pos, "expected a value for field '" + f + "'");
    const w = word(true);
    if (w.pat === '*') return {op: 'exists', f};
    if (w.wild) return check({op: 'wild', f, pattern: w.pat}, start);
    return check({op: 'term', f, value: w.lit}, start);
  }
  function fieldUnary(f) {
    if (keyword('NOT')) return {op: 'not', node: fieldUnary(f)};
    const n = peek();
    if (n === '-' || n === '!') { pos++; return {op: 'not', node: fieldUnary(f)}; }
    return value(f);
  }
  function group(f) {
    let nodes = [fieldUnary(f)];
    const ors = [];
    for (;;) {
      if (keyword('OR', '||')) {
        ors.push(nodes.length === 1 ? nodes[0] : {op: 'and', nodes});
        nodes = [fieldUnary(f)];
      } else if (keyword('AND', '&&') || (peek() !== '' && peek() !== ')')) nodes.push(fieldUnary(f));
      else break;
    }
    ors.push(nodes.length === 1 ? nodes[0] : {op: 'and', nodes});
    return ors.length === 1 ? ors[0] : {op: 'or', nodes: ors};
  }
  function bound() {
    if (peek() === '"') return phrase();
    ws();
    let out = '';
    while (pos < text.length && !/[\s\[\]{}()]/.test(text[pos])) out += text[pos++];
    if (!out) fail(pos, 'expected a range bound, found ' + found());
    return out === '*' ? null : out;
  }
  function range(f) {
    const start = pos;
    const incLow = text[pos++] === '[';
    const low = bound();
    if (!keyword('TO')) fail(pos, "expected 'TO' in range");
    const high = bound();
    const close = peek();
    if (close !== ']' && close !== '}') fail(pos, "expected ']' or '}' to close the range");
    pos++;
    return check({op: 'range', f, low, high, incLow, incHigh: close === ']'}, start);
  }
  function check(node, start) {
    const kind = FIELDS[node.f];
    const norm = v => (kind === 'date' && v !== null && /^\d{8}$/.test(v))
      ? v.slice(0, 4) + '-' + v.slice(4, 6) + '-' + v.slice(6) : v;
    const where = 'query error at position ' + (start + 1) + ': ';
    if (node.op === 'term') node.value = norm(node.value);
    if (node.op === 'range') { node.low = norm(node.low); node.high = norm(node.high); }
    if (kind === 'number') {
      if (node.op === 'wild') throw new Error(where + 'wildcards need a text field; ' + node.f + ' is numeric');
      for (const v of node.op === 'term' ? [node.value] : [node.low, node.high]) {
        if (v !== null && (v.trim() === '' || isNaN(Number(v)))) {
          throw new Error(where + node.f + " is numeric, '" + v + "' is not a number");
        }
      }
    }
    if (node.op === 'wild') node.re = globRegex(node.pattern, '');
    return node;
  }
  if (peek() === '') fail(0, 'empty query (use * to match everything)');
  const node = or();
  if (peek() !== '') fail(pos, "unexpected '" + text[pos] + "'");
  return node;
}

function hasPhrase(list, words) {
  for (let i = 0; i + words.length <= list.length; i++) {
    if (words.every((w, j) => list[i + j] === w)) return true;
  }
  return false;
}
function matches(node, card) {
  const values = f => card.values[f] || [];
  switch (node.op) {
    case 'all': return true;
    case 'and': return node.nodes.every(n => matches(n, card));
    case 'or': return node.nodes.some(n => matches(n, card));
    case 'not': return !matches(node.node, card);
    case 'text': {
      const words = tokens(node.value);
      return words.length > 0 && card.tokens.some(t => hasPhrase(t, words));
    }
    case 'textwild': return card.texts.some(v => node.re.test(v));
    case 'exists': return values(node.f).length > 0;
    case 'term': return values(node.f).some(v => FIELDS[node.f] === 'number'
      ? Number(v) === Number(node.value) : String(v) === node.value);
    case 'wild': return values(node.f).some(v => typeof v === 'string' && node.re.test(v));
    case 'range': return values(node.f).some(v => inRange(node, v));
  }
  return false;
}
function inRange(node, v) {
  const number = FIELDS[node.f] === 'number';
  if (number ? typeof v !== 'number' : typeof v !== 'string') return false;
  const day = FIELDS[node.f] === 'date';
  const conv = b => number ? Number(b) : b;
  if (node.low !== null) {
    const low = !node.incLow && day ? node.low + MAX : conv(node.low);
    if (node.incLow ? v < low : v <= low) return false;
  }
  if (node.high !== null) {
    const high = node.incHigh && day ? node.high + MAX : conv(node.high);
    if (node.incHigh ? v > high : v >= high) return false;
  }
  return true;
}

const prepared = data.map(values => {
  const texts = Object.values(values).flat().filter(v => typeof v === 'string');
  return {values, texts, tokens: Object.values(values).flat().map(tokens)};
});
function apply() {
  const text = box.value.trim();
  let node = {op: 'all'};
  errorLine.textContent = '';
  if (text) {
    try { node = parse(text); } catch (e) { errorLine.textContent = e.message; }
  }
  let shown = 0;
  cards.forEach((card, i) => { card.hidden = !matches(node, prepared[i]); if (!card.hidden) shown++; });
  for (const group of document.querySelectorAll('.study, .patient')) {
    group.hidden = !group.querySelector('.card:not([hidden])');
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


def segments(doc: dict[str, Any]) -> list[tuple[int, str]]:
    """(number, label) of a SEG's segments or an RTSTRUCT's ROIs, from the document."""
    for sequence, number_key, label_key in SEGMENT_SEQUENCES:
        items = [i for i in as_list(doc.get(sequence)) if isinstance(i, dict)]
        found = []
        for position, item in enumerate(items, 1):
            number = as_list(item.get(number_key))
            label = _text(item.get(label_key))
            found.append((number[0] if number and isinstance(number[0], int) else position, label or "?"))
        if found:
            return sorted(found)
    return [(n, str(label)) for n, label in enumerate(as_list(doc.get(ANNOTATION_KEY)), 1)]


def colour(number: int) -> str:
    """The colour ``kaapcli thumbnail`` draws segment ``number`` in, as CSS."""
    from kaapcli.core.thumbnail import PALETTE

    r, g, b = PALETTE[(number - 1) % len(PALETTE)]
    return f"#{r:02x}{g:02x}{b:02x}"


def filter_values(doc: dict[str, Any], datasets: Sequence[str]) -> dict[str, list[Any]]:
    """The values the page's filter sees, by field name."""
    values: dict[str, list[Any]] = {}
    for _, name, key, _ in CARD_FIELDS:
        values[name] = [v for v in as_list(lookup(doc, key)) if v is not None]
    for name, key, _ in GROUP_FIELDS:
        values[name] = [v for v in as_list(lookup(doc, key)) if v is not None]
    values["Tags"] = [str(t) for t in as_list(doc.get(TAGS_KEY))]
    values["Dataset"] = list(datasets)
    values["AnnotationLabel"] = [str(v) for v in as_list(doc.get(ANNOTATION_KEY))]
    return {k: v for k, v in values.items() if v}


def _is_annotation(doc: dict[str, Any]) -> bool:
    return bool(doc.get(ANNOTATION_KEY)) or any(doc.get(seq) for seq, _, _ in SEGMENT_SEQUENCES)


def _card(doc: dict[str, Any], thumb: str | None, datasets: Sequence[str]) -> str:
    esc = html.escape
    uid = doc_id(doc)
    rows = []
    for label, _, key, _ in CARD_FIELDS:
        text = _text(lookup(doc, key))
        if text:
            rows.append(f"<dt>{esc(label)}</dt><dd>{esc(text)}</dd>")
    if thumb:
        image = f'<img class="thumb" src="{esc(thumb)}" alt="{esc(uid)}" loading="lazy">'
    else:
        modality = _text(doc.get("00080060 Modality_keyword")) or "?"
        image = f'<div class="thumb nothumb">{esc(modality)}</div>'
    legend = ""
    if _is_annotation(doc):
        items = "".join(f'<li><span class="swatch" style="background:{colour(n)}"></span>{esc(label)}</li>'
                        for n, label in segments(doc))
        legend = f'<ul class="legend">{items}</ul>'
    chips = "".join(f'<span class="tag">{esc(str(t))}</span>' for t in as_list(doc.get(TAGS_KEY))) + \
        "".join(f'<span class="dataset">{esc(d)}</span>' for d in datasets)
    fields = esc(json.dumps(filter_values(doc, datasets), ensure_ascii=False, default=str))
    return (f'<article class="card" data-uid="{esc(uid)}" data-fields="{fields}">{image}{legend}'
            f"<dl>{''.join(rows)}</dl><div>{chips}</div></article>")


def _group_heading(doc: dict[str, Any], level: str) -> str:
    esc = html.escape
    if level == "patient":
        pid = _text(doc.get("00100020 PatientID_keyword")) or "(no PatientID)"
        extra = " · ".join(x for x in (_text(doc.get("00100010 PatientName_keyword_alphabetic")),
                                        _text(doc.get("00100040 PatientSex_keyword"))) if x)
        return f"<h2>Patient {esc(pid)}{' · ' + esc(extra) if extra else ''}</h2>"
    date = _text(doc.get("00080020 StudyDate_date")) or "(no date)"
    description = _text(doc.get("00081030 StudyDescription_keyword"))
    uid = _text(doc.get("0020000D StudyInstanceUID_keyword"))
    return (f"<h3>{esc(date)}{' · ' + esc(description) if description else ''} "
            f'<span class="uid">{esc(uid)}</span></h3>')


def grouped(docs: Iterable[dict[str, Any]]) -> list[tuple[str, list[tuple[str, list[dict[str, Any]]]]]]:
    """Documents by patient (PatientID order), then study (date order); series keep their order."""
    patients: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for doc in docs:
        patient = _text(doc.get("00100020 PatientID_keyword"))
        study = _text(doc.get("0020000D StudyInstanceUID_keyword"))
        patients.setdefault(patient, {}).setdefault(study, []).append(doc)
    return [(p, sorted(studies.items(), key=lambda s: (_text(s[1][0].get("00080020 StudyDate_date")), s[0])))
            for p, studies in sorted(patients.items())]


def render(body: str, title: str, total: int) -> str:
    script = SCRIPT.replace("__FIELDS__", json.dumps(FILTER_FIELDS))
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{digest}'")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<input id="filter" type="search" autofocus
 placeholder="Filter: Modality:CT -Tags:excluded, SeriesDescription:LUNG*, StudyDate:[2020-01-01 TO *], words">
<span id="count">{total} series</span><span id="error"></span></header>
<main id="groups">
{body}
</main>
<script>{script}</script>
</body></html>
"""


def build(docs: Iterable[dict[str, Any]], out: Path, *, thumbnails: Path | None = None,
          title: str = "kaapcli gallery", datasets: dict[str, list[str]] | None = None) -> tuple[Path, int, int]:
    """Write ``out/index.html`` (+ ``out/thumbnails/``); returns (page, cards, thumbnails copied).
    ``datasets``: the datasets each series (by UID) belongs to."""
    sections: list[str] = []
    cards = copied = 0
    for _, studies in grouped(docs):
        parts = [_group_heading(studies[0][1][0], "patient")]
        for _, series in studies:
            items = []
            for doc in series:
                uid = doc_id(doc)
                thumb = None
                source = thumbnails / f"{uid}.png" if thumbnails else None
                if source is not None and source.is_file():
                    name = f"thumbnails/{fsio.safe_name(uid)}.png"
                    fsio.write_bytes(out / name, source.read_bytes())
                    thumb = name
                    copied += 1
                items.append(_card(doc, thumb, (datasets or {}).get(uid, [])))
                cards += 1
            parts.append(f'<section class="study">{_group_heading(series[0], "study")}'
                         f'<div class="grid">{"".join(items)}</div></section>')
        sections.append(f'<section class="patient">{"".join(parts)}</section>')
    page = out / "index.html"
    fsio.write_bytes(page, render("\n".join(sections), title, cards).encode())
    return page, cards, copied
