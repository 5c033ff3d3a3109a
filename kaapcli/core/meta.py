"""Kaapana's series metadata JSON (the "meta" document of DESIGN §3.1), built from DICOM headers.

Keys are ``"<GGGGEEEE> <Keyword>_<type>"`` with the type suffix taken from the VR; derived fields
live under group ``00000000``.  Values that break their VR's syntax (IS "2.0", DA "20201350") are
kept as the raw text and reported as a warning: a document is never lost to one bad value.

Numbers, dates and times are parsed from the raw bytes (these VRs are ASCII), not through
pydicom's converters, so malformed values neither raise nor print validation warnings and the
hot path stays cheap.  Private tags and tags missing from pydicom's dictionary are left out:
their meaning depends on a private creator that a flat key cannot carry.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, MutableSequence, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError

FORMAT_VERSION = 1  # bump when the document changes, so up-to-date outputs are rebuilt
DERIVED = "00000000"

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
ASCII_VRS = frozenset({"AE", "AS", "CS", "UI", "DA", "TM", "DT", "IS", "DS"})  # charset-independent
TEXT_VRS = frozenset({"LT", "ST", "UT"})  # leading spaces are significant, trailing ones are padding

# Kaapana's legacy spellings (its dicom_tag_dict.json: PS3.6 names without spaces) where they differ
# from today's keyword.  A short list of attributes that real CT/MR/PET/SEG/RTSTRUCT series carry.
LEGACY_NAMES: dict[int, str] = {
    0x00080052: "Query/RetrieveLevel",
    0x00080061: "ModalitiesinStudy",
    0x00080062: "SOPClassesinStudy",
    0x00081048: "Physician(s)ofRecord",
    0x00081060: "NameofPhysician(s)ReadingStudy",
    0x00081070: "Operators'Name",
    0x00100021: "IssuerofPatientID",
    0x00100022: "TypeofPatientID",
    0x00180010: "Contrast/BolusAgent",
    0x00180083: "NumberofAverages",
    0x00180086: "EchoNumber(s)",
    0x00180089: "NumberofPhaseEncodingSteps",
    0x00180094: "PercentPhaseFieldofView",
    0x00181020: "SoftwareVersion(s)",
    0x00181040: "Contrast/BolusRoute",
    0x00181041: "Contrast/BolusVolume",
    0x00181042: "Contrast/BolusStartTime",
    0x00181120: "Gantry/DetectorTilt",
    0x00181151: "X-RayTubeCurrent",
    0x00181190: "FocalSpot(s)",
    0x00181312: "In-planePhaseEncodingDirection",
    0x00189328: "ExposureTimeinms",
    0x00189330: "X-RayTubeCurrentinmA",
    0x00189332: "ExposureinmAs",
    0x00200032: "ImagePosition(Patient)",
    0x00200037: "ImageOrientation(Patient)",
    0x00200052: "FrameofReferenceUID",
    0x00201002: "ImagesinAcquisition",
    0x00201209: "NumberofSeriesRelatedInstances",
    0x00280002: "SamplesperPixel",
    0x00280008: "NumberofFrames",
    0x00281055: "WindowCenter&WidthExplanation",
    0x00540081: "NumberofSlices",
    0x00541310: "Primary(Prompts)CountsAccumulated",
    0x30060010: "ReferencedFrameofReferenceSequence",
    0x30060024: "ReferencedFrameofReferenceUID",
    0x52009230: "Per-frameFunctionalGroupsSequence",
}

_INT_RE = re.compile(r"[+-]?\d+")
_DS_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_DA_RE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM_RE = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT_RE = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?([+-]\d{4})?")
_AS_RE = re.compile(r"(\d{3})([DWMY])")

DAYS_PER_YEAR = 365.2425


class _Malformed(ValueError):
    """A value that breaks its VR's syntax; the raw text goes into the document instead."""


# --------------------------------------------------------------------------- value parsing

def _split(text: str) -> list[str]:
    return [part.strip(" \x00") for part in text.split("\\")]


