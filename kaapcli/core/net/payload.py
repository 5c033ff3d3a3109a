"""What a file is sent as: its structure checked before it leaves, and — only when the peer refuses the
file's own transfer syntax — re-encoded in an accepted one with its decoded pixels proven unchanged.

1. ``check_structure``: a walk over the element headers of the dataset (values are skipped by seeking, never
   read): every length must fit in the file, so a truncated file is refused locally (as DCMTK's storescu and
   dcmsend refuse it) instead of stalling the peer and aborting the association for the files behind it.
2. ``transcode``: the file is read whole; compressed pixel data is decoded (lossless syntaxes only, unless
   lossy decoding is allowed), the values of OW/OF/OL/OD/OV elements are byte-swapped when the byte order
   changes (Pixel Data by Bits Allocated, as pydicom reads it), the dataset is encoded in the target syntax,
   decoded again, and its pixel array compared with the original's.

Never: re-compresses, sends pixels that decode differently from the original's, or changes a file silently
(the result says which syntax it left in); a file it cannot convert exactly is a failed item with the reason.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from kaapcli.core import dicom
from kaapcli.exitcodes import KaapcliError

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, EXPLICIT_BE)
# Compressed syntaxes whose decoding gives back the pixels exactly as they were encoded (PS3.5 A.4, A.8).
LOSSLESS = frozenset({
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG Lossless (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",  # JPEG 2000 / HTJ2K lossless
})
DECOMPRESS_POLICIES = ("never", "lossless", "lossy")
MAX_DECODED_BYTES = 2 << 30  # header values are the sender's: never decode (twice, to verify) more than this
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float and (plain) Pixel Data


def may_decompress(syntax: str, policy: str) -> bool:
    """Whether a file in ``syntax`` may be decoded to an uncompressed syntax under ``policy``."""
    if syntax in UNCOMPRESSED:
        return True
    return policy == "lossy" or (policy == "lossless" and syntax in LOSSLESS)


# --------------------------------------------------------------------------- structure check

class BadStructure(ValueError):
    """The file's element structure does not fit in its bytes (truncated) or its transfer syntax."""


def check_structure(path: Path, offset: int, syntax: str) -> None:
    """Raise :class:`BadStructure` when an element of the dataset at ``offset`` claims more bytes than the file has,
    or when the dataset has an odd length (PS3.5 7.1.1: every value has even length; peers abort on it)."""
    if syntax == DEFLATED_LE or offset < 0:
        return  # a deflated stream has no element headers to walk; files without file meta are read by pydicom
    with open(path, "rb") as fh:
        reader = _Window(fh)
        _walk(reader, offset, reader.size, syntax == IMPLICIT_LE, syntax != EXPLICIT_BE, depth=0)
    if (reader.size - offset) % 2:
        raise BadStructure(f"the dataset has an odd length ({reader.size - offset} bytes): truncated or not conformant")


class _Window:
    """Reads of a few bytes at any position, served from one 64 KB window (a header is read once, values skipped)."""

    SIZE = 16384

    def __init__(self, fh: Any):
        self.fh = fh
        self.size = fh.seek(0, 2)
        self.start, self.data = 0, b""

    def read(self, pos: int, n: int) -> bytes:
        at = pos - self.start
        if at < 0 or at + n > len(self.data):
            if pos >= self.size:
                return b""
            self.fh.seek(pos)
            self.start, self.data, at = pos, self.fh.read(max(n, self.SIZE)), 0
        return self.data[at:at + n]


_TAG = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_U16 = {"<": struct.Struct("<H"), ">": struct.Struct(">H")}
_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_SHORT_VRS = frozenset(vr.encode() for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT",
                                              "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"))


