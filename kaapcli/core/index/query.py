"""The one query language of kaapcli's index: a Lucene-style query string → a bound AST.

Grammar (precedence NOT > AND > OR; terms side by side are joined with AND)::

    query    := or EOF
    or       := and (("OR" | "||") and)*
    and      := unary (("AND" | "&&")? unary)*
    unary    := ("NOT" | "-" | "!") unary | "+" unary | primary
    primary  := "(" or ")" | FIELD ":" value | "*" | WORD | PHRASE
    value    := "(" values ")" | RANGE | (">" | ">=" | "<" | "<=") WORD | "*" | WORD | PHRASE
    RANGE    := ("[" | "{") bound "TO" bound ("]" | "}")      bound := WORD | PHRASE | "*"

A FIELD is a DICOM keyword (``Modality``), a derived field (``Tags``), a full document key
(``"00080060 Modality_keyword"`` or ``00080060\\ Modality_keyword``) or a dotted path into a
sequence (``ProcedureCodeSequence.CodeMeaning``).  :func:`parse` checks syntax and resolves
fields to document keys, so both backends receive the same :data:`Node` tree and never see a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kaapcli.exitcodes import UsageError

# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Field:
    """A field as typed and the document keys it resolves to (several for e.g. PN components)."""

    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class MatchAll:
    pass


@dataclass(frozen=True)
class Text:
    """Full text: a bare word or phrase (``wildcard`` when it holds ``*``/``?``)."""

    value: str
    phrase: bool = False
    wildcard: bool = False


@dataclass(frozen=True)
class Term:
    """Exact value of a field (a keyword equals it, a list holds it, a number equals it)."""

    field: Field
    value: str


@dataclass(frozen=True)
class Wildcard:
    """A ``*``/``?`` pattern over a whole text value, case-sensitive like a keyword term."""

    field: Field
    pattern: str


@dataclass(frozen=True)
class Range:
    field: Field
    low: str | None
    high: str | None
    include_low: bool = True
    include_high: bool = True


@dataclass(frozen=True)
class Exists:
    field: Field


@dataclass(frozen=True)
class Ids:
    """Documents by SeriesInstanceUID (built by commands from ``--series``; not query syntax)."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class InDataset:
    """Members of a dataset (``Dataset:NAME``; ``wildcard``: NAME is a ``*``/``?`` pattern over dataset names).
    Indexes resolve patterns to names before they translate a query (:meth:`Index.bind`)."""

    name: str
    wildcard: bool = False


@dataclass(frozen=True)
class Not:
    node: Node


@dataclass(frozen=True)
class And:
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    nodes: tuple[Node, ...]


Node = MatchAll | Text | Term | Wildcard | Range | Exists | Ids | InDataset | Not | And | Or
MATCH_NONE: Node = Not(MatchAll())

# --------------------------------------------------------------------------- fields

TEXT_TYPES = ("keyword", "date", "time", "datetime")
NUMERIC_TYPES = ("integer", "float")
TAGS_KEY = "00000000 Tags_keyword"
SERIES_KEY = "0020000E SeriesInstanceUID_keyword"
STUDY_KEY = "0020000D StudyInstanceUID_keyword"
SOURCE_KEY = "00000000 SourcePeer_keyword"  # the [pacs.NAME] profile a series came from (kaapcli index --source)
# ``Dataset:NAME`` is no document key: datasets are lists kept beside the documents
DATASET_FIELD = Field("Dataset", ())

# Derived fields of DESIGN §3.1 (group 00000000); names resolve like DICOM keywords.
DERIVED_KEYS = (
    "00000000 Timestamp_datetime", "00000000 TimeTagUsed_keyword", "00000000 TimestampArrived_datetime",
    "00000000 TimestampArrived_date", "00000000 TimestampArrivedHour_integer", "00000000 DayOfWeek_integer",
    "00000000 DerivedPatientAge_integer", "00000000 CuratedModality_keyword",
    "00000000 AnnotationLabel_keyword", "00000000 AnnotationLabelsList_keyword", TAGS_KEY,
    "00000000 NumberOfInstances_integer", "00000000 SeriesSizeBytes_integer", SOURCE_KEY,
)

