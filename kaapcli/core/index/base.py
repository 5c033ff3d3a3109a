"""The index interface both backends implement, and :func:`open_index` that picks one from a target.

A target is a path (embedded SQLite), an ``http(s)://`` URL (OpenSearch), or the name of an
``[index.NAME]`` config profile holding either.  Documents are series "meta" documents
(DESIGN §3.1) whose id is their SeriesInstanceUID.  Tag and dataset operations are written once
here in terms of the backend primitives, so they behave the same on both backends.
"""

from __future__ import annotations

import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from kaapcli.core.index.query import (
    DATASET_FIELD,
    DATE_UNITS,
    MATCH_NONE,
    SERIES_KEY,
    TAGS_KEY,
    And,
    Exists,
    Facet,
    Ids,
    InDataset,
    Node,
    Not,
    Or,
    glob_to_regex,
)
from kaapcli.exitcodes import ConfigError, DataError, NoInputError

DEFAULT_PROJECT = "admin"
BULK_SIZE = 500
Doc = dict[str, Any]


@dataclass
class WriteStats:
    """What a write did: documents created, changed, left as they were; ids not found; rejected documents."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "series UID: reason" for documents the backend refused

    def __iadd__(self, other: WriteStats) -> WriteStats:
        self.added += other.added
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.missing.extend(other.missing)
        self.errors.extend(other.errors)
        return self


@dataclass(frozen=True)
class Sort:
    keys: tuple[str, ...]  # a field may resolve to several keys; the first present one sorts
    descending: bool = False


@dataclass(frozen=True)
class SeriesFiles:
    """Where the files of a series were when it was indexed: (absolute path, size, mtime in ns) of each, so a
    file that has gone or changed since can be told from one that has not."""

    uid: str
    files: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, uid: str, paths: Iterable[Path | str]) -> SeriesFiles:
        entries = []
        for path in paths:
            absolute = os.path.abspath(path)
            st = os.stat(absolute)
            entries.append((absolute, st.st_size, st.st_mtime_ns))
        return cls(uid, tuple(sorted(entries)))

    def to_json(self) -> list[dict[str, Any]]:
        return [{"path": p, "size": size, "mtime": mtime} for p, size, mtime in self.files]

    @classmethod
    def from_json(cls, uid: str, files: Any) -> SeriesFiles:
        """From :meth:`to_json` as stored; entries that are not such objects are left out."""
        entries = [(f["path"], f.get("size", -1), f.get("mtime", -1)) for f in files or []
                   if isinstance(f, dict) and isinstance(f.get("path"), str)]
        return cls(uid, tuple(entries))


def doc_id(doc: Doc) -> str:
    """The document id: its SeriesInstanceUID (a DataError when it has none)."""
    uid = doc.get(SERIES_KEY)
    if isinstance(uid, list) and len(uid) == 1:
        uid = uid[0]
    if not isinstance(uid, str) or not uid.strip():
        raise DataError(f"document has no {SERIES_KEY!r}", hint="index dcm2json output (Kaapana series meta JSON)")
    return uid.strip()


@dataclass(frozen=True)
class Stored:
    """A document ready to write: its id, JSON text, full-text words and top-level keys, made once.
    ``kaapcli index`` makes them in the worker processes that read the inputs, so the writer only writes."""

    uid: str
    text: str
    words: str
    keys: frozenset[str]
    nested: bool  # holds an object: keys below the top level

    @classmethod
    def of(cls, doc: Doc) -> Stored:
        """DataError for a document without a SeriesInstanceUID or holding NaN/Infinity (which is no JSON)."""
        uid = doc_id(doc)
        words, nested, finite, _ = _words(doc)
        return cls._make(uid, doc, words, nested, finite)

    @classmethod
    def parsed(cls, doc: Doc) -> Stored | None:
        """:meth:`of` a document orjson parsed, or None when it holds a float of 1e18 or more: that may have been an
        integer beyond 64 bits, which only the stdlib parser reads exactly (see :func:`loads`)."""
        uid = doc_id(doc)
        words, nested, finite, small = _words(doc)
        return cls._make(uid, doc, words, nested, finite) if small or not finite else None

    @classmethod
    def _make(cls, uid: str, doc: Doc, words: str, nested: bool, finite: bool) -> Stored:
        if not finite:
            raise DataError(f"series {uid}: NaN or Infinity is not a valid JSON value")
        try:
            text = orjson.dumps(doc).decode()  # 10x faster than json.dumps
        except TypeError:  # an integer beyond 64 bits
            text = json.dumps(doc, ensure_ascii=False)
        return cls(uid, text, words, frozenset(doc), nested)

    @property
    def doc(self) -> Doc:
        return loads(self.text)  # type: ignore[no-any-return]


# Deeper documents are refused, each one error line: every walk of a document (here, merge, SQLite's json_tree
# with its limit of 1000) recurses once per level, so depth must stay far below Python's recursion limit; real
# series documents nest a few levels, SR content trees a few dozen; OpenSearch refuses objects deeper than 20.
MAX_DEPTH = 100
_LONG_INTEGER = re.compile(r"[:\[,]\s*-?\d{19}")  # a number token that may not fit 64 bits


def loads(text: str) -> Any:
    """JSON as orjson reads it (3x faster); stdlib json reads what orjson would read as a float (integers
    beyond 64 bits) and reads or explains what it refuses (NaN, error positions)."""
    if _LONG_INTEGER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(text)
    except RecursionError:  # orjson stops at 1024 levels, stdlib json at the interpreter's recursion limit
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", text, 0) from None


def full_text(doc: Doc) -> str:
    """The words of a document for full-text search: its leaf values, one per line."""
    return _words(doc)[0]


def _words(doc: Doc) -> tuple[str, bool, bool, bool]:
    """Full-text words; whether the document holds an object; whether every number in it is finite; whether
    every float in it is below 1e18 in magnitude.  A DataError when it nests deeper than MAX_DEPTH."""
    lines: list[str] = []
    nested, finite, small = False, True, True

    def leaves(values: Iterable[Any], depth: int) -> None:
        nonlocal nested, finite, small
        if depth > MAX_DEPTH:
            raise DataError(f"document nested deeper than {MAX_DEPTH} levels (objects and lists)")
        for value in values:
            if type(value) is str:
                lines.append(value)
            elif isinstance(value, dict):
                nested = True
                leaves(value.values(), depth + 1)
            elif isinstance(value, list):
                leaves(value, depth + 1)
            elif value is not None:
                if type(value) is float and not -1e18 < value < 1e18:
                    finite = finite and math.isfinite(value)
                    small = False
                lines.append(str(value))

    leaves(doc.values(), 1)
    return "\n".join(lines), nested, finite, small


def stored(docs: Iterable[Doc | Stored], errors: list[str]) -> list[Stored]:
    """Documents as :class:`Stored`; those holding NaN are reported in ``errors`` and left out (a document
    without id raises: that is the caller's mistake, not the data's)."""
    result = []
    for doc in docs:
        if not isinstance(doc, Stored):
            doc_id(doc)
            try:
                doc = Stored.of(doc)
            except DataError as exc:
                errors.append(exc.message)
                continue
        result.append(doc)
    return result


def merge(old: Doc, new: Doc) -> Doc:
    """OpenSearch partial-update semantics: objects merge key by key, every other value is replaced."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class Index(ABC):
    """One project of one index (SQLite file or OpenSearch index)."""

    target: str  # for messages: a path or a URL without credentials
    project: str

    # -- primitives every backend implements
    @abstractmethod
    def write(self, docs: Sequence[Doc | Stored], *, replace: bool) -> WriteStats:
        """Merge-update (or with ``replace`` overwrite) documents, keyed by :func:`doc_id`."""

    @abstractmethod
    def search(self, node: Node, *, fields: Sequence[str] | None = None, limit: int | None = None,
               sort: Sort | None = None) -> Iterator[Doc]:
        """Matching documents, sorted by ``sort`` then SeriesInstanceUID, projected to ``fields`` (keys)."""

    @abstractmethod
    def count(self, node: Node) -> int: ...

    @abstractmethod
    def delete(self, node: Node) -> int:
        """Delete matching documents; returns how many."""

    @abstractmethod
    def value_counts(self, keys: Sequence[str], node: Node, top: int | None = None) -> list[tuple[Any, int]]:
        """(value, number of matching documents holding it) for a field, most frequent first."""

    @abstractmethod
    def date_counts(self, keys: Sequence[str], node: Node, chars: int) -> list[tuple[str, int]]:
        """(period, number of matching documents with a value in it) for a date field, oldest first; a period
        is the first ``chars`` characters of the value (7: ``YYYY-MM``)."""

    @abstractmethod
    def store_files(self, entries: Sequence[SeriesFiles]) -> None:
        """Remember where the files of series are (replacing what was known of those series)."""

    @abstractmethod
    def files_of(self, uids: Sequence[str]) -> dict[str, SeriesFiles]:
        """The known files of these series (series without any are absent)."""

    @abstractmethod
    def datasets(self) -> dict[str, int]:
        """Dataset name → number of series."""

    @abstractmethod
    def dataset_members(self, name: str) -> list[str] | None:
        """The series UIDs of a dataset (sorted), or None when there is no such dataset."""

    @abstractmethod
    def set_dataset(self, name: str, uids: Sequence[str]) -> None:
        """Store a dataset's member list (an empty list deletes the dataset)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared operations
    def bind(self, node: Node) -> Node:
        """The query with ``Dataset:`` patterns resolved to dataset names, as backends translate it.  A dataset
        named exactly that does not exist is a NoInputError (a typo should not look like an empty dataset)."""
        names: list[str] | None = None

        def walk(n: Node) -> Node:
            nonlocal names
            if isinstance(n, InDataset):
                if names is None:
                    names = sorted(self.datasets())
                if n.wildcard:
                    pattern = glob_to_regex(n.name)
                    return any_of([InDataset(x) for x in names if pattern.fullmatch(x)])
                if n.name not in names:
                    raise NoInputError(f"dataset {n.name!r} does not exist in {self.target}",
                                       hint="kaapcli dataset list shows the datasets")
                return n
            if isinstance(n, And):
                return And(tuple(walk(x) for x in n.nodes))
            if isinstance(n, Or):
                return Or(tuple(walk(x) for x in n.nodes))
            if isinstance(n, Not):
                return Not(walk(n.node))
            return n

        return walk(node)

    def facet_counts(self, facet: Facet, node: Node, top: int | None = None) -> list[tuple[Any, int]]:
        """(value, series) of a facet over the matching series: most frequent first (dates: in time order,
        the ``top`` most frequent periods); series without a value count under ``None``, in order of frequency
        (dates: last)."""
        counts: list[tuple[Any, int]]
        if facet.field is DATASET_FIELD:
            names = list(self.datasets())
            counts = sorted(((name, self.count(And((node, InDataset(name))))) for name in names),
                            key=lambda vc: (-vc[1], vc[0]))
            counts = [(v, n) for v, n in counts if n][:top]
            absent_node: Node = And((node, Not(any_of([InDataset(name) for name in names]))))
        elif facet.unit:
            counts = list(self.date_counts(facet.field.keys, node, DATE_UNITS[facet.unit]))
            if top:
                counts = sorted(sorted(counts, key=lambda vc: (-vc[1], vc[0]))[:top])
            absent_node = And((node, Not(Exists(facet.field))))
        else:
            counts = list(self.value_counts(facet.field.keys, node, top))
            absent_node = And((node, Not(Exists(facet.field))))
        absent = self.count(absent_node) if top is None or len(counts) < top else 0
        if absent:
            counts.append((None, absent))
            if not facet.unit:
                counts.sort(key=lambda vc: -vc[1])
        return counts

    def uids(self, node: Node) -> list[str]:
        return [doc_id(d) for d in self.search(node, fields=[SERIES_KEY])]

    def retag(self, node: Node, add: Iterable[str] = (), remove: Iterable[str] = (),
              from_keys: Sequence[str] = ()) -> WriteStats:
        """Add/remove tags (``Tags_keyword``) on matching documents; ``from_keys``: tag with those fields' values."""
        add, remove = list(add), set(remove)
        changes: list[Doc] = []
        stats = WriteStats()
        found: set[str] = set()
        for doc in self.search(node, fields=[SERIES_KEY, TAGS_KEY, *from_keys]):
            found.add(doc_id(doc))
            tags = [str(t) for t in as_list(doc.get(TAGS_KEY))]
            extra = [str(v) for key in from_keys for v in as_list(lookup(doc, key)) if v not in (None, "")]
            new = [t for t in dict.fromkeys([*tags, *add, *extra]) if t not in remove]
            if new == tags:
                stats.unchanged += 1
            else:
                changes.append({SERIES_KEY: doc_id(doc), TAGS_KEY: new})
        for start in range(0, len(changes), BULK_SIZE):
            self.write(changes[start:start + BULK_SIZE], replace=False)
        stats.updated = len(changes)
        stats.missing = _missing(node, found)
        return stats

    def dataset_change(self, name: str, node: Node, *, remove: bool = False) -> WriteStats:
        """Add (or remove) the matching series to (from) a dataset; reports how many changed."""
        members = self.dataset_members(name) or []
        selected = set(self.uids(node))
        if remove:  # series no longer in the index can still be removed from a dataset
            selected |= set(node.uids) if isinstance(node, Ids) else set()
            kept = [u for u in members if u not in selected]
            stats = WriteStats(updated=len(members) - len(kept), unchanged=len(selected) - (len(members) - len(kept)))
            new = kept
        else:
            current = set(members)
            fresh = sorted(selected - current)
            stats = WriteStats(added=len(fresh), unchanged=len(selected) - len(fresh), missing=_missing(node, selected))
            new = sorted(current | selected)
        if new != members:
            self.set_dataset(name, new)
        return stats


    def datasets_from_field(self, node: Node, keys: Sequence[str], template: str = "{}",
                            problems: list[str] | None = None) -> dict[str, WriteStats]:
        """Add each matching series to the dataset named by its value(s) of a field (``template`` with ``{}``
        for the value); per dataset, how many were added.  Series without a usable value go to ``problems``."""
        groups: dict[str, set[str]] = {}
        for doc in self.search(node, fields=[SERIES_KEY, *keys]):
            uid = doc_id(doc)
            values = [str(v).strip() for key in keys for v in as_list(lookup(doc, key)) if v not in (None, "")]
            names = [template.replace("{}", v) for v in dict.fromkeys(values) if v]
            bad = [n for n in names if not valid_dataset_name(n)]
            if (not names or bad) and problems is not None:
                reason = "no value" if not names else f"value {bad[0][:80]!r} is no dataset name"
                problems.append(f"series {uid}: {reason}: not added")
            for name in names:
                if valid_dataset_name(name):
                    groups.setdefault(name, set()).add(uid)
        result = {}
        for name in sorted(groups):
            members = self.dataset_members(name) or []
            fresh = groups[name] - set(members)
            result[name] = WriteStats(added=len(fresh), unchanged=len(groups[name]) - len(fresh))
            if fresh:
                self.set_dataset(name, sorted({*members, *fresh}))
        return result


