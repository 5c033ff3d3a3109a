"""``kaapcli phi-scan``: nothing on anonymize's output of pydicom's test files; every planted leak found.

Each leak is planted in a copy of that clean output, one kind per case, and the scan must report it where it is
(element, sequence item, file meta, file name, folder name, sidecar, hidden file, the map) with exit 1.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_files, kaapcli

ORIGINAL = "CT_small.dcm"  # PatientName CompressedSamples^CT1, PatientID 1CT1


def scan(*args: object) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    proc = kaapcli("phi-scan", *args)
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clean(anonymized_pydicom: tuple[subprocess.CompletedProcess[str], Path]) -> tuple[Path, dict[str, Path]]:
    """The de-identified tree and, per original file name, its output."""
    proc, out = anonymized_pydicom
    outputs = {Path(r["input"]).name: Path(r["outputs"][0]) for r in map(json.loads, proc.stdout.splitlines())
               if r["status"] == "ok"}
    return out, outputs


def test_clean_output_has_no_findings(clean: tuple[Path, dict[str, Path]], distinct_pydicom_files: Path) -> None:
    out, outputs = clean
    assert len(outputs) > 100
    proc, findings = scan(out, "--originals", distinct_pydicom_files)
    assert proc.returncode == 0 and findings == [], (proc.stderr, findings[:5])
    assert "findings" in proc.stderr and "Traceback" not in proc.stderr


def test_a_copy_of_the_originals_is_all_findings(distinct_pydicom_files: Path, tmp_path: Path) -> None:
    """The control: without de-identification every file is reported, of every kind the originals carry."""
    shutil.copytree(distinct_pydicom_files, tmp_path / "copy")
    proc, findings = scan(tmp_path / "copy", "--originals", distinct_pydicom_files)
    assert proc.returncode == 1
    assert {f["kind"] for f in findings} >= {"uid", "name", "date", "identifier", "private-tag", "unmarked"}
    assert len({f["path"] for f in findings}) == len(list(distinct_pydicom_files.iterdir()))


# case -> (kind, text in "where"); each case is planted in its own output file of one copy of the clean tree
CASES = {
    "element": ("name", "(0008,0070) Manufacturer"),
    "sequence": ("identifier", "DerivationCodeSequence[0] > (0008,0104) CodeMeaning"),
    "file meta": ("uid", "file meta > (0002,0003)"),
    "file name": ("name", "file name"),
    "folder name": ("identifier", "file name"),
    "sidecar": ("name", "content, line 2"),
    "hidden file": ("identifier", "content, line 1"),
    "map": ("identifier", "table pseudonyms, row 1"),
    "private": ("private-tag", "(0009,xxxx) ACME 1.0"),
    "burned-in": ("burned-in", "BurnedInAnnotation"),
    "unmarked": ("unmarked", "PatientIdentityRemoved"),
    "free text": ("pattern", "(0020,4000) ImageComments"),
    "custom pattern": ("pattern", "(0008,0070) Manufacturer"),
}


def _plant(ds: pydicom.Dataset, target: Path, tree: Path, case: str) -> Path:
    """Plant one leak of kind ``case`` in (or beside) the output ``target``; returns the path it is reported at."""
    if case == "element":
        ds.Manufacturer = "CompressedSamples^CT1"  # CT_small.dcm's PatientName
    elif case == "sequence":
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99LOCAL", "for 1CT1"  # its PatientID
        ds.DerivationCodeSequence = pydicom.Sequence([item])
    elif case == "file meta":
        from pydicom.data import get_testdata_file

        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.dcmread(get_testdata_file(ORIGINAL),
                                                                  stop_before_pixels=True).SOPInstanceUID
    elif case == "private":
        ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", "x")
    elif case == "burned-in":
        ds.BurnedInAnnotation = "YES"
    elif case == "unmarked":
        del ds.PatientIdentityRemoved
    elif case == "free text":
        ds.ImageComments = "seen by Dr. Smith on 2019-05-03, record 48151623"
    elif case == "custom pattern":
        ds.Manufacturer = "HOSP-4711"
    ds.save_as(target)
    if case == "file name":
        target.rename(target.with_name("CompressedSamples_" + target.name))
        return target.with_name("CompressedSamples_" + target.name)
    if case == "folder name":
        (target.parent / "1CT1").mkdir()
        target.rename(target.parent / "1CT1" / target.name)
        return target.parent / "1CT1" / target.name
    if case == "sidecar":
        (target.parent / "notes.json").write_text('{\n "patient": "compressedsamples ct1"\n}\n')
        return target.parent / "notes.json"
    if case == "hidden file":
        (tree / ".cache").mkdir()
        (tree / ".cache" / "manifest.json").write_text('{"/data/in/1CT1/image.dcm": {"outputs": []}}\n')
        return tree / ".cache" / "manifest.json"
    if case == "map":
        con = sqlite3.connect(tree / "map.sqlite")
        con.execute("CREATE TABLE pseudonyms (kind, original, pseudonym)")
        con.execute("INSERT INTO pseudonyms VALUES ('patient_id', '1CT1', 'ANON-0')")
        con.commit()
        con.close()
        return tree / "map.sqlite"
    return target


@pytest.fixture(scope="module")
def planted(clean: tuple[Path, dict[str, Path]], distinct_pydicom_files: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], list[dict],
                                                               dict[str, Path]]:
    """One copy of the clean tree with every case planted, scanned once (with --originals and --patterns)."""
    tree, outputs = clean
    tmp = tmp_path_factory.mktemp("planted")
    dest = tmp / "tree"
    shutil.copytree(tree, dest)
    targets = sorted(dest / p.relative_to(tree) for p in outputs.values())
    where = {case: _plant(pydicom.dcmread(target), target, dest, case)
             for case, target in zip(sorted(CASES), targets[:len(CASES)], strict=True)}
    (tmp / "patterns.txt").write_text("# site record numbers\nsite record\tHOSP-\\d{4}\n")
    proc, findings = scan(dest, "--originals", distinct_pydicom_files, "--patterns", tmp / "patterns.txt")
    return proc, findings, where


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_planted_leak_is_found(planted: tuple[subprocess.CompletedProcess[str], list[dict], dict[str, Path]],
                                     case: str) -> None:
    proc, findings, where = planted
    kind, location = CASES[case]
    assert proc.returncode == 1, proc.stderr
    at = [f for f in findings if f["path"] == str(where[case])]
    assert [f for f in at if f["kind"] == kind and location in f["where"]], (case, at)
    assert {f["kind"] for f in at} <= {kind, "pattern"}, at  # nothing else is reported there


def test_nothing_but_the_planted_leaks_is_reported(
        planted: tuple[subprocess.CompletedProcess[str], list[dict], dict[str, Path]]) -> None:
    _, findings, where = planted
    assert {f["path"] for f in findings} == {str(p) for p in where.values()}


def test_patterns_without_originals_values_masked_and_kinds_allowed(clean: tuple[Path, dict[str, Path]],
                                                                    tmp_path: Path) -> None:
    tree, outputs = clean
    dest = tmp_path / "one"
    dest.mkdir()
    _plant(pydicom.dcmread(outputs[ORIGINAL]), dest / "x.dcm", dest, "free text")
    proc, findings = scan(dest)
    assert proc.returncode == 1
    assert {f["what"] for f in findings} == {"person name", "date", "record number"}
    assert all("Smith" not in f["value"] and "*" in f["value"] for f in findings)  # masked: Dr. S****
    _, shown = scan(dest, "--show-values")
    assert "Dr. Smith" in {f["value"] for f in shown}
    proc, findings = scan(dest, "--allow", "pattern")
    assert proc.returncode == 0 and findings == []


def test_kaapana_profile_output_is_not_clean(mock_ct: Path, tmp_path: Path) -> None:
    """Kaapana's 45 tags leave private elements and dates and set no marker: the gate says so."""
    proc = kaapcli("anonymize", mock_ct, "-o", tmp_path / "out", "--key", "k", "--profile", "kaapana", "-q")
    assert proc.returncode == 0, proc.stderr
    proc, findings = scan(tmp_path / "out", "--originals", mock_ct)
    assert proc.returncode == 1 and {"unmarked", "date"} <= {f["kind"] for f in findings}
    assert len({f["path"] for f in findings if f["kind"] == "unmarked"}) == len(dicom_files(mock_ct))


