"""Residual-identifier scanner (``kaapcli phi-scan``): what a de-identified tree still tells about its people.

Steps:

1. from the originals (optional): collect the values of their identifying attributes (every element whose
   Table E.1-1 action under the Basic Profile is not K, every person name and its name components, instance
   UIDs, dates also in the forms people write them), minus tokens that also occur in attributes the profile
   keeps (a manufacturer's name is not a patient's), plus the tokens the profile keeps, to recognise them later;
2. walk the tree, hidden files and directories included (symbolic links are reported by their target, not
   followed);
3. per file (in the batch engine's worker pool): its path below the root (file and folder names); for a DICOM
   file every element of the file meta and of the dataset, sequences included: private elements, burned-in
   annotation and recognisable-visual-features flags, the de-identification marker, values of the originals,
   identifying patterns (names, dates, IDs, and ``--patterns``) in free text; for any other file its bytes as
   text: values of the originals and patterns;
4. one :class:`Finding` per residual identifier.

Matching is by tokens (runs of letters and digits; dotted digit runs such as UIDs stay whole) looked up in hash
tables, so it costs the same whatever the number of originals.  This module never prints and never writes
anything; the values in findings are masked unless asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.anonymize import (
    CODE_ATTRIBUTES,
    Options,
    action_for,
    is_well_known_uid,
    load_table,
    raw_encoding,
)
from kaapcli.core.batch import BaseOperator, BatchOptions, Context, Item, ItemResult, Outcome, run_batch
from kaapcli.exitcodes import ConfigError, DataError, NoInputError

KINDS = ("identifier", "name", "uid", "date", "pattern", "private-tag", "burned-in", "visual-features",
         "unmarked", "unreadable")
TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")
FREE_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "PN"})
IDENTIFYING_VRS = frozenset({"AE", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UN", "UR", "UT"})
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                      "UR", "UT"})
# Tokens that occur in names and everywhere else, and the dummies de-identifiers write: never identifiers alone.
COMMON_TOKENS = frozenset({"MR", "MRS", "MS", "MISS", "DR", "PROF", "JR", "SR", "II", "III", "IV", "MD", "PHD",
                           "ANONYMIZED", "ANONYMOUS", "ANON", "UNKNOWN", "NONE", "NULL", "TEST", "PATIENT", "NAME",
                           "REMOVED", "YES", "NO", "DEMO", "PHANTOM"})
# Identifying patterns in free text (HIPAA Safe Harbor kinds: names, dates, record numbers, phone, e-mail, SSN).
# Header values and files are hostile input: every pattern starts only where a run begins (a lookbehind) and
# repeats boundedly, so a search costs time linear in the text, never quadratic.
DAY, MONTH, YEAR = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])", r"(?:19|20)\d\d"
FREE_TEXT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("date", re.compile(rf"(?<![\w.]){YEAR}[-/.]{MONTH}[-/.]{DAY}(?![\w.])|(?<![\w.]){DAY}[-/.]{MONTH}[-/.]{YEAR}"
                        rf"(?![\w.])|(?<![\w.]){MONTH}/{DAY}/{YEAR}(?![\w.])")),
    ("date", re.compile(r"(?<![\w.])(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?![\w.])")),
    ("person name", re.compile(r"(?<![A-Za-z'-])[A-Z][A-Za-z'-]{1,40}\^[A-Z]")),  # FAMILY^GIVEN, DICOM's own form
    ("person name", re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s{1,3}[A-Z][a-z]{1,40}")),
    ("ssn", re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")),
    ("e-mail", re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")),
    ("phone", re.compile(r"(?<![\w.])\+?\(?\d{2,4}\)?[ -]\d{3,4}[ -]\d{3,4}(?![\w.])")),
    ("record number", re.compile(r"(?<![\w.])\d{6,}(?![\w.])|\b(?:MRN|PID|ID)[:#]?\s{0,3}\d{4,}(?!\d)",
                                 re.IGNORECASE)),
)
MAX_FINDINGS_PER_FILE = 200


def free_text_pattern(text: str, extra: Iterable[tuple[str, re.Pattern[str]]] = ()) -> str:
    """The name of the first identifying pattern found in ``text`` ('' when none)."""
    for name, pattern in (*FREE_TEXT_PATTERNS, *extra):
        if pattern.search(text):
            return name
    return ""


def tokens(text: str) -> list[str]:
    return [t.upper() for t in TOKEN.findall(text)]


def mask(value: str) -> str:
    """A value with all but the first character of every run of letters or digits hidden."""
    return TOKEN.sub(lambda m: m.group(0)[0] + "*" * (len(m.group(0)) - 1), value)


def load_patterns(path: Path) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """``--patterns FILE``: one regular expression a line, optionally ``name<TAB>regex``; ``#`` starts a comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise NoInputError(f"--patterns {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"--patterns {path}: not UTF-8 text") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, regex = line.partition("\t")
        name, regex = (name.strip(), regex) if sep else (f"pattern {number}", line)
        try:
            out.append((name, re.compile(regex.strip())))
        except re.error as exc:
            raise ConfigError(f"--patterns {path}:{number}: {exc}", hint="one Python regular expression a line") \
                from None
    return tuple(out)


