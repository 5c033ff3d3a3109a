"""pdf2dcm / dcm2pdf / bin2dcm / dcm2bin: byte-exact round trips, dciodvfy-clean objects, clear failures."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import dciodvfy_errors, dicom_files, kaapcli

from kaapcli.core import encapsulate


def minimal_pdf(extra: bytes = b"") -> bytes:
    """A small valid one-page PDF (xref offsets computed), made odd-length to exercise the pad byte."""
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
               b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 120 80]>>"]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + extra + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 4\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<</Size 4/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF" % xref
    return out if len(out) % 2 else out + b"\n"


def only_file(root: Path, pattern: str = "*") -> Path:
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and ".kaapcli" not in p.parts)
    assert len(files) == 1, files
    return files[0]


def test_pdf_round_trip_is_byte_exact_and_conformant(tmp_path: Path, mock_ct: Path) -> None:
    pdf = minimal_pdf()
    assert len(pdf) % 2 == 1
    (tmp_path / "report.pdf").write_bytes(pdf)
    proc = kaapcli("pdf2dcm", tmp_path / "report.pdf", "-o", tmp_path / "dcm", "--study-from", mock_ct,
                   "-k", "AccessionNumber=ACC-9", "--title", "Radiomics report")
    assert proc.returncode == 0, proc.stderr
    dcm = only_file(tmp_path / "dcm", "*.dcm")
    assert proc.stdout.split() == [str(dcm)]
    assert dciodvfy_errors(dcm) == []

    ds = pydicom.dcmread(dcm)
    source = pydicom.dcmread(dicom_files(mock_ct)[0], stop_before_pixels=True)
    assert ds.SOPClassUID == encapsulate.ENCAPSULATED_PDF
    assert (ds.PatientID, ds.PatientName, ds.StudyInstanceUID) == (
        source.PatientID, source.PatientName, source.StudyInstanceUID)
    assert ds.SeriesInstanceUID not in {pydicom.dcmread(f).SeriesInstanceUID for f in dicom_files(mock_ct)}
    assert ds.AccessionNumber == "ACC-9" and ds.DocumentTitle == "Radiomics report"
    assert ds.EncapsulatedDocumentLength == len(pdf)
    assert len(ds.EncapsulatedDocument) == len(pdf) + 1  # DICOM padded the odd value

    back = kaapcli("dcm2pdf", tmp_path / "dcm", "-o", tmp_path / "pdf")
    assert back.returncode == 0, back.stderr
    restored = only_file(tmp_path / "pdf", "*.pdf")
    assert restored.read_bytes() == pdf


def test_pdf2dcm_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.pdf").write_bytes(minimal_pdf())
    for name in ("one", "two"):
        assert kaapcli("pdf2dcm", tmp_path / "in", "-o", tmp_path / name, "-q").returncode == 0
    one, two = only_file(tmp_path / "one", "*.dcm"), only_file(tmp_path / "two", "*.dcm")
    assert one.relative_to(tmp_path / "one") == two.relative_to(tmp_path / "two")
    assert one.read_bytes() == two.read_bytes()
    assert dciodvfy_errors(one) == []  # also conformant without any study context


def test_non_pdf_input_fails_clearly_and_walked_others_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.pdf").write_bytes(minimal_pdf())
    (src / "fake.pdf").write_bytes(b"PK\x03\x04 this is a zip, not a PDF")
    (src / "notes.txt").write_text("not an input")
    proc = kaapcli("pdf2dcm", src, "-o", tmp_path / "out", "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["good.pdf"]["status"] == "ok"
    assert records["fake.pdf"]["status"] == "failed"
    assert records["notes.txt"]["status"] == "skipped"
    assert "fake.pdf: not a PDF (no %PDF- header)" in proc.stderr
    assert "Traceback" not in proc.stderr

    only_bad = kaapcli("pdf2dcm", src / "fake.pdf", "-o", tmp_path / "out2")
    assert only_bad.returncode == 65
    assert not any((tmp_path / "out2").rglob("*.dcm"))


def test_bad_keyword_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_bytes(minimal_pdf())
    proc = kaapcli("pdf2dcm", tmp_path / "a.pdf", "-o", tmp_path / "out", "-k", "NoSuchKeyword=1")
    assert proc.returncode == 2
    assert "NoSuchKeyword" in proc.stderr and "Traceback" not in proc.stderr


def test_dcm2pdf_skips_other_dicom_and_reports_broken_files(tmp_path: Path, mock_ct: Path) -> None:
    proc = kaapcli("dcm2pdf", mock_ct, "-o", tmp_path / "out", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    statuses = {json.loads(line)["status"] for line in proc.stdout.splitlines()}
    assert statuses == {"skipped"}
    assert not any((tmp_path / "out").rglob("*.pdf"))

    (tmp_path / "a.pdf").write_bytes(minimal_pdf())
    assert kaapcli("pdf2dcm", tmp_path / "a.pdf", "-o", tmp_path / "dcm", "-q").returncode == 0
    dcm = only_file(tmp_path / "dcm", "*.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(dcm.read_bytes()[:-40])
    broken = kaapcli("dcm2pdf", truncated, "-o", tmp_path / "out2")
    assert broken.returncode == 65
    assert f"{truncated}: truncated file: (0042,0011) EncapsulatedDocument" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert not any((tmp_path / "out2").rglob("*.pdf"))


def test_extract_document_without_recorded_length_drops_the_pad() -> None:
    pdf = minimal_pdf()
    ds = pydicom.Dataset()
    ds.EncapsulatedDocument = pdf + b"\x00"
    assert encapsulate.extract_document(ds) == pdf
    ds.EncapsulatedDocumentLength = len(pdf) - 5
    with pytest.raises(encapsulate.DataError, match="does not match"):
        encapsulate.extract_document(ds)


@pytest.fixture(scope="module")
def big_binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 25 MB random file (seeded) carried in DICOM at 10 MiB parts."""
    root = tmp_path_factory.mktemp("bin")
    src = root / "model weights.bin"
    src.write_bytes(random.Random(42).randbytes(25_000_001))
    proc = kaapcli("bin2dcm", src, "-o", root / "dcm", "--chunk-mb", "10", "-k", "PatientID=P-BIN")
    assert proc.returncode == 0, proc.stderr
    return src, root / "dcm"


