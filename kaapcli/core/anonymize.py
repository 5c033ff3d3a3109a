"""DICOM de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile with options.

Steps, per file: read the header (Pixel Data is never decoded); guard burned-in text; apply Table E.1-1 (data in
``kaapcli/data/ps315_annex_e.tsv``, edition 2026c, matched by tag so attributes pydicom's dictionary does not know
are found too) by action code to every element, recursively inside sequences; set the PS3.15 markers; rebuild the
file meta; write the header and splice the input's Pixel Data bytes after it, atomically (beside the input with
``in_place``).  Everything that must stay consistent across files, runs and machines is derived from one secret
key with HMAC-SHA256:

- UIDs: ``2.25.<first 128 bits of HMAC(key, "uid:" + original)>``, wherever the UID appears;
- PatientID/PatientName from the original PatientID (``realistic``: a fake name of the recorded sex, and a birth
  date moved by the patient's date offset), AccessionNumber from the original accession;
- the ``--retain-dates shift`` offset, one per patient.

It never writes the key, never writes an identifying value to stderr (pydicom's warnings are counted, not echoed)
and never leaves a file the profile has not been applied to under an output name.

So the same key gives byte-identical outputs anywhere, a different key gives unrelated pseudonyms, and
nothing else (no state, no lookup table) is needed to keep a patient's studies linked.

Choices where PS3.15 leaves freedom (documented in docs/anonymize.md):

- conditional codes resolve to the variant that keeps any IOD conformant without knowing attribute
  types: ``X/Z`` -> Z, ``X/D``/``X/Z/D``/``Z/D`` -> D, ``X/Z/U*`` -> keep the sequence, replace its UIDs;
- D on a sequence keeps its items but replaces every free-text value inside with a dummy;
- C (clean) on text keeps the value unless it contains an identifying string of the same file
  (names, IDs, birth date, institution); C on a date (modified dates option) shifts it;
- DA/DT elements missing from Table E.1-1 get the date treatment too (dummy unless dates are retained);
- instance UIDs missing from the table (any UI value that is not a well-known DICOM UID and not a
  class/scheme identifier) are replaced as U;
- public attributes of the identity-bearing groups (patient, visit, study request, results) that the table does
  not list are removed, so attributes the standard adds later are safe by default (a short list of
  non-identifying ones that IODs may require is kept); PN attributes the table does not list get a dummy;
- in a sequence whose action is D (Content Sequence, Waveform Annotation Sequence, ...) coded concepts are kept
  (Code Value, Coding Scheme Designator, Code Meaning, ...); every other free text gets a dummy, or, with the
  Clean Structured Content option, is cleaned.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.core.dicom import read_header, write_spliced
from kaapcli.exitcodes import CantCreateError, DataError, UsageError

OPTION_COLUMNS = ("retain_safe_private", "retain_uids", "retain_device", "retain_institution",
                  "retain_patient_characteristics", "retain_long_full_dates", "retain_long_modified_dates",
                  "clean_descriptors", "clean_structured_content", "clean_graphics")
TABLE_EDITION = "2026c"

# CID 7050 De-identification Method (PS3.16), coding scheme DCM.
METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_long_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_long_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution": ("113112", "Retain Institution Identity Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
}

TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "PN", "AE"}
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, Any] = {
    "DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D", "DS": "0", "IS": "0",
    "CS": "ANONYMIZED", "PN": "ANONYMIZED", "AE": "ANONYMIZED", "UR": "", "FL": 0.0, "FD": 0.0,
    "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
}
# UI attributes that name classes, schemes or contexts, not instances: never remapped.
NOT_INSTANCE_UID = re.compile(r"Class|TransferSyntax|CodingScheme|ContextUID|ContextGroupExtensionCreatorUID|"
                              r"MappingResourceUID|PrivateInformationCreatorUID|SOPClasses|ApplicationContext")
# The Kaapana profile's tags that an IOD may need present (Type 1 or 2): kept, empty or with a dummy, not erased.
KAAPANA_PRESENT = {0x00100010: "Z", 0x00100020: "Z", 0x00100030: "Z", 0x00080050: "Z", 0x00080090: "Z",
                   0x00081070: "Z", 0x300600A6: "Z", 0x300E0008: "Z", 0x0040A123: "D"}
# Modalities and SOP classes whose pixels commonly carry burned-in text (PS3.15 E.3.1 Clean Pixel Data).
BURNED_IN_MODALITIES = {"US", "SC", "XA", "RF", "DX", "CR", "ES", "OP", "XC", "GM", "SM", "OT", "DOC", "IVUS"}
BURNED_IN_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture family
                          "1.2.840.10008.5.1.4.1.1.6.", "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound
                          "1.2.840.10008.5.1.4.1.1.104.")  # encapsulated documents

# Attributes Table E.1-1 marks X that are Type 2 in a common IOD: emptied (Z), not removed, so the object stays
# conformant (PS3.15 E.1.1 lets a de-identifier exceed the profile; an empty value carries no identity).
PRESENT_WHEN_REMOVED = {0x300A00B2: "Treatment Machine Name: Type 2 in the RT Beams Module"}

PATIENT_ID, PATIENT_NAME, ACCESSION = 0x00100020, 0x00100010, 0x00080050
BIRTH_DATE, PATIENT_SEX, PATIENT_AGE, STUDY_DATE = 0x00100030, 0x00100040, 0x00101010, 0x00080020
SOP_INSTANCE_UID, SERIES_UID, STUDY_UID = 0x00080018, 0x0020000E, 0x0020000D
IDENTITY_REMOVED, METHOD = 0x00120062, 0x00120063
DEFAULT_NAME = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"

# Groups whose public attributes identify the person: Patient (0010), Study request (0032), Visit (0038), Results
# (4008).  An attribute of these groups that Table E.1-1 does not list is removed, so next year's additions are
# removed too; these are the exceptions, attributes that identify nobody and that IODs may require.
IDENTITY_GROUPS = frozenset({0x0010, 0x0032, 0x0038, 0x4008})
UNLISTED_IDENTITY_ACTIONS = {
    0x00100028: "K",  # Subject Relative Position in Image (Type 1C, multi-subject images)
    0x00100200: "K", 0x00100201: "K",  # Quality Control Subject (a phantom flag) and its type
    **{tag: "K" for tag in range(0x00100212, 0x0010021A)},  # strain of a research animal
    **{tag: "K" for tag in (0x00100221, 0x00100222, 0x00100223, 0x00100229)},  # genetic modifications
    0x00102201: "K", 0x00102202: "K",  # Patient Species Description / Code Sequence (Type 1C)
    0x00102210: "K",  # Anatomical Orientation Type (Type 1C)
    0x00102292: "K", 0x00102293: "K",  # Patient Breed Description / Code Sequence (Type 2C)
    0x00102294: "Z",  # Breed Registration Sequence (Type 2C): it holds registration numbers, emptied
    0x00109431: "K",  # Examined Body Thickness
}
# Patient characteristics the table does not list: removed unless --retain-patient-characteristics.
UNLISTED_CHARACTERISTICS = frozenset({0x00101021, 0x00101022, 0x00101023, 0x00101024})  # size code, BMI, AP, lateral
# The attributes of a coded concept (PS3.3 Table 8.8-1): kept inside sequences whose free text is replaced.
CODE_ATTRIBUTES = frozenset({0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080119, 0x00080120, 0x00080122})
# Free text of structured content: cleaned rather than replaced with --clean-structured-content.
STRUCTURED_TEXT = frozenset({0x0040A160, 0x00700006})  # Text Value (SR), Unformatted Text Value (waveform annotation)

Profile = Literal["basic", "kaapana"]
DateMode = Literal["profile", "full", "shift"]
BurnedIn = Literal["warn", "fail", "ignore"]
Pseudonyms = Literal["hex", "realistic"]
Mode = Literal["bulk", "single_slice"]
TextMode = Literal["", "dummy", "clean"]


# --------------------------------------------------------------------------- the table, as data

@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1: the Basic Profile action and the action under each option that changes it."""

    name: str
    basic: str
    options: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    exact: dict[int, Row]
    masks: tuple[tuple[int, int, Row], ...]  # (mask, value, row): tag & mask == value

    def lookup(self, tag: int) -> Row | None:
        row = self.exact.get(tag)
        if row is not None:
            return row
        for mask, value, masked_row in self.masks:
            if tag & mask == value:
                return masked_row
        return None


