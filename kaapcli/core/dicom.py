"""DICOM I/O shared by operators: reading headers with clean errors, series keys, saving."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import string
import struct
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kaapcli.core import dictionary, fsio
from kaapcli.exitcodes import DataError, UsageError


def import_pydicom(*, pixels: bool = True) -> None:
    """Import pydicom faster: without ``requests`` (~80 ms: pydicom imports it only to download its own test
    files, and falls back to urllib), and with ``pixels=False`` without numpy too (~130 ms more), for a process
    that never decodes pixel values: pydicom still reads and writes every element, Pixel Data as bytes, and
    only its pixel_array needs numpy.  Nothing happens when pydicom is already imported."""
    if "pydicom" in sys.modules:
        return
    hidden = [name for name in ("requests", *(() if pixels else ("numpy",))) if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes ``import name`` raise ImportError
    try:
        import pydicom  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


def read(path: Path | IO[bytes], *, stop_before_pixels: bool = False, specific_tags: Iterable[Any] | None = None,
         defer_size: int | None = None, complete: bool = True) -> Any:
    """``pydicom.dcmread`` that turns every read failure into a one-line DataError.

    With ``complete`` (the default) the file must also parse to its end: pydicom reads a file cut inside an
    element header or value silently, short; here that is a DataError naming where it ends (see
    :func:`check_parsed_to_end`; DCMTK refuses such files too).  ``complete=False`` is for reads that only
    pick a grouping key, where the later full read reports the damage.
    """
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    tags = list(specific_tags) if specific_tags else None
    with contextlib.ExitStack() as stack:
        fp: Any = path
        if isinstance(path, str | os.PathLike):
            fp = stack.enter_context(open(path, "rb")) if complete else path
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True, specific_tags=tags,
                                 defer_size=defer_size)
        except InvalidDicomError as exc:
            raise DataError(f"not a valid DICOM file: {exc}") from exc
        except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError, OverflowError,
                AttributeError, IndexError, struct.error, zlib.error, BytesLengthException) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, EOFError | struct.error | zlib.error) or "end of file" in reason.lower():
                reason = f"truncated or damaged file ({reason})"
            raise DataError(f"cannot read DICOM: {reason}") from exc
        if len(ds) == 0 and not (getattr(ds, "file_meta", None) and (tags or not complete)):
            raise DataError("not a DICOM file: no data elements" if not getattr(ds, "file_meta", None)
                            else "truncated file: nothing after the file meta information")
        if complete and hasattr(fp, "tell"):
            check_parsed_to_end(ds, fp, subset=tags is not None)
    return ds


_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})  # positions are in the inflated stream


def check_parsed_to_end(ds: Any, fp: IO[bytes], *, subset: bool = False) -> None:
    """Raise DataError when the file ``ds`` was just read from does not end where its last element ends.

    Cheap on the common paths: after a full read, the last element's offset and length (pydicom keeps both
    for elements not yet decoded) must meet the file size; after a read stopped before Pixel Data, only
    the element headers from there to the end are walked (usually one: Pixel Data).  A read of a few tags
    (``subset``) that went to the end of the file walks every element header.  A file cut exactly between two
    elements cannot be told from a shorter whole one (by DCMTK neither).
    """
    parsed = fp.tell()
    pos = parsed
    size = fp.seek(0, 2)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) in _DEFLATED:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    try:
        if parsed < size:  # stopped before Pixel Data: the elements before it were whole
            _walk_elements(fp, parsed, size, bool(implicit), bool(little))
            return
        end = None if subset else _last_element_end(ds)
        if end is None:
            _walk_elements(fp, 0, size, bool(implicit), bool(little), from_start=True)
        elif end > size:
            last = next(reversed(ds._dict.values()))
            raise DataError(f"truncated file: {tag_label(int(last.tag))} needs {end - size} more bytes "
                            f"than the file has ({size} bytes)")
        elif end < size:
            raise DataError(f"truncated or damaged file: {size - end} bytes after the last complete element "
                            f"(at byte {end}) do not form an element")
    finally:
        fp.seek(pos)


def _last_element_end(ds: Any) -> int | None:
    """Where the last top-level element of a freshly read dataset ends in its file (None: not known)."""
    if not ds._dict:
        return None
    last = next(reversed(ds._dict.values()))
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None:
        return None  # already decoded: no offsets left
    if length != UNDEFINED:
        return int(tell) + int(length)
    value = getattr(last, "value", None)
    return int(tell) + len(value) + 8 if isinstance(value, bytes) else None  # content, then its delimiter


_ITEM_TAGS = (0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD)


def _walk_elements(fp: IO[bytes], pos: int, size: int, implicit: bool, little: bool, *,
                   from_start: bool = False) -> None:
    """Walk element headers from ``pos`` to the end of the file, seeking over values; raise DataError when the
    file ends inside a header or value, or inside an undefined-length sequence."""
    if from_start:
        fp.seek(128)
        pos = 132 if fp.read(4) == b"DICM" else 0
    order = "<" if little else ">"
    encodings = [(implicit, order)]  # per undefined-length level: the content of an undefined-length UN is implicit LE
    in_meta = from_start
    if from_start and pos >= size:
        raise DataError("truncated file: nothing after the preamble")
    while pos < size:
        if size - pos < 8:
            raise DataError(f"truncated file: ends inside an element header at byte {pos}")
        fp.seek(pos)
        head = fp.read(12)
        group_le = struct.unpack_from("<H", head)[0]
        if in_meta and group_le != 0x0002:
            in_meta = False
        elem_implicit, elem_order = (False, "<") if in_meta else encodings[-1]
        group, element = struct.unpack_from(elem_order + "HH", head)
        tag = group << 16 | element
        if tag in _ITEM_TAGS:
            length = struct.unpack_from(elem_order + "L", head, 4)[0]
            start = pos + 8
            if tag != 0xFFFEE000:  # a delimiter closes the innermost undefined-length level
                if len(encodings) > 1:
                    encodings.pop()
                pos = start
                continue
            if length == UNDEFINED:
                encodings.append(encodings[-1])
                pos = start
                continue
        elif elem_implicit or head[4:6] not in KNOWN_VR_BYTES:  # no VR: implicit, as pydicom reads a bad one
            length, start = struct.unpack_from(elem_order + "L", head, 4)[0], pos + 8
            if length == UNDEFINED:
                encodings.append(encodings[-1])
                pos = start
                continue
        else:
            vr = head[4:6]
            if vr in LONG_LENGTH_VR_BYTES:
                if len(head) < 12:
                    raise DataError(f"truncated file: ends inside the header of {tag_label(tag)}")
                length, start = struct.unpack_from(elem_order + "L", head, 8)[0], pos + 12
                if length == UNDEFINED:
                    encodings.append((True, "<") if vr == b"UN" else encodings[-1])
                    pos = start
                    continue
            else:
                length, start = struct.unpack_from(elem_order + "H", head, 6)[0], pos + 8
        if start + length > size:
            raise DataError(f"truncated file: {tag_label(tag)} has {size - start} of {length} bytes")
        pos = start + length
    if len(encodings) > 1:
        raise DataError("truncated file: ends inside a sequence (no delimiter)")
    if in_meta:
        raise DataError("truncated file: ends inside the file meta information")


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect the warnings pydicom emits (invalid values, VR guesses) as one-line messages, for
    ``Outcome.warnings``, instead of multi-line Python warnings on stderr.  Filled when the block ends."""
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield lines
        finally:
            text = (str(w.message).split(" Please see <")[0].strip() for w in caught)
            lines.extend(dict.fromkeys(t.splitlines()[0] for t in text if t))