# --------------------------------------------------------------------------- findings

@dataclass(frozen=True)
class Finding:
    """One residual identifier: where it is, what kind, and (masked) what."""

    path: str
    kind: str
    where: str
    what: str
    value: str = ""

    def record(self) -> dict[str, str]:
        return asdict(self)


# --------------------------------------------------------------------------- identifiers of the originals

@dataclass
class Identifiers:
    """Values of the originals, as token sequences: ``single`` for one token, ``multi`` keyed by the first."""

    single: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (kind, attribute)
    multi: dict[str, list[tuple[tuple[str, ...], str, str]]] = field(default_factory=dict)
    kept: set[tuple[str, ...]] = field(default_factory=set)  # values (as tokens) of attributes the profile keeps

    def add(self, words: list[str], kind: str, attribute: str) -> None:
        if len(words) == 1:
            word = words[0]
            if word not in COMMON_TOKENS and len(word) >= (3 if word.isalpha() else 5 if word.isdigit() else 4):
                self.single.setdefault(word, (kind, attribute))
        elif len(words) > 1 and sum(map(len, words)) >= 4 and not set(words) <= COMMON_TOKENS:
            self.multi.setdefault(words[0], []).append((tuple(words), kind, attribute))

    def merge(self, other: dict[str, Any]) -> None:
        for word, (kind, attribute) in other["single"]:
            self.single.setdefault(word, (kind, attribute))
        for words, kind, attribute in other["multi"]:
            self.multi.setdefault(words[0], []).append((tuple(words), kind, attribute))
        self.kept.update(tuple(words) for words in other["kept"])

    def finish(self) -> None:
        """Drop what also occurs in an attribute the profile keeps (it proves nothing), and duplicates."""
        for first, entries in self.multi.items():
            self.multi[first] = list({e[0]: e for e in entries}.values())
        for value in self.kept:
            for i, word in enumerate(value):
                self.single.pop(word, None)
                if word in self.multi:
                    self.multi[word] = [e for e in self.multi[word] if value[i:i + len(e[0])] != e[0]]
        self.multi = {first: entries for first, entries in self.multi.items() if entries}
        self.kept = set()

    def __bool__(self) -> bool:
        return bool(self.single or self.multi)

    def find(self, words: list[str]) -> Iterator[tuple[str, str, str]]:
        """(matched text, kind, attribute) for every identifier among ``words``."""
        for i, word in enumerate(words):
            hit = self.single.get(word)
            if hit is not None:
                yield word, *hit
            for seq, kind, attribute in self.multi.get(word, ()):
                if tuple(words[i:i + len(seq)]) == seq:
                    yield " ".join(seq), kind, attribute