def _walk(fh: _Window, pos: int, end: int, implicit: bool, little: bool, depth: int, *, delimited: bool = False
          ) -> int:
    """Walk elements from ``pos`` to ``end``; a ``delimited`` item (undefined length) ends at its delimiter.
    Returns where the walk stopped."""
    order = "<" if little else ">"
    tag_of, u16, u32 = _TAG[order].unpack_from, _U16[order].unpack_from, _U32[order].unpack_from
    if depth > 64:
        raise BadStructure("sequences nested more than 64 deep")
    while pos < end:
        head = fh.read(pos, 12)
        if len(head) < 8:
            raise BadStructure(f"the file ends inside an element header at byte {pos}")
        group, elem = tag_of(head)
        if group == 0xFFFE:  # items and delimiters: tag and 4-byte length in every syntax (PS3.5 7.5)
            if delimited and elem == 0xE00D:
                return pos + 8
            raise BadStructure(f"an unexpected item tag (FFFE,{elem:04X}) at byte {pos}")
        if implicit:
            vr, length, pos = b"", u32(head, 4)[0], pos + 8
        else:
            vr = head[4:6]
            if vr in _SHORT_VRS:
                length, pos = u16(head, 6)[0], pos + 8
            elif vr in dicom.LONG_LENGTH_VR_BYTES:
                if len(head) < 12:
                    raise BadStructure(f"the file ends inside the header of ({group:04X},{elem:04X})")
                length, pos = u32(head, 8)[0], pos + 12
            elif vr.isalpha() and vr.isupper():  # a VR of a later edition: 2-byte length (PS3.5 7.1.2)
                length, pos = u16(head, 6)[0], pos + 8
            else:
                raise BadStructure(f"element ({group:04X},{elem:04X}) at byte {pos} has no VR: the file is not "
                                   "encoded in the explicit VR syntax its file meta names")
        if length == dicom.UNDEFINED:
            # a sequence, encapsulated pixel data, or UN holding an implicit VR LE sequence (CP-246)
            un = vr == b"UN"
            pos = _items(fh, pos, end, implicit or un, little or un, depth, delimited=True,
                         encapsulated=(group, elem) == (0x7FE0, 0x0010))
            continue
        if pos + length > end:
            raise BadStructure(f"element ({group:04X},{elem:04X}) needs {length} bytes at byte {pos}, "
                               f"but {'its item' if depth else 'the file'} ends after {end - pos}")
        if length and (vr == b"SQ" or (implicit and fh.read(pos, 4) == _ITEM[order])):
            _items(fh, pos, pos + length, implicit, little, depth)  # implicit VR: a value starting with an item
        pos += length
    if delimited:
        raise BadStructure("the file ends before an item delimiter")
    return pos


_ITEM = {"<": struct.pack("<HH", 0xFFFE, 0xE000), ">": struct.pack(">HH", 0xFFFE, 0xE000)}


