"""Documents and arbitrary files carried inside DICOM, and back, byte for byte.

* ``pdf2dcm`` / ``dcm2pdf``: Encapsulated PDF Storage (PS3.3 A.45.1).  DICOM pads an odd-length
  EncapsulatedDocument with one byte; EncapsulatedDocumentLength (0042,0015) records the true
  length so the original bytes come back exactly.
* ``bin2dcm`` / ``dcm2bin``: Raw Data Storage (PS3.3 A.37), the standard's container for opaque data
  in private elements.  A file is cut into parts of at most ``chunk`` bytes, one instance per part,
  all parts of one file forming one series.  Standard attributes say what fits them
  (InstanceNumber = part number, SeriesDescription = file name); the rest lives in the private
  block of :data:`PRIVATE_CREATOR` (layout in :data:`BIN_ELEMENTS` and ``docs/utilities.md``).
  Files are read part by part, so memory holds at most one part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError, NoInputError, UsageError

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
PDF_MAGIC = b"%PDF-"
PDF_EOF = b"%%EOF"
PDF_SNIFF = 1024  # readers accept "%PDF-" anywhere in the first 1 KB (PDF 32000-1, Annex H)
READ_BLOCK = 1 << 20

# The private block of bin2dcm: group 0x0011, creator at (0011,0010), elements (0011,10xx).
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "KAAPCLI BINARY 1"
BIN_ELEMENTS: dict[str, tuple[int, str]] = {
    "file_name": (0x01, "UT"),      # original file name (UTF-8), no directory part
    "part_number": (0x02, "UL"),    # 1-based; also InstanceNumber
    "part_count": (0x03, "UL"),
    "file_size": (0x04, "UV"),      # bytes of the whole file
    "part_offset": (0x05, "UV"),    # where this part starts in the file
    "part_length": (0x06, "UV"),    # true length of the part (the OB value may carry one pad byte)
    "file_sha256": (0x07, "LO"),    # hex SHA-256 of the whole file
    "part_sha256": (0x08, "LO"),    # hex SHA-256 of this part
    "data": (0x10, "OB"),
}

CREATOR_VERSION_UID = dicom.uid_from("kaapcli/bin2dcm/layout/1")  # Raw Data module: version of this layout

# Patient, study and clinical-trial attributes a new series copies from its study (--study-from).
STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "StudyDescription", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
)
TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber")


# --------------------------------------------------------------------------- study context

# What makes the object what it is: never taken from -k (the encoder and the IOD own them).
STRUCTURAL = frozenset({
    "SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet", "EncapsulatedDocument", "EncapsulatedDocumentLength",
    "MIMETypeOfEncapsulatedDocument", "InstanceNumber", "CreatorVersionUID", "TransferSyntaxUID",
    "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"})


def parse_keywords(pairs: list[str]) -> dict[str, str]:
    """``Keyword=value`` pairs (``-k``) checked against the DICOM dictionary and the keyword's VR."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.valuerep import validate_value

    values: dict[str, str] = {}
    for pair in pairs:
        keyword, sep, value = pair.partition("=")
        keyword = keyword.strip()
        if not sep or tag_for_keyword(keyword) is None:
            raise UsageError(f"-k {pair!r}: expected Keyword=value with a DICOM keyword, e.g. PatientID=P1")
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            raise UsageError(f"-k {pair!r}: sequences cannot be set with -k")
        if keyword in STRUCTURAL:
            raise UsageError(f"-k {pair!r}: {keyword} is set by kaapcli for this object and cannot be changed")
        try:
            for part in value.split("\\") if vr not in ("LT", "ST", "UT", "UR") else [value]:
                validate_value(vr, part, 2)  # 2 = raise
        except (ValueError, TypeError) as exc:
            reason = str(exc).split(". Please see")[0]
            raise UsageError(f"-k {pair!r}: not a valid {vr} value ({reason})") from None
        values[keyword] = value
    return values


def apply_keywords(ds: Any, context: dict[str, str]) -> None:
    """Set the study context and ``-k`` values on ``ds``: called last, so what the user sets wins over every
    built-in default (Manufacturer, Modality, SeriesNumber, SeriesDescription, ...)."""
    for keyword, value in context.items():
        setattr(ds, keyword, value)


