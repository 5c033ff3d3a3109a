"""From search to data on the embedded index: where series are (paths, dirs, stale files reported), search
formats, queries with a leading '-', search records feeding tag / dataset add, Dataset: in queries, datasets
named from metadata, stats by month and dataset — and the whole `index | search --format paths | convert`
pipeline run by a shell."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from kaapcli.core.index.query import SERIES_KEY, TAGS_KEY
from tests.conftest import ROOT, dicom_files, kaapcli

MOD = "00080060 Modality_keyword"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two MR series (one study) and one CT series, 4 slices of 32x32 each."""
    root = tmp_path_factory.mktemp("tree")
    for args in (("--modality", "MR", "--series", "2", "--seed", "5"), ("--seed", "6")):
        proc = kaapcli("mock", "-o", root, *args, "--slices", "4", "--rows", "32", "--columns", "32", "-q")
        assert proc.returncode == 0, proc.stderr
    return root


def series_files(root: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID → its files (absolute), from the files themselves."""
    found: dict[str, list[Path]] = {}
    for path in dicom_files(root):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        found.setdefault(uid, []).append(path.absolute())
    return found


def modality_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).Modality)


def index_copy(tree: Path, where: Path) -> tuple[Path, Path, dict[str, list[Path]]]:
    copy = where / "tree"
    shutil.copytree(tree, copy)
    db = where / "i.db"
    proc = kaapcli("index", copy, "--index", db, "-w", "1")
    assert proc.returncode == 0, proc.stderr
    return copy, db, series_files(copy)


@pytest.fixture(scope="module")
def indexed_once(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, list[Path]]]:
    """A copy of the tree indexed from its DICOM files: (tree, index, files by series).  Tests that change the
    index use ``indexed`` (a copy of the index file); tests that change files index their own copy."""
    return index_copy(tree, tmp_path_factory.mktemp("indexed"))


@pytest.fixture()
def indexed(indexed_once: tuple[Path, Path, dict[str, list[Path]]],
            tmp_path: Path) -> tuple[Path, Path, dict[str, list[Path]]]:
    copy, db, by_series = indexed_once
    shutil.copyfile(db, tmp_path / "i.db")
    return copy, tmp_path / "i.db", by_series


def run(db: Path, *args: str | Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return kaapcli(*args, "--index", db, input=input)


def test_index_tree_then_search_paths_feeds_convert(tree: Path, tmp_path: Path) -> None:
    """The issue's pipeline, run by a shell exactly as a user types it."""
    work = tmp_path / "work"
    shutil.copytree(tree, work / "TREE")
    by_series = series_files(work / "TREE")
    mr = sorted(uid for uid, files in by_series.items() if modality_of(files) == "MR")
    env = {**os.environ, "KAAPCLI_INDEX": str(tmp_path / "i.db"), "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    kaap = f"{sys.executable} -m kaapcli"
    script = (f"{kaap} index TREE -q && {kaap} tag add excluded --series {mr[0]} -q && "
              f"{kaap} search 'Modality:MR AND -Tags:excluded' --format paths | {kaap} convert - -o nii")
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {script}"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (work / "nii").iterdir() if not p.name.startswith(".")) == [
        f"{mr[1]}.json", f"{mr[1]}.nii.gz"]
    # stdout: the indexed UIDs (index), then what convert wrote
    assert proc.stdout.split() == [*sorted(by_series), str(Path("nii") / f"{mr[1]}.nii.gz"),
                                   str(Path("nii") / f"{mr[1]}.json")]


def test_search_formats(indexed_once: tuple[Path, Path, dict[str, list[Path]]]) -> None:
    _, db, by_series = indexed_once
    uids = sorted(by_series)
    paths = run(db, "search", "*", "--format", "paths")
    assert paths.returncode == 0, paths.stderr
    assert paths.stdout.splitlines() == [str(p) for uid in uids for p in sorted(map(str, by_series[uid]))]
    dirs = run(db, "search", "*", "--format", "dirs").stdout.splitlines()
    assert dirs == list(dict.fromkeys(str(Path(p).parent) for p in paths.stdout.splitlines()))
    assert run(db, "search", "Modality:CT", "--format", "uids").stdout.split() == \
        [u for u in uids if modality_of(by_series[u]) == "CT"]
    docs = [json.loads(line) for line in run(db, "search", "*", "-f", "Modality,NumberOfInstances").stdout.splitlines()]
    assert docs == [{MOD: modality_of(by_series[u]), "00000000 NumberOfInstances_integer": 4} for u in uids]
    table = list(csv.reader(io.StringIO(run(db, "search", "*", "--format", "csv").stdout)))
    assert table[0][:5] == ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "StudyDate", "Modality"]
    assert [row[0] for row in table[1:]] == uids and {row[7] for row in table[1:]} == {"4"}
    picked = run(db, "search", "*", "--format", "csv", "-f", "SeriesInstanceUID,Rows").stdout.splitlines()
    assert picked == ["SeriesInstanceUID,Rows", *(f"{u},32" for u in uids)]
    assert run(db, "search", "*", "--format", "xml").returncode == 2


