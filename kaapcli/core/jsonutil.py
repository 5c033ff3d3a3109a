"""``concat-json``: JSON and JSON Lines files concatenated into one array or one JSONL file.

A ``.json`` file contributes its value as one element; a ``.jsonl``/``.ndjson`` file one element
per non-blank line.  Order is the input order (directories walked sorted), so the output is
deterministic.  A file that does not parse contributes nothing and is reported with its line and
column; the others are still written.  The output is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.exitcodes import DataError, NoInputError, UsageError

JSON_SUFFIXES = (".json",)
LINES_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class ConcatResult:
    files: int = 0
    records: int = 0
    skipped: int = 0  # inputs that are not JSON files
    failures: list[str] = field(default_factory=list)  # "path: reason at line L column C"


def _decode_error(path: Path, exc: json.JSONDecodeError, line_offset: int = 0) -> DataError:
    return DataError(f"{path}: bad JSON at line {exc.lineno + line_offset} column {exc.colno}: {exc.msg}")


def read_records(path: Path) -> list[Any]:
    """The elements one file contributes (parsed completely, so a bad file contributes none)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    if path.suffix.lower() in LINES_SUFFIXES:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise _decode_error(path, exc, number - 1) from None
        return records
    try:
        return [json.loads(text)]
    except json.JSONDecodeError as exc:
        raise _decode_error(path, exc) from None


def output_kind(dest: Path) -> str:
    suffix = dest.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in LINES_SUFFIXES:
        return "jsonl"
    raise UsageError(f"-o {dest}: the output must end in .json (one array) or .jsonl (one record per line)")


def _encoded(records: Iterator[Any], kind: str) -> Iterator[str]:
    first = True
    for record in records:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if kind == "jsonl":
            yield text + "\n"
        else:  # one element per line: readable, diffable, still one JSON array
            yield ("[\n" if first else ",\n") + text
        first = False
    if kind == "json":
        yield "[]\n" if first else "\n]\n"


def concat_json(files: list[Path], dest: Path) -> ConcatResult:
    """Concatenate ``files`` into ``dest``; failures are collected.  When nothing parses, nothing is written."""
    kind = output_kind(dest)
    result = ConcatResult()
    resolved_dest = dest.resolve()
    inputs = [f for f in files if f.suffix.lower() in JSON_SUFFIXES + LINES_SUFFIXES and f.resolve() != resolved_dest]
    result.skipped = len(files) - len(inputs)
    if not inputs:
        raise NoInputError("no .json, .jsonl or .ndjson files among the inputs")

    def records() -> Iterator[Any]:
        for path in inputs:
            try:
                parsed = read_records(path)
            except DataError as exc:
                result.failures.append(exc.message)
                continue
            result.files += 1
            result.records += len(parsed)
            yield from parsed

    try:
        with fsio.atomic_write(dest) as fh:
            for chunk in _encoded(records(), kind):
                fh.write(chunk.encode())
            if result.files == 0:
                raise _NothingParsed
    except _NothingParsed:
        pass  # every input failed: dest is left as it was
    return result


class _NothingParsed(Exception):
    """Aborts the atomic write when no input parsed."""