def check_complete(ds: Any, read_warnings: Iterable[str] = ()) -> None:
    """Raise DataError when a file ended inside an element (pydicom reads truncated files silently)."""
    for note in read_warnings:
        if "end of file" in note.lower() or "eof" in note.lower():
            raise DataError(f"truncated or damaged file ({note})")
    if not ds._dict:
        return
    last = next(reversed(ds._dict.values()))  # insertion order = file order; a raw element still holds its length
    value, length = getattr(last, "value", None), getattr(last, "length", None)
    if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
        raise DataError(f"truncated file: {tag_label(last.tag)} has {len(value)} of {length} bytes")


def require(ds: Any, keyword: str) -> Any:
    value = ds.get(keyword)
    if value in (None, ""):
        raise DataError(f"missing {keyword}")
    return value


def series_uid(path: Path) -> str:
    """The SeriesInstanceUID of a file, read without parsing the rest (a grouping key)."""
    ds = read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    return str(require(ds, "SeriesInstanceUID"))


IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1543.1"  # kaapcli's implementation class UID (PS3.10 7.1)
IMPLEMENTATION_VERSION = "KAAPCLI_010"


def file_meta(sop_class: str, sop_uid: str, syntax: str | None = None) -> Any:
    """Part 10 file meta for an object kaapcli writes (explicit VR little endian unless told otherwise)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(syntax or ExplicitVRLittleEndian)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


# Explicit VR elements whose length field is 4 bytes after 2 reserved ones (PS3.5 Table 7.1-1).
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
LONG_LENGTH_VR_BYTES = frozenset(vr.encode() for vr in LONG_LENGTH_VRS)  # as they appear in a header
# Explicit VR elements with a 2-byte length field (PS3.5 7.1.2).
SHORT_LENGTH_VR_BYTES = frozenset(
    vr.encode() for vr in "AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
KNOWN_VR_BYTES = LONG_LENGTH_VR_BYTES | SHORT_LENGTH_VR_BYTES
UNDEFINED = 0xFFFFFFFF  # the undefined length (PS3.5 7.1.1)


def encode_file_meta(sop_class: str, sop_uid: str, syntax: str, source_aet: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a Part 10 file kaapcli writes (PS3.10 7.1),
    encoded directly: pydicom's writer validates and copies the group on every file, a measurable share of a
    header-only rewrite, and the receiver writes one per dataset."""
    def element(tag: int, vr: bytes, text: str) -> bytes:
        value = text.encode("ascii", "replace")
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
        return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value

    body = (struct.pack("<HH2sHL", 2, 0x0001, b"OB", 0, 2) + b"\0\1" + element(0x0002, b"UI", sop_class)
            + element(0x0003, b"UI", sop_uid) + element(0x0010, b"UI", syntax)
            + element(0x0012, b"UI", IMPLEMENTATION_UID) + element(0x0013, b"SH", IMPLEMENTATION_VERSION)
            + (element(0x0016, b"AE", source_aet) if source_aet else b""))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body


