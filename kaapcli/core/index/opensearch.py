"""The OpenSearch backend: the same operations as the embedded index, through opensearch-py.

One index per project, ``project_<name>``, document id = SeriesInstanceUID.  Writes are ``_bulk``
requests of :data:`BULK_SIZE` actions: ``update`` with ``doc_as_upsert`` (merge) or ``index``
(``--replace``).  Queries are the parser's AST translated to query DSL: ``term``, ``wildcard``,
``range``, ``exists``, ``ids``, ``bool``, ``query_string`` for bare words, and for ``Dataset:NAME`` a
``terms`` lookup of ``_id`` in the dataset's document.  Datasets are documents of a separate index,
:data:`DATASETS_INDEX`; where the files of a series are, documents of :data:`FILES_INDEX`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from kaapcli.core.index.base import BULK_SIZE, Doc, Index, SeriesFiles, Sort, Stored, WriteStats, redact, stored
from kaapcli.core.index.query import (
    SERIES_KEY,
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
from kaapcli.exitcodes import DataError, NoInputError, UnavailableError

DATASETS_INDEX = "kaapcli-datasets"
FILES_INDEX = "kaapcli-files"
PAGE = 1000
MAX_BUCKETS = 10000
T = TypeVar("T")

_DATE_FORMATS = {
    "date": "yyyy-MM-dd",
    "time": "HH:mm:ss.SSSSSS||HH:mm:ss||HH:mm",
    "datetime": "yyyy-MM-dd HH:mm:ss.SSSSSS||yyyy-MM-dd HH:mm:ss||yyyy-MM-dd",
}
# Created only when the project index does not exist yet (a Kaapana index keeps its own mapping).
# Field types follow the key suffix; a malformed value is kept in _source but not indexed.
INDEX_BODY: dict[str, Any] = {
    "settings": {"index.mapping.ignore_malformed": True, "index.mapping.total_fields.limit": 10000},
    "mappings": {"date_detection": False, "dynamic_templates": [
        {"keywords": {"match": "*_keyword", "mapping": {"type": "keyword", "ignore_above": 8191}}},
        {"names": {"match": "*_keyword_*", "mapping": {"type": "keyword", "ignore_above": 8191}}},
        {"integers": {"match": "*_integer", "mapping": {"type": "long"}}},
        {"floats": {"match": "*_float", "mapping": {"type": "double"}}},
        *({f"{kind}s": {"match": f"*_{kind}", "mapping": {"type": "date", "format": fmt}}}
          for kind, fmt in _DATE_FORMATS.items()),
    ]},
}
DATASETS_BODY: dict[str, Any] = {"mappings": {"properties": {
    "index": {"type": "keyword"}, "name": {"type": "keyword"}, "series": {"type": "keyword"}}}}
# file lists are kept, not searched: "enabled": false stores them in _source only
FILES_BODY: dict[str, Any] = {"mappings": {"properties": {
    "index": {"type": "keyword"}, "series": {"type": "keyword"}, "files": {"type": "object", "enabled": False}}}}
_DATE_UNITS = {4: "year", 7: "month", 10: "day"}
_DATE_KEY_FORMATS = {4: "yyyy", 7: "yyyy-MM", 10: "yyyy-MM-dd"}
# query_string syntax characters, escaped in bare words
_RESERVED = set('+-=&|><!(){}[]^"~*?:\\/ ')


class OpenSearchIndex(Index):
    def __init__(self, url: str, project: str, *, username: str | None = None, password: str | None = None,
                 verify: bool = True, ca_certs: str | None = None, create: bool = False, timeout: float = 30):
        from opensearchpy import OpenSearch

        self.url = url
        self.target = redact(url)
        self.project = project
        self.index = f"project_{project}"
        auth = (username, password) if username else None
        self.client = OpenSearch(hosts=[url], http_auth=auth, verify_certs=verify, ca_certs=ca_certs,
                                 ssl_show_warn=False, timeout=timeout, max_retries=1, retry_on_timeout=False)
        self.dirty = False
        if not self._call(lambda: self.client.indices.exists(index=self.index)):
            if not create:
                raise NoInputError(f"index {self.index} does not exist at {self.target}",
                                   hint="index documents first: kaapcli index INPUT... --index URL")
            self._create(self.index, INDEX_BODY)

    # -- plumbing
    def _call(self, fn: Callable[[], T]) -> T:
        """Run one client call, mapping transport failures to kaapcli errors that name the endpoint."""
        from opensearchpy import exceptions as ex

        try:
            return fn()
        except ex.ConnectionError as exc:
            reason = str(getattr(exc, "info", "") or exc).splitlines()[0][:200]
            raise UnavailableError(f"OpenSearch {self.target} unreachable: {reason}",
                                   hint="check --index URL, the network and that OpenSearch is running") from exc
        except (ex.AuthenticationException, ex.AuthorizationException) as exc:
            raise UnavailableError(f"OpenSearch {self.target} refused access ({exc.status_code})",
                                   hint="set username/password in the [index.NAME] profile") from exc
        except ex.TransportError as exc:
            status = exc.status_code if isinstance(exc.status_code, int) else 0
            reason = _reason(exc.info) or str(exc.error)
            if status >= 500 or status == 429:
                raise UnavailableError(f"OpenSearch {self.target}: {status} {reason}") from exc
            if "index_not_found" in str(exc.error):
                raise NoInputError(f"index {self.index} does not exist at {self.target}") from exc
            raise DataError(f"OpenSearch {self.target} rejected the request: {status} {reason}") from exc

    def _create(self, name: str, body: dict[str, Any]) -> None:
        try:
            self._call(lambda: self.client.indices.create(index=name, body=body))
        except DataError as exc:
            if "resource_already_exists" not in str(exc):  # created concurrently: fine
                raise

    def close(self) -> None:
        if self.dirty:  # make writes visible to the next command's search
            self._call(lambda: self.client.indices.refresh(index=self.index))
            self.dirty = False
        self.client.close()

    # -- writing
    def write(self, docs: Sequence[Doc | Stored], *, replace: bool) -> WriteStats:
        stats = WriteStats()
        items = stored(docs, stats.errors)
        for start in range(0, len(items), BULK_SIZE):
            lines: list[str] = []
            for item in items[start:start + BULK_SIZE]:
                action = "index" if replace else "update"
                lines.append(json.dumps({action: {"_index": self.index, "_id": item.uid}}))
                lines.append(item.text if replace else f'{{"doc": {item.text}, "doc_as_upsert": true}}')
            body = "\n".join(lines) + "\n"
            response = self._call(lambda body=body: self.client.bulk(body=body))  # type: ignore[misc]
            self.dirty = True
            for item in response.get("items", []):
                result = next(iter(item.values()))
                if "error" in result:
                    stats.errors.append(f"series {result.get('_id')}: {_reason(result['error'])}")
                elif result.get("result") == "created":
                    stats.added += 1
                elif result.get("result") == "noop":
                    stats.unchanged += 1
                else:
                    stats.updated += 1
        return stats

    def _dsl(self, node: Node) -> dict[str, Any]:
        return to_dsl(self.bind(node), self.index)

    def delete(self, node: Node) -> int:
        query = self._dsl(node)
        uids = self.uids(node) if self._exists(FILES_INDEX) else []
        response = self._call(lambda: self.client.delete_by_query(
            index=self.index, body={"query": query}, params={"refresh": "true", "conflicts": "proceed"}))
        for start in range(0, len(uids), PAGE):  # their file lists go with them
            ids = [self._member_id(u) for u in uids[start:start + PAGE]]
            self._call(lambda ids=ids: self.client.delete_by_query(  # type: ignore[misc]
                index=FILES_INDEX, body={"query": {"ids": {"values": ids}}},
                params={"refresh": "true", "conflicts": "proceed"}))
        return int(response.get("deleted", 0))

    def _exists(self, index: str) -> bool:
        return bool(self._call(lambda: self.client.indices.exists(index=index)))

    def _member_id(self, uid: str) -> str:
        return f"{self.index}:{uid}"

    # -- where the files are
    def store_files(self, entries: Sequence[SeriesFiles]) -> None:
        if not entries:
            return
        if not self._exists(FILES_INDEX):
            self._create(FILES_INDEX, FILES_BODY)
        for start in range(0, len(entries), BULK_SIZE):
            lines: list[str] = []
            for entry in entries[start:start + BULK_SIZE]:
                lines.append(json.dumps({"index": {"_index": FILES_INDEX, "_id": self._member_id(entry.uid)}}))
                lines.append(json.dumps({"index": self.index, "series": entry.uid, "files": entry.to_json()}))
            body = "\n".join(lines) + "\n"
            response = self._call(lambda body=body: self.client.bulk(body=body, params={"refresh": "true"}))  # type: ignore[misc]
            errors = [next(iter(i.values())) for i in response.get("items", []) if "error" in next(iter(i.values()))]
            if errors:
                raise DataError(f"OpenSearch {self.target} refused file lists: series "
                                f"{str(errors[0].get('_id', '')).split(':', 1)[-1]}: {_reason(errors[0]['error'])}")

    def files_of(self, uids: Sequence[str]) -> dict[str, SeriesFiles]:
        found: dict[str, SeriesFiles] = {}
        for start in range(0, len(uids), PAGE):
            ids = [self._member_id(u) for u in uids[start:start + PAGE]]
            response = self._missing_ok(lambda ids=ids: self.client.mget(  # type: ignore[misc]
                index=FILES_INDEX, body={"ids": ids}))
            for doc in (response or {}).get("docs", []):
                source = doc.get("_source") if doc.get("found") else None
                if isinstance(source, dict) and isinstance(source.get("series"), str):
                    found[source["series"]] = SeriesFiles.from_json(source["series"], source.get("files"))
        return found

    # -- reading
    def search(self, node: Node, *, fields: Sequence[str] | None = None, limit: int | None = None,
               sort: Sort | None = None) -> Iterator[Doc]:
        order: list[dict[str, Any]] = []
        if sort is not None:
            order.append({sort.keys[0]: {"order": "desc" if sort.descending else "asc", "missing": "_last",
                                         "unmapped_type": "long" if is_numeric(sort.keys[0]) else "keyword"}})
        order.append({SERIES_KEY: {"order": "asc", "unmapped_type": "keyword"}})
        body: dict[str, Any] = {"query": self._dsl(node), "sort": order, "track_total_hits": False}
        if fields is not None:
            body["_source"] = list(fields)
        remaining = limit
        while remaining is None or remaining > 0:
            body["size"] = PAGE if remaining is None else min(PAGE, remaining)
            response = self._call(lambda: self.client.search(index=self.index, body=body))
            hits = response.get("hits", {}).get("hits", [])
            for hit in hits:
                yield hit.get("_source", {})
            if remaining is not None:
                remaining -= len(hits)
            if len(hits) < body["size"]:
                return
            body["search_after"] = hits[-1]["sort"]

    def count(self, node: Node) -> int:
        query = self._dsl(node)
        response = self._call(lambda: self.client.count(index=self.index, body={"query": query}))
        return int(response["count"])

    def value_counts(self, keys: Sequence[str], node: Node, top: int | None = None) -> list[tuple[Any, int]]:
        aggs = {f"k{i}": {"terms": {"field": key, "size": top or MAX_BUCKETS}} for i, key in enumerate(keys)}
        body = {"query": self._dsl(node), "size": 0, "aggs": aggs}
        response = self._call(lambda: self.client.search(index=self.index, body=body))
        counts: dict[Any, int] = {}
        for name in aggs:
            for bucket in response.get("aggregations", {}).get(name, {}).get("buckets", []):
                value = bucket.get("key_as_string", bucket["key"])
                counts[value] = counts.get(value, 0) + int(bucket["doc_count"])
        ranked = sorted(counts.items(), key=lambda vc: (-vc[1], str(vc[0])))
        return ranked[:top] if top else ranked

    def date_counts(self, keys: Sequence[str], node: Node, chars: int) -> list[tuple[str, int]]:
        aggs = {f"k{i}": {"date_histogram": {"field": key, "calendar_interval": _DATE_UNITS[chars],
                                             "format": _DATE_KEY_FORMATS[chars], "min_doc_count": 1}}
                for i, key in enumerate(keys)}
        body = {"query": self._dsl(node), "size": 0, "aggs": aggs}
        response = self._call(lambda: self.client.search(index=self.index, body=body))
        counts: dict[str, int] = {}
        for name in aggs:
            for bucket in response.get("aggregations", {}).get(name, {}).get("buckets", []):
                period = str(bucket.get("key_as_string", bucket["key"]))
                counts[period] = counts.get(period, 0) + int(bucket["doc_count"])
        return sorted(counts.items())

    # -- datasets
    def _dataset_id(self, name: str) -> str:
        return f"{self.index}:{name}"

    def _missing_ok(self, fn: Callable[[], T]) -> T | None:
        """A call whose 404 (no such document or index) means "nothing", not an error."""
        from opensearchpy import exceptions as ex

        def call() -> T | None:
            try:
                return fn()
            except ex.NotFoundError:
                return None

        return self._call(call)

    def datasets(self) -> dict[str, int]:
        body = {"query": {"term": {"index": self.index}}, "size": MAX_BUCKETS, "sort": [{"name": "asc"}]}
        response = self._missing_ok(lambda: self.client.search(index=DATASETS_INDEX, body=body))
        hits = response["hits"]["hits"] if response else []
        return {h["_source"]["name"]: len(h["_source"].get("series", [])) for h in hits}

    def dataset_members(self, name: str) -> list[str] | None:
        response = self._missing_ok(lambda: self.client.get(index=DATASETS_INDEX, id=self._dataset_id(name)))
        return None if response is None else sorted(response["_source"].get("series", []))

    def set_dataset(self, name: str, uids: Sequence[str]) -> None:
        ident = self._dataset_id(name)
        if not uids:
            self._missing_ok(lambda: self.client.delete(index=DATASETS_INDEX, id=ident, params={"refresh": "true"}))
            return
        if not self._call(lambda: self.client.indices.exists(index=DATASETS_INDEX)):
            self._create(DATASETS_INDEX, DATASETS_BODY)
        doc = {"index": self.index, "name": name, "series": list(uids)}
        self._call(lambda: self.client.index(index=DATASETS_INDEX, id=ident, body=doc, params={"refresh": "true"}))


def _reason(info: Any) -> str:
    """The most specific reason of an OpenSearch error body."""
    if isinstance(info, dict):
        err = info.get("error", info)
        if isinstance(err, dict):
            causes = err.get("root_cause") or []
            first = causes[0] if causes and isinstance(causes[0], dict) else err
            return f"{first.get('type', '')}: {first.get('reason', '')}".strip(": ")
        return str(err)
    return str(info or "")


# --------------------------------------------------------------------------- AST → query DSL

def _typed(key: str, value: str) -> Any:
    if is_numeric(key):
        number = float(value)
        return int(number) if number.is_integer() and key_type(key) == "integer" else number
    return value


def _any(queries: list[dict[str, Any]]) -> dict[str, Any]:
    return queries[0] if len(queries) == 1 else {"bool": {"should": queries, "minimum_should_match": 1}}


def _escape(text: str, keep_wildcards: bool) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if keep_wildcards and ch == "\\" and i + 1 < len(text):
            out.append(text[i:i + 2])  # an escaped literal of the pattern stays escaped
            i += 2
            continue
        out.append(ch if (keep_wildcards and ch in "*?") or ch not in _RESERVED else "\\" + ch)
        i += 1
    return "".join(out)


def to_dsl(node: Node, index: str = "project_admin") -> dict[str, Any]:
    """The query DSL of a parsed query (field names are the full document keys; ``index``: the project index,
    whose datasets ``Dataset:NAME`` names)."""
    if isinstance(node, MatchAll):
        return {"match_all": {}}
    if isinstance(node, Ids):
        return {"ids": {"values": list(node.uids)}}
    if isinstance(node, InDataset):  # a terms lookup: the members are read from the dataset document, server-side
        return {"terms": {"_id": {"index": DATASETS_INDEX, "id": f"{index}:{node.name}", "path": "series"}}}
    if isinstance(node, And):
        return {"bool": {"filter": [to_dsl(n, index) for n in node.nodes]}}
    if isinstance(node, Or):
        return {"bool": {"should": [to_dsl(n, index) for n in node.nodes], "minimum_should_match": 1}}
    if isinstance(node, Not):
        return {"bool": {"must_not": [to_dsl(node.node, index)]}}
    if isinstance(node, Text):
        if node.phrase:  # inside quotes only " and \ are special
            query = '"' + node.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            query = _escape(node.value, node.wildcard)
        return {"query_string": {"query": query, "default_field": "*", "lenient": True,
                                 "analyze_wildcard": True}}
    keys = node.field.keys
    if isinstance(node, Exists):
        return _any([{"exists": {"field": k}} for k in keys])
    if isinstance(node, Term):
        return _any([{"term": {k: _typed(k, node.value)}} for k in keys])
    if isinstance(node, Wildcard):
        return _any([{"wildcard": {k: {"value": node.pattern}}} for k in keys])
    if isinstance(node, Range):
        queries = []
        for key in keys:
            bounds: dict[str, Any] = {}
            if node.low is not None:
                bounds["gte" if node.include_low else "gt"] = _typed(key, node.low)
            if node.high is not None:
                bounds["lte" if node.include_high else "lt"] = _typed(key, node.high)
            if key_type(key) in _DATE_FORMATS:
                bounds["format"] = _DATE_FORMATS[key_type(key)]
            queries.append({"range": {key: bounds}})
        return _any(queries)
    raise TypeError(f"unknown query node {node!r}")  # pragma: no cover - exhaustive
