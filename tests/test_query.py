"""The query language parser: every construct, field resolution, and syntax errors with positions."""

from __future__ import annotations

import pytest

from kaapcli.core.index.query import (
    DATASET_FIELD,
    And,
    Exists,
    Facet,
    Field,
    InDataset,
    MatchAll,
    Not,
    Or,
    Range,
    Term,
    Text,
    Wildcard,
    glob_to_regex,
    key_type,
    parse,
    parse_facet,
)
from kaapcli.exitcodes import ExitCode, UsageError

MODALITY = Field("Modality", ("00080060 Modality_keyword",))
ROWS = Field("Rows", ("00280010 Rows_integer",))
DATE = Field("StudyDate", ("00080020 StudyDate_date",))


def test_field_by_keyword_and_by_full_key() -> None:
    assert parse("Modality:CT") == Term(MODALITY, "CT")
    full = Field("00080060 Modality_keyword", ("00080060 Modality_keyword",))
    assert parse('"00080060 Modality_keyword":CT') == Term(full, "CT")
    assert parse(r"00080060\ Modality_keyword:CT") == Term(full, "CT")
    assert parse("modality:CT") == Term(Field("modality", MODALITY.keys), "CT")  # keywords are case-insensitive


def test_field_types_from_the_dicom_dictionary() -> None:
    assert parse("Rows:512") == Term(ROWS, "512")
    assert parse("SliceThickness:2.5").field.keys == ("00180050 SliceThickness_float",)  # DS
    assert parse("PatientName:Doe").field.keys == tuple(
        f"00100010 PatientName_keyword_{p}" for p in ("alphabetic", "ideographic", "phonetic"))
    assert parse("Tags:x") == Term(Field("Tags", ("00000000 Tags_keyword",)), "x")
    assert parse("DayOfWeek:0").field.keys == ("00000000 DayOfWeek_integer",)
    seq = parse('ProcedureCodeSequence.CodeMeaning:"CT CHEST"')
    assert seq == Term(Field("ProcedureCodeSequence.CodeMeaning",
                             ("00081032 ProcedureCodeSequence_object.00080104 CodeMeaning_keyword",)), "CT CHEST")
    assert key_type("00100010 PatientName_keyword_alphabetic") == "keyword"
    assert key_type("00280010 Rows_integer") == "integer"
    assert key_type("00081032 ProcedureCodeSequence_object.00080020 StudyDate_date") == "date"


def test_boolean_operators_and_default_and() -> None:
    a, b, c = Text("a"), Text("b"), Text("c")
    assert parse("a b") == And((a, b))
    assert parse("a AND b") == parse("a && b") == And((a, b))
    assert parse("a OR b") == parse("a || b") == Or((a, b))
    assert parse("a OR b c") == Or((a, And((b, c))))  # AND binds tighter than OR
    assert parse("(a OR b) c") == And((Or((a, b)), c))
    assert parse("NOT a") == parse("-a") == parse("!a") == Not(a)
    assert parse("+a") == a
    assert parse("a -b") == And((a, Not(b)))
    assert parse("and or") == And((Text("and"), Text("or")))  # lowercase words are terms


def test_wildcards_phrases_and_match_all() -> None:
    assert parse("*") == MatchAll()
    assert parse("LUNG1-*") == Text("LUNG1-*", wildcard=True)
    assert parse('"CT CHEST"') == Text("CT CHEST", phrase=True)
    assert parse("Modality:C?") == Wildcard(MODALITY, "C?")
    assert parse(r"SeriesDescription:a\*b*").pattern == r"a\*b*"  # escaped * is literal
    assert parse(r"a\*b") == Text("a*b")
    assert parse("Modality:*") == Exists(MODALITY)
    assert parse("Modality:(CT OR MR)") == Or((Term(MODALITY, "CT"), Term(MODALITY, "MR")))
    assert parse("Modality:(CT -MR)") == And((Term(MODALITY, "CT"), Not(Term(MODALITY, "MR"))))
    regex = glob_to_regex(r"a\*b*")
    assert regex.fullmatch("a*bcd") and not regex.fullmatch("axbcd")


