"""The quick paths of ``kaapcli index`` give exactly what the general paths give: reading JSON files, making
kv rows, listing directories."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from kaapcli.core import fsio
from kaapcli.core.index import ingest
from kaapcli.core.index.query import SERIES_KEY

UID = "1.2.826.0.1.3680043.10.1"
HEAD = f'{{"{SERIES_KEY}": "{UID}"'  # the start of a document written by hand


def _mixed_inputs(root: Path) -> list[Path]:
    """JSON files of every shape the readers must agree on, the quick path's and the general one's."""
    doc: dict[str, Any] = {SERIES_KEY: UID, "00080060 Modality_keyword": "CT", "00280010 Rows_integer": 512,
                           "00180050 SliceThickness_float": 1.25, "00080008 ImageType_keyword": ["A", "B", "A"],
                           "00081032 ProcedureCodeSequence_object": {"00080104 CodeMeaning_keyword": "x"},
                           "Flag_boolean": True, "Nothing_keyword": None, "Name_keyword": "Müller\u00e9\u4e2d"}
    texts: dict[str, str | bytes] = {
        "plain.json": json.dumps(doc),
        "list.json": json.dumps([doc, {**doc, SERIES_KEY: "1.2.3"}]),
        "empty-list.json": "[]",
        "long-int.json": json.dumps({**doc, "Big_integer": 123456789012345678901234567890}),
        "u64.json": json.dumps({**doc, "Big_integer": 18446744073709551615, "Neg_integer": -9223372036854775808}),
        "big-float.json": json.dumps({**doc, "Big_float": 1e300, "Small_float": -2.5e18}),
        "nan.json": json.dumps({**doc, "Bad_float": math.nan}),
        "infinity.json": HEAD + ', "x": Infinity}',
        "invalid.json": HEAD + ',',
        "bom.json": b"\xef\xbb\xbf" + json.dumps(doc).encode(),
        "latin1.json": json.dumps(doc, ensure_ascii=False).encode("latin-1", "replace").replace(b"?", b"\xe9"),
        "surrogate.json": HEAD + ', "x": "\\ud800"}',
        "no-uid.json": json.dumps({"00080060 Modality_keyword": "CT"}),
        "not-object.json": json.dumps([doc, 3]),
        "scalar.json": "42",
        "crlf.json": json.dumps(doc, indent=1).replace("\n", "\r\n"),
        "dup-keys.json": HEAD + ', "k": 1, "k": 2}',
        "escapes.json": json.dumps({**doc, "Esc_keyword": "tab\there \"quoted\" \\ / \u0001"}),
    }
    paths = []
    for name, text in texts.items():
        path = root / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        paths.append(path)
    missing = root / "gone.json"
    paths.append(missing)
    return paths


def _outcome(source: ingest.Source) -> tuple[Any, ...]:
    return source.label, source.docs, source.errors, source.warnings, source.skipped


@pytest.mark.parametrize("extra", [None, {"Source_keyword": "PACS1"}])
def test_quick_json_read_equals_general(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        extra: dict[str, Any] | None) -> None:
    paths = _mixed_inputs(tmp_path)
    quick = [_outcome(ingest.read_json(p, extra)) for p in paths]
    assert any(o[1] for o in quick) and any(o[2] for o in quick)  # both documents and errors were met
    assert ingest._read_plain(paths[0], extra) is not None  # the quick path was taken
    monkeypatch.setattr(ingest, "_read_plain", lambda path, extra: None)
    general = [_outcome(ingest.read_json(p, extra)) for p in paths]
    assert quick == general


def test_listing_order_and_kinds(tmp_path: Path) -> None:
    """Regular files (held as names only) and other entries come out merged in name order, as one sorted
    listing of entries would give them."""
    (tmp_path / "b.dcm").write_bytes(b"x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "inner.json").write_text("{}")
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / ".hidden").write_text("{}")
    (tmp_path / "ab-link").symlink_to(tmp_path / "c.json")
    (tmp_path / "aa-dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "z-dirlink").symlink_to(tmp_path / "a")
    os.mkfifo(tmp_path / "fifo")
    for i in range(50):
        (tmp_path / f"n{i}").write_text("")
    seen = [(type(e).__name__, e.path.name) for e in fsio.iter_inputs([str(tmp_path)])]
    top = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".") and p.name != "a")
    assert [name for _, name in seen] == [*top, "inner.json"]
    kinds = dict((name, kind) for kind, name in seen)
    assert kinds["aa-dangling"] == kinds["fifo"] == kinds["z-dirlink"] == "Unusable"
    assert kinds["ab-link"] == kinds["b.dcm"] == kinds["n7"] == "InputFile"