def _parse_int(text: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise _Malformed
    return int(text)


def _parse_float(text: str) -> float:
    if not _DS_RE.fullmatch(text):
        raise _Malformed
    return float(text)


def parse_date(text: str) -> date:
    m = _DA_RE.fullmatch(text)
    if not m:
        raise _Malformed
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise _Malformed from None


def _time_parts(text: str) -> tuple[int, int, int, int]:
    """(hour, minute, second, microsecond) of a TM value; unspecified components are 0."""
    m = _TM_RE.fullmatch(text)
    if not m:
        raise _Malformed
    hour, minute, second = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    if hour > 23 or minute > 59 or second > 60:  # 60: a leap second is legal in TM
        raise _Malformed
    return hour, minute, second, int((m[4] or "0").ljust(6, "0"))


def _format_time(parts: tuple[int, int, int, int]) -> str:
    hour, minute, second, micro = parts
    return f"{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}"


def parse_datetime(text: str) -> datetime:
    """A DT value as a naive datetime in the recorded local time (a UTC offset suffix is ignored)."""
    m = _DT_RE.fullmatch(text)
    if not m:
        raise _Malformed
    try:
        return datetime(int(m[1]), int(m[2] or 1), int(m[3] or 1), int(m[4] or 0), int(m[5] or 0),
                        min(int(m[6] or 0), 59), int((m[7] or "0").ljust(6, "0")))
    except ValueError:
        raise _Malformed from None


def _combine(day: date, parts: tuple[int, int, int, int]) -> datetime:
    hour, minute, second, micro = parts
    return datetime(day.year, day.month, day.day, hour, minute, min(second, 59), micro)


def format_datetime(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S.%f}"


_PARSERS = {
    "DA": lambda t: f"{parse_date(t):%Y-%m-%d}",
    "TM": lambda t: _format_time(_time_parts(t)),
    "DT": lambda t: format_datetime(parse_datetime(t)),
    "IS": _parse_int,
    "DS": _parse_float,
}


# --------------------------------------------------------------------------- element conversion

def _values(value: Any) -> list[Any]:
    """A pydicom value as a list: multi-valued elements as they are, one value as a one-item list."""
    if value is None or value == "":
        return []
    # pydicom's MultiValue and Sequence are MutableSequences; str, bytes and PersonName are single values
    return list(value) if isinstance(value, list | tuple | MutableSequence) else [value]


def _texts(elem: Any) -> list[str]:
    """The values of an ASCII-VR element as stripped strings, from the raw bytes when not yet converted."""
    if isinstance(elem.value, bytes):
        return _split(elem.value.decode("latin-1"))
    # Converted values keep their source text (pydicom's IS/DS/DA/TM/DT carry original_string).
    return [str(getattr(v, "original_string", None) or v).strip(" \x00") for v in _values(elem.value)]


def _shape(values: list[Any]) -> Any:
    """One value stays a scalar, several stay a list (as Kaapana does)."""
    return values[0] if len(values) == 1 else values


def _sorted(obj: Any) -> Any:
    """Keys sorted by tag at every level (datasets built in memory need not be in tag order)."""
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted(v) for v in obj]
    return obj


def _vr(tag: int, elem: Any) -> str:
    """The element's VR; the dictionary's for implicit VR files and for UN on a known tag."""
    from pydicom.datadict import dictionary_VR

    if elem.VR and elem.VR != "UN":
        return str(elem.VR)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


SUFFIX = {"DA": "date", "TM": "time", "DT": "datetime", "IS": "integer", "DS": "float"}


