"""The embedded index: one SQLite file, no server.

Schema (one file may hold several projects)::

    docs(id, project, uid, doc)      the documents as JSON; (project, uid) unique
    keys(id, key)                    document keys, so kv rows hold a small integer per key
    kv(key, v, doc)                  one row per leaf value (lists → one row per element; objects → dotted
                                     keys, as OpenSearch flattens them), and at the same time the one index
                                     of field queries (a WITHOUT ROWID table ordered by its primary key):
                                     terms, wildcards with a literal prefix, ranges, sorting, value counts.
                                     ``v`` is a number for numeric keys (``_integer``/``_float``), else text;
                                     SQLite orders every number before every text, so ``v < ''`` means
                                     "a number".
    fts(body)                        contentless FTS5 over every value of a document (``base.full_text``),
                                     rowid = docs.id
    datasets(project, name, uid)
    files(project, uid, files)       where the files of a series were when it was indexed (JSON, base.SeriesFiles)

kv rows are made inside SQLite from the stored JSON (``json_tree``), FTS text in Python from the parsed
document (SQLite's ``group_concat`` over ``json_tree`` cost five times more), when a document is written
and again, identically, when it is changed or deleted.

A query AST becomes one SQL ``WHERE`` over ``docs d``: every field condition is
``d.id IN (SELECT doc FROM kv WHERE key IN (<key ids>) AND ...)``, which SQLite answers from kv's key order.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from kaapcli.core.index.base import (
    Doc,
    Index,
    SeriesFiles,
    Sort,
    Stored,
    WriteStats,
    full_text,
    merge,
    stored,
)
from kaapcli.core.index.query import (
    And,
    Exists,
    Ids,
    InDataset,
    MatchAll,
    Node,
    Not,
    Or,
    Range,
    Term,
    Text,
    Wildcard,
    is_numeric,
    key_type,
)
from kaapcli.exitcodes import CantCreateError, DataError, NoInputError

KV_TABLE = "CREATE TABLE IF NOT EXISTS kv(key INTEGER NOT NULL, v NOT NULL, doc INTEGER NOT NULL, " \
           "PRIMARY KEY(key, v, doc)) WITHOUT ROWID"
FILES_TABLE = "CREATE TABLE IF NOT EXISTS files(project TEXT NOT NULL, uid TEXT NOT NULL, files TEXT NOT NULL, " \
              "PRIMARY KEY(project, uid)) WITHOUT ROWID"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, project TEXT NOT NULL, uid TEXT NOT NULL,
                                doc TEXT NOT NULL, UNIQUE(project, uid));
CREATE TABLE IF NOT EXISTS keys(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
{KV_TABLE};
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(body, content='');
CREATE TABLE IF NOT EXISTS datasets(project TEXT NOT NULL, name TEXT NOT NULL, uid TEXT NOT NULL,
                                    PRIMARY KEY(project, name, uid)) WITHOUT ROWID;
{FILES_TABLE};
PRAGMA user_version = 4;
"""
MAX_CHAR = "\U0010ffff"  # appended to a date bound so "2020-12-31" covers that whole day of a datetime

# The leaf values of the documents whose ids are the JSON list :ids.  Built in SQL rather than bound row by
# row from Python, which cost more than everything else indexing does (~80 rows per document).
_LEAVES = ("FROM docs d, json_tree(d.doc) t WHERE d.id IN (SELECT value FROM json_each(:ids)) "
           "AND t.atom IS NOT NULL")
# the dotted key of a leaf: top-level members directly, anything deeper through kaapcli_key()
_LEAF_KEY = ("CASE WHEN t.path = '$' THEN t.key "
             # an element of a top-level list whose key needs quotes but holds none: the key, read in SQL
             """WHEN typeof(t.key) = 'integer' AND t.path GLOB '$."*"' """
             """AND instr(substr(t.path, 4), '"') = length(t.path) - 3 THEN substr(t.path, 4, length(t.path) - 4) """
             "ELSE kaapcli_key(t.path, t.key) END")
