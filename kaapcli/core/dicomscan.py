"""A fast reader of plain DICOM headers, without pydicom: the top-level elements before the pixel data.

Converting a series needs some forty attributes of every file and the place of its pixel bytes;
pydicom parses every element into objects first, which costs several times the conversion itself.
This module walks the element headers of the common case and decodes, on request, the attributes
listed in :data:`KEYWORDS` exactly as pydicom would (strings stripped as pydicom strips them, DS as
float, IS as int, binary numbers as int/float, several values as lists):

1. read the first 64 KiB of the file (more when the header is longer, up to ``MAX_HEADER``);
2. walk the file meta group (always explicit VR little endian, PS3.10 7.1), then the dataset in
   explicit or implicit VR little endian; sequences are stepped over (items and delimiters counted),
   never decoded;
3. stop at Pixel Data (7FE0,0010), recording where its bytes start and how many there are.

Anything else, a deflated or big endian dataset, encapsulated (compressed) pixel data, float pixel
data, a file without the DICM preamble, a value pydicom would read differently (an IS of "01", an
unknown character set with non-ASCII bytes), makes :func:`scan` return None or :meth:`Header.get`
raise :class:`Unsupported`: the caller then reads the file with pydicom.  So this reader never
decides anything pydicom would decide differently; it only gets there faster.

Never: trusts a length that runs past the bytes read, or allocates from a header value.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

HEAD = 16384  # first read: a CT header is ~2 KiB; a Siemens MR with CSA headers (~20 KiB) takes a second one
MAX_HEADER = 16 * 2**20  # longer headers (enhanced objects with thousands of frames) go to pydicom
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009

# keyword -> (tag, VR): the attributes callers may ask for (PS3.6 names and VRs).
KEYWORDS: dict[str, tuple[int, str]] = {
    "SpecificCharacterSet": (0x00080005, "CS"), "ImageType": (0x00080008, "CS"),
    "SOPClassUID": (0x00080016, "UI"), "SOPInstanceUID": (0x00080018, "UI"), "StudyDate": (0x00080020, "DA"),
    "SeriesDate": (0x00080021, "DA"), "AcquisitionDate": (0x00080022, "DA"), "ContentDate": (0x00080023, "DA"),
    "StudyTime": (0x00080030, "TM"), "SeriesTime": (0x00080031, "TM"), "AcquisitionTime": (0x00080032, "TM"),
    "Modality": (0x00080060, "CS"), "Manufacturer": (0x00080070, "LO"), "InstitutionName": (0x00080080, "LO"),
    "StationName": (0x00081010, "SH"), "StudyDescription": (0x00081030, "LO"),
    "SeriesDescription": (0x0008103E, "LO"), "ManufacturerModelName": (0x00081090, "LO"),
    "PatientID": (0x00100020, "LO"),
    "BodyPartExamined": (0x00180015, "CS"), "ScanningSequence": (0x00180020, "CS"),
    "SequenceVariant": (0x00180021, "CS"), "MRAcquisitionType": (0x00180023, "CS"),
    "SequenceName": (0x00180024, "SH"), "SliceThickness": (0x00180050, "DS"), "KVP": (0x00180060, "DS"),
    "RepetitionTime": (0x00180080, "DS"), "EchoTime": (0x00180081, "DS"), "InversionTime": (0x00180082, "DS"),
    "ImagingFrequency": (0x00180084, "DS"), "EchoNumbers": (0x00180086, "IS"),
    "MagneticFieldStrength": (0x00180087, "DS"), "SpacingBetweenSlices": (0x00180088, "DS"),
    "EchoTrainLength": (0x00180091, "IS"), "SoftwareVersions": (0x00181020, "LO"),
    "ProtocolName": (0x00181030, "LO"), "ExposureTime": (0x00181150, "IS"), "XRayTubeCurrent": (0x00181151, "IS"),
    "ConvolutionKernel": (0x00181210, "SH"), "InPlanePhaseEncodingDirection": (0x00181312, "CS"),
    "FlipAngle": (0x00181314, "DS"), "PatientPosition": (0x00185100, "CS"), "DiffusionBValue": (0x00189087, "FD"),
    "DiffusionGradientOrientation": (0x00189089, "FD"), "MRDiffusionSequence": (0x00189117, "SQ"),
    "StudyInstanceUID": (0x0020000D, "UI"), "SeriesInstanceUID": (0x0020000E, "UI"),
    "SeriesNumber": (0x00200011, "IS"), "AcquisitionNumber": (0x00200012, "IS"),
    "InstanceNumber": (0x00200013, "IS"), "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"), "FrameOfReferenceUID": (0x00200052, "UI"),
    "TemporalPositionIdentifier": (0x00200100, "IS"), "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"), "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "PixelSpacing": (0x00280030, "DS"),
    "BitsAllocated": (0x00280100, "US"), "BitsStored": (0x00280101, "US"), "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"), "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"), "RescaleType": (0x00281054, "LO"), "Units": (0x00541001, "CS"),
    "WindowCenter": (0x00281050, "DS"), "WindowWidth": (0x00281051, "DS"), "ImagerPixelSpacing": (0x00181164, "DS"),
    "PixelAspectRatio": (0x00280034, "IS"), "ModalityLUTSequence": (0x00283000, "SQ"),
    "VOILUTSequence": (0x00283010, "SQ"),
    "DecayCorrection": (0x00541102, "CS"), "GridFrameOffsetVector": (0x3004000C, "DS"),
    "DoseGridScaling": (0x3004000E, "DS"), "SharedFunctionalGroupsSequence": (0x52009229, "SQ"),
    "PerFrameFunctionalGroupsSequence": (0x52009230, "SQ"), "PixelData": (PIXEL_DATA, "OW"),
    "FloatPixelData": (FLOAT_PIXEL_DATA, "OF"), "DoubleFloatPixelData": (DOUBLE_PIXEL_DATA, "OD"),
}
_BY_TAG = {tag: vr for tag, vr in KEYWORDS.values()}
_LONG = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_SHORT = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_VRS = {vr: (vr.decode(), vr in _LONG) for vr in _LONG | _SHORT}  # VR bytes -> (VR, whose length is 4 bytes)
_TEXT = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})  # decoded with the character set (PS3.5 6.1.2.3)
_SINGLE = frozenset({"ST", "LT", "UT"})  # backslash is text, not a delimiter
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_PIXEL_TAGS = frozenset({PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA})
_UNPACK_SHORT, _UNPACK_LONG = struct.Struct("<HH2sH").unpack_from, struct.Struct("<I").unpack_from
_UNPACK_IMPLICIT = struct.Struct("<HHI").unpack_from
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class Unsupported(Exception):
    """This file (or this value) is outside what the fast reader decodes exactly as pydicom: use pydicom."""


@dataclass
class Header:
    """The top-level elements of one file (tag -> (VR, raw value)) and where its pixel bytes are."""

    path: Path
    syntax: str
    elements: dict[int, tuple[str, bytes]]
    pixel_offset: int = -1  # file offset of the Pixel Data value; -1: no pixel data
    pixel_length: int = 0
    sequences: frozenset[int] = frozenset()  # tags of the top-level sequences met (not decoded)
    # (tag, first byte, end) of every top-level element before Pixel Data, file meta included, in file order
    layout: tuple[tuple[int, int, int], ...] = ()
    pixel_element: int = -1  # file offset of the Pixel Data element (its tag); -1: no pixel data

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            tag = KEYWORDS[key][0]
            return tag in self.elements or tag in self.sequences or (tag == PIXEL_DATA and self.pixel_offset >= 0)
        return key in self.elements

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a keyword of :data:`KEYWORDS`) as pydicom returns it, or ``default``."""
        if not isinstance(key, str):
            raise Unsupported(f"element {key} by tag")
        tag, vr = KEYWORDS[key]
        if vr == "SQ" or tag in _PIXEL_TAGS:
            if tag in self.sequences or tag in self.elements:
                raise Unsupported(f"{key} is a sequence or pixel data")
            return default
        element = self.elements.get(tag)
        if element is None:
            return default
        return decode(element[1], vr, self.charset)

    @cached_property
    def charset(self) -> str:
        raw = self.elements.get(0x00080005)
        name = raw[1].decode("latin-1").strip(" \x00") if raw else ""
        if "\\" in name:  # ISO 2022 code extensions: pydicom's job
            return ""
        return _CHARSETS.get(name, "")

    def private(self, group: int, creator: str, offset: int) -> bytes | None:
        """The raw value of private element (group, xx<offset>) of block ``creator`` (PS3.5 7.8.1), or None."""
        for block in range(0x10, 0x100):
            raw = self.elements.get(group << 16 | block)
            if raw is not None and raw[1].decode("latin-1").strip(" \x00") == creator:
                value = self.elements.get(group << 16 | block << 8 | offset)
                return value[1] if value is not None else None
        return None