def study_context(study_from: Path | None, keywords: dict[str, str]) -> dict[str, str]:
    """Patient and study attributes of a new series: from the first DICOM file under ``study_from``,
    then overridden by ``-k`` values."""
    context: dict[str, str] = {}
    if study_from is not None:
        if not study_from.exists():
            raise NoInputError(f"{study_from}: no such file or directory")
        files = [study_from] if study_from.is_file() else fsio.walk_files(study_from)
        source = next((f for f in files if fsio.is_dicom(f)), None)
        if source is None:
            raise NoInputError(f"{study_from}: no DICOM file to take the study from")
        ds = dicom.read(source, stop_before_pixels=True)
        dicom.require(ds, "StudyInstanceUID")
        context = {kw: str(ds.get(kw)) for kw in STUDY_KEYWORDS if ds.get(kw) not in (None, "")}
    context.update(keywords)
    return context


def _base_dataset(sop_class: str, sop_uid: str, context: dict[str, str], study_seed: str) -> Any:
    """A dataset with file meta, SOP common, patient and study attributes filled in."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.file_meta = dicom.file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: file names and titles may be anything
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for keyword in TYPE2_EMPTY:
        setattr(ds, keyword, "")
    ds.Manufacturer = "kaapcli"
    apply_keywords(ds, context)
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = dicom.uid_from(study_seed + "/study")
    return ds


def _content_datetime(path: Path) -> tuple[str, str]:
    """Content date and time: the input's modification time (stable across re-runs, unlike 'now')."""
    stamp = datetime.fromtimestamp(path.stat().st_mtime)
    return stamp.strftime("%Y%m%d"), stamp.strftime("%H%M%S")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _context_seed(context: dict[str, str]) -> str:
    return "|".join(f"{k}={v}" for k, v in sorted(context.items()))


# --------------------------------------------------------------------------- PDF

def pdf_complete(data: bytes) -> bool:
    """A PDF ends with %%EOF; readers look for it in the last 1 KB (trailing bytes after it are tolerated)."""
    return PDF_EOF in data[-PDF_SNIFF:]


def is_pdf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return PDF_MAGIC in fh.read(PDF_SNIFF)
    except OSError:
        return False


class PdfToDicom(BaseOperator):
    """One Encapsulated PDF instance per PDF, a new series in the given (or a new) study."""

    name = "pdf2dcm"

    def __init__(self, context: dict[str, str], title: str | None = None):
        self.context = context
        self.title = title

    def options(self) -> dict[str, Any]:
        return {"context": self.context, "title": self.title}

    def accepts(self, path: Path) -> bool:
        # A *.pdf that is not a PDF is an input that fails; other non-PDF files are skipped.
        return path.suffix.lower() == ".pdf" or is_pdf(path)

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        path = item.paths[0]
        data = path.read_bytes()
        if PDF_MAGIC not in data[:PDF_SNIFF]:
            raise DataError("not a PDF (no %PDF- header)", hint="pdf2dcm takes PDF documents only")
        warnings = [] if pdf_complete(data) else ["no %%EOF at the end: the PDF may be truncated (stored as is)"]
        digest = hashlib.sha256(data).hexdigest()
        seed = f"pdf2dcm/{digest}/{_context_seed(self.context)}/{self.title}"
        series_uid = dicom.uid_from(seed + "/series")
        ds = _base_dataset(ENCAPSULATED_PDF, dicom.uid_from(seed + "/instance"), self.context, seed)
        ds.Modality = "DOC"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 901
        ds.SeriesDescription = "PDF"
        ds.ConversionType = "WSD"  # SC Equipment module: made on a workstation
        ds.InstanceNumber = 1
        ds.ContentDate, ds.ContentTime = _content_datetime(path)
        ds.AcquisitionDateTime = ""
        ds.BurnedInAnnotation = "YES"  # a report names its patient: treat as identifying
        ds.DocumentTitle = self.title if self.title is not None else path.stem
        ds.ConceptNameCodeSequence = []
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = data
        ds.EncapsulatedDocumentLength = len(data)
        apply_keywords(ds, self.context)
        dest = ctx.out / fsio.safe_name(str(ds.SeriesInstanceUID)) / f"{ds.SOPInstanceUID}.dcm"
        dicom.save(ds, dest)
        return Outcome(outputs=[dest], warnings=warnings)