@cache
def load_table() -> Table:
    """Table E.1-1 from the package data (the private-attributes row is handled in code)."""
    text = resources.files("kaapcli.data").joinpath("ps315_annex_e.tsv").read_text(encoding="utf-8")
    exact: dict[int, Row] = {}
    masks: list[tuple[int, int, Row]] = []
    header: list[str] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        cells = line.split("\t")
        if not header:
            header = cells
            continue
        record = dict(zip(header, cells, strict=True))
        row = Row(record["name"], record["basic"],
                  tuple((col, record[col]) for col in OPTION_COLUMNS if record[col]))
        digits = record["tag"].replace(",", "").upper()
        if digits.startswith("G"):
            continue
        if "X" in digits:
            mask = int("".join("0" if c == "X" else "F" for c in digits), 16)
            masks.append((mask, int(digits.replace("X", "0"), 16), row))
        else:
            exact[int(digits, 16)] = row
    return Table(exact, tuple(masks))


def load_kaapana_tags() -> tuple[int, ...]:
    """The 45 tags Kaapana's LocalDcmAnonymizerOperator erases with ``dcmodify --erase-all``."""
    text = resources.files("kaapcli.data").joinpath("kaapana_anonymize_tags.tsv").read_text(encoding="utf-8")
    return tuple(int(line.split("\t")[0].replace(",", ""), 16) for line in text.splitlines()
                 if line and not line.startswith("#"))


@cache
def load_names() -> dict[str, tuple[str, ...]]:
    """Our list of common family and given names (by sex) for realistic pseudonyms: kind -> names."""
    text = resources.files("kaapcli.data").joinpath("pseudonym_names.tsv").read_text(encoding="utf-8")
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            kind, name = line.split("\t")[:2]
            names.setdefault(kind, []).append(name.strip().upper())
    return {kind: tuple(values) for kind, values in names.items()}


def load_safe_private() -> frozenset[tuple[str, int, int]]:
    """(private creator, group, element offset) triples kept by --retain-safe-private."""
    text = resources.files("kaapcli.data").joinpath("safe_private.tsv").read_text(encoding="utf-8")
    out = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            creator, group, offset = line.split("\t")[:3]
            out.add((creator.strip(), int(group, 16), int(offset, 16)))
    return frozenset(out)


# --------------------------------------------------------------------------- options and keyed derivations

