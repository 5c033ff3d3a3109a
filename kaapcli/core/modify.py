"""Header edits in DCMTK dcmodify's vocabulary, applied without ever decoding pixel data.

A file is read with pydicom, its header changed in memory and written back with the
same transfer syntax: untouched elements (PixelData above all, compressed or not) are
written from their original bytes.  Everything that can be checked without a file
(tag names, VRs, values, multiplicities) is checked when the edits are parsed, so a bad
option is a usage error before any file is touched.

Edits apply in a fixed order, whatever the order of the options:
conditions (on the original) → new UIDs → --erase-private → --erase-all → -e → -m → -i,
then the file meta information is brought in line with SOPClassUID/SOPInstanceUID.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from kaapcli.core import dicom, dicomscan, dictionary, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.core.dicom import ALL_ITEMS, TagStep, tag_label
from kaapcli.exitcodes import DataError, UsageError

TagPath = tuple[TagStep, ...]

BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
SINGLE_TEXT_VRS = {"LT", "ST", "UT", "UR"}  # a backslash is part of the value, not a delimiter
INT_VRS = {"US", "SS", "UL", "SL", "SV", "UV"}
FLOAT_VRS = {"FL", "FD"}
ALL_VRS = BINARY_VRS | SINGLE_TEXT_VRS | INT_VRS | FLOAT_VRS | {
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "SQ", "TM", "UC", "UI"}
# Binary numbers: the range of each VR (PS3.5 Table 6.2-1).
INT_RANGES = {"US": (0, 2**16 - 1), "SS": (-2**15, 2**15 - 1), "UL": (0, 2**32 - 1), "SL": (-2**31, 2**31 - 1),
              "UV": (0, 2**64 - 1), "SV": (-2**63, 2**63 - 1)}
FORMATS = {"DA": "YYYYMMDD", "TM": "HHMMSS[.FFFFFF]", "DT": "YYYYMMDDHHMMSS[.FFFFFF][+ZZZZ]",
           "AS": "nnnD, nnnW, nnnM or nnnY", "IS": "an integer", "DS": "a decimal number",
           "UI": "digits and dots, no leading zeros", "CS": "A-Z 0-9 space _, up to 16 characters",
           "FL": "a number", "FD": "a number", "AT": "a tag like (0010,0010)",
           **{vr: f"an integer from {low} to {high}" for vr, (low, high) in INT_RANGES.items()}}
UID_LEVELS = ("study", "series", "instance")
# Which UID attributes each --new-uids level replaces, at any depth (references follow their target).
UID_KEYWORDS = {"study": ("StudyInstanceUID",), "series": ("SeriesInstanceUID",),
                "instance": ("SOPInstanceUID", "ReferencedSOPInstanceUID")}
UTF8 = "ISO_IR 192"
PIXEL_DATA = 0x7FE00010


# --------------------------------------------------------------------------- parsing the edits

@dataclass(frozen=True)
class Assignment:
    """``TAG=VALUE`` of ``-i``/``-m``: the path, the raw value, and the VR when known up front."""

    option: str  # "-i" or "-m", for messages
    text: str  # the TAG as the user wrote it
    path: TagPath
    value: str
    vr: str | None  # explicit (``TAG=VR:value``) or from the dictionary; None = the existing element's
    explicit_vr: bool = False

    @property
    def tag(self) -> int:
        return self.path[-1].tag


@dataclass(frozen=True)
class Condition:
    """``--if``: ``TAG=PATTERN``, ``TAG!=PATTERN`` (``*``/``?`` wildcards), ``TAG`` (present), ``!TAG`` (absent)."""

    text: str
    path: TagPath
    pattern: str | None  # None: a presence test
    negate: bool = False

    def holds(self, ds: Any) -> bool:
        values = [element_text(e) for e in find_elements(ds, self.path)]
        if self.pattern is None:
            return any(v != "" for v in values) != self.negate
        matched = any(fnmatchcase(v, self.pattern) for v in values or [""])  # absent counts as empty
        return matched != self.negate


@dataclass(frozen=True)
class Edits:
    """Everything ``kaapcli modify`` does to one dataset (picklable, fingerprinted for up-to-date checks)."""

    inserts: tuple[Assignment, ...] = ()
    modifies: tuple[Assignment, ...] = ()
    erase: tuple[TagPath, ...] = ()
    erase_all: tuple[int, ...] = ()
    erase_private: bool = False
    conditions: tuple[Condition, ...] = ()
    new_uids: tuple[str, ...] = ()
    uid_seed: str = ""

    @property
    def needs_pixel_element(self) -> bool:
        """Whether an edit or condition addresses Pixel Data or an element after it (then the whole file is read;
        otherwise only the header is, and Pixel Data is copied as read)."""
        paths = [a.path for a in self.inserts + self.modifies] + list(self.erase) + [c.path for c in self.conditions]
        return any(p[0].tag >= PIXEL_DATA for p in paths) or any(t >= PIXEL_DATA for t in self.erase_all)

    def is_empty(self) -> bool:
        return not (self.inserts or self.modifies or self.erase or self.erase_all or self.erase_private
                    or self.new_uids)


def dictionary_vr(tag: int) -> str | None:
    """The VR the data dictionary gives a tag (``None`` for private and unknown tags)."""
    if dictionary.is_private_creator(tag):
        return "LO"
    if (entry := dictionary.entry(tag)) is not None:
        return entry[0]
    from pydicom.datadict import dictionary_VR  # repeating groups (60xx, 50xx)

    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _check_editable(tag: int, where: str) -> None:
    group, element = tag >> 16, tag & 0xFFFF
    if group == 0x0002:
        raise UsageError(f"{where}: file meta information (group 0002) is kept in line by kaapcli, not edited",
                         hint="--new-uids instance or -m SOPInstanceUID=... updates MediaStorageSOPInstanceUID")
    if element == 0 or group == 0xFFFE:
        raise UsageError(f"{where}: group lengths and item delimiters cannot be edited")


def parse_assignment(text: str, option: Literal["-i", "-m"]) -> Assignment:
    """Parse ``TAG=VALUE`` (or ``TAG=VR:VALUE`` for a tag the dictionary does not know)."""
    tag_text, sep, value = text.partition("=")
    where = f"{option} {text!r}"
    if not sep:
        raise UsageError(f"{where}: expected TAG=VALUE", hint="an empty value is written TAG=")
    path = dicom.parse_tag_path(tag_text)
    if path[-1].index is not None:
        raise UsageError(f"{where}: the path must end in an element, not a sequence item")
    _check_editable(path[-1].tag, where)
    if path[-1].tag == 0x7FE00010:
        raise UsageError(f"{where}: pixel data cannot be set from text")
    vr = dictionary_vr(path[-1].tag)
    explicit = False
    if vr is None:  # private or unknown: the VR may be given as a prefix of the value
        match = re.fullmatch(r"([A-Z]{2}):(.*)", value, re.S)
        if match and match[1] in ALL_VRS:
            vr, value, explicit = match[1], match[2], True
        elif option == "-i":
            raise UsageError(f"{where}: {tag_label(path[-1].tag)} is not in the DICOM dictionary, so its VR is "
                             "unknown", hint=f"give the VR before the value, e.g. {tag_text}=LO:{value}")
    assignment = Assignment(option, tag_text.strip(), path, value, vr, explicit)
    if vr is not None:
        try:
            convert_value(vr, value, path[-1].tag)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return assignment


def parse_condition(text: str) -> Condition:
    match = re.fullmatch(r"\s*(!?)([^=!]+?)\s*(?:(!?=)(.*))?", text, re.S)
    if match is None or (match[1] and match[3]):
        raise UsageError(f"--if {text!r}: expected TAG=PATTERN, TAG!=PATTERN, TAG or !TAG")
    path = dicom.parse_tag_path(match[2])
    if path[-1].index is not None:
        raise UsageError(f"--if {text!r}: the path must end in an element, not a sequence item")
    if match[3] is None:
        return Condition(text, path, None, negate=bool(match[1]))
    return Condition(text, path, match[4], negate=match[3] == "!=")


def parse_kaapana_tags(text: str) -> list[Assignment]:
    """Kaapana's ``"(0008,0060)=CT;(0010,0010)=Doe^Jane"``: each is set, inserted when missing (``-i``)."""
    return [parse_assignment(part.strip(), "-i") for part in text.split(";") if part.strip()]