def test_errors_are_one_line_and_not_a_pass(tmp_path: Path) -> None:
    proc, _ = scan(tmp_path / "missing")
    assert proc.returncode == 66 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "p.txt").write_text("bad\t(unclosed\n")
    proc, _ = scan(tmp_path, "--patterns", tmp_path / "p.txt")
    assert proc.returncode == 78 and "p.txt:1" in proc.stderr
    broken = tmp_path / "tree" / "x.dcm"
    broken.parent.mkdir()
    broken.write_bytes(Path(pydicom.data.get_testdata_file(ORIGINAL)).read_bytes()[:1500])  # ends inside an element
    proc, findings = scan(tmp_path / "tree")
    assert proc.returncode == 1 and [f["kind"] for f in findings] == ["unreadable"]


def test_a_worker_without_the_originals_values_fails_rather_than_passes(tmp_path: Path) -> None:
    """Workers inherit the originals' values from the scanning process; one that did not (another start method)
    must fail its items, since an empty set of values would report a leaking tree clean."""
    from kaapcli.core.batch import Context, Item
    from kaapcli.core.phi_scan import ScanOperator, ScanRules

    (tmp_path / "f.txt").write_text("x\n")
    op = ScanOperator(ScanRules(root=tmp_path, identifiers_token="from-another-scan"))
    with pytest.raises(RuntimeError, match="originals"):
        op.process(Item("f", (tmp_path / "f.txt",)), Context(out=None))


@pytest.mark.parametrize("unit", ["A-", "a.a+", "Dr ", "1"])
def test_patterns_take_linear_time_on_hostile_text(unit: str) -> None:
    """Header values and sidecars are attacker-controlled: ten times the text costs about ten times the time
    (a quadratic pattern would take a hundred times), whatever repeats in it."""
    import time

    from kaapcli.core.phi_scan import free_text_pattern

    def seconds(n: int) -> float:
        text = unit * n + "x"
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            free_text_pattern(text)
            best = min(best, time.perf_counter() - start)
        return best

    assert seconds(100_000) < 40 * seconds(10_000)