@dataclass(frozen=True)
class Options:
    """Everything that shapes the output except the key."""

    profile: Profile = "basic"
    dates: DateMode = "profile"
    retain_uids: bool = False
    retain_device: bool = False
    retain_institution: bool = False
    retain_patient_characteristics: bool = False
    retain_safe_private: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    pseudonyms: Pseudonyms = "hex"
    keep: tuple[int, ...] = ()
    replace: tuple[tuple[int, str], ...] = ()
    id_prefix: str = "ANON-"
    burned_in: BurnedIn = "warn"
    name: str = DEFAULT_NAME

    def selected(self) -> list[str]:
        """The option columns of Table E.1-1 in force."""
        chosen = [col for col in ("retain_uids", "retain_device", "retain_institution",
                                  "retain_patient_characteristics", "retain_safe_private", "clean_descriptors",
                                  "clean_structured_content") if getattr(self, col)]
        if self.dates == "full":
            chosen.append("retain_long_full_dates")
        elif self.dates == "shift":
            chosen.append("retain_long_modified_dates")
        return chosen


class Keyed:
    """The keyed, deterministic derivations: one HMAC-SHA256 per purpose, prefixed so purposes never collide."""

    def __init__(self, key: bytes):
        self._key = key
        self._uids: dict[str, str] = {}  # a series repeats its study, series and frame UIDs in every file

    def digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        mapped = self._uids.get(original)
        if mapped is None:
            mapped = self._uids[original] = "2.25." + str(int.from_bytes(self.digest("uid", original)[:16], "big"))
        return mapped

    def patient(self, original_id: str, prefix: str) -> str:
        return prefix + self.digest("patient", original_id).hex()[:16].upper()

    def accession(self, original: str) -> str:
        return self.digest("accession", original).hex()[:16].upper()  # SH: at most 16 characters

    def day_offset(self, original_id: str) -> int:
        """Days to move this patient's dates back: 1..3652 (up to ten years), one value per patient."""
        return 1 + int.from_bytes(self.digest("dates", original_id)[:8], "big") % 3652

    def birth_jitter(self, original_id: str) -> int:
        """Days to move a realistic birth date by when the other dates are kept: -90..90 (GUIDMint's spread)."""
        return int.from_bytes(self.digest("birth", original_id)[:8], "big") % 181 - 90

    def realistic_name(self, original_id: str, sex: str) -> str:
        """A reproducible fake ``FAMILY^GIVEN^M`` name of the recorded sex (either list when it is not M or F)."""
        names = load_names()
        given = {"M": names["male"], "F": names["female"]}.get(sex, names["male"] + names["female"])
        digest = self.digest("name", original_id)
        family = names["family"][int.from_bytes(digest[:8], "big") % len(names["family"])]
        first = given[int.from_bytes(digest[8:16], "big") % len(given)]
        return f"{family}^{first}^{chr(ord('A') + digest[16] % 26)}"

    def fingerprint(self) -> str:
        return self.digest("fingerprint", "")[:8].hex()


def is_well_known_uid(value: str) -> bool:
    from pydicom.uid import UID_dictionary

    return value.startswith("1.2.840.10008.") or value in UID_dictionary


# --------------------------------------------------------------------------- applying the profile

@dataclass
class Run:
    """The state of de-identifying one dataset: decisions made, identifying strings seen, lines for --dry-run."""

    options: Options
    keyed: Keyed
    patient_basis: str
    phi_strings: tuple[str, ...]
    patient: dict[int, str] = field(default_factory=dict)  # original sex, birth date, age, study date
    lines: list[str] = field(default_factory=list)
    safe_private: frozenset[tuple[str, int, int]] = frozenset()
    verbose: bool = False  # collect per-element lines (for --dry-run only: they cost time)
    actions: dict[tuple[int, str], str] = field(default_factory=dict)  # shared by the operator's runs

    def action(self, tag: int, vr: str) -> str:
        """The action for an element: it depends only on tag, VR and options, so it is worked out once."""
        key = (tag, vr)
        found = self.actions.get(key)
        if found is None:
            found = self.actions[key] = action_for(tag, vr, self.options)
        return found

    def note(self, depth: int, tag: int, action: str, detail: str = "") -> None:
        if not self.verbose:
            return
        line = f"{'  ' + '>' * depth}{dicom.tag_label(tag):<48} {action:<6} {detail}"
        self.lines.append(line.rstrip())


def resolve(row: Row, options: Options) -> str:
    """The effective action code of a row under the selected options: K beats C beats the option's own code."""
    selected = set(options.selected())
    codes = [code for col, code in row.options if col in selected]
    for preferred in ("K", "C"):
        if preferred in codes:
            return preferred
    return codes[0] if codes else row.basic


def conditional(code: str) -> str:
    """A conditional code resolved to the conformance-safe variant (we do not know each attribute's IOD type)."""
    if code == "X/Z":
        return "Z"
    if code in ("X/D", "X/Z/D", "Z/D"):
        return "D"
    if code == "X/Z/U*":
        return "U*"
    return code


def _keep_present(tag: int, code: str) -> str:
    return "Z" if code == "X" and tag in PRESENT_WHEN_REMOVED else code


