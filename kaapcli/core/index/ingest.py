"""Documents to index, read from inputs: dcm2json output (JSON, JSONL) or DICOM series directly.

Each input yields one :class:`Source` (a JSON file, a JSONL file, a DICOM series) carrying its
documents or the one-line reason it failed; a bad line of a JSONL file fails that line only.
DICOM files are grouped by SeriesInstanceUID and turned into documents with
:func:`kaapcli.core.meta.series_document` in a process pool (header reading is the slow part).
A DICOM series also brings where its files are (:class:`SeriesFiles`) and, from the file meta of
its first file, the AE title that sent it (PS3.10 Sending / Source Application Entity Title), so
``kaapcli retrieve`` can later pull it from there.  ``extra`` keys (``kaapcli index --source``)
are added to every document.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import describe_exception, process_pool
from kaapcli.core.index.base import BULK_SIZE, Index, SeriesFiles, Stored, loads
from kaapcli.exitcodes import DataError, KaapcliError

# File meta elements (PS3.10 7.1) that say where a file came from, kept in the document under their keys
ORIGIN_META = (("SourceApplicationEntityTitle", "00020016 SourceApplicationEntityTitle_keyword"),
               ("SendingApplicationEntityTitle", "00020017 SendingApplicationEntityTitle_keyword"),
               ("SourcePresentationAddress", "00020026 SourcePresentationAddress_keyword"),
               ("SendingPresentationAddress", "00020027 SendingPresentationAddress_keyword"))

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Source:
    label: str
    docs: list[Stored] = field(default_factory=list)
    files: list[SeriesFiles] = field(default_factory=list)  # DICOM series: where their files are
    errors: list[str] = field(default_factory=list)  # one line each, naming the file (and line)
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False  # neither JSON nor DICOM


def _checked(doc: object, where: str, extra: dict[str, Any] | None = None) -> Stored:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object (a series meta document), found {type(doc).__name__}")
    try:
        return Stored.of({**doc, **extra} if extra else doc)
    except KaapcliError as exc:
        raise ValueError(f"{where}: {exc.message}") from None


def read_json(path: Path, extra: dict[str, Any] | None = None) -> Source:
    """A ``.json`` file (one document or a list of them) or a ``.jsonl`` file (one per line)."""
    if path.suffix.lower() not in JSONL_SUFFIXES:
        fast = _read_plain(path, extra)
        if fast is not None:
            return fast
    source = Source(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        source.errors.append(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
        return source
    if path.suffix.lower() in JSONL_SUFFIXES:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                source.docs.append(_checked(loads(line), f"{path}:{number}", extra))
            except json.JSONDecodeError as exc:
                source.errors.append(f"{path}:{number}: invalid JSON: {exc.msg} at column {exc.colno}")
            except ValueError as exc:
                source.errors.append(str(exc))
        return source
    try:
        data = loads(text)
    except json.JSONDecodeError as exc:
        source.errors.append(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        return source
    for i, doc in enumerate(data if isinstance(data, list) else [data]):
        try:
            source.docs.append(_checked(doc, f"{path}" + (f"[{i}]" if isinstance(data, list) else ""), extra))
        except ValueError as exc:
            source.errors.append(str(exc))
    return source


def _read_plain(path: Path, extra: dict[str, Any] | None) -> Source | None:
    """A ``.json`` file of valid documents, read the quick way: its bytes straight to orjson, without the
    decode, the scan for long integers and the checks :func:`read_json` makes.  None for anything else
    (unreadable, not UTF-8, invalid, not documents, a float that may be a long integer): read_json reads it
    again its own way, so results and messages are the same."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    source = Source(str(path))
    for doc in data if isinstance(data, list) else [data]:
        if not isinstance(doc, dict):
            return None
        try:
            item = Stored.parsed({**doc, **extra} if extra else doc)
        except KaapcliError:
            return None
        if item is None:
            return None
        source.docs.append(item)
    return source


def _series_key(path: Path) -> tuple[Path, str | None, str]:
    try:
        return path, dicom.series_uid(path), ""
    except KaapcliError as exc:
        return path, None, f"{path}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - one bad file is one failed input
        return path, None, f"{path}: {describe_exception(exc)}"