class _Converter:
    """Turns one dataset (recursively) into the flat key scheme, collecting warnings."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.warnings: list[str] = []

    def dataset(self, ds: Any) -> dict[str, Any]:
        from pydicom.datadict import keyword_for_tag

        doc: dict[str, Any] = {}
        for tag in ds.keys():
            if tag.is_private or tag.element == 0 or tag.group == 0x0002:
                continue  # private, group lengths, file meta (not part of the dataset proper)
            keyword = keyword_for_tag(tag)
            if not keyword:
                continue  # not in pydicom's dictionary: no name to give it
            elem = ds.get_item(tag)  # raw (unconverted) when read from a file
            vr = _vr(tag, elem)
            if " or " in vr:  # e.g. "US or SS": pydicom resolves it from PixelRepresentation
                elem = ds[tag]
                vr = elem.VR
                if " or " in vr:  # unresolvable (no PixelRepresentation): bytes are binary, else the first VR
                    vr = "OB" if isinstance(elem.value, bytes) else vr.split(" or ")[0]
            if vr in BINARY_VRS or tag == 0x7FE00010:
                continue
            name = (self.legacy and LEGACY_NAMES.get(int(tag))) or keyword
            key = f"{int(tag):08X} {name}"
            if vr in ASCII_VRS:
                self.ascii(doc, key, keyword, vr, ds[tag] if elem.value is None else elem)  # None: deferred
            else:
                self.converted(doc, key, keyword, vr, ds[tag].value)
        return doc

    def ascii(self, doc: dict[str, Any], key: str, keyword: str, vr: str, elem: Any) -> None:
        texts = _texts(elem)
        if not any(texts):
            return
        parse = _PARSERS.get(vr)
        if parse is None:
            doc[f"{key}_keyword"] = _shape(texts)
            return
        try:
            doc[f"{key}_{SUFFIX[vr]}"] = _shape([parse(t) if t else None for t in texts])
        except _Malformed:
            raw = "\\".join(texts)
            self.warnings.append(f"{keyword}: malformed {vr} value {raw!r} kept as text")
            doc[f"{key}_keyword"] = raw

    def converted(self, doc: dict[str, Any], key: str, keyword: str, vr: str, value: Any) -> None:
        values = _values(value)
        if not values:
            return
        if vr == "SQ":
            doc[f"{key}_object"] = _shape([self.dataset(item) for item in values])
        elif vr == "PN":
            for component in ("alphabetic", "ideographic", "phonetic"):
                # trailing "^" only delimit empty components (PS3.5 6.2.1): "^^^^" is no name at all
                parts = [str(getattr(name, component, "") or "").strip().rstrip("^") for name in values]
                if any(parts):
                    doc[f"{key}_keyword_{component}"] = _shape(parts)
        elif vr == "AT":
            doc[f"{key}_keyword"] = _shape([f"{int(t):08X}" for t in values])
        elif vr in INT_VRS:
            doc[f"{key}_integer"] = _shape([int(n) for n in values])
        elif vr in FLOAT_VRS:
            doc[f"{key}_float"] = _shape([self.finite(keyword, float(n)) for n in values])
        else:  # text VRs and anything unforeseen: strings, like Kaapana's rule for unknown VRs
            strip = str.rstrip if vr in TEXT_VRS else str.strip
            texts = [strip(str(v)) for v in values]
            if any(texts):
                doc[f"{key}_keyword"] = _shape(texts)

    def finite(self, keyword: str, number: float) -> float | None:
        if math.isfinite(number):
            return number
        self.warnings.append(f"{keyword}: {number} is not valid JSON, written as null")
        return None


# --------------------------------------------------------------------------- derived fields

def _all(ds: Any, keyword: str) -> list[str]:
    """The values of an ASCII-VR element as text ([] when absent), without pydicom's validation."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return []
    elem = ds.get_item(tag)
    return _texts(ds[tag] if elem.value is None else elem)


def _first(ds: Any, keyword: str) -> str:
    return next(iter(_all(ds, keyword)), "")


def _try(parse: Any, text: str) -> Any:
    try:
        return parse(text) if text else None
    except _Malformed:
        return None


TIMESTAMP_LEVELS = ("Acquisition", "Series", "Content", "Study")


def _timestamp(ds: Any, arrived: datetime | None) -> tuple[datetime | None, str]:
    """Kaapana's Timestamp: AcquisitionDateTime, else the first valid date of acquisition → series →
    content → study with the time of the same level (or the first valid time of the others)."""
    acquired = _try(parse_datetime, _first(ds, "AcquisitionDateTime"))
    if acquired is not None:
        return acquired, "AcquisitionDateTime"
    dates = [(level, _try(parse_date, _first(ds, f"{level}Date"))) for level in TIMESTAMP_LEVELS]
    times = {level: _try(_time_parts, _first(ds, f"{level}Time")) for level in TIMESTAMP_LEVELS}
    for level, day in dates:
        if day is None:
            continue
        time_level = level if times[level] else next((lv for lv in TIMESTAMP_LEVELS if times[lv]), None)
        if time_level is None:
            return _combine(day, (0, 0, 0, 0)), f"{level}Date"
        return _combine(day, times[time_level]), f"{level}Date + {time_level}Time"
    if arrived is not None:
        return arrived, "TimestampArrived"
    return None, ""