def action_for(tag: int, vr: str, options: Options) -> str:
    """The action code for an element with this tag and VR (a UI element's U still keeps well-known UIDs)."""
    if tag in options.keep:
        return "K"
    if tag in dict(options.replace):
        return "R"
    if (tag >> 16) % 2 == 1:
        return "X"  # private: safe private elements are decided by the caller
    if tag & 0xFFFF == 0x0000:
        return "X"  # group lengths: stale after editing, retired anyway
    if tag in (PATIENT_ID, PATIENT_NAME):
        return "P"
    if tag == ACCESSION:
        return "A"
    if tag == BIRTH_DATE and options.pseudonyms == "realistic":
        return "B"
    row = load_table().lookup(tag)
    if row is not None:
        code = _keep_present(tag, conditional(resolve(row, options)))
        return "C" if code == "D" and tag in STRUCTURED_TEXT and options.clean_structured_content else code
    if tag >> 16 in IDENTITY_GROUPS:
        if tag in UNLISTED_CHARACTERISTICS:
            return "K" if options.retain_patient_characteristics else "X"
        return UNLISTED_IDENTITY_ACTIONS.get(tag, "X")
    if vr == "PN":
        return "D"  # a person's name the table does not list yet: present, but nobody's
    if vr in ("DA", "DT"):
        return {"full": "K", "shift": "C"}.get(options.dates, "D")
    if vr == "UI":
        return "K" if options.retain_uids or _names_class_uid(tag) else "U"
    if tag in STRUCTURED_TEXT and options.clean_structured_content:
        return "C"
    return "K"


def _names_class_uid(tag: int) -> bool:
    """Whether a UI attribute names a class, scheme or context rather than an instance."""
    from pydicom.datadict import keyword_for_tag

    return bool(NOT_INSTANCE_UID.search(keyword_for_tag(tag)))


def _remappable(elem: Any) -> bool:
    """Whether a UI element holds instance UIDs (not a class, scheme or other well-known UID)."""
    if _names_class_uid(int(elem.tag)):
        return False
    values = elem.value if elem.VM > 1 else [elem.value]
    return any(v and not is_well_known_uid(str(v)) for v in values)


def deidentify(ds: Any, run: Run, depth: int = 0, text_mode: TextMode = "") -> None:
    """Apply the profile to ``ds`` in place, recursing into sequence items.  ``text_mode`` is how the free text of
    kept elements is treated inside a sequence whose action is D (``dummy``) or C (``clean``)."""
    kept_private = _kept_private(ds, run) if run.options.retain_safe_private else set()
    dropped_overlays = _removed_overlay_groups(ds, run)
    for tag in list(ds.keys()):
        if tag.group in dropped_overlays:
            run.note(depth, tag, "X", "overlay removed with its Overlay Data")
            del ds[tag]
            continue
        if tag.is_private and tag in kept_private:
            run.note(depth, tag, "K", "safe private")
            continue
        vr = element_vr(ds, tag)
        action = run.action(tag, vr)
        if action == "K" and text_mode and vr in TEXT_VRS and tag not in CODE_ATTRIBUTES:
            action = "D" if text_mode == "dummy" else "C"
        if action == "X":
            run.note(depth, tag, "X", "remove")
            del ds[tag]
        elif action == "K" and vr != "SQ":
            run.note(depth, tag, "K")  # not even decoded: pydicom writes the bytes as read
        elif not _replace_raw(ds, tag, vr, action, run, depth):
            _apply(ds[tag], action, run, depth, text_mode)


def _replace_raw(ds: Any, tag: Any, vr: str, action: str, run: Run, depth: int) -> bool:
    """Z, D and P values do not depend on the old one, and U values only on its ASCII text: a raw element (read
    with an explicit VR) is replaced by a new one without pydicom decoding and validating the old value."""
    if action not in ("Z", "D", "P", "U", "U*") or vr in ("SQ", "UN"):
        return False
    raw = ds.get_item(tag)
    if not getattr(raw, "is_raw", False) or raw.VR is None:
        return False
    from pydicom.dataelem import DataElement

    if action == "Z":
        value: Any = None if vr not in ("OB", "OW") else b""
        how = "Z", "empty"
    elif action == "D":
        value, how = _dummy_value(vr), ("D", "dummy")
    elif action == "P":
        value, how = pseudonym(run, int(tag)), ("Z->D", "keyed pseudonym" if run.options.pseudonyms == "hex"
                                                or int(tag) == PATIENT_ID else "keyed realistic name")
    elif vr != "UI":
        value, how = _dummy_value(vr), ("U", "keyed UID")
    else:
        uids = [v.strip(" \0") for v in raw.value.decode("latin-1").split("\\")] if raw.value else []
        if _names_class_uid(int(tag)) or not any(u and not is_well_known_uid(u) for u in uids):
            run.note(depth, tag, "K", "well-known UID")
            return True
        mapped = [u if not u or is_well_known_uid(u) else run.keyed.uid(u) for u in uids]
        value, how = mapped if len(mapped) > 1 else mapped[0], ("U", "keyed UID")
    ds[tag] = DataElement(tag, vr, value)
    run.note(depth, tag, *how)
    return True


def element_vr(ds: Any, tag: Any) -> str:
    """The VR of an element, without decoding its value when the file states it explicitly.  Implicit VR and
    UN elements are decoded: pydicom then takes the VR from the dictionary, and so must the action."""
    vr = ds.get_item(tag).VR
    return vr if vr not in (None, "UN") else ds[tag].VR