def _items(fh: _Window, pos: int, end: int, implicit: bool, little: bool, depth: int, *, delimited: bool = False,
           encapsulated: bool = False) -> int:
    """Walk the items of a sequence (or the fragments of encapsulated pixel data) from ``pos`` to ``end``; an
    undefined-length (``delimited``) sequence ends at its delimiter."""
    order = "<" if little else ">"
    while pos < end:
        head = fh.read(pos, 8)
        if len(head) < 8:
            raise BadStructure(f"the file ends inside a sequence at byte {pos}")
        group, elem, length = struct.unpack(order + "HHI", head)
        pos += 8
        if delimited and (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise BadStructure(f"expected an item at byte {pos - 8}, found ({group:04X},{elem:04X})")
        if length == dicom.UNDEFINED:
            if encapsulated:
                raise BadStructure("a pixel data fragment of undefined length")
            pos = _walk(fh, pos, end, implicit, little, depth + 1, delimited=True)
            continue
        if pos + length > end:
            where = "the file" if delimited else "its sequence"
            raise BadStructure(f"an item of {length} bytes at byte {pos}, but {where} ends after {end - pos}")
        if not encapsulated and length:
            _walk(fh, pos, pos + length, implicit, little, depth + 1)
        pos += length
    if delimited:
        raise BadStructure("the file ends before a sequence delimiter")
    return pos


# --------------------------------------------------------------------------- transcoding

def transcode(path: Path, source: str, target: str, policy: str = "lossless") -> tuple[bytes, str]:
    """The dataset of ``path`` (in ``source``) encoded in the uncompressed ``target`` syntax, and a note saying
    what was done. Raises KaapcliError when it cannot be done exactly."""
    import numpy as np
    from pydicom.uid import UID

    src_uid, dst_uid = UID(source), UID(target)
    if target not in UNCOMPRESSED:
        raise KaapcliError(f"kaapcli does not compress: cannot encode in {dst_uid.name}")
    if not may_decompress(source, policy):
        kind = "lossy " if source not in LOSSLESS else ""
        raise KaapcliError(f"the peer refuses {src_uid.name}; decompressing {kind}data is off",
                           hint="--decompress lossy allows it" if kind else "--decompress lossless allows it")
    ds = dicom.read(path)
    for _ in ds.iterall():  # decode every element in the source's encoding before it is re-encoded
        pass
    _check_decoded_size(ds)
    before = _pixels(ds, "the original")
    if source not in UNCOMPRESSED and before is not None:
        _decompress(ds, src_uid)
    elif src_uid.is_little_endian != dst_uid.is_little_endian:
        _swap_words(ds)
    encoded = dicom.encode_dataset(ds, dst_uid.is_implicit_VR, dst_uid.is_little_endian)
    if dst_uid.is_deflated:
        raise KaapcliError("kaapcli does not deflate on send")
    if before is not None:
        after = _pixels(_reread(encoded, ds, target), "the re-encoded dataset")
        if after is None or before.shape != after.shape or not np.array_equal(before, after):
            raise KaapcliError(f"re-encoding from {src_uid.name} to {dst_uid.name} would change the decoded pixels")
    return encoded, f"sent as {dst_uid.name} (the peer refuses {src_uid.name}); decoded pixels verified identical"


def _check_decoded_size(ds: Any) -> None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
                * max(1, int(ds.get("BitsAllocated", 8) or 8) // 8) * max(1, frames))
    except (TypeError, ValueError) as exc:
        raise KaapcliError(f"cannot verify the pixel data: bad image header value ({exc})") from None
    if size > MAX_DECODED_BYTES:
        raise KaapcliError(f"its pixel data would decode to {size / 2**30:.1f} GiB, more than kaapcli decodes to "
                           f"re-encode ({MAX_DECODED_BYTES >> 30} GiB)")


def _pixels(ds: Any, what: str) -> Any:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        return None
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: cannot prove the pixels unchanged
        raise KaapcliError(f"cannot decode the pixel data of {what} to verify it ({type(exc).__name__}: "
                           f"{str(exc)[:120]})") from exc


def _decompress(ds: Any, syntax: Any) -> None:
    from pydicom.pixels import get_decoder

    decoder = get_decoder(syntax)
    if not decoder.is_available:
        raise KaapcliError(f"no decoder for {syntax.name} is installed", hint="pip install pylibjpeg "
                           "pylibjpeg-libjpeg pylibjpeg-openjpeg pyjpegls")
    lossy = syntax not in LOSSLESS
    try:
        # as_rgb=False: a YCbCr image stays YCbCr (converting would round); the SOP Instance UID is kept
        ds.decompress(as_rgb=False, generate_instance_uid=False)
    except Exception as exc:  # noqa: BLE001 - a decoder failure is this file's failure
        raise KaapcliError(f"cannot decompress {syntax.name}: {type(exc).__name__}: {str(exc)[:120]}") from exc
    if lossy:
        ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5: once lossy-compressed, always marked so


def _swap_words(ds: Any) -> None:
    """Swap the byte order of every OW/OF/OL/OD/OV value; 8-bit Pixel Data in OW is swapped pairwise and wider
    Pixel Data by Bits Allocated, as pydicom decodes it."""
    import numpy as np

    for elem in ds.iterall():
        vr = str(elem.VR)
        if vr not in _SWAP_WIDTH or not isinstance(elem.value, bytes | bytearray):
            continue
        width = _SWAP_WIDTH[vr]
        if elem.tag == 0x7FE00010:
            bits = int(ds.get("BitsAllocated", 16) or 16)
            if bits not in (8, 16, 32, 64):
                raise KaapcliError(f"cannot change the byte order of {bits}-bit Pixel Data")
            width = max(2, bits // 8)
        value = bytes(elem.value)
        if len(value) % width:
            raise KaapcliError(f"{elem.keyword or elem.tag}: {len(value)} bytes is not a whole number of "
                               f"{width}-byte words")
        elem.value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _reread(encoded: bytes, ds: Any, syntax: str) -> Any:
    from io import BytesIO

    import pydicom

    meta = dicom.encode_file_meta(str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")), syntax)
    return pydicom.dcmread(BytesIO(meta + encoded))