class DicomToPdf(BaseOperator):
    """The PDF of an Encapsulated PDF instance, exactly as it went in."""

    name = "dcm2pdf"

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        ds = dicom.read(item.paths[0])
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class != ENCAPSULATED_PDF:
            return Outcome(skipped=True, message=f"not an Encapsulated PDF (SOP class {sop_class or 'missing'})")
        data = extract_document(ds)
        if PDF_MAGIC not in data[:PDF_SNIFF]:
            raise DataError("EncapsulatedDocument does not hold a PDF (no %PDF- header)")
        if not pdf_complete(data):
            raise DataError("the encapsulated PDF is truncated (no %%EOF at its end)",
                            hint="the DICOM file is probably cut short; fetch it again")
        dest = ctx.out / f"{dicom.require(ds, 'SOPInstanceUID')}.pdf"
        fsio.write_bytes(dest, data)
        return Outcome(outputs=[dest])


def extract_document(ds: Any) -> bytes:
    """The encapsulated bytes without DICOM's pad byte: cut at EncapsulatedDocumentLength when present.

    Without a recorded length (older writers), a trailing NUL after a PDF's ``%%EOF`` is taken as the pad.
    """
    data = ds.get("EncapsulatedDocument")
    if data is None:
        raise DataError("missing EncapsulatedDocument (0042,0011)")
    data = bytes(data)
    length = ds.get("EncapsulatedDocumentLength")
    if length is not None:
        length = int(length)
        if length > len(data) or len(data) - length > 1:
            raise DataError(f"EncapsulatedDocumentLength {length} does not match the {len(data)} bytes stored")
        return data[:length]
    if len(data) % 2 == 0 and data.endswith(b"\x00") and data.rstrip(b"\x00").rstrip().endswith(PDF_EOF):
        return data[:-1]
    return data


# --------------------------------------------------------------------------- any binary file

@dataclass
class Part:
    number: int  # 1-based
    offset: int
    length: int
    sha256: str


@dataclass
class BinaryPlan:
    """How one file is cut into parts, with the checksums every part records."""

    path: Path
    size: int
    sha256: str
    parts: list[Part] = field(default_factory=list)


def plan_parts(path: Path, chunk: int) -> BinaryPlan:
    """Hash the whole file and each part in one streaming pass."""
    size = path.stat().st_size
    whole = hashlib.sha256()
    plan = BinaryPlan(path, size, "")
    with open(path, "rb") as fh:
        for number, offset in enumerate(range(0, size, chunk) or [0], 1):  # an empty file is one empty part
            part_hash = hashlib.sha256()
            length = 0
            for block in _blocks(fh, min(chunk, size - offset)):
                whole.update(block)
                part_hash.update(block)
                length += len(block)
            if length != min(chunk, size - offset):
                raise DataError("file changed while reading it")
            plan.parts.append(Part(number, offset, length, part_hash.hexdigest()))
    plan.sha256 = whole.hexdigest()
    return plan


def _blocks(fh: IO[bytes], n: int) -> Iterator[bytes]:
    while n > 0:
        block = fh.read(min(READ_BLOCK, n))
        if not block:
            return
        n -= len(block)
        yield block