def pixel_array(header: Header, frame: int | None = None) -> Any:
    """The stored pixels of a native (uncompressed) monochrome image, as pydicom's ``pixel_array`` gives them:
    (rows, columns) for one frame (``frame``, or the only one), else (frames, rows, columns); bits above
    BitsStored masked (signed: sign-extended) as pydicom does.  Raises Unsupported for anything else."""
    import numpy as np

    bits, stored = header.get("BitsAllocated"), header.get("BitsStored")
    signed, rows, columns = header.get("PixelRepresentation"), header.get("Rows"), header.get("Columns")
    frames = header.get("NumberOfFrames") or 1
    if (header.pixel_offset < 0 or bits not in (8, 16, 32) or signed not in (0, 1) or (header.get("SamplesPerPixel")
            or 1) != 1 or not all(isinstance(v, int) and v > 0 for v in (rows, columns, frames, stored))
            or stored > bits):
        raise Unsupported("not a native monochrome image")
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    plane = rows * columns * dtype.itemsize
    if header.pixel_length < plane * frames:
        raise Unsupported("short pixel data: pydicom says why")
    first, count = (0, frames) if frame is None else (frame, 1)
    if not 0 <= first < frames:
        raise Unsupported(f"frame {frame} of {frames}")
    offset = header.pixel_offset + first * plane
    arr = np.fromfile(header.path, dtype=dtype, count=rows * columns * count, offset=offset)
    if arr.size != rows * columns * count:
        raise Unsupported("truncated pixel data: pydicom says why")
    if stored < bits:
        np.left_shift(arr, bits - stored, out=arr)
        np.right_shift(arr, bits - stored, out=arr)
    return arr.reshape((rows, columns) if count == 1 else (count, rows, columns))