def _apply(elem: Any, action: str, run: Run, depth: int, text_mode: TextMode) -> None:
    tag = int(elem.tag)
    if elem.VR == "SQ":
        if action == "Z":
            run.note(depth, tag, "Z", "empty sequence")
            elem.value = []
            return
        inner: TextMode = "dummy" if action == "D" or text_mode == "dummy" else \
            "clean" if action == "C" or text_mode == "clean" else ""
        label = {"dummy": "keep codes, dummy free text", "clean": "keep codes, clean free text"}.get(
            inner, "keep items, replace UIDs" if action == "U*" else "keep items")
        run.note(depth, tag, action, f"{label} ({len(elem.value)})")
        for item in elem.value:
            deidentify(item, run, depth + 1, inner)
        return
    if action == "K":
        run.note(depth, tag, "K")
    elif action == "R":
        elem.value = dict(run.options.replace)[tag]
        run.note(depth, tag, "R", "replaced as asked")
    elif action == "P":
        elem.value = pseudonym(run, tag)
        run.note(depth, tag, "Z->D", "keyed pseudonym" if run.options.pseudonyms == "hex" or tag == PATIENT_ID
                 else "keyed realistic name")
    elif action == "B":
        elem.value = realistic_birth_date(run)
        run.note(depth, tag, "Z->D", "realistic birth date (moved by the patient's offset)" if elem.value
                 else "empty (no birth date or age to move)")
    elif action == "A":
        if elem.value:
            elem.value = run.keyed.accession(str(elem.value))
        run.note(depth, tag, "Z->D", "keyed pseudonym" if elem.value else "empty")
    elif action in ("U", "U*"):
        if elem.VR == "UI" and not _remappable(elem):
            run.note(depth, tag, "K", "well-known UID")
        else:
            elem.value = _map_uids(elem, run)
            run.note(depth, tag, "U", "keyed UID")
    elif action == "Z":
        elem.value = None if elem.VR not in ("OB", "OW", "UN") else b""
        run.note(depth, tag, "Z", "empty")
    elif action == "D":
        elem.value = _dummy(elem)
        run.note(depth, tag, "D", "dummy")
    elif action == "C":
        cleaned, how = _clean(elem, run)
        elem.value = cleaned
        run.note(depth, tag, "C", how)
    else:  # pragma: no cover - the table only holds the codes above
        raise DataError(f"unknown action code {action!r} for {dicom.tag_label(tag)}")


def _map_uids(elem: Any, run: Run) -> Any:
    if elem.VR != "UI":
        return _dummy(elem)

    def one(uid: str) -> str:
        uid = str(uid).strip().rstrip("\0")
        return uid if not uid or is_well_known_uid(uid) else run.keyed.uid(uid)

    values = elem.value if elem.VM > 1 else [elem.value] if elem.value else []
    mapped = [one(v) for v in values]
    return mapped if elem.VM > 1 else (mapped[0] if mapped else elem.value)


def _dummy(elem: Any) -> Any:
    return _dummy_value(elem.VR)


def _dummy_value(vr: str) -> Any:
    if vr == "UI":
        return None  # never invent a UID that could collide; UI rows are U in the table anyway
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    if vr in TEXT_VRS or vr == "UC":
        return DUMMY_TEXT if vr != "SH" and vr != "AE" else DUMMY_TEXT[:16]
    return DUMMY_BY_VR.get(vr, DUMMY_TEXT)


def pseudonym(run: Run, tag: int) -> str:
    """The keyed pseudonym of PatientID, or of PatientName (``ANON-<hex>``, or a realistic fake name)."""
    if tag == PATIENT_NAME and run.options.pseudonyms == "realistic":
        return run.keyed.realistic_name(run.patient_basis, run.patient.get(PATIENT_SEX, "").strip().upper())
    return run.keyed.patient(run.patient_basis, run.options.id_prefix)


def realistic_birth_date(run: Run) -> str:
    """The birth date moved as the patient's other dates are (``shift``), so ages stay exact; by -90..90 days when
    dates are kept (``full``).  Without a birth date it is inferred, as GUIDMint does, from age and study date."""
    born = _parse_date(run.patient.get(BIRTH_DATE, ""))
    if born is None:
        age, studied = run.patient.get(PATIENT_AGE, ""), _parse_date(run.patient.get(STUDY_DATE, ""))
        if studied is None or not re.fullmatch(r"\d{3}Y", age):
            return ""
        born = studied - dt.timedelta(days=round(int(age[:3]) * 365.25))
    if run.options.dates == "full":
        moved = born + dt.timedelta(days=run.keyed.birth_jitter(run.patient_basis))
    else:
        moved = born - dt.timedelta(days=run.keyed.day_offset(run.patient_basis))
    return moved.strftime("%Y%m%d") if moved.year >= 1 else ""


def _parse_date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _clean(elem: Any, run: Run) -> tuple[Any, str]:
    if elem.VR in ("DA", "DT"):
        if run.options.dates != "shift":
            return elem.value, "kept"
        return _shift(elem, run.keyed.day_offset(run.patient_basis)), "date shifted"
    if elem.VR == "TM":
        return elem.value, "kept (dates move by whole days)"
    if elem.VR == "CS":
        return elem.value, "kept (a defined term)"
    if elem.VR not in TEXT_VRS:
        return _dummy(elem), "dummy (binary: cannot be cleaned)"
    from kaapcli.core.phi_scan import free_text_pattern

    text = str(elem.value or "")
    if any(s in text.lower() for s in run.phi_strings):
        return _dummy(elem), "identifying text replaced"
    found = free_text_pattern(text)
    if found:
        return _dummy(elem), f"text replaced ({found} in it)"
    return elem.value, "kept (no identifying text found)"


def _shift(elem: Any, days: int) -> Any:
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    out = []
    for value in values:
        text = str(value or "")
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date() - dt.timedelta(days=days)
        except ValueError:
            out.append(DUMMY_BY_VR[elem.VR] if text else text)  # partial or damaged: no safe shift
            continue
        out.append(day.strftime("%Y%m%d") + text[8:])
    return out if elem.VM > 1 else out[0]