def parse_edits(*, inserts: Iterable[str] = (), modifies: Iterable[str] = (), erase: Iterable[str] = (),
                erase_all: Iterable[str] = (), erase_private: bool = False, conditions: Iterable[str] = (),
                new_uids: Iterable[str] = (), uid_seed: str = "", kaapana_tags: Iterable[str] = ()) -> Edits:
    """Check every option and build the :class:`Edits`; raises UsageError on the first bad one."""
    erase_paths = []
    for text in erase:
        path = dicom.parse_tag_path(text)
        _check_editable(path[-1].tag, f"-e {text!r}")
        erase_paths.append(path)
    erase_tags = []
    for text in erase_all:
        tag = dicom.parse_tag(text)
        _check_editable(tag, f"--erase-all {text!r}")
        erase_tags.append(tag)
    levels = []
    for level in new_uids:
        if level not in UID_LEVELS:
            raise UsageError(f"--new-uids {level!r}: expected one of {', '.join(UID_LEVELS)}")
        if level not in levels:
            levels.append(level)
    kaapana = [a for text in kaapana_tags for a in parse_kaapana_tags(text)]
    return Edits(inserts=tuple(parse_assignment(t, "-i") for t in inserts) + tuple(kaapana),
                 modifies=tuple(parse_assignment(t, "-m") for t in modifies),
                 erase=tuple(erase_paths), erase_all=tuple(erase_tags), erase_private=erase_private,
                 conditions=tuple(parse_condition(t) for t in conditions),
                 new_uids=tuple(levels), uid_seed=uid_seed)


