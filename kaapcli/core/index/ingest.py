"""Documents to index, read from inputs: dcm2json output (JSON, JSONL) or DICOM series directly.

Each input yields one :class:`Source` (a JSON file, a JSONL file, a DICOM series) carrying its
documents or the one-line reason it failed; a bad line of a JSONL file fails that line only.
DICOM files are grouped by SeriesInstanceUID and turned into documents with
:func:`kaapcli.core.meta.series_document` in a process pool (header reading is the slow part).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import process_pool
from kaapcli.core.index.base import Stored, loads
from kaapcli.exitcodes import KaapcliError

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Source:
    label: str
    docs: list[Stored] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line each, naming the file (and line)
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False  # neither JSON nor DICOM


def _checked(doc: object, where: str) -> Stored:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object (a series meta document), found {type(doc).__name__}")
    try:
        return Stored.of(doc)
    except KaapcliError as exc:
        raise ValueError(f"{where}: {exc.message}") from None


def read_json(path: Path) -> Source:
    """A ``.json`` file (one document or a list of them) or a ``.jsonl`` file (one per line)."""
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
                source.docs.append(_checked(loads(line), f"{path}:{number}"))
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
            source.docs.append(_checked(doc, f"{path}" + (f"[{i}]" if isinstance(data, list) else "")))
        except ValueError as exc:
            source.errors.append(str(exc))
    return source


def _series_key(path: Path) -> tuple[Path, str | None, str]:
    try:
        return path, dicom.series_uid(path), ""
    except KaapcliError as exc:
        return path, None, f"{path}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - one bad file is one failed input
        return path, None, f"{path}: {type(exc).__name__}: {exc}"


def _series_source(uid: str, paths: tuple[Path, ...]) -> Source:
    from kaapcli.core.meta import series_document

    source = Source(f"series {uid} ({len(paths)} files)")
    try:
        doc, notes = series_document(list(paths))
        source.docs.append(Stored.of(doc))
        source.warnings.extend(notes if len(paths) > 1 else [f"{paths[0]}: {n}" for n in notes])  # name the file
    except KaapcliError as exc:
        source.errors.append(f"series {uid}: {exc.message}")
    except Exception as exc:  # noqa: BLE001
        source.errors.append(f"series {uid}: {type(exc).__name__}: {exc}")
    return source


def read_sources(files: list[Path], workers: int = 1) -> Iterator[Source]:
    """One Source per JSON/JSONL file (in order), one per other file that is no DICOM (skipped), then one per
    DICOM series (sorted by UID).  With several workers, files are read and parsed in a process pool: JSON
    documents arrive ready to write (:class:`Stored`), so the writing process only writes."""
    json_files = [p for p in files if p.suffix.lower() in JSON_SUFFIXES + JSONL_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in JSON_SUFFIXES + JSONL_SUFFIXES]
    pool = process_pool(workers) if workers > 1 else None  # workers that die with the parent (`| head`)
    try:
        yield from pool.map(read_json, json_files, chunksize=64) if pool and len(json_files) > 64 \
            else map(read_json, json_files)
        dicom_files = []
        for path in others:
            if fsio.is_dicom(path):
                dicom_files.append(path)
            else:
                yield Source(str(path), skipped=True)
        groups: dict[str, list[Path]] = {}
        keys = pool.map(_series_key, dicom_files, chunksize=32) if pool else map(_series_key, dicom_files)
        for path, uid, error in keys:
            if error:
                yield Source(str(path), errors=[error])
            elif uid is not None:
                groups.setdefault(uid, []).append(path)
        uids = sorted(groups)
        args = [tuple(sorted(groups[u])) for u in uids]
        yield from (pool.map(_series_source, uids, args) if pool else map(_series_source, uids, args))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
