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


def _kv_docs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Documents without objects (the flat statement's) and with (the general one's), every kind of leaf."""
    flat: list[dict[str, Any]] = [
        {SERIES_KEY: "1.1", "00280010 Rows_integer": 512, "00180050 SliceThickness_float": [1.25, 1.25, 2],
         "00080060 Modality_keyword": "CT", "Text_keyword": [1.5, 1e20, 0.30000000000000004, -7, "7"],
         "Bool_boolean": [True, False], "Null_keyword": None, "Nulls_keyword": [None, "a", None],
         "Lists_integer": [[1, 2], [3, "x", [4.5]]], "Empty_keyword": [], "Blank_keyword": "",
         "Odd_integer": "2.0x", "Num_text_float": ["3", "1e3", "nan", "inf"], "Huge_integer": 2 ** 70},
        {SERIES_KEY: "1.2", 'quote"key_keyword': "q", "dotted.key_keyword": ["d", "e"], "Ünïcode_keyword": "ü中",
         "sp ace_keyword": [["x"]], "00280010 Rows_integer": "512", "Text_keyword": True},
    ]
    nested: list[dict[str, Any]] = [
        {SERIES_KEY: "2.1", "Seq_object": {"Code_keyword": "c", "Deep_object": {"N_integer": [1, 2]}},
         "Items_object": [{"A_keyword": "a"}, {"A_keyword": "b", "B_float": 2}], "Text_keyword": "n"},
    ]
    return flat, nested


def _kv_table(path: Path) -> tuple[list[Any], list[Any]]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        keys = db.execute("SELECT id, key FROM keys ORDER BY id").fetchall()
        rows = db.execute("SELECT k.key, kv.v, typeof(kv.v), d.uid FROM kv JOIN keys k ON k.id = kv.key "
                          "JOIN docs d ON d.id = kv.doc ORDER BY 1, 2, 4").fetchall()
        return keys, rows
    finally:
        db.close()


def test_flat_kv_rows_equal_general(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kv rows made by the statement for documents without objects equal those of the general statement,
    on first writes, merges into stored documents, replacements and a batch mixing both kinds."""
    from kaapcli.core.index import sqlite as backend

    flat, nested = _kv_docs()
    writes: list[tuple[list[dict[str, Any]], bool]] = [
        (flat, False), (nested, False),
        ([{SERIES_KEY: "1.1", "Text_keyword": ["new", 2.5]}, {SERIES_KEY: "1.2", "Lists_integer": [[9]]}], False),
        ([flat[1]], True), ([{SERIES_KEY: "3.1", "X_keyword": "x"}, *nested], False)]
    tables = []
    for name in ("quick", "general"):
        if name == "general":
            monkeypatch.setattr(backend, "KV_ROWS_FLAT", backend.KV_ROWS)
        ix = backend.SqliteIndex(tmp_path / f"{name}.db", "admin", create=True)
        try:
            for docs, replace in writes:
                ix.write(docs, replace=replace)
        finally:
            ix.close()
        tables.append(_kv_table(tmp_path / f"{name}.db"))
    assert tables[0] == tables[1]
    keys, rows = tables[0]
    assert {uid for *_, uid in rows} == {"1.1", "1.2", "2.1", "3.1"}
    assert ("Lists_integer", 4.5, "real", "1.1") in rows and ("Text_keyword", "new", "text", "1.1") in rows


def test_listing_runs_merge_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory read in several runs of names still walks in sorted order, other entries merged in."""
    monkeypatch.setattr(fsio, "LISTING_RUN", 7)
    monkeypatch.setattr(fsio, "LISTING_PIECE", 3)
    names = [f"f{(i * 37) % 101:03d}" for i in range(101)]
    for name in names:
        (tmp_path / name).write_text("")
    (tmp_path / "f050-dir").mkdir()
    (tmp_path / "f050-dir" / "x").write_text("")
    (tmp_path / "f0505").symlink_to(tmp_path / "f001")
    walked = [e.path.relative_to(tmp_path).as_posix() for e in fsio.iter_inputs([str(tmp_path)])]
    assert walked == [*sorted([*names, "f0505"]), "f050-dir/x"]