def date_forms(value: str) -> list[list[str]]:
    """A DA/DT value as the token sequences people write it in: 19710123, 1971-01-23, 23.01.1971, 01/23/1971."""
    text = value.strip()[:8]
    if not re.fullmatch(r"\d{8}", text):
        return []
    y, m, d = text[:4], text[4:6], text[6:]
    forms = [[text], [y, m, d], [d, m, y], [m, d, y], [f"{y}.{m}.{d}"], [f"{d}.{m}.{y}"]]
    if value.strip() != text and value.strip().isdigit():
        forms.append([value.strip()])  # the DateTime as written
    return forms


def element_texts(elem: Any) -> list[str]:
    """The string values of a decoded non-sequence element; bytes of unknown VRs decoded as text."""
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, bytes | bytearray):
        return [bytes(value).decode("utf-8", "replace")] if elem.VR in ("UN", "UT", "ST", "LT") else []
    if elem.VR not in TEXT_VRS:
        return []
    values = value if elem.VM > 1 else [value]
    return [str(v).strip() for v in values if str(v).strip()]


def dataset_values(ds: Any, encoding: str | None = "latin-1") -> Iterator[tuple[Any, str, list[str], Any]]:
    """(tag, VR, string values, the element) for every element of ``ds`` (not into sequences: the caller recurses
    into ``ds[tag].value`` for VR SQ).  Text is decoded from the raw bytes when the character set allows."""
    from pydicom.datadict import dictionary_VR

    encoding = raw_encoding(ds, encoding)
    for elem in ds.elements():
        tag, vr = elem.tag, elem.VR
        if vr in (None, "UN") and not tag.is_private:  # implicit VR, or UN: pydicom would use the dictionary
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if getattr(elem, "is_raw", False) and encoding and vr in TEXT_VRS and vr != "SQ":
            text = elem.value.decode(encoding, "replace") if elem.value else ""
            values = [v.strip(" \0") for v in (text.split("\\") if vr not in ("LT", "ST", "UT", "UR") else [text])]
            yield tag, vr, [v for v in values if v], elem
        elif vr == "SQ" or tag.is_private:
            yield tag, vr, [], elem
        else:
            decoded = ds[tag]
            yield tag, decoded.VR, element_texts(decoded), decoded


_ACTIONS: dict[tuple[int, str], str] = {}  # (tag, VR) -> the Basic Profile's action, as it is met


@cache
def is_descriptor(tag: int) -> bool:
    """Whether Table E.1-1 treats an attribute as free text that may hold identity (a description or comment,
    cleanable under the Clean Descriptors or Clean Structured Content option) rather than as an identifier."""
    row = load_table().lookup(tag)
    return row is not None and any(code == "C" for col, code in row.options
                                   if col in ("clean_descriptors", "clean_structured_content"))