# --------------------------------------------------------------------------- values

def _vm_bounds(tag: int) -> tuple[int, int | None, int]:
    """(minimum, maximum or None, step) of the dictionary VM of a tag; anything goes when unknown."""
    if (entry := dictionary.entry(tag)) is not None:
        vm = entry[1]
    else:
        from pydicom.datadict import dictionary_VM

        try:
            vm = str(dictionary_VM(tag))
        except KeyError:
            return 1, None, 1
    match = re.fullmatch(r"(\d+)(?:-(\d*)(n?))?", vm)
    if match is None:
        return 1, None, 1
    low = int(match[1])
    if match[2] is None and not match[3]:
        return low, low, 1
    if match[3]:  # "1-n", "2-2n", "3-3n": any multiple of the step
        return low, None, int(match[2]) if match[2] else 1
    return low, int(match[2]), 1


def convert_value(vr: str, text: str, tag: int) -> Any:
    """The Python value of ``text`` for an element of ``vr``; raises ValueError saying what is wrong."""
    if " or " in vr:  # ambiguous dictionary VR ("US or SS", "OB or OW"): the writer settles it from context
        choices = vr.split(" or ")
        vr = next((c for c in choices if c not in BINARY_VRS), choices[0])
    if vr == "SQ":
        if text:
            raise ValueError("a sequence takes no value (TAG= makes an empty one; use TAG[0].Item=... for items)")
        return []
    if vr in BINARY_VRS:
        raise ValueError(f"a {vr} (binary) value cannot be given as text")
    if text == "":
        return None
    parts = [text] if vr in SINGLE_TEXT_VRS else text.split("\\")
    low, high, step = _vm_bounds(tag)
    if len(parts) < low or (high is not None and len(parts) > high) or len(parts) % step:
        vm = f"{low}" if high == low else f"{low}-{high if high is not None else 'n'}"
        raise ValueError(f"{tag_label(tag)} takes {vm} value(s) (VM {vm}), got {len(parts)}: "
                         "values are separated by \\")
    values = [v if (v := _plain_value(vr, part)) is not None else _checked_value(vr, part) for part in parts]
    return values[0] if len(values) == 1 else values