# numeric keys (the JSON list :numeric of key ids) hold numbers, or text when a value is no number
# (DESIGN §3.1); other keys hold text; booleans are 'true'/'false'
_VALUE = ("CASE WHEN {t}.type IN ('true', 'false') THEN {t}.type "
          "WHEN k.id NOT IN (SELECT value FROM json_each(:numeric)) THEN CAST({t}.atom AS TEXT) "
          "WHEN {t}.type IN ('integer', 'real') THEN {t}.atom + 0.0 "
          "ELSE coalesce(kaapcli_float({t}.atom), {t}.atom) END")
_LEAF_VALUE = _VALUE.format(t="t")
INSERT_KEYS = f"INSERT OR IGNORE INTO keys(key) SELECT DISTINCT {_LEAF_KEY} {_LEAVES}"
KV_ROWS = (f"SELECT k.id, {_LEAF_VALUE}, d.id "
           f"{_LEAVES.replace(' WHERE ', f' JOIN keys k ON k.key = {_LEAF_KEY} WHERE ', 1)}")
# The same rows for documents holding no object, where every leaf's key is its top-level member's: the
# members (json_each), and the leaves of those that are lists, found without working out a key from a path.
_MEMBERS = ("FROM docs d, json_each(d.doc) e JOIN keys k ON k.key = e.key "
            "WHERE d.id IN (SELECT value FROM json_each(:ids))")
KV_ROWS_FLAT = (f"SELECT k.id, {_VALUE.format(t='e')}, d.id {_MEMBERS} AND e.atom IS NOT NULL "
                f"UNION ALL SELECT k.id, {_LEAF_VALUE}, d.id "
                f"{_MEMBERS.replace(' WHERE ', ', json_tree(e.value) t WHERE ', 1)} "
                "AND e.type = 'array' AND t.atom IS NOT NULL")

_PATH_PART = re.compile(r'\.(?:("(?:[^"\\]|\\.)*")|([^.\[]+))')  # ."quoted label" or .label; [n] skipped


@lru_cache(maxsize=4096)
def _dotted(path: str) -> str:
    """A json_tree path (``$."K1"[0]."K2"``) as the dotted key it stands for (``K1.K2``)."""
    return ".".join(json.loads(quoted) if quoted else name for quoted, name in _PATH_PART.findall(path))


def _leaf_key(path: str, label: Any) -> str:
    """The key of a json_tree leaf below the top level: its container's key, plus its label in an object."""
    prefix = _dotted(path)
    return prefix if isinstance(label, int) else f"{prefix}.{label}" if prefix else str(label)