def test_ranges() -> None:
    assert parse("StudyDate:[2020-01-01 TO 2020-12-31]") == Range(DATE, "2020-01-01", "2020-12-31", True, True)
    assert parse("StudyDate:{20200101 TO 20201231}") == Range(DATE, "2020-01-01", "2020-12-31", False, False)
    assert parse("StudyDate:[2020-01-01 TO *]") == Range(DATE, "2020-01-01", None, True, True)
    assert parse("Rows:>=512") == Range(ROWS, "512", None, True, True)
    assert parse("Rows:>512") == Range(ROWS, "512", None, False, True)
    assert parse("Rows:<512") == Range(ROWS, None, "512", True, False)
    assert parse("Rows:<=512") == Range(ROWS, None, "512", True, True)
    assert parse("StudyTime:[10:00:00 TO 12:00:00}").high == "12:00:00"  # ':' inside values is fine
    assert parse("StudyDate:20200131") == Term(DATE, "2020-01-31")  # DICOM DA spelling accepted


@pytest.mark.parametrize(("query", "message"), [
    ("(Modality:CT", "position 13: expected ')'"),
    ("Modality:CT)", "position 12: unexpected ')'"),
    ("a AND", "position 6: expected a term"),
    ("Modality:", "position 10: expected a value"),
    ('"open phrase', "position 1: unterminated quoted phrase"),
    ("Rows:[1 2]", "position 9: expected 'TO'"),
    ("Rows:[1 TO 2", "position 13: expected ']' or '}'"),
    ("", "position 1: empty query"),
    ("Mod*:CT", "position 1: wildcards are not allowed in field names"),
    ("a\\", "position 2: dangling backslash"),
])
def test_syntax_errors_name_the_position(query: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(query)
    assert message in str(info.value)
    assert info.value.code == ExitCode.USAGE


@pytest.mark.parametrize(("query", "message"), [
    ("NoSuchKeyword:1", "unknown field 'NoSuchKeyword'"),
    ("Rows:abc", "Rows is numeric, 'abc' is not a number"),
    ("Rows:5*", "wildcards need a text field"),
    ("ProcedureCodeSequence:x", "is a sequence"),
])
def test_field_errors(query: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(query)


def test_dataset_field_combines_with_any_query() -> None:
    assert parse("Dataset:train") == InDataset("train")
    assert parse("dataset:train") == InDataset("train")  # field names are case-insensitive
    assert parse('Dataset:"my set"') == InDataset("my set")
    assert parse("Dataset:train-*") == InDataset("train-*", wildcard=True)
    assert parse("Dataset:*") == InDataset("*", wildcard=True)  # in any dataset
    assert parse("Modality:MR AND -Dataset:test -Tags:excluded") == And((
        Term(MODALITY, "MR"), Not(InDataset("test")), Not(Term(Field("Tags", ("00000000 Tags_keyword",)), "excluded"))))
    assert parse("Dataset:(a OR b)") == Or((InDataset("a"), InDataset("b")))
    with pytest.raises(UsageError, match="Dataset: takes a dataset name"):
        parse("Dataset:[a TO b]")
    with pytest.raises(UsageError, match="Dataset: takes a dataset name"):
        parse("Dataset:>a")


def test_facets() -> None:
    assert parse_facet("Modality") == Facet(Field("Modality", MODALITY.keys))
    assert parse_facet("StudyDate:month") == Facet(Field("StudyDate", DATE.keys), "month")
    assert parse_facet("StudyDate:month").label == "StudyDate by month"
    assert parse_facet("AcquisitionDateTime:YEAR").unit == "year"
    assert parse_facet("Dataset") == Facet(DATASET_FIELD)
    with pytest.raises(UsageError, match="only date and datetime fields"):
        parse_facet("Modality:month")
    with pytest.raises(UsageError, match="is a sequence"):
        parse_facet("ProcedureCodeSequence")
    with pytest.raises(UsageError, match="unknown field"):
        parse_facet("NoSuchKeyword")