_VR_SUFFIX = {
    **dict.fromkeys(("AE", "AS", "AT", "CS", "LO", "LT", "SH", "ST", "UC", "UI", "UR", "UT"), "keyword"),
    "DA": "date", "TM": "time", "DT": "datetime",
    **dict.fromkeys(("IS", "SL", "SS", "UL", "US", "SV", "UV"), "integer"),
    **dict.fromkeys(("DS", "FL", "FD"), "float"),
    "SQ": "object",
}
_KEY = re.compile(r"^[0-9A-Fa-f]{8} \S+$")


@lru_cache(maxsize=65536)
def key_type(key: str) -> str:
    """The value type of a document key: keyword, date, time, datetime, integer, float or object."""
    last = key.rsplit(".", 1)[-1].split(" ", 1)[-1]
    parts = last.split("_")
    if len(parts) >= 3 and parts[-2] == "keyword":  # PN components: _keyword_alphabetic
        return "keyword"
    return parts[-1] if len(parts) >= 2 and parts[-1] in (*_VR_SUFFIX.values(),) else "keyword"


def is_numeric(key: str) -> bool:
    return key_type(key) in NUMERIC_TYPES


@lru_cache(maxsize=1)
def _dicom_dictionary() -> dict[int, tuple[str, str, str, str, str]]:
    """pydicom's data dictionary (tag → VR, VM, name, retired, keyword).

    ``import pydicom`` costs ~0.5 s (numpy, its pixel handlers), more than a whole ``kaapcli search``;
    the dictionary is one plain module in it, loaded here on its own unless pydicom is imported already.
    """
    import sys

    if "pydicom" in sys.modules:
        from pydicom._dicom_dict import DicomDictionary

        return DicomDictionary
    import importlib.util

    spec = importlib.util.find_spec("pydicom")  # finds the package without importing it
    locations = spec.submodule_search_locations if spec else None
    if not locations:  # pragma: no cover - pydicom is a dependency
        raise ModuleNotFoundError("pydicom")
    module_spec = importlib.util.spec_from_file_location("_kaapcli_dicom_dict",
                                                         Path(locations[0]) / "_dicom_dict.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.DicomDictionary  # type: ignore[no-any-return]


@lru_cache(maxsize=1)
def _keyword_tags() -> dict[str, int]:
    """Keyword → tag, as ``pydicom.datadict.keyword_dict``."""
    return {entry[4]: tag for tag, entry in _dicom_dictionary().items()}


@lru_cache(maxsize=512)
def _keyword_keys(name: str) -> tuple[str, ...]:
    """Document keys of one DICOM keyword or derived field name (case-insensitive)."""
    for key in DERIVED_KEYS:
        if key.split(" ", 1)[1].split("_", 1)[0].lower() == name.lower():
            return tuple(k for k in DERIVED_KEYS if k.split(" ", 1)[1].split("_", 1)[0].lower() == name.lower())
    dictionary = _dicom_dictionary()
    keyword_dict = _keyword_tags()
    tag = keyword_dict.get(name)
    if tag is None:  # case-insensitive fallback: modality → Modality
        lowered = {k.lower(): v for k, v in keyword_dict.items()}
        tag = lowered.get(name.lower())
    if tag is None:
        return ()
    vr_text, _, _, _, keyword = dictionary[tag]
    prefix = f"{tag:08X} {keyword}"
    vrs = [vr.strip() for vr in vr_text.split(" or ")]
    if "PN" in vrs:
        return tuple(f"{prefix}_keyword_{part}" for part in ("alphabetic", "ideographic", "phonetic"))
    suffixes = sorted({_VR_SUFFIX[vr] for vr in vrs if vr in _VR_SUFFIX})
    return tuple(f"{prefix}_{suffix}" for suffix in suffixes)


def resolve_field(name: str, position: int = 0) -> Field:
    """Resolve a field name to document keys; an unknown name is a usage error."""
    if _KEY.match(name):
        return Field(name, (name,))
    if name.lower() == DATASET_FIELD.name.lower():
        return DATASET_FIELD
    keys: tuple[str, ...] = ("",)
    for segment in name.split("."):
        found = (segment,) if _KEY.match(segment) else _keyword_keys(segment)
        if not found:
            where = f"query error at position {position}: " if position else ""
            raise UsageError(f"{where}unknown field {name!r}",
                             hint='use a DICOM keyword (Modality) or a quoted full key ("00080060 Modality_keyword")')
        keys = tuple(f"{k}.{f}" if k else f for k in keys for f in found)
    return Field(name, keys)


def field_keys(name: str) -> tuple[str, ...]:
    """Document keys of a field name given on the command line (``--sort``, ``--fields``, ``stats``)."""
    field = resolve_field(name)
    if field is DATASET_FIELD:
        raise UsageError("Dataset is not a document field: use it in queries (Dataset:NAME), stats and dashboards")
    return field.keys


DATE_UNITS = {"year": 4, "month": 7, "day": 10}  # characters of a "YYYY-MM-DD..." value that make the bucket


@dataclass(frozen=True)
class Facet:
    """A field to count series by (``stats``, ``dashboard``): ``StudyDate:month`` buckets dates by month;
    ``Dataset`` counts series per dataset."""

    field: Field
    unit: str | None = None  # year | month | day, for date and datetime fields

    @property
    def label(self) -> str:
        return f"{self.field.name} by {self.unit}" if self.unit else self.field.name


def parse_facet(text: str) -> Facet:
    """``FIELD`` or ``FIELD:year|month|day`` (dates and datetimes); a usage error otherwise."""
    name, _, unit = text.strip().rpartition(":") if text.strip().lower().endswith(
        tuple(f":{u}" for u in DATE_UNITS)) else (text.strip(), "", "")
    field = resolve_field(name)
    unit = unit.lower() or ""
    if unit and (field is DATASET_FIELD or not all(key_type(k) in ("date", "datetime") for k in field.keys)):
        raise UsageError(f"{text}: only date and datetime fields can be counted by {unit}")
    if field is not DATASET_FIELD and any(key_type(k) == "object" for k in field.keys):
        raise UsageError(f"{text}: {field.name} is a sequence; count one of its items' fields")
    return Facet(field, unit or None)


# --------------------------------------------------------------------------- parser

_SPECIAL = set('()[]{}":')  # no ^ boosts or ~ fuzziness: ^ separates DICOM name components
_DATE8 = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def _syntax(position: int, message: str) -> UsageError:
    return UsageError(f"query syntax error at position {position}: {message}")


class _Parser:
    """Recursive descent over the raw string (positions in messages are 1-based columns)."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    # -- scanning
    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, n: int = 1) -> str:
        self.ws()
        return self.text[self.pos:self.pos + n]

    def at_end(self) -> bool:
        return self.peek() == ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of query"
            raise _syntax(self.pos + 1, f"expected {char!r}, found {found}")
        self.pos += 1

    def keyword(self, *words: str) -> str | None:
        """An operator word (AND/OR/NOT/TO/&&/||) standing alone at the cursor."""
        self.ws()
        for word in words:
            end = self.pos + len(word)
            if self.text.startswith(word, self.pos) and (
                    not word.isalpha() or end >= len(self.text) or self.text[end].isspace() or self.text[end] in "()"):
                self.pos = end
                return word
        return None

    def word(self, allow_colon: bool) -> tuple[str, str, bool, int]:
        """An unquoted word with backslash escapes: (literal text, wildcard pattern, has wildcard, start)."""
        self.ws()
        start = self.pos
        text: list[str] = []
        pattern: list[str] = []
        wildcard = False
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\":
                if self.pos + 1 >= len(self.text):
                    raise _syntax(self.pos + 1, "dangling backslash")
                escaped = self.text[self.pos + 1]
                text.append(escaped)
                pattern.append("\\" + escaped if escaped in "*?\\" else escaped)
                self.pos += 2
                continue
            if ch.isspace() or (ch in _SPECIAL and not (ch == ":" and allow_colon)):
                break
            wildcard = wildcard or ch in "*?"
            text.append(ch)
            pattern.append(ch)
            self.pos += 1
        if self.pos == start:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of query"
            raise _syntax(self.pos + 1, f"expected a term, found {found}")
        return "".join(text), "".join(pattern), wildcard, start

    def phrase(self) -> tuple[str, int]:
        self.ws()
        start = self.pos
        self.pos += 1  # opening quote
        out: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
            out.append(self.text[self.pos])
            self.pos += 1
        if self.pos >= len(self.text):
            raise _syntax(start + 1, "unterminated quoted phrase")
        self.pos += 1
        return "".join(out), start

    # -- grammar
    def parse(self) -> Node:
        if self.at_end():
            raise _syntax(1, "empty query (use * to match everything)")
        node = self.or_()
        if not self.at_end():
            raise _syntax(self.pos + 1, f"unexpected {self.text[self.pos]!r}")
        return node

    def or_(self) -> Node:
        nodes = [self.and_()]
        while self.keyword("OR", "||"):
            nodes.append(self.and_())
        return nodes[0] if len(nodes) == 1 else Or(tuple(nodes))

    def and_(self) -> Node:
        nodes = [self.unary()]
        while True:
            if self.keyword("AND", "&&"):
                nodes.append(self.unary())
                continue
            nxt = self.peek()
            if nxt == "" or nxt == ")" or self._at_or():
                break
            nodes.append(self.unary())
        return nodes[0] if len(nodes) == 1 else And(tuple(nodes))

    def _at_or(self) -> bool:
        save = self.pos
        found = self.keyword("OR", "||") is not None
        self.pos = save
        return found

    def unary(self) -> Node:
        if self.keyword("NOT") or self.peek() in ("-", "!"):
            if self.peek() in ("-", "!"):
                self.pos += 1
            return Not(self.unary())
        if self.peek() == "+":
            self.pos += 1
        return self.primary()

    def primary(self) -> Node:
        nxt = self.peek()
        if nxt == "(":
            self.pos += 1
            node = self.or_()
            self.expect(")")
            return node
        if nxt == '"':
            text, start = self.phrase()
            if self.text.startswith(":", self.pos):
                self.pos += 1
                return self.value(resolve_field(text, start + 1))
            return Text(text, phrase=True)
        if nxt in ("", ")"):
            found = "end of query" if nxt == "" else "')'"
            raise _syntax(self.pos + 1, f"expected a term, found {found}")
        if nxt in "[]{}:":
            raise _syntax(self.pos + 1, f"unexpected {nxt!r}")
        text, pattern, wildcard, start = self.word(allow_colon=False)
        if self.text.startswith(":", self.pos):
            self.pos += 1
            if wildcard:
                raise _syntax(start + 1, "wildcards are not allowed in field names")
            return self.value(resolve_field(text, start + 1))
        if pattern == "*":
            return MatchAll()
        return Text(pattern, wildcard=True) if wildcard else Text(text)

    def value(self, field: Field) -> Node:
        self.ws()
        nxt = self.peek()
        start = self.pos + 1
        if field is DATASET_FIELD and nxt != "(":
            return self.dataset(start)
        if nxt == "(":  # Modality:(CT OR MR): the field applies to every term inside
            self.pos += 1
            node = self.field_group(field)
            self.expect(")")
            return node
        if nxt in ("[", "{"):
            return self.range_(field)
        for op in (">=", "<=", ">", "<"):
            if self.text.startswith(op, self.pos):
                self.pos += len(op)
                bound, _ = self.bound()
                if bound is None:
                    raise _syntax(self.pos, f"{op} needs a value")
                node = Range(field, bound, None, op == ">=", True) if op[0] == ">" else \
                    Range(field, None, bound, True, op == "<=")
                return _check(node, start)
        if nxt == '"':
            text, _ = self.phrase()
            return _check(Term(field, text), start)
        if nxt == "" or nxt.isspace() or nxt in ")]}":
            raise _syntax(self.pos + 1, f"expected a value for field {field.name!r}")
        text, pattern, wildcard, _ = self.word(allow_colon=True)
        if pattern == "*":
            return Exists(field)
        if wildcard:
            return _check(Wildcard(field, pattern), start)
        return _check(Term(field, text), start)

    def dataset(self, start: int) -> Node:
        """``Dataset:NAME``, ``Dataset:"a name"``, ``Dataset:train-*``, ``Dataset:*`` (in any dataset)."""
        nxt = self.peek()
        if nxt == '"':
            name, _ = self.phrase()
            return InDataset(name)
        if nxt == "" or nxt.isspace() or nxt in ")]}[{<>":
            raise _syntax(start, "Dataset: takes a dataset name or a wildcard pattern")
        text, pattern, wildcard, _ = self.word(allow_colon=True)
        return InDataset(pattern, wildcard=True) if wildcard else InDataset(text)

    def field_group(self, field: Field) -> Node:
        nodes = [self.field_unary(field)]
        ors: list[Node] = []
        while True:
            if self.keyword("OR", "||"):
                ors.append(nodes[0] if len(nodes) == 1 else And(tuple(nodes)))
                nodes = [self.field_unary(field)]
            elif self.keyword("AND", "&&") or self.peek() not in ("", ")"):
                nodes.append(self.field_unary(field))
            else:
                break
        ors.append(nodes[0] if len(nodes) == 1 else And(tuple(nodes)))
        return ors[0] if len(ors) == 1 else Or(tuple(ors))

    def field_unary(self, field: Field) -> Node:
        if self.keyword("NOT") or self.peek() in ("-", "!"):
            if self.peek() in ("-", "!"):
                self.pos += 1
            return Not(self.field_unary(field))
        return self.value(field)

    def bound(self) -> tuple[str | None, int]:
        if self.peek() == '"':
            text, start = self.phrase()
            return text, start
        self.ws()
        start = self.pos
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch.isspace() or ch in "[]{}()":
                break
            out.append(ch)
            self.pos += 1
        text = "".join(out)
        if not text:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of query"
            raise _syntax(self.pos + 1, f"expected a range bound, found {found}")
        return (None if text == "*" else text), start

    def range_(self, field: Field) -> Node:
        start = self.pos + 1
        include_low = self.text[self.pos] == "["
        self.pos += 1
        low, _ = self.bound()
        if not self.keyword("TO"):
            raise _syntax(self.pos + 1, "expected 'TO' in range")
        high, _ = self.bound()
        close = self.peek()
        if close not in ("]", "}"):
            raise _syntax(self.pos + 1, "expected ']' or '}' to close the range")
        self.pos += 1
        return _check(Range(field, low, high, include_low, close == "]"), start)


def normalize_value(key: str, value: str) -> str:
    """Dates typed the DICOM way (20200131) are compared the document way (2020-01-31)."""
    if key_type(key) in ("date", "datetime"):
        m = _DATE8.match(value)
        if m:
            return f"{m[1]}-{m[2]}-{m[3]}"
    return value


def _check(node: Term | Wildcard | Range, position: int) -> Node:
    """Normalize dates; reject values that cannot match a field's type (numbers on numeric fields)."""
    field = node.field
    first = field.keys[0]
    if isinstance(node, Term):
        node = Term(field, normalize_value(first, node.value))
    elif isinstance(node, Range):
        low, high = (v if v is None else normalize_value(first, v) for v in (node.low, node.high))
        node = Range(field, low, high, node.include_low, node.include_high)
    numeric = [k for k in field.keys if is_numeric(k)]
    if not numeric:
        if any(key_type(k) == "object" for k in field.keys):
            raise UsageError(f"query error at position {position}: {field.name} is a sequence; "
                             "query one of its items' fields, e.g. ProcedureCodeSequence.CodeMeaning")
        return node
    if isinstance(node, Wildcard):
        raise UsageError(f"query error at position {position}: wildcards need a text field; {field.name} is numeric")
    values = [node.value] if isinstance(node, Term) else [v for v in (node.low, node.high) if v is not None]
    for value in values:
        try:
            float(value)
        except ValueError:
            raise UsageError(f"query error at position {position}: {field.name} is numeric, "
                             f"{value!r} is not a number") from None
    return node


def parse(text: str) -> Node:
    """Parse a query string; syntax errors and unknown fields raise UsageError (exit 2) with the position."""
    return _Parser(text).parse()


def glob_to_regex(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """A wildcard pattern (``*``/``?`` wild, ``\\*`` literal) as a whole-value regular expression."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("".join(out), flags | re.DOTALL)