def renders(header: Header, keywords: list[str]) -> bool:
    """Whether ``header`` gives these keywords (of a name template) exactly as pydicom's ``str()`` of them would."""
    try:
        return all(k in KEYWORDS and KEYWORDS[k][1] not in ("DS", "SQ", "OW", "OF", "OD")
                   and not isinstance(header.get(k), list) for k in keywords)
    except Unsupported:
        return False


def decode(raw: bytes, vr: str, charset: str = "latin-1") -> Any:
    """One element value as pydicom decodes it (see the module docstring); raises Unsupported otherwise."""
    if vr in _BINARY:
        code = _BINARY[vr]
        size = struct.calcsize(code)
        if not raw or len(raw) % size:
            raise Unsupported(f"{vr} value of {len(raw)} bytes")
        values = list(struct.unpack(f"<{len(raw) // size}{code}", raw))
        return values[0] if len(values) == 1 else values
    if vr in _TEXT:
        if not charset:
            if any(b > 0x7F or b == 0x1B for b in raw):
                raise Unsupported("text in a character set the fast reader does not decode")
            charset = "latin-1"
        try:
            text = raw.decode(charset)
        except UnicodeDecodeError:
            raise Unsupported("undecodable text") from None
        if vr == "PN":
            raise Unsupported("person names are pydicom's")
        if vr in _SINGLE:
            return text.rstrip("\0 ")
        parts = [p.rstrip("\0 ") for p in text.split("\\")]
        return parts[0] if len(parts) == 1 else parts
    text = raw.decode("latin-1")
    if vr == "DS":
        text = text.strip().rstrip(" \x00")
        return _one_or_list([_ds(p) for p in text.split("\\")]) if text else None  # pydicom: empty DS/IS are None
    if vr == "IS":
        parts = text.rstrip(" \x00").split("\\")
        return _one_or_list([_is(p) for p in parts]) if text.rstrip(" \x00") else None
    if vr == "AE":
        return _one_or_list([p.strip() for p in text.split("\\")])
    if vr in ("UI", "CS", "DA", "TM", "DT", "AS"):
        return _one_or_list(text.rstrip(" \x00").split("\\"))
    raise Unsupported(f"VR {vr}")


