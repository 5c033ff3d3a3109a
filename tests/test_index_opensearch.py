"""The OpenSearch backend through the real opensearch-py client, against an HTTP-level test double that
records every request and answers like OpenSearch; plus an opt-in run against a real server
(KAAPCLI_TEST_OPENSEARCH_URL)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from kaapcli.core.index.opensearch import FILES_BODY, INDEX_BODY, OpenSearchIndex, to_dsl
from kaapcli.core.index.query import SERIES_KEY, TAGS_KEY, Ids, parse
from tests.conftest import dicom_files, free_port, kaapcli

MOD, ROWS = "00080060 Modality_keyword", "00280010 Rows_integer"


class Double:
    """A pretend OpenSearch: records (method, path, query, body) and answers from a little state."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.indices: set[str] = set()
        self.ids: set[str] = set()
        self.search_pages: list[list[dict[str, Any]]] = []  # successive _search answers (hits)
        self.aggregations: dict[str, Any] = {}
        self.fail_ids: set[str] = set()
        self.datasets: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, Any]] = {}  # kaapcli-files documents by id

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if method == "HEAD" and len(parts) == 1:
            return (200 if parts[0] in self.indices else 404), None
        if method == "PUT" and len(parts) == 1:
            self.indices.add(parts[0])
            return 200, {"acknowledged": True, "index": parts[0]}
        if parts == ["_bulk"]:
            items = []
            for action, doc in zip(body[::2], body[1::2], strict=True):
                (kind, meta), = action.items()
                if meta["_index"] == "kaapcli-files":
                    self.files[meta["_id"]] = doc
                    items.append({kind: {"_id": meta["_id"], "result": "created", "status": 201}})
                    continue
                if meta["_id"] in self.fail_ids:
                    items.append({kind: {"_id": meta["_id"], "status": 400, "error": {
                        "type": "mapper_parsing_exception", "reason": "failed to parse field"}}})
                    continue
                result = "updated" if meta["_id"] in self.ids else "created"
                self.ids.add(meta["_id"])
                items.append({kind: {"_id": meta["_id"], "result": result, "status": 200}})
            return 200, {"took": 1, "errors": bool(self.fail_ids), "items": items}
        if parts[-1] == "_refresh":
            return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        if parts[-1] == "_count":
            return 200, {"count": 7}
        if parts[-1] == "_delete_by_query":
            return 200, {"deleted": 2}
        if parts == ["kaapcli-files", "_mget"]:
            return 200, {"docs": [{"_id": i, "found": True, "_source": self.files[i]} if i in self.files else
                                  {"_id": i, "found": False} for i in body["ids"]]}
        if parts == ["kaapcli-datasets", "_search"] and self.datasets:
            return 200, {"hits": {"hits": [{"_id": k, "_source": v} for k, v in sorted(self.datasets.items())
                                           if v["index"] == body["query"]["term"]["index"]]}}
        if parts[-1] == "_search":
            if parts[0] not in self.indices:
                return 404, {"error": {"type": "index_not_found_exception", "reason": "no such index"},
                             "status": 404}
            hits = self.search_pages.pop(0) if self.search_pages else []
            return 200, {"hits": {"hits": hits}, "aggregations": self.aggregations}
        if parts[:2] == ["kaapcli-datasets", "_doc"]:
            ident = parts[2]
            if method == "GET":
                if ident in self.datasets:
                    return 200, {"_id": ident, "found": True, "_source": self.datasets[ident]}
                return 404, {"_id": ident, "found": False}
            self.datasets[ident] = body
            return 201, {"_id": ident, "result": "created"}
        return 400, {"error": {"type": "unexpected", "reason": f"{method} {path}"}}

    def of(self, method: str, suffix: str) -> list[tuple[str, dict[str, list[str]], Any]]:
        return [(p, q, b) for m, p, q, b in self.requests if m == method and p.endswith(suffix)]


@pytest.fixture()
def double() -> Iterator[tuple[Double, str]]:
    state = Double()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            url = urlsplit(self.path)
            body: Any = None
            if raw:
                lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
                body = lines if url.path.endswith("_bulk") else lines[0]
            path = unquote(url.path)
            state.requests.append((self.command, path, parse_qs(url.query), body))
            status, answer = state.answer(self.command, path, body)
            data = json.dumps(answer).encode() if answer is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


DOCS = [{SERIES_KEY: f"1.2.{i}", MOD: "CT" if i % 2 else "MR", ROWS: 512} for i in range(3)]