def _removed_overlay_groups(ds: Any, run: Run) -> set[int]:
    """Overlay groups whose Overlay Data (60xx,3000) goes: the whole Overlay Plane goes with it, as a plane
    without its data is a Type 1 violation."""
    groups = set()
    for tag in ds.keys():
        group = tag.group
        if 0x6000 <= group <= 0x601E and group % 2 == 0 and tag.element == 0x3000 \
                and run.action(tag, element_vr(ds, tag)) == "X":
            groups.add(group)
    return groups


def _kept_private(ds: Any, run: Run) -> set[int]:
    """Private tags of ``ds`` in the safe list, plus the creator elements they need."""
    kept: set[int] = set()
    for elem in ds:
        if not elem.tag.is_private or elem.tag.element < 0x1000:
            continue
        creator_tag = (elem.tag.group << 16) | (elem.tag.element >> 8)
        creator = ds.get(creator_tag)
        if creator is not None and (str(creator.value).strip(), elem.tag.group, elem.tag.element & 0xFF) \
                in run.safe_private:
            kept.update((int(elem.tag), creator_tag))
    return kept


def identifying_strings(ds: Any) -> tuple[str, ...]:
    """Lower-cased identifying strings of a dataset, for cleaning free text: every PN value (and its name
    components), patient IDs, birth date, accession and institution."""
    found: set[str] = set()

    def walk(d: Any) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "PN" or int(elem.tag) in (PATIENT_ID, ACCESSION, 0x00100030, 0x00101000, 0x00080080,
                                                     0x00080081):
                values = elem.value if elem.VM > 1 else [elem.value]
                for value in values:
                    text = str(value or "").strip().lower()
                    parts = re.split(r"[\^=\s,]+", text) if elem.VR == "PN" else [text]
                    found.update(p for p in [text, *parts] if len(p) >= 3)

    walk(ds)
    return tuple(sorted(found))


def mark(ds: Any, options: Options) -> None:
    """PS3.15 E.1.1 conformance markers: identity removed, method text and CID 7050 codes, temporal status."""
    methods, codes = _markers(options)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = list(methods)
    ds.DeidentificationMethodCodeSequence = codes  # one Sequence for every file: only ever written, never edited
    ds.LongitudinalTemporalInformationModified = {"full": "UNMODIFIED", "shift": "MODIFIED"}.get(options.dates,
                                                                                                  "REMOVED")


