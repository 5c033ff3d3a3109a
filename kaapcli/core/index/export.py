"""What ``search``, ``dataset show`` and ``stats`` print: selected series as data for the next command.

Formats (``--format``):

- ``jsonl``: one document per line (the stored one, or its ``--fields``), what ``tag``/``dataset add
  --series -`` and ``retrieve --from-query -`` read;
- ``uids``: one SeriesInstanceUID per line;
- ``paths``: every file of every series, one per line, as recorded when the series was indexed from
  DICOM (``kaapcli index TREE``, ``receive``/``watch --index``): what any command's ``-`` input reads;
- ``dirs``: the directories holding those files, each once;
- ``csv``: a header of field names, then one row per series (lists joined with ``\\``, the DICOM
  multi-value delimiter).

Before a path is printed it is checked: a file that has gone, is no regular file any more, or has
changed and no longer belongs to its series is *reported* (one line per series) and left out, never
printed; a series with no known files is reported too.  Nothing here writes to the index.
CSV cells that a spreadsheet would run as a formula (text starting with ``= + - @``, tab or CR,
e.g. a hostile SeriesDescription) are prefixed with ``'``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.core.index.base import Doc, Index, SeriesFiles, Sort, as_list, doc_id, lookup
from kaapcli.core.index.query import SERIES_KEY, Node, field_keys
from kaapcli.exitcodes import UsageError

FORMATS = ("jsonl", "paths", "dirs", "uids", "csv")
CSV_FIELDS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "StudyDate", "Modality", "SeriesDescription",
              "BodyPartExamined", "NumberOfInstances", "Tags")
PAGE = 500  # series whose file lists are looked up at once
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
STALE_HINT = ("re-index the files (kaapcli index DIR) or retrieve the series again "
              "(kaapcli search Q | kaapcli retrieve --from-query - -o DIR)")


@dataclass
class Exported:
    """What an export printed: series, lines, and the series it could not deliver in full."""

    series: int = 0
    lines: int = 0
    incomplete: int = 0
    uids: list[str] | None = None


def export(ix: Index, node: Node, fmt: str, write: Callable[[str], None], report: Callable[[str], None], *,
           fields: Sequence[str] = (), limit: int | None = None, sort: Sort | None = None) -> Exported:
    """Print the series matching ``node`` in format ``fmt`` through ``write``; problems go to ``report``."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    done = Exported(uids=[])
    keys = [k for name in fields for k in field_keys(name)]
    if fmt == "csv":
        names = list(fields) or list(CSV_FIELDS)
        columns = [(name, field_keys(name)) for name in names]
        projection: list[str] | None = [SERIES_KEY, *(k for _, ks in columns for k in ks)]
    elif fmt == "jsonl":
        projection = keys or None
    else:
        projection = [SERIES_KEY]
    docs = ix.search(node, fields=projection, limit=limit, sort=sort)

    def out(line: str) -> None:
        write(line)
        done.lines += 1

    if fmt in ("paths", "dirs"):
        seen_dirs: set[str] = set()
        for uid, entry in _with_files(ix, docs, done):
            paths, problems = present(uid, entry)
            for problem in problems:
                report(problem)
            done.incomplete += bool(problems)
            for path in paths:
                if fmt == "paths":
                    out(path)
                else:
                    parent = os.path.dirname(path)
                    if parent not in seen_dirs:
                        seen_dirs.add(parent)
                        out(parent)
        return done
    if fmt == "csv":
        out(csv_row(names))
    for doc in docs:
        uid = record_series_uid(doc) or ""  # --fields may leave it out of a jsonl document
        done.series += 1
        assert done.uids is not None
        done.uids.append(uid)
        if fmt == "jsonl":
            out(json.dumps(doc, ensure_ascii=False))
        elif fmt == "uids":
            out(uid)
        else:
            out(csv_row([cell(_first_present(doc, ks)) for _, ks in columns]))
    return done


