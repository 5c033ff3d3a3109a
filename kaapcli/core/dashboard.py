"""A static metadata dashboard: how the series matching a query spread over chosen fields (Kaapana's
side panel of bar charts), as one self-contained ``index.html``.

Steps: count the matching series, then for each facet (``Modality``, ``StudyDate:month``, ``Dataset``,
... see :func:`kaapcli.core.index.query.parse_facet`) ask the index for its value counts — the same
numbers ``kaapcli stats`` prints, on either backend — and draw them: horizontal bars for values (the
``top`` most frequent, the rest summed up as "other values"), columns in time order for dates.

The page has no script and loads nothing: charts are HTML and CSS, every value from the index is
HTML-escaped, and a Content-Security-Policy forbids scripts and network access altogether.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.index.base import Index
from kaapcli.core.index.query import Facet, Node

DEFAULT_FACETS = ("Modality", "BodyPartExamined", "Manufacturer", "StudyDate:month", "PatientSex", "Tags", "Dataset")
BAR = "#2f6fde"  # one colour for every bar, so a screenshot can be measured

STYLE = f"""
body{{font-family:system-ui,sans-serif;margin:1rem;background:#f4f4f6;color:#222}}
h1{{font-size:1.3rem;margin:0 0 .3rem}}
.summary{{color:#555;margin:0 0 1rem;overflow-wrap:anywhere}}
#charts{{display:grid;grid-template-columns:repeat(auto-fill,minmax(24rem,1fr));gap:1rem;align-items:start}}
.chart{{background:#fff;border-radius:6px;box-shadow:0 1px 3px #0003;padding:.6rem .8rem}}
.chart h2{{font-size:1rem;margin:0 0 .5rem}}
table{{border-collapse:collapse;width:100%;font-size:.8rem}}
td{{padding:.1rem .3rem;vertical-align:middle}}
td.label{{text-align:right;width:35%;max-width:10rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}}
td.count{{text-align:right;width:3.5rem;color:#555}}
.bar{{height:.85rem;background:{BAR}}}
.none .bar{{background:#9aa5b8}}
.columns{{display:flex;align-items:flex-end;gap:2px;height:9rem;border-bottom:1px solid #999}}
.column{{flex:1;background:{BAR};min-width:2px}}
.axis{{display:flex;justify-content:space-between;font-size:.7rem;color:#555}}
.empty{{color:#888;font-size:.85rem}}
.other{{color:#666;font-size:.75rem;margin-top:.3rem}}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'"


@dataclass
class Chart:
    facet: Facet
    counts: list[tuple[Any, int]]  # shown (value, series); None = series without a value
    other_values: int = 0  # values beyond ``top``
    other_series: int = 0


def charts(ix: Index, node: Node, facets: Sequence[Facet], top: int) -> list[Chart]:
    """The counts of every facet over the series matching ``node``."""
    result = []
    for facet in facets:
        counts = ix.facet_counts(facet, node)
        if facet.unit:
            result.append(Chart(facet, counts))
            continue
        known = [(v, n) for v, n in counts if v is not None]
        missing = [(v, n) for v, n in counts if v is None]
        rest = known[top:]
        result.append(Chart(facet, known[:top] + missing, len(rest), sum(n for _, n in rest)))
    return result


def _bars(chart: Chart) -> str:
    esc = html.escape
    most = max((n for _, n in chart.counts), default=1)
    rows = []
    for value, n in chart.counts:
        label = "(none)" if value is None else str(value)
        width = 100.0 * n / most
        rows.append(f'<tr class="{"none" if value is None else "value"}"><td class="label" title="{esc(label)}">'
                    f'{esc(label)}</td><td><div class="bar" style="width:{width:.2f}%" title="{n}"></div></td>'
                    f'<td class="count">{n}</td></tr>')
    other = (f'<div class="other">{chart.other_values} other values: {chart.other_series} series</div>'
             if chart.other_values else "")
    return f"<table>{''.join(rows)}</table>{other}"


def _columns(chart: Chart) -> str:
    esc = html.escape
    dated = [(v, n) for v, n in chart.counts if v is not None]
    missing = sum(n for v, n in chart.counts if v is None)
    most = max((n for _, n in dated), default=1)
    columns = "".join(f'<div class="column" style="height:{100.0 * n / most:.2f}%" title="{esc(str(v))}: {n}">'
                      "</div>" for v, n in dated)
    axis = f'<div class="axis"><span>{esc(str(dated[0][0]))}</span><span>{esc(str(dated[-1][0]))}</span></div>' \
        if dated else ""
    note = f'<div class="other">(none): {missing} series</div>' if missing else ""
    return f'<div class="columns">{columns}</div>{axis}{note}'


def render(title: str, query: str, total: int, items: Sequence[Chart]) -> str:
    esc = html.escape
    sections = []
    for chart in items:
        if not chart.counts:
            body = '<p class="empty">no values</p>'
        else:
            body = _columns(chart) if chart.facet.unit else _bars(chart)
        sections.append(f'<section class="chart" data-facet="{esc(chart.facet.label)}">'
                        f"<h2>{esc(chart.facet.label)}</h2>{body}</section>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}</style></head>
<body><h1>{esc(title)}</h1>
<p class="summary"><span id="total">{total}</span> series matching <code>{esc(query)}</code></p>
<main id="charts">
{"".join(sections)}
</main>
</body></html>
"""


def build(ix: Index, node: Node, out: Path, facets: Sequence[Facet], *, query: str = "*", top: int = 15,
          title: str = "kaapcli dashboard") -> tuple[Path, int, int]:
    """Write ``out/index.html``; returns (page, series counted, charts)."""
    total = ix.count(node)
    items = charts(ix, node, facets, top)
    page = out / "index.html"
    fsio.write_bytes(page, render(title, query, total, items).encode())
    return page, total, len(items)