@cache
def _markers(options: Options) -> tuple[tuple[str, ...], Any]:
    """DeidentificationMethod texts and the CID 7050 code items for a set of options, built once per process."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    names = [n for n in ("basic", *options.selected()) if n in METHOD_CODES]
    methods = [f"kaapcli: {METHOD_CODES[n][1]}"[:64] for n in names]
    if options.pseudonyms == "realistic":
        methods.append("kaapcli: realistic pseudonyms (keyed names, moved birth dates)")
    items = []
    for n in names:
        item = Dataset()
        item.CodeValue, item.CodeMeaning = METHOD_CODES[n]
        item.CodingSchemeDesignator = "DCM"
        items.append(item)
    return tuple(methods), Sequence(items)


# Character sets whose text is decoded by kaapcli straight from the raw bytes, without pydicom's
# per-element conversion (which validates every value); any other set goes through pydicom.
RAW_ENCODINGS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


def raw_encoding(ds: Any, parent: str | None) -> str | None:
    """The codec for the raw text of ``ds`` (its own Specific Character Set, else its parent's), or None."""
    raw = ds.get_item(0x00080005)
    if raw is None:
        return parent
    value = raw.value if not getattr(raw, "is_raw", False) else raw.value.decode("latin-1").strip(" \0")
    return RAW_ENCODINGS.get(str(value).strip() if not isinstance(value, list) else "?")


def original_text(ds: Any, tag: int) -> str:
    """A top-level value as text ('' when absent): from its raw bytes where the character set allows (it stays
    undecoded for the profile to replace), else through pydicom."""
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    if getattr(raw, "is_raw", False) and raw.VR in ("UI", "LO", "SH", "CS", "PN"):
        encoding = "latin-1" if raw.VR == "UI" else raw_encoding(ds, "latin-1")
        if encoding:
            return raw.value.decode(encoding, "replace").strip(" \0") if raw.value else ""
    value = ds[tag].value
    return str(value) if value else ""


def already_deidentified(ds: Any) -> bool:
    """Whether kaapcli de-identified this dataset already (its markers say so): ``in_place`` never does it twice,
    which would map the UIDs a second time."""
    if str(ds.get("PatientIdentityRemoved", "") or "").upper() != "YES" or METHOD not in ds:
        return False
    elem = ds[METHOD]
    return any(str(m).startswith("kaapcli:") for m in (elem.value if elem.VM > 1 else [elem.value]))


def burned_in_reason(ds: Any, has_pixels: bool = False) -> str:
    """Why the pixels may carry burned-in text ('' when nothing suggests it)."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    content = has_pixels or any(k in ds for k in ("PixelData", "FloatPixelData", "EncapsulatedDocument"))
    if flag == "NO" or not content:
        return ""
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality in BURNED_IN_MODALITIES:
        return f"BurnedInAnnotation absent and modality is {modality}"
    if sop_class.startswith(BURNED_IN_SOP_PREFIXES):
        return f"BurnedInAnnotation absent and SOP class {sop_class} often carries burned-in text"
    return ""


# --------------------------------------------------------------------------- the re-identification map

_MAP_CONNECTIONS: dict[str, sqlite3.Connection] = {}


def init_map(path: Path) -> None:
    """Create the map (WAL mode, table) once, in the parent: switching the journal mode needs an exclusive
    lock that concurrent workers would fight over ("database is locked") before the busy timeout applies.

    The map links pseudonyms to identities, so it is readable by its owner only (0600), and so are its -wal and
    -shm files, which SQLite creates with the database file's permissions."""
    fsio.ensure_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if part.exists():
                os.chmod(part, 0o600)  # an existing map made by an older kaapcli, or by hand
    except OSError as exc:
        raise CantCreateError(f"--map {path}: cannot create: {exc.strerror}") from exc
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS pseudonyms (kind TEXT NOT NULL, original TEXT NOT NULL, "
                    "pseudonym TEXT NOT NULL, PRIMARY KEY (kind, original))")
        con.commit()


def check_destinations(out: Path | None, map_path: Path | None, inputs: Iterable[Path]) -> None:
    """Refuse, before any work: an output tree that is an input or holds one (anonymize never writes over its
    inputs unless told to with ``in_place``), and a map inside the de-identified tree (it holds the identities
    the tree must not hold) or inside an input (which ``in_place`` de-identifies)."""
    roots = [p.resolve() for p in inputs]
    if out is not None:
        out_dir = out.resolve()
        for root in roots:
            if root.is_relative_to(out_dir):
                raise UsageError(f"{root}: input is inside the output directory {out}",
                                 hint="write to another directory, or pass --in-place to overwrite the inputs")
    if map_path is None:
        return
    where = map_path.resolve()
    if out is not None and where.is_relative_to(out.resolve()):
        raise UsageError(f"--map {map_path} is inside the output directory {out}: the de-identified tree would "
                         "hold the identities", hint="keep the map outside the tree you share")
    for root in roots:
        if where == root or root.is_dir() and where.is_relative_to(root):
            raise UsageError(f"--map {map_path} is inside the input {root}", hint="keep the map outside the data")


def record_map(path: Path, rows: Iterable[tuple[str, str, str]]) -> None:
    """Add (kind, original, pseudonym) rows to the map made by :func:`init_map`; workers write concurrently."""
    key = str(path)
    con = _MAP_CONNECTIONS.get(key)
    if con is None:
        con = _MAP_CONNECTIONS[key] = sqlite3.connect(path, timeout=60)
    with con:
        con.executemany("INSERT OR IGNORE INTO pseudonyms VALUES (?, ?, ?)", list(rows))


# --------------------------------------------------------------------------- the operator

class AnonymizeOperator(BaseOperator):
    """De-identify one file: read, guard burned-in text, apply the profile, write ``<new UIDs>.dcm`` (or over the
    input, atomically, with ``in_place``).  With ``single_slice`` an item is a series, of which only the first file
    (in path order) is de-identified, as Kaapana's anonymizer does for quick checks."""

    name = "anonymize"
    supports_dry_run = True

    def __init__(self, key: bytes, options: Options, map_path: Path | None = None, *, in_place: bool = False,
                 single_slice: bool = False):
        if not key:
            raise UsageError("an empty key is not a key")
        self.keyed = Keyed(key)
        self.opts = options
        self.map_path = map_path
        self.in_place = in_place
        self.grouped = single_slice
        if map_path is not None:
            init_map(map_path)
        self.kaapana_tags = load_kaapana_tags() if options.profile == "kaapana" else ()
        self.safe_private = load_safe_private() if options.retain_safe_private else frozenset()
        self.actions: dict[tuple[int, str], str] = {}  # (tag, VR) -> action, filled as tags are met
        # Import pydicom (~0.3 s) and parse the table once here in the parent: forked workers inherit both.
        dicom.import_pydicom()
        load_table()

    def options(self) -> dict[str, Any]:
        # The key enters only as a keyed digest: a new key makes old outputs stale without storing the key.
        return {"options": repr(self.opts), "key": self.keyed.fingerprint(), "map": str(self.map_path or ""),
                "single_slice": self.grouped}

    def group_key(self, path: Path) -> str | None:
        """single_slice: the series of a file, as its keyed UID (item labels and logs never show the original)."""
        ds = dicom.read(path, stop_before_pixels=True, specific_tags=[SERIES_UID])
        return self.keyed.uid(str(ds.get("SeriesInstanceUID", "") or path))

    def process(self, item: Item, ctx: Context) -> Outcome:
        path = item.paths[0]
        with dicom.collect_warnings() as notes:
            ds, pixels = read_header(path)
        dicom.check_complete(ds, notes)  # a truncated input fails; nothing is written
        if self.in_place and already_deidentified(ds):
            return Outcome(skipped=True, message="already de-identified by kaapcli: left as it is")
        with dicom.collect_warnings() as later:
            outcome = self._deidentify_file(ds, ctx, path, pixels)
        problems = [*notes, *later]
        if problems and ctx.debug:
            outcome.warnings.extend(problems)
        elif problems:  # pydicom's messages quote raw values (names, IDs): count them, never echo them
            outcome.warnings.append(f"{len(problems)} non-conformant value(s) in the input, written as read "
                                    "(values not shown; --debug shows them)")
        if len(item.paths) > 1:
            outcome.message = outcome.message or f"single slice: 1 of the series' {len(item.paths)} files"
        return outcome

    def _deidentify_file(self, ds: Any, ctx: Context, path: Path, pixels: tuple[int, int] | None) -> Outcome:
        originals = {t: original_text(ds, t) for t in
                     (STUDY_UID, SERIES_UID, SOP_INSTANCE_UID, PATIENT_ID, PATIENT_NAME, ACCESSION)}
        if not originals[SOP_INSTANCE_UID]:
            raise DataError("missing SOPInstanceUID", hint="not a composite instance; nothing to name it by")
        warnings: list[str] = []
        reason = burned_in_reason(ds, has_pixels=pixels is not None and pixels[1] > pixels[0])
        if reason and self.opts.burned_in == "fail":
            raise DataError(f"possible burned-in text: {reason}",
                            hint="clean the pixel data first, or pass --burned-in warn|ignore")
        if reason and self.opts.burned_in == "warn":
            warnings.append(f"possible burned-in text in the pixel data ({reason}); pixels are not cleaned")

        patient_basis = originals[PATIENT_ID] or originals[PATIENT_NAME] or originals[STUDY_UID]
        run = Run(self.opts, self.keyed, patient_basis, identifying_strings(ds) if self.opts.selected() else (),
                  patient={t: str(ds.get(t).value or "") for t in (PATIENT_SEX, BIRTH_DATE, PATIENT_AGE, STUDY_DATE)
                           if t in ds} if self.opts.pseudonyms == "realistic" else {},
                  safe_private=self.safe_private, verbose=ctx.dry_run, actions=self.actions)
        if self.opts.profile == "kaapana":
            self._kaapana(ds, run)
        else:
            deidentify(ds, run)
            self._add_replacements(ds, run)
            mark(ds, self.opts)
        meta = self._file_meta(ds)

        if self.in_place:
            dest = path
        else:
            dest = ctx.out / self._name(ds) if ctx.out is not None else self._name(ds)
        if ctx.dry_run:
            return Outcome(message=f"would write {dest}\n" + "\n".join(run.lines), warnings=warnings)
        if pixels is None:
            ds.file_meta, ds.preamble = dicom.file_meta(*meta), b"\0" * 128
            dicom.save(ds, dest)
        else:
            write_spliced(ds, meta, path, pixels, dest)
        if self.map_path is not None:
            record_map(self.map_path, self._map_rows(originals, ds, patient_basis))
        return Outcome(outputs=[dest], warnings=warnings)

    def _kaapana(self, ds: Any, run: Run) -> None:
        """Kaapana's way: its 45 tags wherever they occur, nothing else.  Kaapana erases them all, which leaves
        objects without SOP, Study and Series Instance UIDs; here UIDs are replaced by keyed ones instead
        (references keep pointing at the remapped objects) and the attributes an IOD needs present (Type 1 and 2:
        patient name, ID and birth date, accession, referring physician, operators, ROI interpreter, reviewer, SR person
        names) are emptied or given a dummy rather than removed."""
        tags = set(self.kaapana_tags)

        def erase(d: Any, depth: int) -> None:
            for tag in list(d.keys()):
                if int(tag) in tags:
                    vr = element_vr(d, tag)
                    action = "U" if vr == "UI" else KAAPANA_PRESENT.get(int(tag), "X")
                    if action == "X":
                        run.note(depth, int(tag), "X", "erased (kaapana)")
                        del d[tag]
                    else:
                        _apply(d[tag], action, run, depth, "")
                elif d.get_item(tag).VR == "SQ" or element_vr(d, tag) == "SQ":
                    for item in d[tag].value:
                        erase(item, depth + 1)

        erase(ds, 0)

    def _add_replacements(self, ds: Any, run: Run) -> None:
        """--replace of an attribute the input lacks: add it at the top level."""
        from pydicom.datadict import dictionary_VR

        for tag, value in self.opts.replace:
            if tag not in ds:
                try:
                    ds.add_new(tag, dictionary_VR(tag), value)
                except KeyError:
                    raise UsageError(f"--replace {dicom.tag_label(tag)}: not in the DICOM dictionary, "
                                     "cannot add it") from None
                run.note(0, tag, "R", "added as asked")

    def _file_meta(self, ds: Any) -> tuple[str, str, str]:
        """The fresh file meta group's class, new instance UID and transfer syntax (kaapcli's implementation UID
        joins them when it is encoded)."""
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        old = getattr(ds, "file_meta", None)
        syntax = old.get("TransferSyntaxUID") if old is not None else None
        if not syntax:
            implicit, little = getattr(ds, "original_encoding", (False, True))
            syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        sop_class = ds.get("SOPClassUID") or (old.get("MediaStorageSOPClassUID") if old else "")
        return str(sop_class), str(ds.SOPInstanceUID), str(syntax)

    def _name(self, ds: Any) -> Path:
        name = fsio.render_template(self.opts.name, dicom.template_values(ds, self.opts.name))
        return name if name.suffix else name.with_suffix(".dcm")

    def _map_rows(self, originals: dict[int, str], ds: Any, patient_basis: str) -> list[tuple[str, str, str]]:
        rows = [("patient_id", originals[PATIENT_ID], str(ds.get("PatientID", "") or "")),
                ("patient_name", originals[PATIENT_NAME], str(ds.get("PatientName", "") or ""))]
        if originals[ACCESSION]:
            rows.append(("accession", originals[ACCESSION], str(ds.get("AccessionNumber", "") or "")))
        if originals[STUDY_UID] and not self.opts.retain_uids:
            rows.append(("study_uid", originals[STUDY_UID], self.keyed.uid(originals[STUDY_UID])))
        if self.opts.dates == "shift":
            rows.append(("date_shift_days", patient_basis, str(-self.keyed.day_offset(patient_basis))))
        return rows


def parse_replace(text: str) -> tuple[int, str]:
    """``TAG=VALUE`` for --replace."""
    tag_text, sep, value = text.partition("=")
    if not sep:
        raise UsageError(f"--replace {text!r}: expected TAG=VALUE", hint="e.g. --replace PatientName=TRIAL01")
    return dicom.parse_tag(tag_text), value