# Values valid beyond doubt (PS3.5 Table 6.2-1), a subset of what pydicom's validation accepts: these need no
# pydicom (~0.3 s to import), every other value is judged by it.  Printable ASCII only (no backslash: it
# separates values, except in the single-valued texts), lengths within the VR's maximum, numbers in their
# plain form (pydicom keeps a DS/IS string as written: "+1", "1e3" or "01" are its to judge).
_TEXT, _LONG_TEXT = r"[\x20-\x5b\x5d-\x7e]*", r"[\x20-\x7e]*"  # printable ASCII; without / with backslash
_PLAIN = {vr: (re.compile(pattern), longest) for vr, pattern, longest in [
    ("AE", _TEXT, 16), ("CS", r"[A-Z0-9 _]*", 16), ("SH", _TEXT, 16), ("LO", _TEXT, 64), ("UC", _TEXT, 0),
    ("LT", _LONG_TEXT, 10240), ("ST", _LONG_TEXT, 1024), ("UT", _LONG_TEXT, 0), ("AS", r"\d{3}[DWMY]", 0),
    ("PN", r"[\x20-\x3c\x3e-\x5b\x5d-\x7e]{0,64}", 0),  # one component group of up to 64: no "="
    ("UI", r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", 64), ("DS", r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", 16),
    ("IS", r"0|-?[1-9][0-9]{0,8}", 0), ("DA", r"\d{8}", 0), ("DT", r"\d{4}(\d{4})?", 0),  # DT: a year or a date
    ("TM", r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", 0)]}
_INTEGER, _DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)"), re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")


def _plain_value(vr: str, part: str) -> Any:
    """``part`` as :func:`convert_value` gives it when it is valid beyond doubt (see above); None: ask pydicom."""
    if vr in INT_RANGES:
        low, high = INT_RANGES[vr]
        return int(part) if _INTEGER.fullmatch(part) and low <= int(part) <= high else None
    if vr in FLOAT_VRS:
        return float(part) if _DECIMAL.fullmatch(part) and len(part) <= 16 else None
    if vr not in _PLAIN or not _PLAIN[vr][0].fullmatch(part) or len(part) > (_PLAIN[vr][1] or len(part)):
        return None
    if vr == "DA" or (vr == "DT" and len(part) == 8):
        import datetime

        try:
            datetime.date(int(part[:4]), int(part[4:6]), int(part[6:]))
        except ValueError:
            return None
    if vr == "TM" and not (int(part[:2]) < 24 and all(int(part[i:i + 2]) < 60 for i in (2, 4) if i < len(part))):
        return None
    return part


def _checked_value(vr: str, part: str) -> Any:
    """One value of ``vr`` judged by pydicom's validation; raises ValueError saying what is wrong."""
    from pydicom import config
    from pydicom.valuerep import DA, DT, TM, validate_value

    fmt = f" (expected {FORMATS[vr]})" if vr in FORMATS else ""
    try:
        if vr in INT_VRS:
            value: Any = int(part)
            low_value, high_value = INT_RANGES[vr]
            if not low_value <= value <= high_value:
                raise ValueError(f"{part!r} is out of range for {vr} (expected {FORMATS[vr]})")
        elif vr in FLOAT_VRS:
            value = float(part)
        elif vr == "AT":
            value = dicom.parse_tag(part)
        else:
            value = part
            if vr in ("DA", "DT", "TM"):
                {"DA": DA, "DT": DT, "TM": TM}[vr](part)  # a real date/time, not a query range
        validate_value(vr, value, config.RAISE)
    except (ValueError, UsageError, OverflowError) as exc:
        reason = str(exc).split(" Please see")[0]
        if not (vr in INT_RANGES and "out of range for" in reason) and (vr in FORMATS or not reason):
            reason = f"{part!r} is not a valid {vr} value{fmt}"
        raise ValueError(reason) from None
    return value


def element_text(elem: Any) -> str:
    """An element's value as text, multiple values joined by ``\\`` (what ``--if`` patterns match)."""
    from pydicom.multival import MultiValue

    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    return str(value)


# --------------------------------------------------------------------------- walking paths

def containers(ds: Any, path: TagPath, create: bool = False) -> list[Any]:
    """The datasets that hold the last step of ``path``; with ``create``, missing sequences and items are made."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    level = [ds]
    for step in path[:-1]:
        found = []
        for container in level:
            if step.tag not in container:
                if not create:
                    continue
                container[step.tag] = DataElement(step.tag, "SQ", [])
            elem = container[step.tag]
            if elem.VR != "SQ":
                raise DataError(f"{tag_label(step.tag)} is not a sequence here (VR {elem.VR})")
            items = elem.value
            if step.index == ALL_ITEMS:
                found.extend(items)
                continue
            assert step.index is not None
            while create and len(items) <= step.index:
                items.append(Dataset())
            if step.index < len(items):
                found.append(items[step.index])
        level = found
    return level


def find_elements(ds: Any, path: TagPath) -> list[Any]:
    tag = path[-1].tag
    return [c[tag] for c in containers(ds, path) if tag in c]


def datasets(ds: Any) -> Iterator[Any]:
    """A dataset and every item of its sequences, depth first."""
    yield ds
    for elem in ds:
        if elem.VR == "SQ" and elem.value:
            for item in elem.value:
                yield from datasets(item)


# --------------------------------------------------------------------------- applying

def new_uid(level: str, original: str, seed: str = "") -> str:
    """The replacement of a UID: the same for every file (so one series keeps one series UID), seedable."""
    key = f"modify/{seed}/{level}/{original}" if seed else f"modify/{level}/{original}"
    return dicom.uid_from(key)


def _resolve_vr(a: Assignment, container: Any) -> str:
    if a.explicit_vr or (a.vr is not None and " or " not in a.vr):
        return str(a.vr)
    existing = container.get(a.tag)
    if existing is not None and existing.VR != "UN" and " or " not in existing.VR:
        return str(existing.VR)
    if a.vr is not None:
        return a.vr  # ambiguous: pydicom's writer resolves it from PixelRepresentation and friends
    raise DataError(f"{a.option} {a.text}: {tag_label(a.tag)} has an unknown VR in this file",
                    hint=f"give the VR before the value, e.g. {a.text}=LO:{a.value}")


def _assign(a: Assignment, container: Any) -> None:
    from pydicom.dataelem import DataElement

    vr = _resolve_vr(a, container)
    try:
        value = convert_value(vr, a.value, a.tag)
    except ValueError as exc:
        raise DataError(f"{a.option} {a.text}={a.value}: {exc}") from None
    container[a.tag] = DataElement(a.tag, vr, value)


def _charset_for(ds: Any, texts: Iterable[str]) -> list[str]:
    """Keep new text values encodable: when the dataset's Specific Character Set (its code extensions included,
    ISO 2022) cannot hold one, decode every value with the old set and switch the dataset to UTF-8 (PS3.5 6.1.2.3:
    ISO_IR 192 stands alone, without code extensions)."""
    from pydicom import config
    from pydicom.charset import convert_encodings, encode_string

    extended = [t for t in texts if not t.isascii()]
    if not extended:
        return []
    # pydicom writes the default repertoire (ISO-IR 6, ASCII) as Latin-1: check against what the set declares
    encodings = ["ascii" if e == "iso8859" else e for e in convert_encodings(ds.get("SpecificCharacterSet") or "")]
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE  # encode_string then raises instead of writing "?"
    try:
        for text in extended:
            encode_string(text, encodings)
        return []
    except (UnicodeError, LookupError, ValueError):
        pass
    finally:
        config.settings.writing_validation_mode = mode
    original = "\\".join(ds.SpecificCharacterSet) if isinstance(ds.get("SpecificCharacterSet"), list | tuple) \
        else ds.get("SpecificCharacterSet") or "ISO_IR 6 (default)"
    ds.decode()  # decode every text with the old character set before it changes
    ds.SpecificCharacterSet = UTF8
    return [f"SpecificCharacterSet {original} cannot hold the new value(s): changed to {UTF8} (UTF-8)"]


def apply_edits(edits: Edits, ds: Any) -> list[str]:
    """Apply the edits to ``ds`` in place (conditions are the caller's); returns warnings."""
    notes: list[str] = []
    sop_before = (ds.get("SOPClassUID"), ds.get("SOPInstanceUID"))
    for level in edits.new_uids:
        keywords = UID_KEYWORDS[level]
        for item in datasets(ds):
            for keyword in keywords:
                if item.get(keyword):
                    item[keyword].value = new_uid(level, str(item[keyword].value), edits.uid_seed)
    if edits.erase_private:
        ds.remove_private_tags()
    for tag in edits.erase_all:
        for item in list(datasets(ds)):
            if tag in item:
                del item[tag]
    for path in edits.erase:
        _erase(ds, path)
    notes += _charset_for(ds, (a.value for a in edits.modifies + edits.inserts))
    for a in edits.modifies:
        targets = [c for c in containers(ds, a.path) if a.tag in c]
        if not targets:
            notes.append(f"-m {a.text}: not present, not modified (use -i to insert)")
        for container in targets:
            _assign(a, container)
    for a in edits.inserts:
        for container in containers(ds, a.path, create=True):
            _assign(a, container)
    _sync_file_meta(ds, sop_before)
    return notes


def _erase(ds: Any, path: TagPath) -> None:
    last = path[-1]
    for container in containers(ds, path):
        if last.tag not in container:
            continue
        if last.index is None:
            del container[last.tag]
            continue
        items = container[last.tag].value if container[last.tag].VR == "SQ" else None
        if items is None:
            raise DataError(f"{tag_label(last.tag)} is not a sequence here")
        if last.index == ALL_ITEMS:
            items.clear()
        elif last.index < len(items):
            del items[last.index]


def _sync_file_meta(ds: Any, sop_before: tuple[Any, Any]) -> None:
    """Keep MediaStorageSOP*UID equal to SOP*UID when an edit changed them; name kaapcli as the writer."""
    meta = ds.file_meta
    if (ds.get("SOPClassUID"), ds.get("SOPInstanceUID")) != sop_before:
        if ds.get("SOPClassUID"):
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if ds.get("SOPInstanceUID"):
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = dicom.IMPLEMENTATION_UID  # PS3.10 7.1: the implementation that wrote the file
    meta.ImplementationVersionName = dicom.IMPLEMENTATION_VERSION


def complete_file_meta(ds: Any) -> list[str]:
    """Fill in the file meta a Part 10 file needs (a bare dataset has none); returns warnings.

    A dataset without SOPClassUID/SOPInstanceUID cannot become a conformant Part 10 file: it is then
    written in the form it came in (see :func:`write`), as dcmodify does.
    """
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds.ensure_file_meta()
    meta = ds.file_meta
    had_meta = bool(meta.get("TransferSyntaxUID"))
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not ds.get(kw)]
    if missing:
        return [f"no {' or '.join(missing)}: written in its original form, not as a conformant Part 10 file"]
    if not had_meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    for meta_kw, kw in (("MediaStorageSOPClassUID", "SOPClassUID"), ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if not meta.get(meta_kw):
            setattr(meta, meta_kw, ds.get(kw))
    notes = [] if had_meta else ["no File Meta Information in the input: written as a DICOM Part 10 file"]
    syntax = meta.TransferSyntaxUID
    # A file read as implicit VR although its transfer syntax is explicit (pydicom warns and carries on) has raw
    # elements without a VR: give each its dictionary VR so the file is written as its transfer syntax says.
    if syntax.is_transfer_syntax and not syntax.is_implicit_VR and any(
            getattr(elem, "VR", "") is None for elem in ds._dict.values()):
        for _ in ds.iterall():
            pass
        notes.append(f"the dataset was not encoded as its transfer syntax says: re-encoded as {syntax.name}")
    return notes


def write(ds: Any, dest: Path) -> None:
    """Write atomically: as a Part 10 file when the dataset can be one, else in the form it was read."""

    try:
        if ds.get("SOPClassUID") and ds.get("SOPInstanceUID"):
            dicom.save(ds, dest)
        else:
            with fsio.atomic_write(dest) as fh:
                ds.save_as(fh, enforce_file_format=False)
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot write the modified file: {reason}") from None


def spliceable(ds: Any) -> bool:
    """Whether an edited header (read without Pixel Data) can be written followed by the input's Pixel Data
    element as read: a Part 10 file (SOP Class and Instance UIDs present) whose elements all precede Pixel Data."""
    return bool(ds.get("SOPClassUID") and ds.get("SOPInstanceUID")) and all(int(t) < PIXEL_DATA for t in ds.keys())


def write_with_pixels_of(ds: Any, source: Path, pixels: tuple[int, int], dest: Path) -> None:
    """The edited file meta and header, encoded here, then the source's Pixel Data element copied byte for byte
    (in the kernel): a 512x512 slice costs the few KB of its header, as dcmodify's edit does."""
    import struct

    meta = ds.file_meta
    if "FileMetaInformationVersion" not in meta:
        meta.FileMetaInformationVersion = b"\0\1"
    missing = [kw for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if not meta.get(kw)]
    if missing:
        raise DataError(f"cannot write the modified file: no {', '.join(missing)} in its file meta information")
    # The group as read (raw elements copied, the edited ones encoded), explicit VR little endian, its group
    # length recomputed (PS3.10 7.1); pydicom's writer would validate and copy the whole group again.
    del meta[0x00020000:0x00020001]
    body = dicom.encode_dataset(meta, implicit=False, little=True)
    preamble = ds.preamble if ds.preamble and len(ds.preamble) == 128 else b"\0" * 128
    group_length = struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body))
    dicom.write_spliced(ds, preamble + b"DICM" + group_length + body, source, pixels, dest)