def _age_years(text: str) -> int | None:
    """PatientAge (AS) in whole years: 012W is twelve weeks (0 years), 018M is one year."""
    m = _AS_RE.fullmatch(text)
    if not m:
        return None
    n, unit = int(m[1]), m[2]
    if unit == "Y":
        return n
    if unit == "M":
        return n // 12
    return int(n * (7 if unit == "W" else 1) / DAYS_PER_YEAR)


def _years_between(born: date, day: date) -> int:
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def _annotation_labels(ds: Any, modality: str) -> list[str]:
    if modality == "SEG":
        items, attr = ds.get("SegmentSequence") or [], "SegmentLabel"
    elif modality == "RTSTRUCT":
        items, attr = ds.get("StructureSetROISequence") or [], "ROIName"
    else:
        return []
    # Commas would split the comma-joined list: Kaapana turns them into dashes.
    labels = [str(item.get(attr) or "").replace(",", "-").strip() for item in items]
    return [label for label in labels if label]


def _derive(doc: dict[str, Any], ds: Any, arrived: datetime | None, notes: list[str]) -> None:
    stamp, used = _timestamp(ds, arrived)
    if stamp is not None:
        doc[f"{DERIVED} Timestamp_datetime"] = format_datetime(stamp)
        doc[f"{DERIVED} TimeTagUsed_keyword"] = used
        doc[f"{DERIVED} DayOfWeek_integer"] = stamp.weekday()
    if arrived is not None:
        doc[f"{DERIVED} TimestampArrived_datetime"] = format_datetime(arrived)
        doc[f"{DERIVED} TimestampArrived_date"] = f"{arrived:%Y-%m-%d}"
        doc[f"{DERIVED} TimestampArrivedHour_integer"] = arrived.hour

    born = _try(parse_date, _first(ds, "PatientBirthDate"))
    on = _try(parse_date, _first(ds, "StudyDate")) or (stamp.date() if stamp else None)
    age = _years_between(born, on) if born and on else None
    if age is not None and age < 0:
        notes.append(f"PatientBirthDate {born} is after the study date {on}: age taken from PatientAge")
        age = None
    if age is None:
        age = _age_years(_first(ds, "PatientAge"))
    if age is not None:
        doc[f"{DERIVED} DerivedPatientAge_integer"] = age

    modality = _first(ds, "Modality").upper()
    if modality:
        image_type = {v.upper() for v in _all(ds, "ImageType")}
        curated = "XR" if modality == "CT" and "LOCALIZER" in image_type else modality
        doc[f"{DERIVED} CuratedModality_keyword"] = curated
    labels = _annotation_labels(ds, modality)
    if labels:
        doc[f"{DERIVED} AnnotationLabel_keyword"] = labels
        doc[f"{DERIVED} AnnotationLabelsList_keyword"] = ",".join(sorted(labels))

    for key in ("00120010 ClinicalTrialSponsorName_keyword", "00120020 ClinicalTrialProtocolID_keyword"):
        value = doc.get(key)
        if isinstance(value, str) and value.startswith("kp-"):  # Kaapana's dataset/project marker
            doc[key] = value[3:]


# --------------------------------------------------------------------------- public API

