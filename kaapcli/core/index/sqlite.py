"""The embedded index: one SQLite file, no server.

Schema (one file may hold several projects)::

    docs(id, project, uid, doc)      the documents as JSON; (project, uid) unique
    keys(id, key)                    document keys, so kv rows and indexes hold a small integer per key
    kv(doc, i, key, text, num)       one row per leaf value (lists → one row per element; objects →
                                     dotted keys, as OpenSearch flattens them); text OR num is set
      kv_value(key, text, num)       the one index of field queries: terms, wildcards with a literal prefix,
                                     ranges (numbers: text IS NULL), sorting, value counts
    fts(body)                        contentless FTS5 over every value of a document, rowid = docs.id
    datasets(project, name, uid)

A query AST becomes one SQL ``WHERE`` over ``docs d``: every field condition is
``d.id IN (SELECT doc FROM kv WHERE key IN (<key ids>) AND ...)``, which SQLite answers from an index.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kaapcli.core.index.base import Doc, Index, Sort, WriteStats, doc_id, merge
from kaapcli.core.index.query import (
    And,
    Exists,
    Ids,
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, project TEXT NOT NULL, uid TEXT NOT NULL,
                                doc TEXT NOT NULL, UNIQUE(project, uid));
CREATE TABLE IF NOT EXISTS keys(id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS kv(doc INTEGER NOT NULL, i INTEGER NOT NULL, key INTEGER NOT NULL, text TEXT, num REAL,
                              PRIMARY KEY(doc, i)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_value ON kv(key, text, num);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(body, content='');
CREATE TABLE IF NOT EXISTS datasets(project TEXT NOT NULL, name TEXT NOT NULL, uid TEXT NOT NULL,
                                    PRIMARY KEY(project, name, uid)) WITHOUT ROWID;
PRAGMA user_version = 1;
"""
MAX_CHAR = "\U0010ffff"  # appended to a date bound so "2020-12-31" covers that whole day of a datetime