def collect_identifiers(ds: Any) -> dict[str, Any]:
    """The identifying values of one original and the values it keeps (JSON-able, to leave a worker).

    Identifying: values of attributes the Basic Profile does not keep (K), except descriptions and comments
    (their identifying content is found through the names, IDs and dates of the same object, and through the
    patterns), and, inside sequences the profile removes, person names, dates and UIDs."""
    from pydicom.datadict import keyword_for_tag

    options = Options()
    found = Identifiers()
    actions = _ACTIONS

    def walk(d: Any, container: str, encoding: str | None) -> None:
        """``container``: the action of the sequence around ``d`` that overrides its kept elements: "X" (the
        profile removes or empties it), "D" (it keeps codes and other non-text values, text gets a dummy), ""."""
        for tag, vr, texts, _ in dataset_values(d, encoding):
            if tag.is_private:
                continue  # private values are not attributes of anyone: private elements are findings themselves
            action = actions.get((tag, vr)) or actions.setdefault((tag, vr), action_for(int(tag), vr, options))
            if vr == "SQ":
                inner = "X" if container == "X" or action in ("X", "Z") else "D" if container or action == "D" else ""
                for item in d[tag].value or ():
                    walk(item, inner, raw_encoding(d, encoding))
                continue
            keeps = action in ("K", "C") or int(tag) in CODE_ATTRIBUTES
            if keeps and (not container or container == "D" and (vr not in TEXT_VRS or int(tag) in CODE_ATTRIBUTES
                                                                 or vr in ("CS", "UI", "DA", "DT", "TM"))):
                found.kept.update(tuple(tokens(text)) for text in texts)
                continue
            if vr not in IDENTIFYING_VRS or keeps and vr not in ("PN", "DA", "DT", "UI") or is_descriptor(int(tag)):
                continue  # codes, times, ages, numbers and free text: too common to recognise anywhere
            keyword = keyword_for_tag(tag) or dicom.tag_label(int(tag))
            for text in texts:
                if vr == "UI":
                    if not is_well_known_uid(text):
                        found.add([text], "uid", keyword)
                elif vr in ("DA", "DT"):
                    for form in date_forms(text):
                        found.add(form, "date", keyword)
                elif vr == "PN":
                    for component in re.split(r"[=^]", text):
                        found.add(tokens(component), "name", keyword)
                        for word in tokens(component):
                            found.add([word], "name", keyword)
                    found.add(tokens(text), "name", keyword)
                else:
                    found.add(tokens(text), "identifier", keyword)

    walk(ds, "", "latin-1")
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        uid = str(meta.MediaStorageSOPInstanceUID)
        if not is_well_known_uid(uid):
            found.add([uid], "uid", "MediaStorageSOPInstanceUID")
    return {"single": list(found.single.items()), "multi": [e for es in found.multi.values() for e in es],
            "kept": sorted(found.kept)}


class OriginalsOperator(BaseOperator):
    """Reads one original and returns its identifying values (as JSON in the outcome's message)."""

    name = "phi-scan-originals"

    def process(self, item: Item, ctx: Context) -> Outcome:
        ds = dicom.read(item.paths[0], stop_before_pixels=True)
        return Outcome(message=json.dumps(collect_identifiers(ds)))


# --------------------------------------------------------------------------- scanning one file

@dataclass
class ScanRules:
    """What the scan looks for besides the originals' values."""

    root: Path
    patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()
    show_values: bool = False
    identifiers_token: str = ""  # which identifiers the workers must hold (see _IDENTIFIERS)


# Set in the parent before the pool forks: workers inherit it instead of unpickling it with every chunk.  A worker
# that does not hold the identifiers the scan was started with fails every item: a silently empty set would pass.
_IDENTIFIERS = Identifiers()
_IDENTIFIERS_TOKEN = ""


class ScanOperator(BaseOperator):
    """Scans one file of the tree and returns its findings (as JSON in the outcome's message)."""

    name = "phi-scan"

    def __init__(self, rules: ScanRules):
        self.rules = rules

    def accepts(self, path: Path) -> bool:
        return True  # every file: sidecars, manifests and maps leak as well as DICOM files

    def process(self, item: Item, ctx: Context) -> Outcome:
        if self.rules.identifiers_token != _IDENTIFIERS_TOKEN:
            raise RuntimeError("this worker process does not hold the originals' values (not forked from the scan)")
        findings = scan_file(item.paths[0], self.rules, _IDENTIFIERS)
        return Outcome(message=json.dumps([f.record() for f in findings]))