# --------------------------------------------------------------------------- the byte editor

# The VRs whose values the byte editor encodes as pydicom's writer does: text (ASCII, values joined by a
# backslash, padded to even length) and binary numbers.
_TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_NUMBER_CODES = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "UV": "Q", "SV": "q", "FL": "f", "FD": "d"}
# Edits of these change how the rest reads (the character set) or what the file meta must say: pydicom's path.
_NOT_BYTE_EDITED = frozenset({0x00080005, 0x00080016, 0x00080018})
DIRECTORY_RECORDS = 0x00041220

ByteStep = tuple[str, str, int, str, bytes | None]  # option, TAG as written, tag, VR, encoded value (None: erase)


def byte_steps(edits: Edits) -> list[ByteStep] | None:
    """The edits as steps of the byte editor, in the order :func:`apply_edits` makes them (-e, -m, -i), when all
    are -e/-m/-i of top-level elements before Pixel Data with a VR of their own that it encodes and ASCII values;
    None: they are pydicom's.  The element values are encoded here, once; the element header per file."""
    if edits.conditions or edits.new_uids or edits.erase_private or edits.erase_all or edits.needs_pixel_element:
        return None
    steps: list[ByteStep] = []
    for path in edits.erase:
        if len(path) > 1 or path[0].index is not None:
            return None
        steps.append(("-e", "", path[0].tag, "", None))
    for a in edits.modifies + edits.inserts:
        vr = a.vr or ""
        parts = [a.value] if vr in SINGLE_TEXT_VRS else a.value.split("\\")
        if len(a.path) > 1 or a.tag in _NOT_BYTE_EDITED or vr not in _TEXT_VRS | _NUMBER_CODES.keys() or (
                a.value and any(_plain_value(vr, part) is None for part in parts)):
            return None  # a value pydicom may write otherwise than as given (" 1.5", "+1") is pydicom's to write
        data = value_bytes(vr, convert_value(vr, a.value, a.tag))
        if len(data) > 0xFFFF and vr not in dicom.LONG_LENGTH_VRS:
            return None
        steps.append((a.option, a.text, a.tag, vr, data))
    return steps