def test_bin_round_trip_in_three_conformant_parts(tmp_path: Path, big_binary: tuple[Path, Path]) -> None:
    src, dcm_dir = big_binary
    parts = dicom_files(dcm_dir)
    assert len(parts) == 3
    headers = sorted((pydicom.dcmread(p, defer_size=1024) for p in parts), key=lambda d: d.InstanceNumber)
    assert [d.InstanceNumber for d in headers] == [1, 2, 3]
    assert len({d.SeriesInstanceUID for d in headers}) == 1
    for part in parts:
        assert dciodvfy_errors(part) == []
    block = headers[0].private_block(encapsulate.PRIVATE_GROUP, encapsulate.PRIVATE_CREATOR)
    assert block[0x01].value == "model weights.bin"
    assert block[0x03].value == 3 and block[0x04].value == src.stat().st_size
    assert headers[0].PatientID == "P-BIN" and headers[0].SOPClassUID == encapsulate.RAW_DATA

    proc = kaapcli("dcm2bin", dcm_dir, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    restored = tmp_path / "out" / "model weights.bin"
    assert proc.stdout.split("\n")[0] == str(restored)
    assert restored.read_bytes() == src.read_bytes()


def test_missing_part_is_named(tmp_path: Path, big_binary: tuple[Path, Path]) -> None:
    _, dcm_dir = big_binary
    parts = sorted(dicom_files(dcm_dir), key=lambda p: pydicom.dcmread(p, defer_size=1024).InstanceNumber)
    proc = kaapcli("dcm2bin", parts[0], parts[2], "-o", tmp_path / "out")
    assert proc.returncode == 65
    assert "'model weights.bin': part(s) 2 of 3 missing" in proc.stderr
    assert list((tmp_path / "out").glob("*.bin")) == []


def test_corrupt_part_is_named_and_nothing_is_written(tmp_path: Path, big_binary: tuple[Path, Path]) -> None:
    _, dcm_dir = big_binary
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in dicom_files(dcm_dir):
        ds = pydicom.dcmread(path)
        if ds.InstanceNumber == 2:
            block = ds.private_block(encapsulate.PRIVATE_GROUP, encapsulate.PRIVATE_CREATOR)
            data = bytearray(block[0x10].value)
            data[1000] ^= 0xFF
            block[0x10].value = bytes(data)
            corrupt = damaged / path.name
        ds.save_as(damaged / path.name)
    proc = kaapcli("dcm2bin", damaged, "-o", tmp_path / "out")
    assert proc.returncode == 65
    assert f"part 2 of 3 of 'model weights.bin' is corrupt: {corrupt}" in proc.stderr
    assert not (tmp_path / "out").exists()  # a run that wrote nothing leaves no OUT behind


def test_small_and_empty_files_and_other_dicom(tmp_path: Path, mock_ct: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "odd.bin").write_bytes(b"abc")
    (src / "empty.bin").write_bytes(b"")
    assert kaapcli("bin2dcm", src, "-o", tmp_path / "dcm", "-q").returncode == 0
    for part in dicom_files(tmp_path / "dcm"):
        assert dciodvfy_errors(part) == []
    proc = kaapcli("dcm2bin", tmp_path / "dcm", mock_ct, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr  # the CT slices are not bin2dcm series: skipped
    assert (tmp_path / "out" / "odd.bin").read_bytes() == b"abc"
    assert (tmp_path / "out" / "empty.bin").read_bytes() == b""


def test_interoperates_with_dcmtk_pdf2dcm_and_dcm2pdf(tmp_path: Path) -> None:
    """DCMTK reads what kaapcli writes, and kaapcli reads what DCMTK writes, both byte-exact."""
    from conftest import dcmtk

    pdf = minimal_pdf(b" ")
    (tmp_path / "a.pdf").write_bytes(pdf)
    assert kaapcli("pdf2dcm", tmp_path / "a.pdf", "-o", tmp_path / "k", "-q").returncode == 0
    ours = only_file(tmp_path / "k", "*.dcm")
    subprocess.run([dcmtk("dcm2pdf"), str(ours), str(tmp_path / "dcmtk.pdf")], check=True, capture_output=True)
    assert (tmp_path / "dcmtk.pdf").read_bytes() == pdf

    subprocess.run([dcmtk("pdf2dcm"), str(tmp_path / "a.pdf"), str(tmp_path / "theirs.dcm")], check=True,
                   capture_output=True)
    proc = kaapcli("dcm2pdf", tmp_path / "theirs.dcm", "-o", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    assert only_file(tmp_path / "back", "*.pdf").read_bytes() == pdf


def test_user_keywords_win_over_built_in_defaults(tmp_path: Path) -> None:
    """Kaapana's Pdf2Dcm/Bin2Dcm parameters as -k: Manufacturer, SeriesDescription, Modality, SeriesNumber."""
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 10)
    wanted = {"Manufacturer": "ACME Radiology", "ManufacturerModelName": "Reporter 2", "SeriesDescription": "Report",
              "SeriesNumber": "42", "Modality": "OT"}
    for command, src in (("pdf2dcm", pdf), ("bin2dcm", blob)):
        proc = kaapcli(command, src, "-o", tmp_path / command, "-q", *[a for k, v in wanted.items()
                                                                          for a in ("-k", f"{k}={v}")])
        assert proc.returncode == 0, proc.stderr
        (out,) = [Path(p) for p in proc.stdout.split()]
        ds = pydicom.dcmread(out)
        assert {k: str(ds.get(k)) for k in wanted} == wanted, command
        assert dciodvfy_errors(out) == []
    for bad, reason in (("SOPClassUID=1.2.3", "cannot be changed"), ("SeriesNumber=abc", "not a valid IS value")):
        proc = kaapcli("pdf2dcm", pdf, "-o", tmp_path / "bad", "-k", bad)
        assert proc.returncode == 2 and reason in proc.stderr and "Traceback" not in proc.stderr