def valid_dataset_name(name: str) -> bool:
    """1-256 characters, no control characters (names may come from DICOM header values)."""
    return 0 < len(name.strip()) and len(name) <= 256 and not any(ord(c) < 32 or ord(c) == 127 for c in name)


def any_of(nodes: Sequence[Node]) -> Node:
    """A node matching any of ``nodes`` (none: nothing)."""
    return MATCH_NONE if not nodes else nodes[0] if len(nodes) == 1 else Or(tuple(nodes))


def _missing(node: Node, found: set[str]) -> list[str]:
    """Series asked for by UID (``--series``) that the index does not hold."""
    return [u for u in node.uids if u not in found] if isinstance(node, Ids) else []


def lookup(doc: Doc, key: str) -> Any:
    """A value by dotted key path (through objects and lists of objects)."""
    values: list[Any] = [doc]
    for part in key.split("."):
        nxt: list[Any] = []
        for value in values:
            for item in as_list(value):
                if isinstance(item, dict) and part in item:
                    nxt.append(item[part])
        values = nxt
    flat = [v for value in values for v in as_list(value)]
    return flat[0] if len(flat) == 1 else (flat or None)


_URL_AUTH = re.compile(r"(https?://)[^/@]*@")


def redact(url: str) -> str:
    """A URL without user:password (for messages)."""
    return _URL_AUTH.sub(r"\1", url)