def test_csv_cells_are_no_formulas_and_lists_join(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    doc = {SERIES_KEY: "1.2", "0008103E SeriesDescription_keyword": "=HYPERLINK(\"http://x\")",
           TAGS_KEY: ["a", "-b"], "00280010 Rows_integer": -5}
    (tmp_path / "d.json").write_text(json.dumps(doc))
    assert run(db, "index", tmp_path / "d.json").returncode == 0
    out = run(db, "search", "*", "--format", "csv", "-f", "SeriesDescription,Tags,Rows").stdout
    assert list(csv.reader(io.StringIO(out))) == [["SeriesDescription", "Tags", "Rows"],
                                                   ["'=HYPERLINK(\"http://x\")", "a\\'-b", "-5"]]


def test_stale_paths_are_reported_not_printed(tree: Path, tmp_path: Path) -> None:
    _, db, by_series = index_copy(tree, tmp_path)
    mr = sorted(u for u, f in by_series.items() if modality_of(f) == "MR")
    ct = next(u for u, f in by_series.items() if modality_of(f) == "CT")
    first, second = sorted(by_series[mr[0]]), sorted(by_series[mr[1]])
    first[0].unlink()  # gone
    os.utime(first[1], ns=(1, 1))  # touched: changed on disk, still a file of its series → still printed
    shutil.copyfile(by_series[ct][0], second[0])  # now a file of another series
    (tmp_path / "j.json").write_text(json.dumps({SERIES_KEY: "9.9", MOD: "MR"}))  # indexed from JSON: no files
    assert run(db, "index", tmp_path / "j.json").returncode == 0
    proc = run(db, "search", "Modality:MR", "--format", "paths")
    assert proc.returncode == 1
    expected = [str(p) for p in sorted(map(str, first[1:]))] + [str(p) for p in sorted(map(str, second[1:]))]
    assert proc.stdout.splitlines() == expected
    assert f"error: series {mr[0]}: 1 of 4 files gone since it was indexed (first: {first[0]})" in proc.stderr
    assert f"error: series {mr[1]}: 1 of 4 files changed since it was indexed and are no longer of this series " \
           f"(first: {second[0]})" in proc.stderr
    assert "error: series 9.9: no files known" in proc.stderr
    assert "hint: re-index the files" in proc.stderr and "Traceback" not in proc.stderr


def test_a_leading_dash_is_a_query_and_options_still_work(
        indexed_once: tuple[Path, Path, dict[str, list[Path]]]) -> None:
    _, db, by_series = indexed_once
    mr = sorted(u for u, f in by_series.items() if modality_of(f) == "MR")

    def count(*args: str) -> str:
        proc = run(db, "search", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert count("-Modality:CT", "--count") == count("--count", "-Modality:CT") == "2"
    assert count("-CT", "--count") == "2"  # full text: the CT series holds the word CT
    assert count("-Modality:CT", "--format", "uids").split() == mr
    assert count("-f", "Modality", "-Modality:CT").splitlines() == ['{"00080060 Modality_keyword": "MR"}'] * 2
    assert count("--format=uids", "--limit", "1", "-Modality:CT") == mr[0]
    assert count("--sort", "-SeriesNumber", "-Modality:CT", "--format", "uids").split()[0] == \
        count("--sort", "SeriesNumber:desc", "Modality:MR", "--format", "uids").split()[0]
    assert kaapcli("search", "--count", "--index", db, "--", "-Modality:CT").stdout == "2\n"
    assert count("Modality:MR", "-SeriesNumber:1", "--count") == "1"  # several words are one query
    assert count("Modality:CT", "OR", "-Modality:MR", "--count") == "1"  # in the order given
    assert run(db, "search", "--help").returncode == 0
    bad = run(db, "search", "-Modality:(CT")
    assert bad.returncode == 2 and "query syntax error at position" in bad.stderr


def test_search_records_feed_tag_and_dataset_add(indexed: tuple[Path, Path, dict[str, list[Path]]]) -> None:
    _, db, by_series = indexed
    mr = sorted(u for u, f in by_series.items() if modality_of(f) == "MR")
    records = run(db, "search", "Modality:MR").stdout
    proc = run(db, "tag", "add", "reviewed", "--series", "-", input=records)
    assert proc.returncode == 0, proc.stderr
    assert "2 series changed" in proc.stderr
    assert run(db, "search", "Tags:reviewed", "--format", "uids").stdout.split() == mr
    proc = run(db, "dataset", "add", "mr", "--series", "-", input=records)
    assert proc.returncode == 0 and "mr: 2 series added" in proc.stderr
    dicom_json = json.dumps({"0020000E": {"vr": "UI", "Value": [mr[0]]}})  # a kaapcli query record
    proc = run(db, "tag", "add", "q", "--series", "-", input=dicom_json + "\n")
    assert proc.returncode == 0 and run(db, "search", "Tags:q", "--format", "uids").stdout.split() == [mr[0]]
    bad = run(db, "tag", "add", "x", "--series", "-", input=records + '{"name": "train", "count": 2}\n')
    assert bad.returncode == 2 and "stdin line 3: a JSON record without a SeriesInstanceUID" in bad.stderr
    assert run(db, "tag", "add", "x", "--series", "-", input="{oops\n").returncode == 2


def test_json_records_on_a_batch_commands_stdin_are_a_clear_error(
        indexed_once: tuple[Path, Path, dict[str, list[Path]]], tmp_path: Path) -> None:
    _, db, _ = indexed_once
    records = run(db, "search", "Modality:MR").stdout
    proc = kaapcli("convert", "-", "-o", tmp_path / "nii", input=records)
    assert proc.returncode == 2
    assert "stdin: a JSON record, not a path" in proc.stderr and "--format paths" in proc.stderr
    assert "File name too long" not in proc.stderr and not (tmp_path / "nii").exists()


def test_dataset_in_queries_from_field_and_stats(indexed: tuple[Path, Path, dict[str, list[Path]]]) -> None:
    _, db, by_series = indexed
    uids = sorted(by_series)
    mr = sorted(u for u in uids if modality_of(by_series[u]) == "MR")
    ct = [u for u in uids if u not in mr]

    def found(query: str) -> list[str]:
        proc = run(db, "search", query, "--format", "uids")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    proc = run(db, "dataset", "add", "body-{}", "--from-field", "BodyPartExamined", "--query", "*")
    assert proc.returncode == 0, proc.stderr
    listed = [json.loads(line) for line in run(db, "dataset", "list").stdout.splitlines()]
    assert listed == [{"name": "body-ABDOMEN", "count": 2}, {"name": "body-CHEST", "count": 1}]
    assert found("Dataset:body-ABDOMEN") == mr and found("Dataset:body-*") == uids and found("Dataset:*") == uids
    assert run(db, "tag", "add", "excluded", "--series", mr[0]).returncode == 0
    assert found("Dataset:body-ABDOMEN AND -Tags:excluded") == [mr[1]]
    assert found("-Dataset:body-ABDOMEN") == ct and found("dataset:(body-CHEST OR body-ABDOMEN)") == uids
    assert found("Dataset:nothing-*") == []
    missing = run(db, "search", "Dataset:body-abdomen")  # names are exact: a typo is an error, not "no series"
    assert missing.returncode == 66 and "dataset 'body-abdomen' does not exist" in missing.stderr
    # a series whose field has no value is reported, not added; a template needs {}
    proc = run(db, "dataset", "add", "--from-field", "Tags", "--query", "*")
    assert proc.returncode == 0 and f"warning: series {ct[0]}: no value: not added" in proc.stderr
    assert found("Dataset:excluded") == [mr[0]]
    assert run(db, "dataset", "add", "fixed", "--from-field", "Tags", "--query", "*").returncode == 2
    assert run(db, "dataset", "add", "--query", "*").returncode == 2  # neither NAME nor --from-field
    shown = run(db, "dataset", "show", "body-ABDOMEN", "--format", "paths")
    assert shown.stdout.splitlines() == [str(p) for u in mr for p in sorted(map(str, by_series[u]))]
    # stats: per dataset, per month, as CSV
    per_dataset = [json.loads(line) for line in run(db, "stats", "Dataset").stdout.splitlines()]
    assert per_dataset == [{"value": "body-ABDOMEN", "count": 2}, {"value": "body-CHEST", "count": 1},
                           {"value": "excluded", "count": 1}]
    months = {}
    for u in uids:
        date = str(pydicom.dcmread(by_series[u][0], stop_before_pixels=True).StudyDate)
        months[f"{date[:4]}-{date[4:6]}"] = months.get(f"{date[:4]}-{date[4:6]}", 0) + 1
    by_month = run(db, "stats", "StudyDate:month", "--format", "csv").stdout.splitlines()
    assert by_month == ["value,count", *(f"{m},{n}" for m, n in sorted(months.items()))]
    tags = run(db, "stats", "Tags", "--format", "csv").stdout.splitlines()
    assert tags == ["value,count", ",2", "excluded,1"]  # the empty value: series without tags


def test_index_source_must_name_a_configured_pacs(tree: Path, tmp_path: Path) -> None:
    proc = kaapcli("index", tree, "--index", tmp_path / "i.db", "--source", "nowhere")
    assert proc.returncode == 2 and "no [pacs.nowhere] profile" in proc.stderr
    assert not (tmp_path / "i.db").exists()


def test_a_file_name_with_a_line_break_is_never_printed(tree: Path, tmp_path: Path) -> None:
    """One path per line: a name holding a newline would read as two paths downstream (a file name is data)."""
    odd = tmp_path / "odd"
    odd.mkdir()
    source = dicom_files(tree)[0]
    shutil.copyfile(source, odd / "a.dcm")
    shutil.copyfile(source, odd / "x\n..\nb.dcm")  # the same instance under a hostile name
    db = tmp_path / "i.db"
    assert kaapcli("index", odd, "--index", db).returncode == 0
    proc = kaapcli("search", "*", "--format", "paths", "--index", db)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [str((odd / "a.dcm").absolute())]
    assert "1 of 2 file names hold a line break and cannot be printed one per line" in proc.stderr
