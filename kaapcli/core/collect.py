"""``kaapcli collect``: a worklist CSV in, the studies of each row found, retrieved, optionally
anonymized and forwarded, and one result row per input row out (DIANA's collector).

A row names its studies by ``AccessionNumber``, or by ``PatientID`` and ``StudyDate`` (a date or a
range ``20200101-20201231``).  The result CSV is the resume point: a re-run skips the rows whose
result is ``ok`` and retries the others.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.exitcodes import DataError, KaapcliError, NoInputError

RESULT_FIELDS = ["status", "studies", "files", "outputs", "message"]


@dataclass
class Row:
    number: int  # 1-based data row of the worklist
    values: dict[str, str]

    @property
    def key(self) -> str:
        """Identity for resuming: the row's own values (not its position, so rows may be reordered)."""
        return hashlib.sha1(repr(sorted(self.values.items())).encode()).hexdigest()[:16]

    def match_keys(self) -> dict[str, str]:
        accession = self.values.get("AccessionNumber", "").strip()
        if accession:
            return {"AccessionNumber": accession}
        patient = self.values.get("PatientID", "").strip()
        date = self.values.get("StudyDate", "").strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):  # ISO date → DA; DA ranges (a-b) stay as they are
            date = date.replace("-", "")
        if patient and date:
            return {"PatientID": patient, "StudyDate": date}
        raise DataError(f"row {self.number}: needs AccessionNumber, or PatientID and StudyDate")


@dataclass
class RowResult:
    row: Row
    status: str = "ok"  # ok | not-found | failed
    studies: list[str] = field(default_factory=list)
    files: int = 0
    outputs: str = ""
    message: str = ""

    def csv_row(self) -> dict[str, str]:
        return {**self.row.values, "status": self.status, "studies": " ".join(self.studies),
                "files": str(self.files), "outputs": self.outputs, "message": self.message}


def read_worklist(path: Path) -> tuple[list[str], list[Row]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise NoInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the worklist: {exc}") from exc
    if text.lstrip().startswith("{"):
        return _json_worklist(path, text)
    reader = csv.DictReader(io.StringIO(text))
    columns = list(reader.fieldnames or [])
    if not {"AccessionNumber"} & set(columns) and not {"PatientID", "StudyDate"} <= set(columns):
        raise DataError(f"{path}: the worklist needs an AccessionNumber column, or PatientID and StudyDate",
                        hint="a CSV with a header row, e.g. AccessionNumber\\nACC123")
    rows = [Row(n, {k: (v or "").strip() for k, v in raw.items() if k}) for n, raw in enumerate(reader, 1)]
    return columns, rows


_JSON_COLUMNS = {"AccessionNumber": "00080050", "PatientID": "00100020", "StudyInstanceUID": "0020000D"}


def _json_worklist(path: Path, text: str) -> tuple[list[str], list[Row]]:
    """Rows from DICOM JSON lines, e.g. ``kaapcli query --worklist`` output: their AccessionNumber, PatientID and
    StudyInstanceUID."""
    import json

    rows = []
    for n, line in enumerate((line for line in text.splitlines() if line.strip()), 1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}: line {n}: not JSON ({exc})") from None
        values = {}
        for column, tag in _JSON_COLUMNS.items():
            element = record.get(tag) if isinstance(record, dict) else None
            found = (element or {}).get("Value") or [""]
            values[column] = str(found[0] or "").strip()
        rows.append(Row(n, values))
    return list(_JSON_COLUMNS), rows


def previous_results(path: Path) -> dict[str, dict[str, str]]:
    """Result rows of an earlier run, by row key (rows with status ok are not done again)."""
    if not path.is_file():
        return {}
    out = {}
    for raw in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
        values = {k: v for k, v in raw.items() if k and k not in RESULT_FIELDS}
        out[Row(0, values).key] = raw
    return out


def write_results(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, *RESULT_FIELDS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    fsio.write_bytes(path, buffer.getvalue().encode())


def collect_row(row: Row, fetcher: Any, out: Path, *, anonymize: Callable[[list[Path], Path], list[Path]] | None,
                forward: Callable[[list[Path]], None] | None) -> RowResult:
    """Find, retrieve, (anonymize,) (forward) the studies of one row; never raises for a row's failure."""
    from kaapcli.core.net.query import Query, uids_of

    result = RowResult(row)
    try:
        matches = fetcher.find(Query("study", row.match_keys(), ["StudyInstanceUID"]))
        result.studies = sorted({uids_of(m).get("StudyInstanceUID", "") for m in matches} - {""})
        if not result.studies:
            result.status, result.message = "not-found", f"no study matches {row.match_keys()}"
            return result
        files: list[Path] = []
        for study in result.studies:
            outcome = fetcher.fetch({"StudyInstanceUID": study})
            files += outcome.files
            if not outcome.ok:
                raise KaapcliError(f"study {study}: {outcome.message or 'retrieve failed'} "
                                   f"({outcome.completed} completed, {outcome.failed} failed, "
                                   f"{len(outcome.files)} received)")
        result.files = len(files)
        result.outputs = str(out / "studies")
        if anonymize is not None:
            files = anonymize(files, out / "anonymized")
            result.outputs = str(out / "anonymized")
        if forward is not None:
            forward(files)
    except KaapcliError as exc:
        result.status, result.message = "failed", exc.message
    return result


def pending(rows: list[Row], done: dict[str, dict[str, str]]) -> Iterator[Row]:
    return (row for row in rows if done.get(row.key, {}).get("status") != "ok")