def default_target() -> Path:
    from kaapcli.core.config import data_home

    return data_home() / "index.db"


def open_index(target: str | None, project: str | None = None, *, config: Any = None,
               create: bool = False) -> Index:
    """Open the index a target names: a path, an ``http(s)://`` URL or an ``[index.NAME]`` profile.

    ``create``: make a missing SQLite file / OpenSearch index (for writes); reads of a missing
    index raise NoInputError.
    """
    profile: dict[str, Any] = {}
    if target and config is not None and not target.startswith(("http://", "https://")):
        profile = config.profile("index", target) or {}
        if profile:
            if "url" not in profile and "path" not in profile:
                raise ConfigError(f"[index.{target}] needs url = \"http(s)://...\" or path = \"...\"")
            target = str(profile.get("url") or profile.get("path"))
            project = project or profile.get("project")
    project = project or DEFAULT_PROJECT
    if target and target.startswith(("http://", "https://")):
        from kaapcli.core.index.opensearch import OpenSearchIndex

        return OpenSearchIndex(target, project, username=profile.get("username"), password=profile.get("password"),
                               verify=profile.get("verify", True), ca_certs=profile.get("ca_certs"),
                               create=create)
    from kaapcli.core.index.sqlite import SqliteIndex

    return SqliteIndex(Path(target).expanduser() if target else default_target(), project, create=create)