def encode_dataset(ds: Any, implicit: bool, little: bool) -> bytes:
    """``ds`` encoded as pydicom's ``write_dataset`` would, with one difference in cost: elements never decoded
    (most of a header that was mostly kept) are copied as read instead of each passing through pydicom's
    per-element writer.  Datasets read in another encoding or character set go through pydicom entirely."""
    from pydicom.filebase import DicomBytesIO

    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = implicit, little
    _encode_into(out, ds, None)
    return bytes(out.getvalue())


def _encode_into(out: Any, ds: Any, parent_charset: Any) -> None:
    from pydicom.filewriter import write_data_element, write_dataset

    encoding = (out.is_implicit_VR, out.is_little_endian)
    if ds.original_encoding != encoding or ds.original_character_set != ds._character_set:
        write_dataset(out, ds, parent_charset or "iso8859")
        return
    charset = ds.get("SpecificCharacterSet", parent_charset)
    order = "<" if out.is_little_endian else ">"
    for tag in sorted(ds.keys()):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        elem = ds.get_item(tag)
        if elem.is_raw:
            _write_element(out, tag, elem.VR, elem.value, order, elem.length == UNDEFINED)
        elif elem.VR == "SQ":
            _encode_sequence(out, elem, charset, order)
        elif (value := _ascii_value(elem)) is not None:
            _write_element(out, tag, elem.VR, value, order)
        else:
            write_data_element(out, elem, charset)


# String VRs whose str values pydicom writes as they are (DA, DT and TM included: only non-str values are formatted).
_PLAIN_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "LO", "LT", "SH", "ST", "UC", "UI", "UR", "UT"})


def _ascii_value(elem: Any) -> bytes | None:
    """The encoded value of a string element whose values are all ASCII, padded to even length (None: leave it to
    pydicom).  ASCII encodes the same under every character set, so no Specific Character Set lookup is needed."""
    if elem.VR not in _PLAIN_STRING_VRS:
        return None
    value = elem.value
    if value is None:
        return b""
    values: list[str] = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else []
    if not values or not all(isinstance(v, str) and v.isascii() for v in values):
        return None
    text = "\\".join(values).encode()
    if len(text) % 2:
        text += b"\0" if elem.VR == "UI" else b" "
    return text if len(text) <= 0xFFFF or elem.VR in LONG_LENGTH_VRS else None  # pydicom turns those into UN