@pytest.mark.network
def test_index_creates_the_project_index_and_sends_bulk_upserts(double: tuple[Double, str], tmp_path: Path) -> None:
    state, url = double
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    proc = kaapcli("index", tmp_path / "d.jsonl", "--index", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1.2.0", "1.2.1", "1.2.2"]
    assert [(m, p) for m, p, _, _ in state.requests] == [
        ("HEAD", "/project_admin"), ("PUT", "/project_admin"), ("POST", "/_bulk"), ("POST", "/project_admin/_refresh")]
    assert state.requests[1][3] == INDEX_BODY  # a fresh index gets the suffix → type mapping
    bulk = state.of("POST", "/_bulk")[0][2]
    assert bulk == [x for d in DOCS for x in ({"update": {"_index": "project_admin", "_id": d[SERIES_KEY]}},
                                               {"doc": d, "doc_as_upsert": True})]
    assert "3 documents (3 added, 0 updated, 0 unchanged)" in proc.stderr
    again = kaapcli("index", tmp_path / "d.jsonl", "--index", url)
    assert "(0 added, 3 updated" in again.stderr and len(state.of("PUT", "/project_admin")) == 1


@pytest.mark.network
def test_replace_project_and_bulk_batches(double: tuple[Double, str], tmp_path: Path) -> None:
    state, url = double
    (tmp_path / "d.json").write_text(json.dumps(DOCS))
    proc = kaapcli("index", tmp_path / "d.json", "--index", url, "--project", "lung", "--replace")
    assert proc.returncode == 0, proc.stderr
    assert state.of("HEAD", "/project_lung") and state.of("PUT", "/project_lung")
    bulk = state.of("POST", "/_bulk")[0][2]
    assert bulk == [x for d in DOCS for x in ({"index": {"_index": "project_lung", "_id": d[SERIES_KEY]}}, d)]
    state.requests.clear()
    many = [{SERIES_KEY: f"2.{i}"} for i in range(1100)]
    with OpenSearchIndex(url, "lung") as ix:
        stats = ix.write(many, replace=False)
    assert stats.added == 1100
    sizes = [len(b) // 2 for _, _, b in state.of("POST", "/_bulk")]
    assert sizes == [500, 500, 100]


@pytest.mark.network
def test_rejected_documents_fail_alone(double: tuple[Double, str], tmp_path: Path) -> None:
    state, url = double
    state.fail_ids = {"1.2.1"}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    proc = kaapcli("index", tmp_path / "d.jsonl", "--index", url)
    assert proc.returncode == 1
    assert "series 1.2.1: mapper_parsing_exception: failed to parse field" in proc.stderr
    assert "2 added" in proc.stderr


@pytest.mark.network
def test_search_translation_sort_fields_and_paging(double: tuple[Double, str]) -> None:
    state, url = double
    state.indices.add("project_admin")
    page1 = [{"_source": {SERIES_KEY: f"1.{i}"}, "sort": [512, f"1.{i}"]} for i in range(1000)]
    page2 = [{"_source": {SERIES_KEY: "2.0"}, "sort": [256, "2.0"]}]
    state.search_pages = [page1, page2]
    proc = kaapcli("search", "Modality:CT AND Rows:>=512 -Tags:x", "--sort", "-Rows", "--fields",
                   "SeriesInstanceUID", "--index", url)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1001
    (_, _, first), (_, _, second) = state.of("POST", "/project_admin/_search")
    expected_query = {"bool": {"filter": [
        {"term": {MOD: "CT"}}, {"range": {ROWS: {"gte": 512}}},
        {"bool": {"must_not": [{"term": {TAGS_KEY: "x"}}]}}]}}
    assert first == {"query": expected_query, "track_total_hits": False, "_source": [SERIES_KEY], "size": 1000,
                     "sort": [{ROWS: {"order": "desc", "missing": "_last", "unmapped_type": "long"}},
                              {SERIES_KEY: {"order": "asc", "unmapped_type": "keyword"}}]}
    assert second == {**first, "search_after": [512, "1.999"]}
    count = kaapcli("search", "*", "--count", "--index", url)
    assert count.stdout == "7\n" and state.of("POST", "/_count")[0][2] == {"query": {"match_all": {}}}


def test_query_translation_of_every_construct() -> None:
    date = "00080020 StudyDate_date"
    assert to_dsl(parse("*")) == {"match_all": {}}
    assert to_dsl(parse("Modality:CT OR Modality:MR")) == {"bool": {"should": [
        {"term": {MOD: "CT"}}, {"term": {MOD: "MR"}}], "minimum_should_match": 1}}
    assert to_dsl(parse("Rows:512")) == {"term": {ROWS: 512}}
    assert to_dsl(parse("SliceThickness:2.5")) == {"term": {"00180050 SliceThickness_float": 2.5}}
    assert to_dsl(parse("SeriesDescription:LUNG1-*")) == {"wildcard": {"0008103E SeriesDescription_keyword": {
        "value": "LUNG1-*"}}}
    assert to_dsl(parse("StudyDate:{20200101 TO 2020-12-31]")) == {"range": {date: {
        "gt": "2020-01-01", "lte": "2020-12-31", "format": "yyyy-MM-dd"}}}
    assert to_dsl(parse("Rows:<256")) == {"range": {ROWS: {"lt": 256}}}
    assert to_dsl(parse("Tags:*")) == {"exists": {"field": TAGS_KEY}}
    assert to_dsl(parse("NOT Tags:x")) == {"bool": {"must_not": [{"term": {TAGS_KEY: "x"}}]}}
    assert to_dsl(parse("PatientName:Doe*"))["bool"]["should"][0] == {
        "wildcard": {"00100010 PatientName_keyword_alphabetic": {"value": "Doe*"}}}
    assert to_dsl(parse("chest")) == {"query_string": {"query": "chest", "default_field": "*", "lenient": True,
                                                       "analyze_wildcard": True}}
    assert to_dsl(parse("LUNG1-*"))["query_string"]["query"] == "LUNG1\\-*"
    assert to_dsl(parse('"low dose"'))["query_string"]["query"] == '"low dose"'
    assert to_dsl(Ids(("1", "2"))) == {"ids": {"values": ["1", "2"]}}
    seq = 'ProcedureCodeSequence.CodeMeaning:"CT CHEST"'
    assert to_dsl(parse(seq)) == {"term": {
        "00081032 ProcedureCodeSequence_object.00080104 CodeMeaning_keyword": "CT CHEST"}}


@pytest.mark.network
def test_tags_unindex_stats_datasets(double: tuple[Double, str]) -> None:
    state, url = double
    state.indices.add("project_admin")
    state.search_pages = [[{"_source": {SERIES_KEY: "1.1", TAGS_KEY: ["old"]}, "sort": ["1.1"]},
                           {"_source": {SERIES_KEY: "1.2"}, "sort": ["1.2"]}]]
    proc = kaapcli("tag", "add", "new", "--query", "Modality:CT", "--index", url)
    assert proc.returncode == 0, proc.stderr
    search_body = state.of("POST", "/_search")[0][2]
    assert search_body["query"] == {"term": {MOD: "CT"}} and search_body["_source"] == [SERIES_KEY, TAGS_KEY]
    assert state.of("POST", "/_bulk")[0][2] == [
        {"update": {"_index": "project_admin", "_id": "1.1"}}, {"doc": {SERIES_KEY: "1.1", TAGS_KEY: ["old", "new"]},
                                                               "doc_as_upsert": True},
        {"update": {"_index": "project_admin", "_id": "1.2"}}, {"doc": {SERIES_KEY: "1.2", TAGS_KEY: ["new"]},
                                                               "doc_as_upsert": True}]
    proc = kaapcli("unindex", "--study", "9.9", "--index", url)
    assert "2 series removed" in proc.stderr
    path, query, body = state.of("POST", "/_delete_by_query")[0]
    assert path == "/project_admin/_delete_by_query" and query["refresh"] == ["true"]
    assert body == {"query": {"term": {"0020000D StudyInstanceUID_keyword": "9.9"}}}
    state.aggregations = {"k0": {"buckets": [{"key": "CT", "doc_count": 5}, {"key": "MR", "doc_count": 2}]}}
    proc = kaapcli("stats", "Modality", "--index", url)
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [  # the double counts 7 without the field
        {"value": None, "count": 7}, {"value": "CT", "count": 5}, {"value": "MR", "count": 2}]
    assert state.of("POST", "/_count")[-1][2] == {"query": {"bool": {"filter": [
        {"match_all": {}}, {"bool": {"must_not": [{"exists": {"field": MOD}}]}}]}}}
    agg_body = state.of("POST", "/_search")[-1][2]
    assert agg_body == {"query": {"match_all": {}}, "size": 0, "aggs": {"k0": {"terms": {"field": MOD,
                                                                                          "size": 10000}}}}
    state.search_pages = [[{"_source": {SERIES_KEY: "1.1"}, "sort": ["1.1"]}]]
    proc = kaapcli("dataset", "add", "train", "--query", "Modality:CT", "--index", url)
    assert proc.returncode == 0, proc.stderr
    assert state.datasets == {"project_admin:train": {"index": "project_admin", "name": "train", "series": ["1.1"]}}
    assert kaapcli("dataset", "show", "train", "--index", url, "--format", "uids").stdout == "1.1\n"
    state.requests.clear()
    state.search_pages = [[{"_source": {SERIES_KEY: "1.1", MOD: "CT"}, "sort": ["1.1"]}]]
    shown = kaapcli("dataset", "show", "train", "--index", url)  # the members' documents, by a terms lookup
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line) for line in shown.stdout.splitlines()] == [{SERIES_KEY: "1.1", MOD: "CT"}]
    assert state.of("POST", "/project_admin/_search")[0][2]["query"] == lookup("train")