class BinaryToDicom(BaseOperator):
    """Any file as a Raw Data series: one instance per part of at most ``chunk`` bytes."""

    name = "bin2dcm"

    def __init__(self, chunk: int, context: dict[str, str]):
        if chunk < 2:
            raise UsageError("--chunk-mb is too small")
        self.chunk = chunk - chunk % 2  # even parts: only the last one can need a pad byte
        self.context = context

    def options(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "context": self.context}

    def accepts(self, path: Path) -> bool:
        return path.is_file()

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        path = item.paths[0]
        plan = plan_parts(path, self.chunk)
        seed = f"bin2dcm/{plan.sha256}/{path.name}/{self.chunk}/{_context_seed(self.context)}"
        series_uid = dicom.uid_from(seed + "/series")
        date, time = _content_datetime(path)
        outputs = []
        with open(path, "rb") as fh:
            for part in plan.parts:
                fh.seek(part.offset)
                data = fh.read(part.length)
                if hashlib.sha256(data).hexdigest() != part.sha256:
                    raise DataError(f"file changed while reading (part {part.number})")
                ds = _base_dataset(RAW_DATA, dicom.uid_from(f"{seed}/part/{part.number}"), self.context, seed)
                ds.Modality = "OT"
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = 902
                ds.SeriesDescription = path.name[:64]
                ds.Laterality = ""
                ds.InstanceNumber = part.number
                ds.ContentDate, ds.ContentTime = date, time
                ds.AcquisitionContextSequence = []
                ds.CreatorVersionUID = CREATOR_VERSION_UID
                values = {"file_name": path.name, "part_number": part.number, "part_count": len(plan.parts),
                          "file_size": plan.size, "part_offset": part.offset, "part_length": part.length,
                          "file_sha256": plan.sha256, "part_sha256": part.sha256, "data": data}
                block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
                for key, (element, vr) in BIN_ELEMENTS.items():
                    block.add_new(element, vr, values[key])
                apply_keywords(ds, self.context)
                dest = ctx.out / fsio.safe_name(str(ds.SeriesInstanceUID)) / f"{ds.SOPInstanceUID}.dcm"
                dicom.save(ds, dest)
                outputs.append(dest)
                del ds, data, block  # one part in memory at a time
        return Outcome(outputs=outputs)


def _bin_value(ds: Any, key: str) -> Any:
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return block[BIN_ELEMENTS[key][0]].value
    except KeyError:
        raise DataError(f"missing kaapcli binary attribute {key!r}") from None


class DicomToBinary(BaseOperator):
    """Restore the original file from the Raw Data series bin2dcm wrote (one item per series)."""

    name = "dcm2bin"
    grouped = True

    def group_key(self, path: Path) -> str | None:
        creator = (PRIVATE_GROUP << 16) | 0x0010
        ds = dicom.read(path, stop_before_pixels=True,
                        specific_tags=["SOPClassUID", "SeriesInstanceUID", creator])
        if str(ds.get("SOPClassUID", "")) != RAW_DATA or ds.get(creator) is None:
            return None  # other DICOM: not an input of dcm2bin
        if ds[creator].value != PRIVATE_CREATOR:
            return None
        return str(dicom.require(ds, "SeriesInstanceUID"))

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        headers = [(path, dicom.read(path, defer_size=4096)) for path in item.paths]
        first = headers[0][1]
        name, count, size, sha = (_bin_value(first, k) for k in ("file_name", "part_count", "file_size",
                                                                    "file_sha256"))
        name = str(name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise DataError(f"unsafe original file name {name!r}")
        by_number: dict[int, Path] = {}
        for path, ds in headers:
            if _bin_value(ds, "file_sha256") != sha or _bin_value(ds, "part_count") != count:
                raise DataError(f"{path}: part of a different file than {name!r} in the same series")
            number = int(_bin_value(ds, "part_number"))
            if number in by_number:
                raise DataError(f"part {number} of {name!r} twice: {by_number[number]} and {path}")
            by_number[number] = path
        missing = [n for n in range(1, int(count) + 1) if n not in by_number]
        if missing:
            raise DataError(f"{name!r}: part(s) {', '.join(map(str, missing))} of {count} missing",
                            hint="give every file of the series (all parts) as input")
        dest = ctx.out / name
        whole = hashlib.sha256()
        written = 0
        with fsio.atomic_write(dest) as out:
            for number in range(1, int(count) + 1):
                path = by_number[number]
                ds = dicom.read(path)
                length = int(_bin_value(ds, "part_length"))
                data = bytes(_bin_value(ds, "data") or b"")[:length]
                if len(data) != length or hashlib.sha256(data).hexdigest() != _bin_value(ds, "part_sha256"):
                    raise DataError(f"part {number} of {count} of {name!r} is corrupt: {path} "
                                    "(SHA-256 does not match)")
                whole.update(data)
                out.write(data)
                written += len(data)
                del ds, data
            if written != int(size) or whole.hexdigest() != sha:
                raise DataError(f"{name!r}: restored file does not match its SHA-256 / size")
        return Outcome(outputs=[dest])
