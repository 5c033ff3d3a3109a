"""The embedded SQLite index through the CLI: every query construct, tags, datasets, merge/replace,
idempotence, unindex, stats, sort, limit, errors.  Expected results come from Python predicates over the
same documents, an oracle independent of the SQL translation."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kaapcli.core.index.query import SERIES_KEY, TAGS_KEY
from tests.conftest import kaapcli

MOD, ROWS, DATE, DESC = ("00080060 Modality_keyword", "00280010 Rows_integer", "00080020 StudyDate_date",
                         "0008103E SeriesDescription_keyword")
STUDY, THICK, NAME = "0020000D StudyInstanceUID_keyword", "00180050 SliceThickness_float", \
    "00100010 PatientName_keyword_alphabetic"
SEQ = "00081032 ProcedureCodeSequence_object"
MODALITIES = ["CT", "MR", "PT", "SEG", "CT", "CR"]


def make_docs(n: int = 24) -> list[dict[str, Any]]:
    docs = []
    for i in range(n):
        doc: dict[str, Any] = {
            SERIES_KEY: f"1.2.826.0.1.{i:03d}",
            STUDY: f"1.2.826.0.9.{i % 4}",
            MOD: MODALITIES[i % len(MODALITIES)],
            ROWS: [256, 512, 1024][i % 3],
            DATE: f"2020-{i % 12 + 1:02d}-{i % 28 + 1:02d}",
            DESC: ["LUNG1-CHEST scan", "Abdomen <b>arterial</b>", "Head", "chest low dose"][i % 4] + f" {i}",
            THICK: [0.625, 1.25, 2.5, 5.0][i % 4],
            NAME: f"Doe^{'John' if i % 2 else 'Jane'}",
            "00080008 ImageType_keyword": ["ORIGINAL", "PRIMARY", "AXIAL" if i % 3 else "LOCALIZER"],
            SEQ: {"00080104 CodeMeaning_keyword": "CT THORAX" if i % 2 else "MR BRAIN"},
        }
        if i % 5 == 0:
            doc[TAGS_KEY] = ["reviewed"]
        if i == 7:
            doc[ROWS] = "2.0x"  # a malformed value kept as text (DESIGN §3.1)
        docs.append(doc)
    return docs


DOCS = make_docs()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("index")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    proc = kaapcli("index", root / "docs.jsonl", "--index", root / "index.db")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [d[SERIES_KEY] for d in DOCS]
    assert "24 documents (24 added, 0 updated, 0 unchanged)" in proc.stderr
    return root / "index.db"


def search(db: Path, *args: str, ok: bool = True) -> list[dict[str, Any]]:
    proc = kaapcli("search", *args, "--index", db)
    assert proc.returncode == 0 or not ok, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def uids(docs: list[dict[str, Any]]) -> list[str]:
    return [d[SERIES_KEY] for d in docs]


def rows(d: dict[str, Any]) -> float | None:
    return d[ROWS] if isinstance(d[ROWS], int) else None


def words(d: dict[str, Any]) -> set[str]:
    return {w.lower() for v in d.values() for item in (v if isinstance(v, list) else [v])
            for w in re.findall(r"\w+", json.dumps(item) if isinstance(item, dict) else str(item))}


# query → oracle; one case per construct of the language
CASES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "Modality:CT": lambda d: d[MOD] == "CT",
    '"00080060 Modality_keyword":MR': lambda d: d[MOD] == "MR",
    "Modality:ct": lambda d: False,  # keyword values are case-sensitive (as OpenSearch keyword fields)
    "Modality:C?": lambda d: d[MOD] in ("CT", "CR"),
    "SeriesDescription:LUNG1-*": lambda d: d[DESC].startswith("LUNG1-"),
    "SeriesDescription:*arterial*": lambda d: "arterial" in d[DESC],
    "-Modality:CT": lambda d: d[MOD] != "CT",
    "NOT Modality:CT AND Rows:512": lambda d: d[MOD] != "CT" and rows(d) == 512,
    "Modality:CT OR Modality:MR": lambda d: d[MOD] in ("CT", "MR"),
    "Modality:CT Rows:1024": lambda d: d[MOD] == "CT" and rows(d) == 1024,  # default operator AND
    "(Modality:CT OR Modality:PT) AND -Rows:256": lambda d: d[MOD] in ("CT", "PT") and rows(d) != 256,
    "Modality:(SEG OR CR)": lambda d: d[MOD] in ("SEG", "CR"),
    'SeriesDescription:"Head 2"': lambda d: d[DESC] == "Head 2",
    "StudyDate:[2020-03-01 TO 2020-06-30]": lambda d: "2020-03-01" <= d[DATE] <= "2020-06-30",
    "StudyDate:{20200301 TO 20200630}": lambda d: "2020-03-01" < d[DATE] < "2020-06-30",
    "StudyDate:[2020-10-01 TO *]": lambda d: d[DATE] >= "2020-10-01",
    "Rows:>=512": lambda d: (rows(d) or 0) >= 512,
    "Rows:>512": lambda d: (rows(d) or 0) > 512,
    "Rows:<512": lambda d: rows(d) is not None and rows(d) < 512,  # type: ignore[operator]
    "Rows:[256 TO 512}": lambda d: rows(d) in (256,),
    "SliceThickness:[1 TO 2.5]": lambda d: 1 <= d[THICK] <= 2.5,
    "SliceThickness:0.625": lambda d: d[THICK] == 0.625,
    "Tags:reviewed": lambda d: "reviewed" in d.get(TAGS_KEY, []),
    "Tags:*": lambda d: bool(d.get(TAGS_KEY)),
    "-Tags:*": lambda d: not d.get(TAGS_KEY),
    "ImageType:LOCALIZER": lambda d: "LOCALIZER" in d["00080008 ImageType_keyword"],  # lists hold values
    "PatientName:Doe^J*n": lambda d: d[NAME] == "Doe^John",
    "ProcedureCodeSequence.CodeMeaning:\"CT THORAX\"": lambda d: d[SEQ]["00080104 CodeMeaning_keyword"] == "CT THORAX",
    "chest": lambda d: "chest" in words(d),  # bare words: full text, case-insensitive, any field
    '"low dose"': lambda d: "low dose" in d[DESC],
    "chest -lung1": lambda d: "chest" in words(d) and "lung1" not in words(d),
    "lung1-*": lambda d: d[DESC].lower().startswith("lung1-"),  # bare wildcard: whole value, case-insensitive
    "thorax": lambda d: "thorax" in words(d),  # full text reaches into sequences
    "*": lambda d: True,
    '"2.0x"': lambda d: d[ROWS] == "2.0x",  # a malformed number is kept as text: full text finds it
}


def test_every_construct_against_an_oracle(db: Path) -> None:
    # One process for all cases: the library is what the CLI calls; the CLI is covered below.
    from kaapcli.core.index.base import open_index
    from kaapcli.core.index.query import parse

    with open_index(str(db)) as ix:
        for query, oracle in CASES.items():
            expected = sorted(d[SERIES_KEY] for d in DOCS if oracle(d))
            got = [d[SERIES_KEY] for d in ix.search(parse(query))]
            assert got == expected, query
            assert ix.count(parse(query)) == len(expected), query


def test_search_cli_fields_sort_limit_count(db: Path) -> None:
    found = search(db, "Modality:CT", "--fields", "SeriesInstanceUID,Rows", "--sort", "-Rows", "--limit", "3")
    cts = [d for d in DOCS if d[MOD] == "CT" and rows(d)]
    expected = sorted(cts, key=lambda d: (-d[ROWS], d[SERIES_KEY]))[:3]
    assert found == [{SERIES_KEY: d[SERIES_KEY], ROWS: d[ROWS]} for d in expected]
    ascending = search(db, "*", "--sort", "StudyDate", "-f", "StudyDate")
    assert [d[DATE] for d in ascending] == sorted(d[DATE] for d in DOCS)
    assert uids(search(db, "*", "--sort", "StudyDate:desc", "-f", "SeriesInstanceUID", "--limit", "1")) == \
        [max(DOCS, key=lambda d: d[DATE])[SERIES_KEY]]
    proc = kaapcli("search", "Modality:CT", "--count", "--index", db)
    assert proc.stdout == f"{sum(d[MOD] == 'CT' for d in DOCS)}\n"
    assert search(db, "*", "--limit", "0") == []
    full = search(db, f"SeriesInstanceUID:{DOCS[3][SERIES_KEY]}")
    assert full == [DOCS[3]]  # documents come back exactly as indexed


def test_syntax_error_exits_2_naming_the_position(db: Path) -> None:
    proc = kaapcli("search", "(Modality:CT OR", "--index", db)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0] == \
        "kaapcli: error: query syntax error at position 16: expected a term, found end of query"
    proc = kaapcli("search", "Nope:1", "--index", db)
    assert proc.returncode == 2 and "unknown field 'Nope'" in proc.stderr and "Traceback" not in proc.stderr
    proc = kaapcli("search", "*", "--sort", "Nope", "--index", db)
    assert proc.returncode == 2 and "unknown field 'Nope'" in proc.stderr


def test_missing_or_damaged_index(tmp_path: Path) -> None:
    proc = kaapcli("search", "*", "--index", tmp_path / "none.db")
    assert proc.returncode == 66 and "does not exist" in proc.stderr
    assert not (tmp_path / "none.db").exists()  # reading never creates an index
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    proc = kaapcli("search", "*", "--index", tmp_path / "junk.db")
    assert proc.returncode == 65 and "junk.db" in proc.stderr and "Traceback" not in proc.stderr


def test_merge_replace_and_idempotence(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    doc = {SERIES_KEY: "1.2.3", MOD: "CT", ROWS: 512, TAGS_KEY: ["keep"], SEQ: {"a_keyword": "1", "b_keyword": "2"}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert kaapcli("index", tmp_path / "a.json", "--index", db).returncode == 0
    again = kaapcli("index", tmp_path / "a.json", "--index", db)
    assert "(0 added, 0 updated, 1 unchanged)" in again.stderr
    update = {SERIES_KEY: "1.2.3", MOD: "MR", DESC: "new", SEQ: {"b_keyword": "3"}}
    (tmp_path / "b.json").write_text(json.dumps(update))
    proc = kaapcli("index", tmp_path / "b.json", "--index", db)
    assert "(0 added, 1 updated, 0 unchanged)" in proc.stderr
    merged = search(db, "*")
    # new keys added, changed values updated, absent keys kept, objects merged key by key
    assert merged == [{**doc, MOD: "MR", DESC: "new", SEQ: {"a_keyword": "1", "b_keyword": "3"}}]
    assert uids(search(db, "Modality:MR")) == ["1.2.3"] and search(db, "Modality:CT") == []
    assert kaapcli("index", tmp_path / "b.json", "--index", db, "--replace").returncode == 0
    assert search(db, "*") == [update]
    assert search(db, "Rows:*") == [] and search(db, "Tags:keep") == []  # side tables follow the document


def test_index_bad_inputs_fail_alone(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    (tmp_path / "good.json").write_text(json.dumps([{SERIES_KEY: "1.1"}, {SERIES_KEY: "1.2"}]))
    (tmp_path / "broken.json").write_text('{"0020000E SeriesInstanceUID_keyword": "1.3"')
    (tmp_path / "noid.json").write_text(json.dumps({MOD: "CT"}))
    (tmp_path / "lines.jsonl").write_text(json.dumps({SERIES_KEY: "1.4"}) + "\n[1, 2]\n")
    (tmp_path / "notes.txt").write_text("not an input")
    for depth in (101, 1100, 5000):  # past the limit, past orjson's, past the interpreter's recursion limit
        (tmp_path / f"deep{depth}.json").write_text(
            f'{{"{SERIES_KEY}": "1.{depth}", "x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}")
    proc = kaapcli("index", tmp_path, "--index", db, "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["good.json"]["outputs"] == ["1.1", "1.2"] and records["good.json"]["status"] == "ok"
    assert records["broken.json"]["status"] == "failed" and "invalid JSON" in records["broken.json"]["message"]
    assert "has no '0020000E SeriesInstanceUID_keyword'" in records["noid.json"]["message"]
    assert records["lines.jsonl"]["outputs"] == ["1.4"] and "lines.jsonl:2: expected a JSON object" in \
        records["lines.jsonl"]["message"]
    for depth in (101, 1100, 5000):
        assert records[f"deep{depth}.json"]["status"] == "failed", depth
        assert "nested deeper than 100 levels" in records[f"deep{depth}.json"]["message"]
    assert "notes.txt" not in records and "1 not JSON/DICOM" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(uids(search(db, "*"))) == ["1.1", "1.2", "1.4"]
    only_bad = kaapcli("index", tmp_path / "broken.json", "--index", db)
    assert only_bad.returncode == 65


def test_index_dicom_directly(tmp_path: Path, mock_ct: Path) -> None:
    import pydicom

    from tests.conftest import dicom_files

    db = tmp_path / "i.db"
    files = dicom_files(mock_ct)
    (tmp_path / "cut.dcm").write_bytes(files[0].read_bytes()[:700])  # truncated inside the header
    (tmp_path / "readme.txt").write_text("not DICOM")
    proc = kaapcli("index", mock_ct, tmp_path / "cut.dcm", tmp_path / "readme.txt", "--index", db, "-w", "2")
    assert proc.returncode == 1
    assert f"error: {tmp_path / 'cut.dcm'}: " in proc.stderr and "Traceback" not in proc.stderr
    series = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in files})
    assert proc.stdout.split() == series
    found = search(db, "Modality:CT AND NumberOfInstances:8 AND Rows:64", "-f", "SeriesInstanceUID")
    assert uids(found) == series


def test_unindex_by_series_study_query(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    assert kaapcli("index", tmp_path / "d.jsonl", "--index", db).returncode == 0
    first = DOCS[0][SERIES_KEY]
    proc = kaapcli("unindex", "--series", first, "--index", db)
    assert proc.returncode == 0 and "1 series removed" in proc.stderr
    proc = kaapcli("unindex", "--study", DOCS[1][STUDY], "--index", db)
    assert f"{sum(d[STUDY] == DOCS[1][STUDY] for d in DOCS)} series removed" in proc.stderr
    assert kaapcli("unindex", "--query", "Modality:MR", "--index", db).returncode == 0
    left = [d for d in DOCS[1:] if d[STUDY] != DOCS[1][STUDY] and d[MOD] != "MR"]
    assert uids(search(db, "*")) == sorted(uids(left))
    assert search(db, "chest", "--count") == [sum("chest" in words(d) for d in left)]  # FTS rows removed too
    assert kaapcli("unindex", "--index", db).returncode == 2  # a selection is required


def test_tags_add_remove_from_field(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    assert kaapcli("index", tmp_path / "d.jsonl", "--index", db).returncode == 0
    ct = sorted(d[SERIES_KEY] for d in DOCS if d[MOD] == "CT")
    proc = kaapcli("tag", "add", "lung", "todo", "--query", "Modality:CT", "--index", db)
    assert proc.returncode == 0 and f"{len(ct)} series changed" in proc.stderr
    assert uids(search(db, "Tags:lung AND Tags:todo")) == ct
    again = kaapcli("tag", "add", "lung", "--query", "Modality:CT", "--index", db)
    assert f"0 series changed, {len(ct)} unchanged" in again.stderr  # idempotent, each tag once
    reviewed_ct = [d for d in DOCS if d[MOD] == "CT" and TAGS_KEY in d]
    assert search(db, f"SeriesInstanceUID:{reviewed_ct[0][SERIES_KEY]}", "-f", "Tags")[0][TAGS_KEY] == \
        ["reviewed", "lung", "todo"]  # existing tags kept, order of addition
    proc = kaapcli("tag", "remove", "todo", "--series", "-", "--index", db, input="\n".join(ct[:2]) + "\n")
    assert proc.returncode == 0
    assert uids(search(db, "Tags:todo")) == ct[2:]
    proc = kaapcli("tag", "add", "--from-field", "Modality", "--series", ct[0], "--series", "9.9.9", "--index", db)
    assert proc.returncode == 1 and "series 9.9.9: not in the index" in proc.stderr
    assert uids(search(db, "Tags:CT")) == [ct[0]]
    assert kaapcli("tag", "remove", "--from-field", "Modality", "--series", ct[0], "--index", db).returncode == 0
    assert search(db, "Tags:CT") == []
    assert kaapcli("tag", "add", "x", "--index", db).returncode == 2


def test_datasets(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    assert kaapcli("index", tmp_path / "d.jsonl", "--index", db).returncode == 0
    mr = sorted(d[SERIES_KEY] for d in DOCS if d[MOD] == "MR")
    assert kaapcli("dataset", "add", "train", "--query", "Modality:MR", "--index", db).returncode == 0
    assert kaapcli("dataset", "add", "train", "--series", DOCS[0][SERIES_KEY], "--index", db).returncode == 0
    proc = kaapcli("dataset", "add", "test", "--series", "9.9", "--index", db)
    assert proc.returncode == 1 and "9.9: not in the index" in proc.stderr
    show = kaapcli("dataset", "show", "train", "--index", db, "--format", "uids")
    assert show.stdout.split() == sorted([*mr, DOCS[0][SERIES_KEY]])
    documents = [json.loads(line) for line in kaapcli("dataset", "show", "train", "--index", db).stdout.splitlines()]
    assert documents == sorted((d for d in DOCS if d[SERIES_KEY] in {*mr, DOCS[0][SERIES_KEY]}),
                               key=lambda d: d[SERIES_KEY])  # jsonl by default: the stored documents
    listed = [json.loads(line) for line in kaapcli("dataset", "list", "--index", db).stdout.splitlines()]
    assert listed == [{"name": "train", "count": len(mr) + 1}]
    assert kaapcli("dataset", "remove", "train", "--series", mr[0], "--index", db).returncode == 0
    assert kaapcli("dataset", "show", "train", "--index", db, "--format", "uids").stdout.split() == \
        sorted([*mr[1:], DOCS[0][SERIES_KEY]])
    assert kaapcli("dataset", "remove", "train", "--index", db).returncode == 0  # no selection: delete it
    assert kaapcli("dataset", "show", "train", "--index", db).returncode == 66
    # projects are separate indexes in one file
    assert kaapcli("search", "*", "--count", "--index", db, "--project", "other").stdout == "0\n"


def test_stats_json_lines_when_piped(db: Path) -> None:
    proc = kaapcli("stats", "Modality", "--index", db)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    counts: dict[str, int] = {}
    for d in DOCS:
        counts[d[MOD]] = counts.get(d[MOD], 0) + 1
    assert got == [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    proc = kaapcli("stats", "Rows", "--query", "-Modality:CT", "--index", db)
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    non_ct = [d for d in DOCS if d[MOD] != "CT"]
    expected = {v: sum(d[ROWS] == v for d in non_ct) for v in {d[ROWS] for d in non_ct}}
    assert {r["value"]: r["count"] for r in got} == expected  # numbers stay numbers, malformed text kept
    tags = [json.loads(line) for line in kaapcli("stats", "Tags", "--index", db).stdout.splitlines()]
    assert tags == [{"value": None, "count": sum(TAGS_KEY not in d for d in DOCS)},  # untagged: null, by count
                    {"value": "reviewed", "count": sum(TAGS_KEY in d for d in DOCS)}]
    top = [json.loads(line) for line in kaapcli("stats", "Modality", "--top", "1", "--index", db).stdout.splitlines()]
    assert top == [{"value": "CT", "count": counts["CT"]}]


def test_stats_bar_chart_on_a_terminal(db: Path) -> None:
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-m", "kaapcli", "stats", "Modality", "--index", str(db)],
                          stdout=follower, stderr=subprocess.PIPE, env=env, timeout=60)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    text = out.decode()
    assert proc.returncode == 0
    assert "Modality: 24 series" in text and "\u2588" in text and "{" not in text


def _kv_and_fts(db: Path, word: str) -> tuple[int, int]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return (con.execute("SELECT count(*) FROM kv").fetchone()[0],
                con.execute("SELECT count(*) FROM fts WHERE fts MATCH ?", (word,)).fetchone()[0])


def test_changed_and_removed_documents_leave_no_values_behind(tmp_path: Path) -> None:
    """kv rows (made in SQL) and FTS text (made in Python) come from the stored JSON; changing or deleting a document
    must take away exactly what was added (deep objects, lists of objects, repeated list values too)."""
    db = tmp_path / "i.db"
    deep = "00400275 RequestAttributesSequence_object"
    doc: dict[str, Any] = {SERIES_KEY: "1.2.3", MOD: "CT", "00200037 ImageOrientationPatient_float": [1, 0, 0, 0, 1, 0],
           deep: [{"00321060 RequestedProcedureDescription_keyword": "oldword scan",
                   "00400008 ScheduledProtocolCodeSequence_object": {"00080100 CodeValue_keyword": ["A1", "B2"]}}],
           "00200010 StudyID_keyword": 17, "00000000 Flag_keyword": True}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert kaapcli("index", tmp_path / "a.json", "--index", db).returncode == 0
    field = f'"{deep}.00400008 ScheduledProtocolCodeSequence_object.00080100 CodeValue_keyword"'
    assert uids(search(db, f"{field}:B2 AND StudyID:17 AND oldword AND ImageOrientationPatient:0")) == ["1.2.3"]
    assert uids(search(db, '"00000000 Flag_keyword":true AND "true"')) == ["1.2.3"]
    rows_before = _kv_and_fts(db, "oldword")[0]
    assert rows_before == 9  # uid, modality, orientation 0 and 1 (once each), description, 2 codes, id, flag
    doc[deep][0]["00321060 RequestedProcedureDescription_keyword"] = "newword scan"
    doc[deep][0]["00400008 ScheduledProtocolCodeSequence_object"]["00080100 CodeValue_keyword"] = ["C3"]
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert "(0 added, 1 updated, 0 unchanged)" in kaapcli("index", tmp_path / "a.json", "--index", db).stderr
    assert search(db, f"{field}:B2") == [] and search(db, "oldword") == []
    assert uids(search(db, f"{field}:C3 AND newword")) == ["1.2.3"]
    assert _kv_and_fts(db, "oldword") == (rows_before - 1, 0)
    assert kaapcli("unindex", "--series", "1.2.3", "--index", db).returncode == 0
    assert _kv_and_fts(db, "newword") == (0, 0)


def test_schema_1_index_is_upgraded(tmp_path: Path) -> None:
    """An index written before kv rows were made in SQL (schema 1) is rebuilt when opened."""
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:
        con.executescript("""
            CREATE TABLE docs(id INTEGER PRIMARY KEY, project TEXT NOT NULL, uid TEXT NOT NULL, doc TEXT NOT NULL,
                              UNIQUE(project, uid));
            CREATE TABLE keys(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
            CREATE TABLE kv(doc INTEGER NOT NULL, i INTEGER NOT NULL, key INTEGER NOT NULL, text TEXT, num REAL,
                            PRIMARY KEY(doc, i)) WITHOUT ROWID;
            CREATE INDEX kv_value ON kv(key, text, num);
            CREATE VIRTUAL TABLE fts USING fts5(body, content='');
            CREATE TABLE datasets(project TEXT NOT NULL, name TEXT NOT NULL, uid TEXT NOT NULL,
                                  PRIMARY KEY(project, name, uid)) WITHOUT ROWID;
            PRAGMA user_version = 1;""")
        for rowid, doc in enumerate(DOCS[:6], 1):
            con.execute("INSERT INTO docs VALUES (?, 'admin', ?, ?)", (rowid, doc[SERIES_KEY], json.dumps(doc)))
            con.execute("INSERT INTO fts(rowid, body) VALUES (?, ?)", (rowid, "written by schema 1"))
    assert uids(search(db, "Modality:CT AND Rows:>=512")) == uids([d for d in DOCS[:6] if d[MOD] == "CT"
                                                                  and (rows(d) or 0) >= 512])
    assert search(db, "schema", "--count") == [0] and search(db, "chest", "--count") == [
        sum("chest" in words(d) for d in DOCS[:6])]
    assert kaapcli("unindex", "--query", "*", "--index", db).returncode == 0
    assert _kv_and_fts(db, "chest") == (0, 0)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 4


def test_schema_2_index_gets_its_fts_text_remade(tmp_path: Path) -> None:
    """Schema 2 made FTS text in SQL (numbers formatted by SQLite): opening it remakes that text in Python, so
    that a later change or delete removes exactly the words that were added."""
    import sqlite3

    db = _older_index(tmp_path, DOCS[:4], "INSERT INTO fts(fts) VALUES ('delete-all')",
                      "INSERT INTO fts(rowid, body) SELECT id, 'written by schema 2' FROM docs",
                      "PRAGMA user_version = 2")
    assert search(db, "schema", "--count") == [0]
    assert search(db, "chest", "--count") == [sum("chest" in words(d) for d in DOCS[:4])]
    assert kaapcli("unindex", "--query", "*", "--index", db).returncode == 0
    assert _kv_and_fts(db, "chest") == (0, 0)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 4


def test_nan_is_refused_per_document(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    (tmp_path / "d.jsonl").write_text(f'{{"{SERIES_KEY}": "1.1", "{THICK}": NaN}}\n'
                                      f'{{"{SERIES_KEY}": "1.2", "{THICK}": "nan", "{ROWS}": " 512 "}}\n')
    proc = kaapcli("index", tmp_path / "d.jsonl", "--index", db)
    assert proc.returncode == 1 and "series 1.1: NaN or Infinity is not a valid JSON value" in proc.stderr
    assert uids(search(db, "*")) == ["1.2"]
    # the string "nan" in a numeric field is no number: kept as text; " 512 " is one (as float() reads it)
    assert uids(search(db, "SliceThickness:* AND Rows:512")) == ["1.2"] and search(db, "SliceThickness:>0") == []


def test_search_does_not_import_pydicom(db: Path) -> None:
    """Field names resolve through pydicom's data dictionary, loaded without pydicom (numpy, ...): start-up."""
    import subprocess
    import sys

    code = ("import sys; from kaapcli.cli.app import main; main(['search', 'Modality:CT', '--count', '--index', "
            f"{str(db)!r}]); print('pydicom' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [str(sum(d[MOD] == "CT" for d in DOCS)), "False"]


def test_values_round_trip_exactly(tmp_path: Path) -> None:
    """Integers beyond 64 bits stay integers, non-ASCII text stays itself, from JSON and JSONL input
    (orjson, used for speed, would read such integers as floats)."""
    db = tmp_path / "i.db"
    doc = {SERIES_KEY: "1.9", "00000000 Huge_integer": 123456789012345678901234567890,
           "00100010 PatientName_keyword": "Müller^Jürgen", "00000000 List_integer": [1, -98765432109876543210987]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.jsonl").write_text(json.dumps({**doc, SERIES_KEY: "1.10"}) + "\n")
    assert kaapcli("index", tmp_path / "a.json", tmp_path / "b.jsonl", "--index", db).returncode == 0
    assert search(db, "*") == [{**doc, SERIES_KEY: "1.10"}, doc]
    assert uids(search(db, "Müller*")) == ["1.10", "1.9"]


def test_schema_3_index_gets_a_files_table(tmp_path: Path) -> None:
    """Schema 3 had no files table: opening it adds one, and documents indexed before have no files known."""
    import sqlite3

    db = _older_index(tmp_path, DOCS[:2], "DROP TABLE files", "PRAGMA user_version = 3")
    proc = kaapcli("search", "*", "--format", "paths", "--index", db)
    assert proc.returncode == 1 and proc.stderr.count("no files known") == 2
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 4
        assert con.execute("SELECT count(*) FROM files").fetchone()[0] == 0


def _older_index(tmp_path: Path, docs: list[dict[str, Any]], *statements: str) -> Path:
    """An index of ``docs`` turned back into an older schema by ``statements``."""
    import sqlite3

    db = tmp_path / "old.db"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert kaapcli("index", tmp_path / "d.jsonl", "--index", db).returncode == 0
    with sqlite3.connect(db) as con:
        for statement in statements:
            con.execute(statement)
    return db