def _float(text: str) -> float | None:
    """A number given as a string, as Python reads it; None when it is none (or NaN, which SQLite stores as NULL)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return None if value != value else value


class SqliteIndex(Index):
    def __init__(self, path: Path, project: str, *, create: bool = False):
        self.path = path
        self.target = str(path)
        self.project = project
        if not path.exists() and not create:
            raise NoInputError(f"index {path} does not exist", hint="index documents first: kaapcli index INPUT...")
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA cache_size=-131072")  # 128 MiB: index pages stay cached during bulk inserts
            self.db.execute("PRAGMA temp_store=MEMORY")
            # bulk writes touch kv pages all over; checkpointing every 64 MiB rather than every 4 MiB copies
            # each page to the database file once instead of several times
            self.db.execute("PRAGMA wal_autocheckpoint=16384")
            self.db.create_function("kaapcli_key", 2, _leaf_key, deterministic=True)
            self.db.create_function("kaapcli_float", 1, _float, deterministic=True)
            self.keys: dict[str, int] = {}
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self.db.executescript(SCHEMA)
            elif version < 4:
                self._upgrade(version)
            self.keys = dict(self.db.execute("SELECT key, id FROM keys"))
        except sqlite3.DatabaseError as exc:
            code = CantCreateError if isinstance(exc, sqlite3.OperationalError) and create else DataError
            raise code(f"index {path}: {exc}", hint="is it a kaapcli index (SQLite) file?") from exc
        except OSError as exc:
            raise CantCreateError(f"index {path}: {exc.strerror}") from exc

    def close(self) -> None:
        self.db.close()

    def _upgrade(self, version: int) -> None:
        """Schema 1 had kv(doc, i, key, text, num) + an index, made in Python; schema 2 made FTS text in SQL;
        schema 3 had no files table.  Remake what changed from the stored documents."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(FILES_TABLE)
            if version == 3:
                db.execute("PRAGMA user_version = 4")
                db.execute("COMMIT")
                return
            if version == 1:
                db.execute("DROP TABLE kv")
                db.execute(KV_TABLE)
            db.execute("INSERT INTO fts(fts) VALUES ('delete-all')")
            docs = [(rowid, json.loads(text)) for rowid, text in db.execute("SELECT id, doc FROM docs")]
            db.executemany("INSERT INTO fts(rowid, body) VALUES (?, ?)", [(i, full_text(d)) for i, d in docs])
            if version == 1:
                self._add_kv(json.dumps([rowid for rowid, _ in docs]))
            db.execute("PRAGMA user_version = 4")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- writing
    def write(self, docs: Sequence[Doc | Stored], *, replace: bool) -> WriteStats:
        stats = WriteStats()
        by_uid: dict[str, Stored] = {}
        merged: dict[str, Doc] = {}  # uids met more than once in this batch: merged as parsed documents
        for item in stored(docs, stats.errors):  # the last of a uid wins, merged over earlier ones like separate writes
            earlier = by_uid.get(item.uid)
            by_uid[item.uid] = item
            if earlier is not None and not replace:  # e.g. per-instance documents of one series: parse each once,
                merged[item.uid] = merge(merged.get(item.uid) or earlier.doc, item.doc)  # serialise once below
        for uid, doc in merged.items():
            by_uid[uid] = Stored.of(doc)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            existing = {uid: (rowid, text) for rowid, uid, text in db.execute(
                "SELECT id, uid, doc FROM docs WHERE project = ? AND uid IN (SELECT value FROM json_each(?))",
                (self.project, json.dumps(list(by_uid))))}
            added: list[Stored] = []
            updated: list[tuple[int, Stored]] = []
            old_docs: list[tuple[int, Doc]] = []
            for uid, item in by_uid.items():
                if uid not in existing:
                    added.append(item)
                    continue
                rowid, text = existing[uid]
                old = json.loads(text)
                new = item.doc if replace else merge(old, item.doc)
                if new == old:
                    stats.unchanged += 1
                    continue
                updated.append((rowid, item if replace else Stored.of(new)))
                old_docs.append((rowid, old))
            self._remove_values(old_docs)  # made from the old documents, so before they change
            db.executemany("UPDATE docs SET doc = ? WHERE id = ?", [(item.text, rowid) for rowid, item in updated])
            db.executemany("INSERT INTO docs(project, uid, doc) VALUES (?, ?, ?)",
                           [(self.project, item.uid, item.text) for item in added])
            rowids = dict(db.execute(
                "SELECT uid, id FROM docs WHERE project = ? AND uid IN (SELECT value FROM json_each(?))",
                (self.project, json.dumps([item.uid for item in added])))) if added else {}
            self._add_values([*((rowids[item.uid], item) for item in added), *updated])
            stats.added, stats.updated = len(added), len(updated)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.keys = dict(self.db.execute("SELECT key, id FROM keys"))  # forget ids of rolled-back keys
            raise
        return stats

    def _add_values(self, items: Sequence[tuple[int, Stored]]) -> None:
        """kv rows and FTS text of the stored documents ``(rowid, item)``, inside the caller's transaction.
        The pass registering new keys is skipped when the documents certainly bring none: their top-level
        keys are known and none holds an object."""
        flat = not any(item.nested for _, item in items)
        known = flat and set().union(*(item.keys for _, item in items)).issubset(self.keys)
        self._add_kv(json.dumps([rowid for rowid, _ in items]), register_keys=not known, flat=flat)
        self.db.executemany("INSERT INTO fts(rowid, body) VALUES (?, ?)", [(i, item.words) for i, item in items])

    def _add_kv(self, ids: str, *, register_keys: bool = True, flat: bool = False) -> None:
        """``flat``: no document holds an object (the quicker statement gives the same rows)."""
        if register_keys:
            self.db.execute(INSERT_KEYS, {"ids": ids})
        args = {"ids": ids, "numeric": self._numeric_ids()}
        rows = KV_ROWS_FLAT if flat else KV_ROWS
        self.db.execute(f"INSERT OR IGNORE INTO kv(key, v, doc) {rows}", args)  # a list may repeat a value

    def _remove_values(self, docs: Sequence[tuple[int, Doc]]) -> None:
        """Undo :meth:`_add_values` for the still stored documents ``(rowid, doc)``."""
        if not docs:
            return
        args = {"ids": json.dumps([rowid for rowid, _ in docs]), "numeric": self._numeric_ids()}
        self.db.executemany("DELETE FROM kv WHERE key = ? AND v = ? AND doc = ?", self.db.execute(KV_ROWS, args))
        self.db.executemany("INSERT INTO fts(fts, rowid, body) VALUES ('delete', ?, ?)",
                            [(i, full_text(d)) for i, d in docs])

    def _numeric_ids(self) -> str:
        """The ids of numeric keys, as a JSON list; read afresh, as other writers may have added keys."""
        self.keys = dict(self.db.execute("SELECT key, id FROM keys"))
        return json.dumps([ident for key, ident in self.keys.items() if is_numeric(key)])

    def key_ids(self, keys: Sequence[str]) -> list[int]:
        if any(k not in self.keys for k in keys):
            self.keys = dict(self.db.execute("SELECT key, id FROM keys"))
        return [self.keys.get(k, -1) for k in keys]  # -1: a key no document has, matches nothing

    def delete(self, node: Node) -> int:
        where, params = self._where(node)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            found = db.execute(f"SELECT d.id, d.uid, d.doc FROM docs d WHERE {where}", params).fetchall()
            rows = [(rowid, json.loads(text)) for rowid, _, text in found]
            self._remove_values(rows)
            db.execute("DELETE FROM docs WHERE id IN (SELECT value FROM json_each(?))",
                       (json.dumps([rowid for rowid, _ in rows]),))
            db.execute("DELETE FROM files WHERE project = ? AND uid IN (SELECT value FROM json_each(?))",
                       (self.project, json.dumps([uid for _, uid, _ in found])))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(rows)

    def store_files(self, entries: Sequence[SeriesFiles]) -> None:
        if not entries:
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO files(project, uid, files) VALUES (?, ?, ?)",
                           [(self.project, e.uid, json.dumps(e.to_json())) for e in entries])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def files_of(self, uids: Sequence[str]) -> dict[str, SeriesFiles]:
        rows = self.db.execute("SELECT uid, files FROM files WHERE project = ? AND uid IN "
                               "(SELECT value FROM json_each(?))", (self.project, json.dumps(list(uids))))
        return {uid: SeriesFiles.from_json(uid, json.loads(text)) for uid, text in rows}

    # -- reading
    def _where(self, node: Node) -> tuple[str, list[Any]]:
        params: list[Any] = []
        sql = _sql(self.bind(node), params, self.key_ids, self.project)
        # "+" keeps SQLite from scanning the project's documents: the field conditions pick the rows by id
        return f"+d.project = ? AND ({sql})", [self.project, *params]

    def search(self, node: Node, *, fields: Sequence[str] | None = None, limit: int | None = None,
               sort: Sort | None = None) -> Iterator[Doc]:
        where, params = self._where(node)
        join, order = "", "d.uid"
        if sort is not None:  # by the smallest (largest) value of a document; documents without one last
            marks = ", ".join("?" * len(sort.keys))
            numbers = " AND v < ''" if all(is_numeric(k) for k in sort.keys) else ""
            join = f"LEFT JOIN (SELECT doc, {'max' if sort.descending else 'min'}(v) AS v FROM kv " \
                   f"WHERE key IN ({marks}){numbers} GROUP BY doc) s ON s.doc = d.id"
            order = f"s.v IS NULL, s.v {'DESC' if sort.descending else 'ASC'}, d.uid"
            params = [*self.key_ids(sort.keys), *params]
        sql = f"SELECT d.doc FROM docs d {join} WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        for (text,) in self.db.execute(sql, params):
            doc = json.loads(text)
            yield doc if fields is None else _project(doc, fields)

    def count(self, node: Node) -> int:
        where, params = self._where(node)
        return int(self.db.execute(f"SELECT count(*) FROM docs d WHERE {where}", params).fetchone()[0])

    def value_counts(self, keys: Sequence[str], node: Node, top: int | None = None) -> list[tuple[Any, int]]:
        where, params = self._where(node)
        marks = ", ".join("?" * len(keys))
        sql = (f"SELECT kv.v, count(DISTINCT kv.doc) AS n FROM kv "
               f"WHERE kv.key IN ({marks}) AND kv.doc IN (SELECT d.id FROM docs d WHERE {where}) "
               f"GROUP BY kv.v ORDER BY n DESC, kv.v")
        args = [*self.key_ids(keys), *params]
        if top is not None:
            sql += " LIMIT ?"
            args.append(top)
        return [(_number(v) if any(is_numeric(k) for k in keys) else v, n) for v, n in self.db.execute(sql, args)]

    def date_counts(self, keys: Sequence[str], node: Node, chars: int) -> list[tuple[str, int]]:
        where, params = self._where(node)
        marks = ", ".join("?" * len(keys))
        # well-formed dates only, as OpenSearch indexes them (a malformed value stays in the document, unindexed)
        sql = (f"SELECT substr(kv.v, 1, ?) AS p, count(DISTINCT kv.doc) FROM kv WHERE kv.key IN ({marks}) "
               "AND typeof(kv.v) = 'text' AND kv.v GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' "
               f"AND kv.doc IN (SELECT d.id FROM docs d WHERE {where}) GROUP BY p ORDER BY p")
        return [(p, n) for p, n in self.db.execute(sql, [chars, *self.key_ids(keys), *params])]

    # -- datasets
    def datasets(self) -> dict[str, int]:
        rows = self.db.execute("SELECT name, count(*) FROM datasets WHERE project = ? GROUP BY name ORDER BY name",
                               (self.project,))
        return dict(rows)

    def dataset_members(self, name: str) -> list[str] | None:
        rows = [r[0] for r in self.db.execute(
            "SELECT uid FROM datasets WHERE project = ? AND name = ? ORDER BY uid", (self.project, name))]
        return rows or None

    def set_dataset(self, name: str, uids: Sequence[str]) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM datasets WHERE project = ? AND name = ?", (self.project, name))
            db.executemany("INSERT INTO datasets VALUES (?, ?, ?)", [(self.project, name, u) for u in uids])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _project(doc: Doc, fields: Sequence[str]) -> Doc:
    """The requested keys of a document (top-level keys, or the top-level object holding a dotted key)."""
    wanted = {f.split(".", 1)[0] for f in fields}
    return {k: v for k, v in doc.items() if k in wanted}