@pytest.mark.network
def test_unreachable_or_missing_index(double: tuple[Double, str]) -> None:
    _, url = double
    dead = f"http://admin:s3cret@127.0.0.1:{free_port()}"
    proc = kaapcli("search", "*", "--index", dead)
    assert proc.returncode == 69
    assert f"OpenSearch http://127.0.0.1:{dead.rsplit(':', 1)[1]} unreachable" in proc.stderr
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr
    proc = kaapcli("search", "*", "--index", url, "--project", "none")
    assert proc.returncode == 66 and "index project_none does not exist" in proc.stderr


@pytest.mark.network
def test_index_profile_from_config(double: tuple[Double, str], tmp_path: Path) -> None:
    state, url = double
    state.indices.add("project_p1")
    (tmp_path / "kaapcli.toml").write_text(f'[index.remote]\nurl = "{url}"\nproject = "p1"\n')
    proc = kaapcli("search", "*", "--index", "remote", "--count", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert state.of("POST", "/project_p1/_count")


def lookup(name: str, index: str = "project_admin") -> dict[str, Any]:
    return {"terms": {"_id": {"index": "kaapcli-datasets", "id": f"{index}:{name}", "path": "series"}}}


def test_dataset_queries_translate_to_terms_lookups() -> None:
    from kaapcli.core.index.query import InDataset

    assert to_dsl(InDataset("train"), "project_lung") == lookup("train", "project_lung")
    assert to_dsl(parse("Modality:MR AND -Dataset:train")) == {"bool": {"filter": [
        {"term": {MOD: "MR"}}, {"bool": {"must_not": [lookup("train")]}}]}}


@pytest.mark.network
def test_dataset_query_stats_by_month_and_dataset(double: tuple[Double, str]) -> None:
    """Dataset:NAME is checked against the datasets index, then sent as a terms lookup (the members are read
    server-side); Dataset:pattern names the matching datasets; dates are counted by a date_histogram."""
    state, url = double
    state.indices.update({"project_admin", "kaapcli-datasets"})
    state.datasets = {"project_admin:train": {"index": "project_admin", "name": "train", "series": ["1.1", "1.2"]},
                      "project_admin:test": {"index": "project_admin", "name": "test", "series": ["1.3"]},
                      "project_other:train": {"index": "project_other", "name": "train", "series": ["9"]}}
    state.search_pages = [[{"_source": {SERIES_KEY: "1.1"}, "sort": ["1.1"]}]]
    proc = kaapcli("search", "Dataset:train -Tags:x", "--format", "uids", "--index", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1.1\n"
    (_, _, listing), (_, _, body) = state.of("POST", "/_search")
    assert listing == {"query": {"term": {"index": "project_admin"}}, "size": 10000, "sort": [{"name": "asc"}]}
    assert body["query"] == {"bool": {"filter": [lookup("train"), {"bool": {"must_not": [
        {"term": {TAGS_KEY: "x"}}]}}]}}
    assert body["_source"] == [SERIES_KEY]
    state.requests.clear()
    assert kaapcli("search", "Dataset:t*", "--count", "--index", url).returncode == 0
    assert state.of("POST", "/project_admin/_count")[0][2] == {"query": {"bool": {
        "should": [lookup("test"), lookup("train")], "minimum_should_match": 1}}}
    missing = kaapcli("search", "Dataset:nope", "--index", url)
    assert missing.returncode == 66 and "dataset 'nope' does not exist" in missing.stderr

    state.requests.clear()
    state.aggregations = {"k0": {"buckets": [{"key_as_string": "2020-01", "key": 1577836800000, "doc_count": 3},
                                             {"key_as_string": "2020-03", "key": 1583020800000, "doc_count": 1}]}}
    proc = kaapcli("stats", "StudyDate:month", "--query", "Modality:CT", "--index", url)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [
        {"value": "2020-01", "count": 3}, {"value": "2020-03", "count": 1}, {"value": None, "count": 7}]
    assert state.of("POST", "/project_admin/_search")[0][2] == {"query": {"term": {MOD: "CT"}}, "size": 0, "aggs": {
        "k0": {"date_histogram": {"field": "00080020 StudyDate_date", "calendar_interval": "month",
                                  "format": "yyyy-MM", "min_doc_count": 1}}}}
    assert state.of("POST", "/project_admin/_count")[0][2] == {"query": {"bool": {"filter": [
        {"term": {MOD: "CT"}}, {"bool": {"must_not": [{"exists": {"field": "00080020 StudyDate_date"}}]}}]}}}

    state.requests.clear()
    proc = kaapcli("stats", "Dataset", "--index", url)  # the double counts 7 for every _count
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [
        {"value": "test", "count": 7}, {"value": "train", "count": 7}, {"value": None, "count": 7}]
    counts = [b["query"] for _, _, b in state.of("POST", "/project_admin/_count")]
    assert counts == [{"bool": {"filter": [{"match_all": {}}, lookup("test")]}},
                      {"bool": {"filter": [{"match_all": {}}, lookup("train")]}},
                      {"bool": {"filter": [{"match_all": {}}, {"bool": {"must_not": [{"bool": {
                          "should": [lookup("test"), lookup("train")], "minimum_should_match": 1}}]}}]}}]


@pytest.mark.network
def test_file_lists_are_stored_looked_up_and_removed(double: tuple[Double, str], mock_ct: Path) -> None:
    """kaapcli index TREE stores each series' files in kaapcli-files (bulk, refreshed); search --format paths
    looks them up with _mget; unindex removes them with the documents."""
    import pydicom

    state, url = double
    proc = kaapcli("index", mock_ct, "--index", url, "-w", "1")
    assert proc.returncode == 0, proc.stderr
    uids = proc.stdout.split()
    files = {u: sorted(str(p.absolute()) for p in dicom_files(mock_ct)
                       if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == u) for u in uids}
    assert [(m, p) for m, p, _, _ in state.requests] == [
        ("HEAD", "/project_admin"), ("PUT", "/project_admin"), ("POST", "/_bulk"), ("HEAD", "/kaapcli-files"),
        ("PUT", "/kaapcli-files"), ("POST", "/_bulk"), ("POST", "/project_admin/_refresh")]
    assert state.requests[4][3] == FILES_BODY
    _, query, bulk = state.of("POST", "/_bulk")[1]
    assert query == {"refresh": ["true"]}
    assert [a for a in bulk[::2]] == [{"index": {"_index": "kaapcli-files", "_id": f"project_admin:{u}"}} for u in uids]
    for uid, doc in zip(uids, bulk[1::2], strict=True):
        assert doc["index"] == "project_admin" and doc["series"] == uid
        assert [f["path"] for f in doc["files"]] == files[uid]
        assert all(f["size"] == os.stat(f["path"]).st_size and f["mtime"] == os.stat(f["path"]).st_mtime_ns
                   for f in doc["files"])

    state.requests.clear()
    state.search_pages = [[{"_source": {SERIES_KEY: u}, "sort": [u]} for u in uids]]
    proc = kaapcli("search", "Modality:CT", "--format", "paths", "--index", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [p for u in uids for p in files[u]]
    assert state.of("POST", "/kaapcli-files/_mget")[0][2] == {"ids": [f"project_admin:{u}" for u in uids]}

    state.requests.clear()
    state.search_pages = [[{"_source": {SERIES_KEY: uids[0]}, "sort": [uids[0]]}]]
    proc = kaapcli("unindex", "--series", uids[0], "--index", url)
    assert proc.returncode == 0, proc.stderr
    (path1, _, body1), (path2, query2, body2) = state.of("POST", "/_delete_by_query")
    assert path1 == "/project_admin/_delete_by_query" and body1 == {"query": {"ids": {"values": [uids[0]]}}}
    assert path2 == "/kaapcli-files/_delete_by_query" and query2["refresh"] == ["true"]
    assert body2 == {"query": {"ids": {"values": [f"project_admin:{uids[0]}"]}}}


@pytest.mark.network
@pytest.mark.skipif(not os.environ.get("KAAPCLI_TEST_OPENSEARCH_URL"), reason="KAAPCLI_TEST_OPENSEARCH_URL not set")
def test_against_a_real_opensearch(tmp_path: Path) -> None:
    url = os.environ["KAAPCLI_TEST_OPENSEARCH_URL"]
    project = f"kaapclitest{uuid.uuid4().hex[:8]}"
    docs = [{SERIES_KEY: f"1.9.{i}", MOD: ["CT", "MR"][i % 2], ROWS: 256 * (i % 3 + 1),
             "00080020 StudyDate_date": f"2020-0{i + 1}-01", "0008103E SeriesDescription_keyword": f"LUNG1-{i:03d}"}
            for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = ["--index", url, "--project", project]
    try:
        assert kaapcli("index", tmp_path / "d.jsonl", *common).returncode == 0

        def found(query: str) -> list[str]:
            proc = kaapcli("search", query, *common, "-f", "SeriesInstanceUID")
            assert proc.returncode == 0, proc.stderr
            return [json.loads(line)[SERIES_KEY] for line in proc.stdout.splitlines()]

        assert found("Modality:CT") == [d[SERIES_KEY] for d in docs if d[MOD] == "CT"]
        assert found("Rows:>=512 -Modality:MR") == [d[SERIES_KEY] for d in docs if d[ROWS] >= 512 and d[MOD] == "CT"]
        assert found("StudyDate:[2020-02-01 TO 2020-04-01}") == ["1.9.1", "1.9.2"]
        assert found("SeriesDescription:LUNG1-00?") == [d[SERIES_KEY] for d in docs]
        assert kaapcli("tag", "add", "t1", "--query", "Modality:MR", *common).returncode == 0
        assert found("Tags:t1") == [d[SERIES_KEY] for d in docs if d[MOD] == "MR"]
        assert kaapcli("dataset", "add", "d1", "--query", "Rows:>=512", *common).returncode == 0
        assert found("Dataset:d1 AND -Modality:MR") == [d[SERIES_KEY] for d in docs if d[ROWS] >= 512 and
                                                        d[MOD] == "CT"]
        assert found("Dataset:d* OR Modality:MR") == [d[SERIES_KEY] for d in docs if d[ROWS] >= 512 or
                                                      d[MOD] == "MR"]
        months = kaapcli("stats", "StudyDate:month", "--query", "Modality:CT", *common, "--format", "csv")
        assert months.stdout.splitlines() == ["value,count", "2020-01,1", "2020-03,1", "2020-05,1"]
        per_dataset = kaapcli("stats", "Dataset", *common, "--format", "csv").stdout.splitlines()
        assert per_dataset == ["value,count", f"d1,{sum(d[ROWS] >= 512 for d in docs)}",
                               f",{sum(d[ROWS] < 512 for d in docs)}"]
        assert kaapcli("unindex", "--query", "Tags:t1", *common).returncode == 0
        assert found("*") == [d[SERIES_KEY] for d in docs if d[MOD] == "CT"]
        # DICOM indexed directly: file lists stored beside the documents, printed by --format paths
        tree = tmp_path / "tree"
        assert kaapcli("mock", "-o", tree, "--slices", "2", "--rows", "16", "--columns", "16", "-q").returncode == 0
        assert kaapcli("index", tree, *common).returncode == 0
        paths = kaapcli("search", "NumberOfInstances:2", "--format", "paths", *common)
        assert paths.returncode == 0, paths.stderr
        assert sorted(paths.stdout.splitlines()) == sorted(str(p.absolute()) for p in dicom_files(tree))
    finally:
        from opensearchpy import OpenSearch

        client = OpenSearch(hosts=[url], verify_certs=False)
        client.indices.delete(index=f"project_{project}", ignore_unavailable=True)
        for index in ("kaapcli-datasets", "kaapcli-files"):  # this project's entries only
            client.delete_by_query(index=index, body={"query": {"term": {"index": f"project_{project}"}}},
                                   params={"ignore_unavailable": "true", "refresh": "true"})
