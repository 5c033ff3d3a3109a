"""DICOM I/O shared by operators: reading headers with clean errors, series keys, saving."""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.exitcodes import DataError


def read(path: Path, *, stop_before_pixels: bool = False, specific_tags: Iterable[Any] | None = None,
         defer_size: int | None = None) -> Any:
    """``pydicom.dcmread`` that turns every read failure into a one-line DataError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True,
                             specific_tags=list(specific_tags) if specific_tags else None, defer_size=defer_size)
    except InvalidDicomError as exc:
        raise DataError(f"not a valid DICOM file: {exc}") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError, OverflowError,
            AttributeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, EOFError) or "end of file" in reason.lower():
            reason = f"truncated or damaged file ({reason})"
        raise DataError(f"cannot read DICOM: {reason}") from exc
    if len(ds) == 0 and not getattr(ds, "file_meta", None):
        raise DataError("not a DICOM file: no data elements")
    return ds


def require(ds: Any, keyword: str) -> Any:
    value = ds.get(keyword)
    if value in (None, ""):
        raise DataError(f"missing {keyword}")
    return value


def series_uid(path: Path) -> str:
    """The SeriesInstanceUID of a file, read without parsing the rest (a grouping key)."""
    ds = read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    return str(require(ds, "SeriesInstanceUID"))


def uid_from(seed: str, prefix: str = "2.25.") -> str:
    """A deterministic UID under 2.25 (PS3.5 B.2: UUID-derived) from any seed string."""
    digest = hashlib.sha256(seed.encode()).digest()[:16]
    return prefix + str(int.from_bytes(digest, "big"))


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def template_values(ds: Any, template: str) -> dict[str, Any]:
    """Values of a dataset for the ``{Keyword}`` fields a template names (missing → ``unknown``)."""
    values: dict[str, Any] = {}
    for name in template_fields(template):
        value = ds.get(name)
        if value not in (None, ""):
            values[name] = value
    return values


def save(ds: Any, dest: Path) -> int:
    """Write a dataset as a Part 10 file, atomically; returns the bytes written."""
    with fsio.atomic_write(dest) as fh:
        ds.save_as(fh, enforce_file_format=True)
        return int(fh.tell())