# --------------------------------------------------------------------------- AST → SQL

_TOKEN = re.compile(r"\w+")


KeyIds = Callable[[Sequence[str]], list[int]]


def _in_kv(condition: str, keys: Sequence[int], params: list[Any], *values: Any) -> str:
    params.extend(keys)
    params.extend(values)
    marks = ", ".join("?" * len(keys))
    return f"d.id IN (SELECT doc FROM kv WHERE key IN ({marks}) AND {condition})"


def _wildcard_parts(pattern: str) -> Iterator[tuple[str, bool]]:
    """The characters of a query wildcard pattern, each with whether it stands for itself: ``*`` and ``?``
    are wildcards unless a backslash escapes them (a backslash escapes any character)."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            yield pattern[i + 1], True
            i += 2
        else:
            yield pattern[i], pattern[i] not in "*?"
            i += 1


def _glob(pattern: str) -> str:
    """Query wildcard pattern → SQLite GLOB (``[*]`` etc. for literals)."""
    return "".join({"*": "[*]", "?": "[?]", "[": "[[]"}.get(ch, ch) if literal else ch
                   for ch, literal in _wildcard_parts(pattern))


def _like(pattern: str) -> str:
    """Query wildcard pattern → LIKE with ``\\`` as escape."""
    return "".join(("\\" + ch if ch in "%_\\" else ch) if literal else {"*": "%", "?": "_"}[ch]
                   for ch, literal in _wildcard_parts(pattern))


def _split(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    numeric = [k for k in keys if is_numeric(k)]
    return numeric, [k for k in keys if k not in numeric]


def _either(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _sql(node: Node, params: list[Any], ids: KeyIds, project: str) -> str:
    if isinstance(node, MatchAll):
        return "1"
    if isinstance(node, Ids):
        params.append(json.dumps(list(node.uids)))
        return "d.uid IN (SELECT value FROM json_each(?))"
    if isinstance(node, InDataset):  # a name: Index.bind resolved patterns
        params.extend((project, node.name))
        return "d.uid IN (SELECT uid FROM datasets WHERE project = ? AND name = ?)"
    if isinstance(node, And):
        return "(" + " AND ".join(_sql(n, params, ids, project) for n in node.nodes) + ")"
    if isinstance(node, Or):
        return "(" + " OR ".join(_sql(n, params, ids, project) for n in node.nodes) + ")"
    if isinstance(node, Not):
        return f"NOT {_sql(node.node, params, ids, project)}"
    if isinstance(node, Text):
        if node.wildcard:  # a whole value of any field, case-insensitive
            params.append(_like(node.value))
            return "d.id IN (SELECT doc FROM kv WHERE typeof(v) = 'text' AND v LIKE ? ESCAPE '\\')"
        tokens = _TOKEN.findall(node.value)
        if not tokens:
            return "0"
        params.append('"' + " ".join(tokens) + '"')
        return "d.id IN (SELECT rowid FROM fts WHERE fts MATCH ?)"
    if isinstance(node, Exists):
        parts = []
        for key in node.field.keys:
            if key_type(key) == "object":
                params.append(_glob(key) + ".*")
                parts.append("d.id IN (SELECT doc FROM kv WHERE key IN (SELECT id FROM keys WHERE key GLOB ?))")
            else:
                parts.append(_in_kv("1", ids([key]), params))
        return _either(parts)
    numeric, text = _split(node.field.keys)
    parts = []
    if isinstance(node, Term):
        if numeric:
            parts.append(_in_kv("v = ?", ids(numeric), params, float(node.value)))
        if text:
            parts.append(_in_kv("v = ?", ids(text), params, node.value))
    elif isinstance(node, Wildcard):
        parts.append(_in_kv("v GLOB ?", ids(text), params, _glob(node.pattern)))
    elif isinstance(node, Range):
        for keys, numbers in ((numeric, True), (text, False)):
            if not keys:
                continue
            conds = ["v < ''"] if numbers else []  # numeric keys: numbers only, not malformed (text) values
            values: list[Any] = []
            rounding = any(key_type(k) in ("date", "time", "datetime") for k in keys)
            if node.low is not None:
                low = float(node.low) if numbers else node.low
                if not node.include_low and rounding:  # {2020-01-01 TO ...: after that whole day
                    low = f"{low}{MAX_CHAR}"
                conds.append(f"v {'>=' if node.include_low else '>'} ?")
                values.append(low)
            if node.high is not None:
                high = float(node.high) if numbers else node.high
                if node.include_high and rounding:  # ... TO 2020-12-31]: up to the end of that day
                    high = f"{high}{MAX_CHAR}"
                conds.append(f"v {'<=' if node.include_high else '<'} ?")
                values.append(high)
            parts.append(_in_kv(" AND ".join(conds) or "1", ids(keys), params, *values))
    else:  # pragma: no cover - exhaustive
        raise TypeError(f"unknown query node {node!r}")
    return _either(parts)