def scan_file(path: Path, rules: ScanRules, identifiers: Identifiers) -> list[Finding]:
    out: list[Finding] = []
    shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # printable as JSON

    def add(kind: str, where: str | Callable[[], str], what: str, value: str = "") -> None:
        if len(out) < MAX_FINDINGS_PER_FILE:
            finding = Finding(shown, kind, where if isinstance(where, str) else where(), what,
                              value if rules.show_values else mask(value))
            if finding not in out:
                out.append(finding)

    def look(text: str, where: str | Callable[[], str], free_text: bool = True) -> None:
        """The originals' values and ``--patterns`` anywhere; the built-in patterns in free text only."""
        for matched, kind, attribute in identifiers.find(tokens(text)):
            add(kind, where, f"{attribute} of an original", matched)
        for name, pattern in (*FREE_TEXT_PATTERNS, *rules.patterns) if free_text else rules.patterns:
            found = pattern.search(text)
            if found:
                add("pattern", where, name, found.group(0))

    try:
        relative = path.relative_to(rules.root)
    except ValueError:
        relative = Path(path.name)
    for part in relative.parts:
        look(TOKEN_UID.sub(" ", re.sub(r"\.(dcm|json|jsonl|nii|gz|txt|csv|sqlite)$", "", part)), "file name")
    if path.is_symlink():
        look(os.readlink(path), "symbolic link target")
        return out
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the scan, a device would never end
            add("unreadable", "file", "not a regular file: not scanned")
            return out
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head == b"SQLite format 3\0":  # a pseudonym map, an index: its text is not in line-shaped bytes
            _scan_sqlite(path, add, look)
        elif fsio.is_dicom(path):
            _scan_dicom(path, add, look)
        else:
            _scan_bytes(path, look)
    except OSError as exc:
        add("unreadable", "file", f"cannot read: {exc.strerror}")
    return out


TOKEN_UID = re.compile(r"\d+(?:\.\d+){3,}")  # UIDs (and the keyed 2.25.<n> ones) are not record numbers


def _scan_bytes(path: Path, look: Callable[..., None], chunk_size: int = 1 << 20) -> None:
    """Any other file, as UTF-8 text, in chunks cut after a line end (or a non-word byte) so no token is split."""
    line, rest = 1, b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(chunk_size)
            data = rest + chunk
            if not data:
                return
            cut = len(data) if not chunk else max(data.rfind(b"\n"), data.rfind(b" ")) + 1
            if cut <= 0:
                cut = max(0, len(data) - 1024)  # no separator in a whole chunk: only the last KiB may hold a token
            lines = data[:cut].split(b"\n")
            for number, text in enumerate(lines, line):
                if text.strip():
                    look(text.decode("utf-8", "replace"), f"content, line {number}")
            line += len(lines) - 1
            rest = data[cut:]