def element_header(tag: int, vr: str, length: int, implicit: bool, order: str = "<") -> bytes:
    """The tag, VR (explicit VR only) and length of an element (PS3.5 7.1)."""
    if implicit:
        return struct.pack(order + "HHL", tag >> 16, tag & 0xFFFF, length)
    if vr in LONG_LENGTH_VRS:
        return struct.pack(order + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _write_element(out: Any, tag: int, vr: str, value: bytes, order: str, undefined: bool = False) -> None:
    """One element; ``undefined``: of undefined length, its value then closed by a sequence delimiter."""
    out.write(element_header(tag, vr, UNDEFINED if undefined else len(value), out.is_implicit_VR, order))
    out.write(value)
    if undefined:
        out.write(struct.pack(order + "HHL", 0xFFFE, 0xE0DD, 0))


def _encode_sequence(out: Any, elem: Any, charset: Any, order: str) -> None:
    """A decoded sequence, its items encoded by :func:`_encode_into` (lengths as pydicom writes them: defined
    unless read undefined, patched in once the content is written)."""
    start = out.tell()
    _write_element(out, int(elem.tag), "SQ", b"", order)
    header = out.tell() - start
    for item in elem.value:
        item_start = out.tell()
        out.write(struct.pack(order + "HHL", 0xFFFE, 0xE000, UNDEFINED))
        _encode_into(out, item, charset)
        if getattr(item, "is_undefined_length_sequence_item", False):
            out.write(struct.pack(order + "HHL", 0xFFFE, 0xE00D, 0))
        else:
            _patch_length(out, item_start + 4, out.tell() - item_start - 8, order)
    if elem.is_undefined_length:
        _patch_length(out, start + header - 4, UNDEFINED, order)
        out.write(struct.pack(order + "HHL", 0xFFFE, 0xE0DD, 0))
    else:
        _patch_length(out, start + header - 4, out.tell() - start - header, order)


def _patch_length(out: Any, at: int, length: int, order: str) -> None:
    end = out.tell()
    out.seek(at)
    out.write(struct.pack(order + "L", length))
    out.seek(end)


def uid_from(seed: str, prefix: str = "2.25.") -> str:
    """A deterministic UID under 2.25 (PS3.5 B.2: UUID-derived) from any seed string."""
    digest = hashlib.sha256(seed.encode()).digest()[:16]
    return prefix + str(int.from_bytes(digest, "big"))


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def template_values(ds: Any, template: str) -> dict[str, Any]:
    """Values of a dataset for the ``{Keyword}`` fields a template names (missing → ``unknown``)."""
    values: dict[str, Any] = {}
    for name in template_fields(template):
        value = ds.get(name)
        if value not in (None, ""):
            values[name] = value
    return values


def save(ds: Any, dest: Path) -> int:
    """Write a dataset as a Part 10 file, atomically; returns the bytes written."""
    with fsio.atomic_write(dest) as fh:
        ds.save_as(fh, enforce_file_format=True)
        return int(fh.tell())


# --------------------------------------------------------------------------- pixel data, byte for byte

def read_header(path: Path) -> tuple[Any, tuple[int, int] | None]:
    """The dataset up to Pixel Data, and the byte range of the Pixel Data element when it can be copied
    verbatim (it is the last element, in the encoding the file meta declares).  Otherwise the full dataset
    and None: the writer then re-encodes everything (pixel values are still never decoded)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with open(path, "rb") as fp:
        ds = read(fp, stop_before_pixels=True)
        start = fp.tell()
        size = fp.seek(0, 2)
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        implicit, little = getattr(ds, "original_encoding", (None, None))
        declared = (syntax.is_implicit_VR, syntax.is_little_endian) if syntax and syntax.is_transfer_syntax else None
        if syntax == DeflatedExplicitVRLittleEndian or declared != (implicit, little):
            return read(path), None  # positions in a deflated stream, or a mislabelled encoding: no splicing
        if start >= size:
            return ds, (size, size)  # no pixel data at all
        end = pixel_element_end(fp, start, bool(implicit), bool(little))
    if end is not None and end > size:
        raise DataError(f"truncated file: PixelData ends at byte {end}, the file has {size}")
    if end == size:
        return ds, (start, end)
    return read(path), None  # something follows Pixel Data (padding, signatures): full re-encode


def pixel_element_end(fp: IO[bytes], start: int, implicit: bool, little: bool) -> int | None:
    """Where the (7FE0,0010) element starting at ``start`` ends (None: not Pixel Data, or not walkable)."""
    order = "<" if little else ">"
    fp.seek(start)
    head = fp.read(12)
    if len(head) < 8 or struct.unpack(order + "HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if implicit:
        length, pos = struct.unpack(order + "L", head[4:8])[0], start + 8
    else:
        if head[4:6] not in (b"OB", b"OW") or len(head) < 12:
            return None
        length, pos = struct.unpack(order + "L", head[8:12])[0], start + 12
    if length != 0xFFFFFFFF:
        return pos + length
    while True:  # encapsulated: items until the sequence delimiter (always little endian)
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            return None
        group, element, item_length = struct.unpack("<HHL", item)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos
        if (group, element) != (0xFFFE, 0xE000) or item_length == 0xFFFFFFFF:
            return None
        pos += item_length


def write_spliced(ds: Any, meta: tuple[str, str, str] | bytes, source: Path, pixels: tuple[int, int],
                  dest: Path) -> int:
    """Write the file meta (class, instance UID, syntax; or its encoded bytes, preamble included), the edited
    header, then the source's Pixel Data element copied byte for byte."""
    implicit, little = ds.original_encoding
    header = (meta if isinstance(meta, bytes) else encode_file_meta(*meta)) + encode_dataset(ds, implicit, little)
    start, end = pixels
    with open(source, "rb") as src, fsio.atomic_write(dest) as out:
        fsio.reserve(out, len(header) + end - start)
        out.write(header)
        out.flush()  # the pixel bytes go to the descriptor directly, after the header
        copy_range(src, out, start, end - start)
    return len(header) + end - start


def copy_range(src: IO[bytes], dst: IO[bytes], offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst``: in the kernel (sendfile, about half the
    CPU of reading and writing them) where the platform allows it, else through a buffer."""
    while count > 0:
        try:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, count)
        except (AttributeError, OSError) as exc:  # no sendfile, or not between these files
            if isinstance(exc, OSError) and exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK,
                                                              errno.EOPNOTSUPP, errno.EXDEV):
                raise
            break
        if sent == 0:
            raise DataError(f"the file shrank while it was read ({count} bytes of Pixel Data missing)")
        offset, count = offset + sent, count - sent
    if count > 0:
        src.seek(offset)
        data = src.read(count)
        if len(data) < count:
            raise DataError(f"the file shrank while it was read ({count - len(data)} bytes of Pixel Data missing)")
        dst.write(data)


# --------------------------------------------------------------------------- tag paths

ALL_ITEMS = -1  # the ``[*]`` item index: every item of a sequence

_TAG_NUMBER = re.compile(r"\(?\s*(?:0x)?([0-9a-fA-F]{4})\s*[,|]\s*(?:0x)?([0-9a-fA-F]{4})\s*\)?"
                         r"|(?:0x)?([0-9a-fA-F]{8})")
_PATH_STEP = re.compile(r"(?P<tag>[^\[\]]+?)\s*(?:\[\s*(?P<index>\d+|\*)\s*\])?")


@dataclass(frozen=True)
class TagStep:
    """One step of a tag path: a tag and, for a sequence, an item index (``None`` = the element itself)."""

    tag: int
    index: int | None = None


def parse_tag(text: str) -> int:
    """A tag from a keyword (``PatientName``) or a number: ``(0010,0010)``, ``0010,0010``,
    ``0x0010,0x0010``, ``0010|0010`` (ITK/Kaapana) or ``00100010``.  Raises UsageError."""
    text = text.strip()
    tag = dictionary.tag_for_keyword(text)
    if tag is not None:
        return tag
    match = _TAG_NUMBER.fullmatch(text)
    if match is None:
        raise UsageError(f"{text!r} is not a DICOM keyword or tag",
                         hint="use a keyword like PatientName or a tag like (0010,0010)")
    group, element, packed = match.groups()
    return int(packed, 16) if packed else int(group, 16) << 16 | int(element, 16)


def parse_tag_path(text: str) -> tuple[TagStep, ...]:
    """A tag or a sequence path like ``ReferencedSeriesSequence[0].SeriesInstanceUID``
    (tags in any :func:`parse_tag` form; ``[*]`` = every item).  Raises UsageError."""
    steps: list[TagStep] = []
    parts = text.strip().split(".")
    for n, part in enumerate(parts):
        match = _PATH_STEP.fullmatch(part.strip())
        if match is None:
            raise UsageError(f"{text!r}: cannot parse {part!r}",
                             hint="a path looks like ReferencedSeriesSequence[0].SeriesInstanceUID")
        index = match["index"]
        step = TagStep(parse_tag(match["tag"]), None if index is None else ALL_ITEMS if index == "*" else int(index))
        if n < len(parts) - 1 and step.index is None:
            raise UsageError(f"{text!r}: sequence {match['tag']!r} needs an item index like [0] or [*]")
        steps.append(step)
    return tuple(steps)


def tag_label(tag: int) -> str:
    """``(0010,0010) PatientName`` (or just the number for private and unknown tags)."""
    entry = dictionary.entry(tag)
    if entry is not None:
        keyword = entry[4]
    else:  # repeating groups, group lengths
        from pydicom.datadict import keyword_for_tag

        keyword = keyword_for_tag(tag)
    number = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{number} {keyword}" if keyword else number


# Transfer syntaxes whose dataset is not explicit VR little endian: peek() leaves them to pydicom.
_NOT_EXPLICIT_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})


def peek(path: Path, tags: Iterable[int], head: int = 16384) -> dict[int, str] | None:
    """Values of a few top-level elements, as text, from the first ``head`` bytes of a Part 10 file.

    Grouping and ordering a series needs one or two tags of every file; a full pydicom read costs
    about five times more.  See :func:`peek_bytes`; ``None`` also when the file cannot be opened.
    """
    try:
        with open(path, "rb") as fh:
            buf = fh.read(head)
    except OSError:
        return None
    return peek_bytes(buf, tags, whole=len(buf) < head)


_ITEM_END, _SEQUENCE_END = 0xFFFEE00D, 0xFFFEE0DD
_HEADER, _LENGTH = struct.Struct("<HH2sH"), struct.Struct("<I")


def peek_bytes(buf: bytes, tags: Iterable[int], *, whole: bool = False) -> dict[int, str] | None:
    """Values of a few top-level elements, as text, from the start of a Part 10 file (``whole``: all of it).

    This walks the element headers of the common case (preamble, explicit VR little endian) and
    returns ``None`` for anything else or when ``buf`` ends before the tags, so the caller falls
    back to :func:`read`.  Absent tags are absent from the result.  A whole file that ends inside an
    element raises DataError (pydicom would read it silently, short).
    """
    wanted = set(tags)
    last = max(wanted)
    if buf[128:132] != b"DICM":
        return None
    found: dict[int, str] = {}
    pos, in_meta, syntax, depth = 132, True, "", 0  # depth: inside undefined-length sequences and items
    size = len(buf)
    while pos + 8 <= size:
        group, element, vr, length = _HEADER.unpack_from(buf, pos)  # explicit VR, 2-byte length
        tag = group << 16 | element
        if group == 0xFFFE:  # item and delimiters: no VR, a 4-byte length
            length, start = _LENGTH.unpack_from(buf, pos + 4)[0], pos + 8
            if tag in (_ITEM_END, _SEQUENCE_END):
                depth -= 1
            elif length == 0xFFFFFFFF:
                depth += 1
                length = 0
            pos = start + length
            continue
        if vr in LONG_LENGTH_VR_BYTES:
            if pos + 12 > size:
                break
            length, start = _LENGTH.unpack_from(buf, pos + 8)[0], pos + 12
        elif vr in SHORT_LENGTH_VR_BYTES:
            start = pos + 8
        else:
            return None  # not explicit VR: pydicom will tell
        if in_meta and group != 0x0002:
            if syntax in _NOT_EXPLICIT_LE:
                return None
            in_meta = False
        if not in_meta and depth == 0 and tag > last:
            return found
        if length == 0xFFFFFFFF:
            if vr != b"SQ":  # encapsulated pixel data (or an undefined-length UN): not walked
                return None
            depth += 1  # its items and elements follow; its delimiter ends it
            pos = start
            continue
        if start + length > len(buf):
            if whole:
                raise DataError(f"truncated file: ends inside ({group:04X},{element:04X})")
            return None
        value = buf[start:start + length]
        if tag == 0x00020010:
            syntax = value.decode("latin-1").strip(" \x00")
        elif not in_meta and depth == 0 and tag in wanted:
            found[tag] = value.decode("latin-1").strip(" \x00")
        pos = start + length
    if whole:
        if pos == len(buf) and depth == 0:
            return found
        raise DataError("truncated file: ends inside an element header")
    return None