def _one_or_list(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def _ds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Unsupported(f"DS {text!r}") from None


def _is(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise Unsupported(f"IS {text!r}") from None
    if str(value) != text:  # pydicom keeps " 1" or "01" as written: its str() differs from int's
        raise Unsupported(f"IS {text!r}")
    return value


def scan(path: Path, *, encapsulated: bool = False, fh: IO[bytes] | None = None) -> Header | None:
    """The header of ``path``, or None when the fast reader does not handle this file (see the module docstring;
    ``encapsulated``: compressed pixel data too, its ``pixel_length`` then -1: undefined; ``fh``: the file already
    open, read at absolute offsets and left open).

    Raises OSError when the file cannot be read.
    """
    with open(path, "rb", buffering=0) if fh is None else contextlib.nullcontext(fh) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = os.pread(fh.fileno(), min(size, HEAD), 0)
        while True:
            header = parse(path, buf, complete=len(buf) >= size, encapsulated=encapsulated)
            if header is None or isinstance(header, Header):
                return header
            if len(buf) >= min(size, MAX_HEADER):
                return None
            # x16: each retry walks the header again; a Siemens MR's (CSA headers, ~240 KB) then takes 2 reads, not 3
            buf += os.pread(fh.fileno(), min(size, MAX_HEADER, len(buf) * 16) - len(buf), len(buf))


def parse(path: Path, buf: bytes, *, complete: bool, encapsulated: bool = False) -> Header | None | bool:
    """Walk the elements of ``buf`` (the first bytes of a Part 10 file; ``complete``: all of it).

    Returns the Header, None when the file is not handled, or False when ``buf`` ends before the pixel data
    (read more and try again).
    """
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    elements: dict[int, tuple[str, bytes]] = {}
    sequences: set[int] = set()
    layout: list[tuple[int, int, int]] = []
    pos, size, syntax, explicit = 132, len(buf), "", True
    meta_end = -1
    unpack_short, unpack_long, unpack_implicit = _UNPACK_SHORT, _UNPACK_LONG, _UNPACK_IMPLICIT
    while True:
        if pos + 8 > size:
            return False if not complete else (_finish(path, syntax, elements, sequences, layout, -1, -1, 0)
                                                if pos == size else None)
        if meta_end < 0 and unpack_short(buf, pos)[0] != 0x0002:
            if syntax not in (EXPLICIT_LE, IMPLICIT_LE) and not (encapsulated and compressed_explicit_le(syntax)):
                return None  # deflated, big endian, encapsulated: pydicom's (the pixel data tells later)
            meta_end = pos
            explicit = syntax != IMPLICIT_LE
        in_meta = meta_end < 0
        if in_meta or explicit:
            group, element, vr_bytes, length = unpack_short(buf, pos)
            if group == 0xFFFE:
                return None  # an item outside a sequence: broken
            known = _VRS.get(vr_bytes)
            if known is None:
                return None
            vr, long_form = known
            if long_form:
                if pos + 12 > size:
                    return False if not complete else None
                length, start = unpack_long(buf, pos + 8)[0], pos + 12
            else:
                start = pos + 8
        else:
            group, element, length = unpack_implicit(buf, pos)
            start = pos + 8
            vr = _BY_TAG.get(group << 16 | element, "UN")
        tag = group << 16 | element
        if tag >= FLOAT_PIXEL_DATA and tag in _PIXEL_TAGS:
            if tag != PIXEL_DATA or (length == _UNDEFINED and not encapsulated):
                return None  # float pixels, or encapsulated (compressed) frames: pydicom decodes those
            length = -1 if length == _UNDEFINED else length
            return _finish(path, syntax, elements, sequences, layout, pos, start, length)
        if length == _UNDEFINED:  # a sequence of undefined length (or an undefined-length UN): step over its items
            if in_meta or (explicit and vr != "SQ"):
                return None  # an undefined-length UN holds implicit VR items (PS3.5 6.2.2): pydicom's
            end = _skip_undefined(buf, start, explicit)
            if end is None:
                return False if not complete else None
            sequences.add(tag)
            layout.append((tag, pos, end))
            pos = end
            continue
        if start + length > size:
            return False if not complete else None
        if vr == "SQ":
            sequences.add(tag)
        else:
            elements[tag] = (vr, buf[start:start + length])
        if tag == 0x00020010:
            syntax = buf[start:start + length].decode("latin-1").strip(" \x00")
        layout.append((tag, pos, start + length))
        pos = start + length


def compressed_explicit_le(syntax: str) -> bool:
    """Whether a transfer syntax is one of encapsulated pixel data whose dataset is explicit VR little endian:
    JPEG family (but JPIP Referenced Deflate, whose dataset is deflated), RLE, Encapsulated Uncompressed, Deflated
    Image Frame Compression (PS3.5 A.4, A.8)."""
    return (syntax.startswith("1.2.840.10008.1.2.4.") and syntax != "1.2.840.10008.1.2.4.95") or syntax in (
        "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.8.1")


def _skip_undefined(buf: bytes, pos: int, explicit: bool) -> int | None:
    """The offset after the sequence delimiter closing the undefined-length sequence whose items start at ``pos``
    (nested sequences and items of either length included), or None when ``buf`` ends first."""
    depth, size = 1, len(buf)
    short, long_, implicit = struct.Struct("<HH2sH").unpack_from, struct.Struct("<I").unpack_from, \
        struct.Struct("<HHI").unpack_from
    while depth:
        if pos + 8 > size:
            return None
        group, element, length = implicit(buf, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            if tag in (_ITEM_END, _SEQUENCE_END):
                depth -= 1
                pos += 8
            elif tag == _ITEM and length == _UNDEFINED:
                depth += 1
                pos += 8
            elif tag == _ITEM:
                pos += 8 + length
            else:
                return None
            continue
        if explicit:
            vr_bytes = short(buf, pos)[2]
            if vr_bytes in _LONG:
                if pos + 12 > size:
                    return None
                length, start = long_(buf, pos + 8)[0], pos + 12
                if vr_bytes == b"UN" and length == _UNDEFINED:
                    return None
            elif vr_bytes in _SHORT:
                length, start = short(buf, pos)[3], pos + 8
            else:
                return None
        else:
            start = pos + 8
        if length == _UNDEFINED:
            depth += 1
            pos = start
            continue
        pos = start + length
    return pos


def _finish(path: Path, syntax: str, elements: dict[int, tuple[str, bytes]], sequences: set[int],
            layout: list[tuple[int, int, int]], element: int, offset: int, length: int) -> Header | None:
    if not syntax:
        return None
    return Header(path, syntax, elements, offset, length, frozenset(sequences), tuple(layout), element)