def flatten(doc: Doc, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, scalar) for every leaf value, list elements one by one."""
    for key, value in doc.items():
        path = f"{prefix}{key}"
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, dict):
                yield from flatten(item, path + ".")
            elif item is not None:
                yield path, item


def kv_rows(doc_rowid: int, doc: Doc, key_id: Callable[[str], int]) -> list[tuple[int, int, int, str | None,
                                                                                   float | None]]:
    rows: list[tuple[int, int, int, str | None, float | None]] = []
    for i, (key, value) in enumerate(flatten(doc)):
        if is_numeric(key) and not isinstance(value, bool):
            try:
                rows.append((doc_rowid, i, key_id(key), None, float(value)))
                continue
            except (TypeError, ValueError):
                pass  # a malformed number is kept as text (DESIGN §3.1)
        rows.append((doc_rowid, i, key_id(key), json.dumps(value) if isinstance(value, bool) else str(value), None))
    return rows


def fts_body(doc: Doc) -> str:
    return "\n".join(str(v) for _, v in flatten(doc))


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
            if self.db.execute("PRAGMA user_version").fetchone()[0] == 0:
                self.db.executescript(SCHEMA)
            self.keys: dict[str, int] = dict(self.db.execute("SELECT key, id FROM keys"))
        except sqlite3.DatabaseError as exc:
            code = CantCreateError if isinstance(exc, sqlite3.OperationalError) and create else DataError
            raise code(f"index {path}: {exc}", hint="is it a kaapcli index (SQLite) file?") from exc
        except OSError as exc:
            raise CantCreateError(f"index {path}: {exc.strerror}") from exc

    def close(self) -> None:
        self.db.close()

    # -- writing
    def write(self, docs: Sequence[Doc], *, replace: bool) -> WriteStats:
        stats = WriteStats()
        by_uid: dict[str, Doc] = {}
        for doc in docs:  # the last document of a uid wins, merged over the earlier ones like separate writes
            uid = doc_id(doc)
            by_uid[uid] = doc if replace or uid not in by_uid else merge(by_uid[uid], doc)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            existing = {uid: (rowid, text) for rowid, uid, text in db.execute(
                "SELECT id, uid, doc FROM docs WHERE project = ? AND uid IN (SELECT value FROM json_each(?))",
                (self.project, json.dumps(list(by_uid))))}
            kv: list[tuple[int, int, int, str | None, float | None]] = []
            fts: list[tuple[int, str]] = []
            for uid, doc in by_uid.items():
                if uid in existing:
                    rowid, old_text = existing[uid]
                    old = json.loads(old_text)
                    new = doc if replace else merge(old, doc)
                    if new == old:
                        stats.unchanged += 1
                        continue
                    stats.updated += 1
                    db.execute("UPDATE docs SET doc = ? WHERE id = ?", (json.dumps(new, ensure_ascii=False), rowid))
                    db.execute("DELETE FROM kv WHERE doc = ?", (rowid,))
                    db.execute("INSERT INTO fts(fts, rowid, body) VALUES ('delete', ?, ?)", (rowid, fts_body(old)))
                else:
                    new = doc
                    stats.added += 1
                    rowid = db.execute("INSERT INTO docs(project, uid, doc) VALUES (?, ?, ?)",
                                       (self.project, uid, json.dumps(new, ensure_ascii=False))).lastrowid
                kv.extend(kv_rows(rowid, new, self._key_id))
                fts.append((rowid, fts_body(new)))
            db.executemany("INSERT INTO kv VALUES (?, ?, ?, ?, ?)", kv)
            db.executemany("INSERT INTO fts(rowid, body) VALUES (?, ?)", fts)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.keys = dict(self.db.execute("SELECT key, id FROM keys"))  # forget ids of rolled-back keys
            raise
        return stats

    def _key_id(self, key: str) -> int:
        """The id of a document key, registered on first sight (inside the caller's transaction)."""
        ident = self.keys.get(key)
        if ident is None:  # another writer may have registered it since we loaded the table
            self.db.execute("INSERT OR IGNORE INTO keys(key) VALUES (?)", (key,))
            ident = self.db.execute("SELECT id FROM keys WHERE key = ?", (key,)).fetchone()[0]
            self.keys[key] = ident
        return ident

    def key_ids(self, keys: Sequence[str]) -> list[int]:
        if any(k not in self.keys for k in keys):
            self.keys = dict(self.db.execute("SELECT key, id FROM keys"))
        return [self.keys.get(k, -1) for k in keys]  # -1: a key no document has, matches nothing

    def delete(self, node: Node) -> int:
        where, params = self._where(node)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = list(db.execute(f"SELECT d.id, d.doc FROM docs d WHERE {where}", params))
            blob = json.dumps([r[0] for r in rows])
            db.executemany("INSERT INTO fts(fts, rowid, body) VALUES ('delete', ?, ?)",
                           [(rowid, fts_body(json.loads(text))) for rowid, text in rows])
            db.execute("DELETE FROM kv WHERE doc IN (SELECT value FROM json_each(?))", (blob,))
            db.execute("DELETE FROM docs WHERE id IN (SELECT value FROM json_each(?))", (blob,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return len(rows)

    # -- reading
    def _where(self, node: Node) -> tuple[str, list[Any]]:
        params: list[Any] = []
        sql = _sql(node, params, self.key_ids)
        # "+" keeps SQLite from scanning the project's documents: the field conditions pick the rows by id
        return f"+d.project = ? AND ({sql})", [self.project, *params]

    def search(self, node: Node, *, fields: Sequence[str] | None = None, limit: int | None = None,
               sort: Sort | None = None) -> Iterator[Doc]:
        where, params = self._where(node)
        order = "d.uid"
        if sort is not None:
            column = "num" if all(is_numeric(k) for k in sort.keys) else "coalesce(text, num)"
            keys = ", ".join("?" * len(sort.keys))
            value = f"(SELECT {'max' if sort.descending else 'min'}({column}) FROM kv WHERE kv.doc = d.id " \
                    f"AND kv.key IN ({keys}))"
            direction = "DESC" if sort.descending else "ASC"
            order = f"{value} IS NULL, {value} {direction}, d.uid"  # documents without the field last
            params += self.key_ids(sort.keys) * 2
        sql = f"SELECT d.doc FROM docs d WHERE {where} ORDER BY {order}"
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
        sql = (f"SELECT coalesce(kv.num, kv.text) AS v, count(DISTINCT kv.doc) AS n FROM kv "
               f"WHERE kv.key IN ({marks}) AND kv.doc IN (SELECT d.id FROM docs d WHERE {where}) "
               f"GROUP BY v ORDER BY n DESC, v")
        args = [*self.key_ids(keys), *params]
        if top is not None:
            sql += " LIMIT ?"
            args.append(top)
        return [(_number(v) if any(is_numeric(k) for k in keys) else v, n) for v, n in self.db.execute(sql, args)]

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


def _glob(pattern: str) -> str:
    """Query wildcard pattern → SQLite GLOB (``[*]`` etc. for literals)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append({"*": "[*]", "?": "[?]", "[": "[[]"}.get(pattern[i + 1], pattern[i + 1]))
            i += 2
            continue
        out.append("[[]" if ch == "[" else ch)
        i += 1
    return "".join(out)


def _like(pattern: str) -> str:
    """Query wildcard pattern → LIKE with ``\\`` as escape."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            ch = pattern[i + 1]
            out.append("\\" + ch if ch in "%_\\" else ch)
            i += 2
            continue
        out.append("%" if ch == "*" else "_" if ch == "?" else "\\" + ch if ch in "%_\\" else ch)
        i += 1
    return "".join(out)


def _split(keys: Sequence[str]) -> tuple[list[str], list[str]]:
    numeric = [k for k in keys if is_numeric(k)]
    return numeric, [k for k in keys if k not in numeric]


def _either(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _sql(node: Node, params: list[Any], ids: KeyIds) -> str:
    if isinstance(node, MatchAll):
        return "1"
    if isinstance(node, Ids):
        params.append(json.dumps(list(node.uids)))
        return "d.uid IN (SELECT value FROM json_each(?))"
    if isinstance(node, And):
        return "(" + " AND ".join(_sql(n, params, ids) for n in node.nodes) + ")"
    if isinstance(node, Or):
        return "(" + " OR ".join(_sql(n, params, ids) for n in node.nodes) + ")"
    if isinstance(node, Not):
        return f"NOT {_sql(node.node, params, ids)}"
    if isinstance(node, Text):
        if node.wildcard:  # a whole value of any field, case-insensitive
            params.append(_like(node.value))
            return "d.id IN (SELECT doc FROM kv WHERE text LIKE ? ESCAPE '\\')"
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
            parts.append(_in_kv("text IS NULL AND num = ?", ids(numeric), params, float(node.value)))
        if text:
            parts.append(_in_kv("text = ?", ids(text), params, node.value))
    elif isinstance(node, Wildcard):
        parts.append(_in_kv("text GLOB ?", ids(text), params, _glob(node.pattern)))
    elif isinstance(node, Range):
        for keys, column in ((numeric, "num"), (text, "text")):
            if not keys:
                continue
            conds, values = (["text IS NULL"] if column == "num" else []), []
            rounding = any(key_type(k) in ("date", "time", "datetime") for k in keys)
            if node.low is not None:
                low = float(node.low) if column == "num" else node.low
                if not node.include_low and rounding:  # {2020-01-01 TO ...: after that whole day
                    low = f"{low}{MAX_CHAR}"
                conds.append(f"{column} {'>=' if node.include_low else '>'} ?")
                values.append(low)
            if node.high is not None:
                high = float(node.high) if column == "num" else node.high
                if node.include_high and rounding:  # ... TO 2020-12-31]: up to the end of that day
                    high = f"{high}{MAX_CHAR}"
                conds.append(f"{column} {'<=' if node.include_high else '<'} ?")
                values.append(high)
            parts.append(_in_kv(" AND ".join(conds) if len(conds) > (column == "num") else f"{column} IS NOT NULL",
                                ids(keys), params, *values))
    else:  # pragma: no cover - exhaustive
        raise TypeError(f"unknown query node {node!r}")
    return _either(parts)