def _with_files(ix: Index, docs: Iterable[Doc], done: Exported) -> Iterator[tuple[str, SeriesFiles | None]]:
    """(uid, its files) for each document, file lists looked up :data:`PAGE` series at a time."""
    batch: list[str] = []

    def flush() -> Iterator[tuple[str, SeriesFiles | None]]:
        known = ix.files_of(batch)
        for uid in batch:
            yield uid, known.get(uid)
        batch.clear()

    for doc in docs:
        uid = doc_id(doc)
        done.series += 1
        assert done.uids is not None
        done.uids.append(uid)
        batch.append(uid)
        if len(batch) >= PAGE:
            yield from flush()
    if batch:
        yield from flush()


def present(uid: str, entry: SeriesFiles | None) -> tuple[list[str], list[str]]:
    """The recorded files of a series that are still its files, and one line per kind of problem."""
    if entry is None or not entry.files:
        return [], [f"series {uid}: no files known (it was not indexed from DICOM files here)"]
    ok: list[str] = []
    gone: list[str] = []
    moved: list[str] = []
    unprintable: list[str] = []
    for path, size, mtime in entry.files:
        if "\n" in path or "\r" in path:  # one path per line: a line break would make two paths of one
            unprintable.append(path)
            continue
        try:
            st = os.stat(path)
        except OSError:
            gone.append(path)
            continue
        if not stat.S_ISREG(st.st_mode):
            gone.append(path)
        elif (st.st_size, st.st_mtime_ns) == (size, mtime) or _series_of(Path(path)) == uid:
            ok.append(path)  # unchanged, or changed in place but still of this series
        else:
            moved.append(path)
    total = len(entry.files)
    problems = []
    if gone:
        problems.append(f"series {uid}: {len(gone)} of {total} files gone since it was indexed (first: {gone[0]})")
    if unprintable:
        problems.append(f"series {uid}: {len(unprintable)} of {total} file names hold a line break and cannot be "
                        f"printed one per line (first: {unprintable[0]!r})")
    if moved:
        problems.append(f"series {uid}: {len(moved)} of {total} files changed since it was indexed and are no longer "
                        f"of this series (first: {moved[0]})")
    return ok, problems


def _series_of(path: Path) -> str | None:
    """The SeriesInstanceUID of a file that changed since it was indexed (None when unreadable)."""
    from kaapcli.core import dicom

    fast = dicom.peek(path, [0x0020000E])
    if fast and fast.get(0x0020000E):
        return fast[0x0020000E]
    try:
        return dicom.series_uid(path)
    except Exception:  # noqa: BLE001 - unreadable now: not a file of the series
        return None


def _first_present(doc: Doc, keys: Sequence[str]) -> Any:
    for key in keys:
        value = lookup(doc, key)
        if value not in (None, [], ""):
            return value
    return None


def cell(value: Any) -> str:
    """A CSV cell: lists joined with ``\\``, objects as JSON, text a spreadsheet would run as a formula quoted."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\\".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def csv_row(cells: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue()


def series_uids(lines: Iterable[str], what: str = "stdin") -> list[str]:
    """SeriesInstanceUIDs from lines that are UIDs (space/comma separated) or JSON records: kaapcli search /
    dataset show documents or DICOM JSON (kaapcli query).  A record without one is a UsageError."""
    out: list[str] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if not text.startswith("{"):
            out.extend(v for v in text.replace(",", " ").split() if v)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{what} line {number}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        uid = record_series_uid(record) if isinstance(record, dict) else None
        if not uid:
            raise UsageError(f"{what} line {number}: a JSON record without a SeriesInstanceUID",
                             hint="pipe kaapcli search or kaapcli dataset show records, or UIDs one per line")
        out.append(uid)
    return list(dict.fromkeys(out))


def record_series_uid(record: dict[str, Any]) -> str | None:
    """The SeriesInstanceUID of a series document or a DICOM JSON record (PS3.18 F.2)."""
    value = record.get(SERIES_KEY)
    if value is None and isinstance(record.get("0020000E"), dict):
        value = (record["0020000E"].get("Value") or [None])[0]
    values = as_list(value)
    if len(values) != 1 or values[0] in (None, ""):
        return None
    return str(values[0]).strip() or None