def _scan_sqlite(path: Path, add: Callable[..., None], look: Callable[..., None]) -> None:
    """Every text value of every table of an SQLite file, opened read-only (it is never changed, nor journaled)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)) as con:
            tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                quoted = '"' + table.replace('"', '""') + '"'
                for number, row in enumerate(con.execute(f"SELECT * FROM {quoted}"), 1):  # noqa: S608 - a name
                    for value in row:
                        if isinstance(value, str | bytes):
                            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
                            look(text, f"table {table}, row {number}")
    except sqlite3.DatabaseError as exc:
        add("unreadable", "file", f"an SQLite file that cannot be read: {exc}")


def _scan_dicom(path: Path, add: Callable[..., None], look: Callable[..., None]) -> None:
    try:
        with dicom.collect_warnings() as notes:
            ds = dicom.read(path, stop_before_pixels=True)
        dicom.check_complete(ds, notes)
    except DataError as exc:
        add("unreadable", "file", f"a DICOM file that cannot be read whole: {exc.message}")
        return
    deidentified = str(ds.get("PatientIdentityRemoved", "") or "").upper() == "YES"
    if not deidentified:
        add("unmarked", "(0012,0062) PatientIdentityRemoved", "not YES: this object does not claim to be "
            "de-identified")
    for flag, kind in (("BurnedInAnnotation", "burned-in"), ("RecognizableVisualFeatures", "visual-features")):
        if str(ds.get(flag, "") or "").upper() == "YES":
            add(kind, flag, f"{flag} is YES: the pixels identify")
    private: dict[tuple[int, str], int] = {}

    def walk(d: Any, prefix: str, encoding: str | None) -> None:
        for tag, vr, texts, elem in dataset_values(d, encoding):
            if tag.is_private:
                if tag.element < 0x0100:
                    private.setdefault((tag.group, _text(elem)), 0)  # a private creator element
                else:
                    creator = d.get_item((tag.group << 16) | (tag.element >> 8))
                    key = (tag.group, _text(creator) if creator is not None else "")
                    private[key] = private.get(key, 0) + 1
            elif vr == "SQ":
                for n, item in enumerate(d[tag].value or ()):
                    walk(item, f"{prefix}{dicom.tag_label(tag)}[{n}] > ", raw_encoding(d, encoding))
            elif texts and tag != 0x00120063:  # not the de-identifier's own method text
                free = vr in FREE_TEXT_VRS and not (tag == 0x00100010 and deidentified) and \
                    not (vr in ("LO", "SH") and kept_verbatim(int(tag), vr))
                for text in texts:
                    look(text, lambda tag=tag: f"{prefix}{dicom.tag_label(tag)}", free)

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        walk(meta, "file meta > ", "latin-1")
    walk(ds, "", "latin-1")
    for (group, creator), count in sorted(private.items()):
        add("private-tag", f"({group:04X},xxxx) {creator or 'no private creator'}",
            f"{count} private element(s): private attributes can hold anything")


def _text(elem: Any) -> str:
    value = elem.value
    return (value.decode("latin-1") if isinstance(value, bytes) else str(value or "")).strip(" \0")


@cache
def kept_verbatim(tag: int, vr: str) -> bool:
    """Short texts the profile keeps as they are (manufacturer, model, software versions, codes): not free text."""
    return tag in CODE_ATTRIBUTES or action_for(tag, vr, Options()) == "K"


# --------------------------------------------------------------------------- the scan

def walk_tree(root: Path) -> list[Path]:
    """Every file below ``root`` (or ``root`` itself), hidden names included, sorted; links are not followed."""
    if root.is_symlink() or root.is_file():
        return [root]
    if not root.is_dir():
        raise NoInputError(f"{root}: no such file or directory")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        files.extend(base / name for name in sorted(filenames))
        files.extend(base / name for name in dirnames if (base / name).is_symlink())
    return files


def _prepare() -> None:
    """Import pydicom and parse Table E.1-1 here in the parent: forked workers inherit both instead of each
    doing it again (~0.3 s apiece)."""
    dicom.import_pydicom(pixels=False)
    load_table()


def gather_identifiers(originals: Path, options: BatchOptions) -> tuple[Identifiers, list[str]]:
    """The identifiers of every DICOM file below ``originals`` (in the worker pool), and the read errors."""
    _prepare()
    found = Identifiers()
    errors: list[str] = []

    def on_result(result: ItemResult) -> None:
        if result.status == "failed":
            errors.append(result.message)
        elif result.status == "ok" and result.message:
            found.merge(json.loads(result.message))

    run_batch(OriginalsOperator(), fsio.collect_inputs([str(originals)]), None, options, on_result=on_result)
    found.finish()
    return found, errors


def scan(tree: Path, rules: ScanRules, identifiers: Identifiers, options: BatchOptions,
         on_findings: Callable[[list[Finding]], None], on_error: Callable[[str], None]) -> int:
    """Scan every file of ``tree``; report findings file by file, in path order.  Returns the files scanned."""
    global _IDENTIFIERS, _IDENTIFIERS_TOKEN
    _IDENTIFIERS, _IDENTIFIERS_TOKEN = identifiers, secrets.token_hex(8)
    rules = replace(rules, identifiers_token=_IDENTIFIERS_TOKEN)
    files = walk_tree(tree)
    _prepare()

    def on_result(result: ItemResult) -> None:
        if result.status == "failed":
            on_error(result.message)
        elif result.message:
            on_findings([Finding(**f) for f in json.loads(result.message)])

    try:
        run_batch(ScanOperator(rules), files, None, options, on_result=on_result)
    finally:
        _IDENTIFIERS, _IDENTIFIERS_TOKEN = Identifiers(), ""
    return len(files)