def origin(path: Path) -> dict[str, str]:
    """The file meta elements of :data:`ORIGIN_META` a Part 10 file holds, as document keys."""
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - no readable file meta: nothing known of the origin
        return {}
    found = {}
    for keyword, key in ORIGIN_META:
        value = str(meta.get(keyword, "") or "").strip()
        if value:
            found[key] = value
    return found


def series_source(uid: str, paths: Sequence[Path], extra: dict[str, Any] | None = None) -> Source:
    """The document and the file list of one DICOM series (its files)."""
    from kaapcli.core.meta import series_document

    source = Source(f"series {uid} ({len(paths)} files)")
    try:
        doc, notes = series_document(list(paths))
        doc = dict(sorted({**doc, **origin(sorted(paths)[0]), **(extra or {})}.items()))
        source.docs.append(Stored.of(doc))
        source.files.append(SeriesFiles.of(uid, paths))
        source.warnings.extend(notes if len(paths) > 1 else [f"{paths[0]}: {n}" for n in notes])  # name the file
    except KaapcliError as exc:
        source.errors.append(f"series {uid}: {exc.message}")
    except Exception as exc:  # noqa: BLE001
        source.errors.append(f"series {uid}: {describe_exception(exc)}")
    return source


def index_series(index: Index, uid: str, paths: Sequence[Path], *, replace: bool = False) -> Source:
    """Index one DICOM series (``receive --index``, ``watch --index``): its document and where its files are.
    Raises the series' error, if any, as a KaapcliError."""
    source = series_source(uid, paths)
    if source.errors:
        raise DataError(source.errors[0])
    stats = index.write(source.docs, replace=replace)
    if stats.errors:
        raise DataError(stats.errors[0])
    index.store_files(source.files)
    return source


READ_CHUNK = 128  # JSON files a worker reads per task: each task costs the writer a wake-up of the pool's thread


def read_sources(files: Iterable[Path], workers: int = 1, extra: dict[str, Any] | None = None) -> Iterator[Source]:
    """One Source per JSON/JSONL file (in input order, as the files arrive), one per other file that is no DICOM
    (skipped), then one per DICOM series (sorted by UID).  With several workers, JSON files are read and parsed in
    a process pool: documents arrive ready to write (:class:`Stored`), so the writing process only writes.  At most
    two write batches are read ahead of the writer, so memory does not grow with the number of files (a
    DICOM series needs all its files before its document can be made: their paths are kept until the end)."""
    pool = process_pool(workers) if workers > 1 else None  # workers that die with the parent (`| head`)
    try:
        reader = functools.partial(_read_chunk, extra=extra)
        # chunks read ahead: two write batches' worth, so the next batch is ready when the writer comes back from
        # one (with fewer the workers idled while it wrote, then it waited for them)
        ahead = workers + 2 * BULK_SIZE // READ_CHUNK
        dicom_files: list[Path] = []
        in_flight: deque[Any] = deque()
        chunk: list[Path] = []

        def submit() -> None:
            if chunk:
                in_flight.append(pool.submit(reader, list(chunk)) if pool else _Ready(reader(list(chunk))))
                chunk.clear()

        for path in files:
            if path.suffix.lower() in JSON_SUFFIXES + JSONL_SUFFIXES:
                chunk.append(path)
                if len(chunk) >= READ_CHUNK:
                    submit()
            elif fsio.is_dicom(path):
                dicom_files.append(path)
            else:
                yield Source(str(path), skipped=True)
            while in_flight and (in_flight[0].done() or len(in_flight) > ahead):
                yield from in_flight.popleft().result()  # bounded read-ahead: wait for the oldest chunk
        submit()
        while in_flight:
            yield from in_flight.popleft().result()
        groups: dict[str, list[Path]] = {}
        keys = pool.map(_series_key, dicom_files, chunksize=32) if pool else map(_series_key, dicom_files)
        for path, uid, error in keys:
            if error:
                yield Source(str(path), errors=[error])
            elif uid is not None:
                groups.setdefault(uid, []).append(path)
        uids = sorted(groups)
        args = [tuple(sorted(groups[u])) for u in uids]
        maker = functools.partial(series_source, extra=extra)
        yield from (pool.map(maker, uids, args) if pool else map(maker, uids, args))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _read_chunk(paths: list[Path], extra: dict[str, Any] | None = None) -> list[Source]:
    return [read_json(path, extra) for path in paths]


class _Ready:
    """A chunk read in this process: looks like a finished future."""

    def __init__(self, value: list[Source]):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> list[Source]:
        return self.value