def value_bytes(vr: str, value: Any) -> bytes:
    """An element value of :func:`convert_value` encoded as pydicom writes it (little endian; text in ASCII)."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if vr in _NUMBER_CODES:
        return struct.pack(f"<{len(values)}{_NUMBER_CODES[vr]}", *values)
    data = "\\".join(values).encode("ascii")
    return data + (b"\0" if vr == "UI" else b" ") * (len(data) % 2)


def edit_bytes(steps: list[ByteStep], src: Path, dest: Path) -> list[str] | None:
    """Make the edits in the bytes of the header, copy the rest of the file as read: the file
    :func:`write_with_pixels_of` writes after pydicom read and edited it (byte for byte, a test compares them),
    without pydicom.  Returns the warnings, or None when the file is pydicom's to edit: one the fast reader does
    not walk (``dicomscan``), elements out of order or after Pixel Data, a truncated file, a DICOMDIR, a file meta
    without its UIDs, explicit UN elements, an implicit VR dataset that starts like an explicit one (pydicom reads
    it as explicit)."""
    try:
        fh = open(src, "rb", buffering=0)
    except OSError:
        return None  # pydicom's read says why
    with fh:
        try:
            header = dicomscan.scan(src, encapsulated=True, fh=fh)
        except OSError:
            return None
        if header is None or DIRECTORY_RECORDS in header.sequences:
            return None
        tags = [tag for tag, _, _ in header.layout]
        if any(a >= b for a, b in zip(tags, tags[1:], strict=False)) or not all(
                header.elements.get(tag, ("", b""))[1].strip(b" \0")
                for tag in (0x00020002, 0x00020003, 0x00020010, 0x00080016, 0x00080018)):
            return None
        implicit = header.syntax == dicomscan.IMPLICIT_LE
        if not implicit and any(vr == "UN" for vr, _ in header.elements.values()):
            return None  # pydicom gives the elements it reads (SOP UIDs...) their dictionary VR: it writes them anew
        size = os.fstat(fh.fileno()).st_size
        end = header.pixel_element if header.pixel_element >= 0 else size
        head = os.pread(fh.fileno(), end, 0)
        if header.pixel_element < 0:
            pixels_end = size
        elif header.pixel_length >= 0:
            pixels_end = header.pixel_offset + header.pixel_length
        else:
            pixels_end = dicom.pixel_element_end(fh, header.pixel_element, implicit=False, little=True) or -1
        first = next((start for tag, start, _ in header.layout if tag >> 16 != 2), None)
        if len(head) != end or pixels_end != size or (
                implicit and first is not None and all(0x40 < b < 0x5B for b in head[first + 4:first + 6])):
            return None
        meta: dict[int, bytes] = {}
        body: dict[int, bytes] = {}
        for tag, start, stop in header.layout:
            if tag >> 16 == 2:
                meta[tag] = head[start:stop]
            elif tag & 0xFFFF or tag >> 16 <= 6:  # retired group lengths are not written (PS3.5 7.2)
                body[tag] = head[start:stop]
        notes = []
        for option, text, tag, vr, value in steps:
            if value is None:
                body.pop(tag, None)
            elif option == "-m" and tag not in body:
                notes.append(f"-m {text}: not present, not modified (use -i to insert)")
            else:
                body[tag] = dicom.element_header(tag, vr, len(value), implicit) + value
        new_head = head[:128] + b"DICM" + _file_meta_group(meta) + b"".join(body[tag] for tag in sorted(body))
        with fsio.atomic_write(dest) as out:
            fsio.reserve(out, len(new_head) + size - end)
            out.write(new_head)
            out.flush()  # the pixel bytes go to the descriptor directly, after the header
            dicom.copy_range(fh, out, end, size - end)
    return notes


def _file_meta_group(elements: dict[int, bytes]) -> bytes:
    """The file meta group of an edited file from its elements as read (tag -> encoded element), as
    :func:`write_with_pixels_of` writes it: kaapcli named as the writer (PS3.10 7.1), the version added when
    missing, the group length recomputed."""
    meta = {tag: element for tag, element in elements.items() if tag != 0x00020000}
    meta.setdefault(0x00020001, dicom.element_header(0x00020001, "OB", 2, False) + b"\0\1")
    writer = ((0x00020012, "UI", dicom.IMPLEMENTATION_UID), (0x00020013, "SH", dicom.IMPLEMENTATION_VERSION))
    for tag, vr, text in writer:
        value = value_bytes(vr, text)
        meta[tag] = dicom.element_header(tag, vr, len(value), False) + value
    group = b"".join(meta[tag] for tag in sorted(meta))
    return dicom.element_header(0x00020000, "UL", 4, False) + struct.pack("<L", len(group)) + group


# --------------------------------------------------------------------------- the operator

def output_path(src: Path, roots: Iterable[Path]) -> Path:
    """Where a file goes in the mirrored tree: its path below the directory INPUT it came from, else its name."""
    for root in roots:
        if src.is_relative_to(root):
            return src.relative_to(root)
    return Path(src.name)


class ModifyOperator(BaseOperator):
    """Edits the header of one file per item; writes it to the mirrored tree under OUT, or in place."""

    name = "modify"
    supports_dry_run = True
    collision_hint = "give their common parent directory as INPUT"
    outputs_follow_root = True  # the mirrored tree is relative to the INPUT directory

    def __init__(self, edits: Edits, roots: Iterable[Path] = (), in_place: bool = False):
        self.edits = edits
        self.roots = tuple(roots)
        self.in_place = in_place
        self.byte_steps = byte_steps(edits)

    def options(self) -> dict[str, Any]:
        return {"edits": asdict(self.edits), "in_place": self.in_place}

    def process(self, item: Item, ctx: Context) -> Outcome:
        src = item.paths[0]
        if self.in_place:
            dest = src
        else:
            assert ctx.out is not None
            dest = ctx.out / output_path(src, (item.root,) if item.root is not None else self.roots)
        if self.byte_steps is not None and not ctx.dry_run:
            notes = edit_bytes(self.byte_steps, src, dest)
            if notes is not None:
                return Outcome(outputs=[dest], warnings=notes)
        dicom.import_pydicom(pixels=False)  # headers are edited, Pixel Data copied as bytes: no numpy, no requests
        with dicom.collect_warnings() as read_notes:
            # The header only, and where Pixel Data lies when it can be copied as read (a file that does not parse
            # to its end, Pixel Data included, fails: never written back as if whole).
            ds, pixels = dicom.read_header(src) if not self.edits.needs_pixel_element else (dicom.read(src), None)
        if "DirectoryRecordSequence" in ds:
            note = "a DICOMDIR is not modified (its record offsets would no longer match)"
            return Outcome(skipped=True, message=note, warnings=[note])
        with dicom.collect_warnings() as pydicom_notes:
            failed = [c.text for c in self.edits.conditions if not c.holds(ds)]
            if failed:
                return Outcome(skipped=True, message=f"condition not met: {failed[0]}")
            notes = read_notes + complete_file_meta(ds) + apply_edits(self.edits, ds)
            if ctx.dry_run:
                return Outcome(skipped=True, message=f"would write {dest}", warnings=notes)
            if pixels is not None and spliceable(ds):
                write_with_pixels_of(ds, src, pixels, dest)
            else:
                if pixels is not None:  # the edits left a dataset that is not written header + Pixel Data
                    ds = dicom.read(src)
                    complete_file_meta(ds)
                    apply_edits(self.edits, ds)
                write(ds, dest)
        return Outcome(outputs=[dest], warnings=notes + pydicom_notes)