def instance_document(ds: Any, *, legacy: bool = False, arrived: datetime | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """The meta document of one dataset and the warnings met (malformed values, NaN, ...).

    ``arrived`` (when the file arrived, e.g. its mtime) fills the ``TimestampArrived*`` fields;
    without it they are left out, so the document depends on the dataset alone.
    """
    converter = _Converter(legacy)
    with dicom.collect_warnings() as pydicom_notes:
        doc = converter.dataset(ds)
        _derive(doc, ds, arrived, converter.warnings)
    return _sorted(doc), converter.warnings + pydicom_notes


def _read(path: Path, **kwargs: Any) -> tuple[Any, list[str]]:
    with dicom.collect_warnings() as notes:
        ds = dicom.read(path, stop_before_pixels=True, **kwargs)
    return ds, notes


def _read_whole_header(path: Path) -> tuple[Any, list[str]]:
    """A document's source: every element before the pixel data, and none of them cut short."""
    ds, notes = _read(path, defer_size=65536)
    dicom.check_complete(ds, notes)
    return ds, notes


def arrival_time(paths: Iterable[Path]) -> datetime:
    """When files arrived: the newest modification time, in UTC (naive, like the other timestamps)."""
    newest = max(p.stat().st_mtime for p in paths)
    return datetime.fromtimestamp(newest, UTC).replace(tzinfo=None)


def _instance_number(path: Path) -> int | None:
    fast = dicom.peek(path, [0x00200013])
    text = fast.get(0x00200013, "") if fast is not None else _first(
        _read(path, specific_tags=["InstanceNumber"])[0], "InstanceNumber")
    return _try(_parse_int, _split(text)[0])


def first_instance(paths: Sequence[Path]) -> tuple[Path, list[str]]:
    """The series' first instance: lowest InstanceNumber (missing or malformed last), then path."""
    if len(paths) == 1:
        return paths[0], []
    ranked: list[tuple[bool, int, str, Path]] = []
    notes: list[str] = []
    for path in paths:
        try:
            number = _instance_number(path)
        except DataError as exc:
            notes.append(f"{path}: skipped when choosing the first instance: {exc.message}")
            continue
        ranked.append((number is None, number or 0, str(path), path))
    if not ranked:
        raise DataError("no readable instance in the series")
    return min(ranked)[3], notes


def series_document(paths: Sequence[Path], *, legacy: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The meta document of one series (files of one SeriesInstanceUID) and its warnings.

    The document is the first instance's (see :func:`first_instance`), read headers-only, plus
    series aggregates: ``NumberOfInstances_integer`` and ``SeriesSizeBytes_integer``.  Warnings
    and errors name the file when the series has several.
    """
    paths = sorted(paths)
    chosen, notes = first_instance(paths)
    prefix = f"{chosen}: " if len(paths) > 1 else ""
    try:
        ds, read_notes = _read_whole_header(chosen)
    except DataError as exc:
        raise DataError(prefix + exc.message, hint=exc.hint) from exc
    doc, doc_notes = instance_document(ds, legacy=legacy, arrived=arrival_time(paths))
    doc[f"{DERIVED} NumberOfInstances_integer"] = len(paths)
    doc[f"{DERIVED} SeriesSizeBytes_integer"] = sum(p.stat().st_size for p in paths)
    return _sorted(doc), notes + [prefix + n for n in read_notes + doc_notes]


# --------------------------------------------------------------------------- operator

@dataclass
class Dcm2JsonOperator(BaseOperator):
    """``kaapcli dcm2json``: one ``<SeriesInstanceUID>.json`` per series, or one per instance."""

    per_instance: bool = False
    legacy: bool = False
    tags: tuple[str, ...] = ()
    name = "dcm2json"

    def __post_init__(self) -> None:
        # Import pydicom (~0.4 s) once here in the parent: forked workers inherit it instead of each
        # importing it on its first series (grouping itself never needs pydicom, see dicom.peek).
        import pydicom  # noqa: F401

    @property
    def grouped(self) -> bool:  # type: ignore[override]
        return not self.per_instance

    def options(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "per_instance": self.per_instance, "legacy": self.legacy,
                "tags": list(self.tags)}

    def group_key(self, path: Path) -> str | None:
        fast = dicom.peek(path, [0x0020000E])
        if fast and fast.get(0x0020000E):
            return fast[0x0020000E]
        with warnings.catch_warnings():  # the engine reports failures; pydicom's guesses are noise here
            warnings.simplefilter("ignore")
            return dicom.series_uid(path)  # the slow path, which also names what is wrong

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        if self.per_instance:
            path = item.paths[0]
            ds, notes = _read_whole_header(path)
            uid = str(dicom.require(ds, "SOPInstanceUID"))
            doc, doc_notes = instance_document(ds, legacy=self.legacy, arrived=arrival_time([path]))
            notes += doc_notes
        else:
            doc, notes = series_document(item.paths, legacy=self.legacy)
            uid = item.key
        if self.tags:
            doc[f"{DERIVED} Tags_keyword"] = list(self.tags)
            doc = _sorted(doc)
        dest = ctx.out / f"{fsio.safe_name(uid)}.json"
        fsio.write_json(dest, doc)
        return Outcome(outputs=[dest], warnings=notes)
