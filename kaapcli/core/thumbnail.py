"""One PNG per series: the middle slice, windowed, in its true aspect; SEG labels over their image.

- slice: the middle one along the slice normal (ImagePositionPatient), else by InstanceNumber;
  a multi-frame object shows its middle frame;
- grey values: modality LUT (rescale), then the first WindowCenter/WindowWidth (DICOM's linear
  VOI function), else a VOI LUT, else the 1st..99th percentile; MONOCHROME1 is inverted.  Enhanced
  (multi-frame) objects take rescale and window of the shown frame from their functional groups
  (Pixel Value Transformation, Frame VOI LUT: per-frame, then shared);
  colour (RGB, YBR_* — pydicom converts to RGB — and PALETTE COLOR) is shown as is;
- size: the longest side is ``size`` pixels, the other follows PixelSpacing (or PixelAspectRatio);
- SEG / RTSTRUCT: the referenced image slice with the most labelled voxels, each segment / ROI a
  distinct colour, semi-transparent fill (overlaps mix) and an opaque outline, and a legend (colour,
  number, label) in the lower left corner.  Masks come from ``core.seg``, which finds the referenced
  series in ``reference`` or beside the SEG/RTSTRUCT.

The common case, a native 8/16-bit MONOCHROME1/2 image with a window in its header, is rendered by
:func:`windowed` without numpy or pydicom (a lookup table over the stored words, applied by Pillow);
its PNG is pixel for pixel the general path's.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# Well-separated, colour-blind-friendly colours (Okabe-Ito, then Tableau) cycled over segment numbers.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (214, 39, 40), (148, 103, 189), (140, 86, 75), (188, 189, 34), (23, 190, 207)]
FILL_ALPHA = 0.4
HEADER_TAGS = ["SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "ImagePositionPatient",
               "ImageOrientationPatient", "InstanceNumber", "NumberOfFrames"]


def slice_key(ds: Any, path: Path) -> tuple[float, float, str]:
    """Where a file sorts in its series: along the slice normal when the geometry is known, else by InstanceNumber,
    then file name.  ``ds``: a pydicom Dataset or a dicomscan.Header.  Plain floats, no numpy: the plan runs this
    for every file of every series, in processes that need not import numpy."""
    try:
        r1, r2, r3, c1, c2, c3 = (float(v) for v in ds.get("ImageOrientationPatient"))
        x, y, z = (float(v) for v in ds.get("ImagePositionPatient"))
        pos = (r2 * c3 - r3 * c2) * x + (r3 * c1 - r1 * c3) * y + (r1 * c2 - r2 * c1) * z  # (row x column) . position
    except (TypeError, ValueError):
        pos = 0.0
    try:
        number = float(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0.0
    return (pos, number, path.name)


def slice_order(headers: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """Files sorted along the slice normal when the geometry is known, else by InstanceNumber, then name."""
    return sorted(headers, key=lambda entry: slice_key(entry[1], entry[0]))


@dataclass(frozen=True)
class Peek:
    """What the plan learnt of one file from a cheap header read: where it sorts and what it is."""

    key: tuple[float, float, str]
    sop_class: str


def peek(path: Path) -> Peek:
    """The sort key and SOP class of a file: the fast header reader, else pydicom (a few tags)."""
    from kaapcli.core import dicomscan

    header: Any = None
    with contextlib.suppress(OSError, dicomscan.Unsupported):
        header = dicomscan.scan(path)
        if header is not None:
            return Peek(slice_key(header, path), str(header.get("SOPClassUID") or ""))
    ds = dicom.read(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    return Peek(slice_key(ds, path), str(ds.get("SOPClassUID", "")))


def frame_pixels(ds: Any, frame: int | None = None) -> Any:
    """The stored pixels of one frame (the middle one by default) as a numpy array; decoder errors → DataError."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure is bad data for this file
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # name the first plugin's reason
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(f"cannot decode pixel data ({getattr(ts, 'name', ts) or 'unknown syntax'}): {reason}") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        arr = arr[frames // 2 if frame is None else frame]
    return arr


def frame_groups(ds: Any, frame: int | None) -> list[Any]:
    """The functional groups of the shown frame (the middle one by default) of an enhanced object, or []."""
    from kaapcli.core.volume import functional_groups

    return functional_groups(ds, int(ds.get("NumberOfFrames") or 1) // 2 if frame is None else frame)


def _group_value(groups: list[Any], sequence: str, keyword: str) -> Any:
    from kaapcli.core.volume import fg_attr

    return fg_attr(groups, sequence, keyword)


def to_display(ds: Any, arr: Any, frame: int | None = None) -> Any:
    """Stored pixels (of ``frame``, the middle one by default) → uint8 grey (rows, columns) or RGB for display."""
    import numpy as np

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        return (arr / (256.0 if arr.max() > 255 else 1.0)).astype(np.uint8)
    if arr.ndim == 3:  # RGB (pydicom has already converted YBR_* to RGB)
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        return arr.astype(np.uint8) if top == 255 else np.clip(arr / top * 255, 0, 255).astype(np.uint8)
    groups = frame_groups(ds, frame)
    slope = first_value(_group_value(groups, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = first_value(_group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept"))
    if slope is not None and intercept is not None:  # enhanced objects: the modality LUT of this frame
        values = arr.astype(np.float64) * slope + intercept
    elif "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        values = apply_modality_lut(arr, ds).astype(np.float64)
    elif ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:  # as apply_modality_lut
        values = arr.astype(np.float64) * float(ds.get("RescaleSlope"))
        values += float(ds.get("RescaleIntercept"))
    else:
        values = arr.astype(np.float64)
    center = first_value(_group_value(groups, "FrameVOILUTSequence", "WindowCenter"))
    width = first_value(_group_value(groups, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None:
        center, width = first_value(ds.get("WindowCenter")), first_value(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear window
        scaled = ((values - (center - 0.5)) / max(width - 1, 1) + 0.5).clip(0, 1)
    else:
        if "VOILUTSequence" in ds:
            from pydicom.pixels import apply_voi_lut

            values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
        scaled = ((values - lo) / (hi - lo)).clip(0, 1) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1 - scaled
    return np.rint(scaled * 255).astype(np.uint8)


def first_value(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def display_size(ds: Any, rows: int, columns: int, size: int) -> tuple[int, int]:
    """(width, height) with the longest side ``size`` and the physical aspect of the pixels."""
    spacing = (ds.get("PixelSpacing") or _group_value(frame_groups(ds, None), "PixelMeasuresSequence", "PixelSpacing")
               or ds.get("ImagerPixelSpacing"))
    return fit(spacing or ds.get("PixelAspectRatio"), rows, columns, size)


def fit(aspect: Any, rows: int, columns: int, size: int) -> tuple[int, int]:
    """(width, height) with the longest side ``size``; ``aspect``: (row, column) spacing or aspect ratio, if any."""
    try:
        dy, dx = (float(v) for v in aspect)
    except (AttributeError, TypeError, ValueError):
        dy = dx = 1.0
    if dy <= 0 or dx <= 0:
        dy = dx = 1.0
    width, height = columns * dx, rows * dy
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def render(pixels: Any, width: int, height: int) -> Any:
    """A display array resized to (width, height) as a Pillow image."""
    from PIL import Image

    return resize(Image.fromarray(pixels), width, height)


def resize(image: Any, width: int, height: int) -> Any:
    from PIL import Image

    return image.resize((width, height), Image.Resampling.LANCZOS)


def windowed(header: Any, size: int) -> Any:
    """The thumbnail of the common case, as :func:`to_display` and :func:`render` make it, without numpy (~0.1 s
    to import, a quarter of a series thumbnail): a native single-frame or plain multi-frame MONOCHROME1/2
    image of 8 or 16 bits (a dicomscan Header) windowed by its first WindowCenter/WindowWidth.  Each possible
    stored word is mapped to its grey level with to_display's float64 arithmetic (a table Pillow applies), so
    the result is identical.  None for anything else (LUT sequences, functional groups, no window, odd bits)."""
    from PIL import Image

    photometric = str(header.get("PhotometricInterpretation") or "").upper()
    bits, stored, signed = header.get("BitsAllocated"), header.get("BitsStored"), header.get("PixelRepresentation")
    rows, columns, frames = header.get("Rows"), header.get("Columns"), header.get("NumberOfFrames") or 1
    if (photometric not in ("MONOCHROME1", "MONOCHROME2") or bits not in (8, 16) or signed not in (0, 1)
            or (header.get("SamplesPerPixel") or 1) != 1 or header.pixel_offset < 0
            or not all(isinstance(v, int) and v > 0 for v in (rows, columns, frames, stored)) or stored > bits
            or any(k in header for k in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
                                         "ModalityLUTSequence", "VOILUTSequence"))):
        return None
    slope, intercept = header.get("RescaleSlope"), header.get("RescaleIntercept")
    rescaled = slope is not None and intercept is not None
    center, width = first_value(header.get("WindowCenter")), first_value(header.get("WindowWidth"))
    numbers = (center, width, *((slope, intercept) if rescaled else ()))
    if (center is None or width is None or width < 1
            or not all(isinstance(v, float) and math.isfinite(v) for v in numbers)):
        return None
    plane = rows * columns * bits // 8
    if header.pixel_length < plane * frames:
        return None  # short pixel data: the general path says why
    low, step, mono1 = center - 0.5, max(width - 1, 1), photometric == "MONOCHROME1"

    def grey(value: int) -> int:  # to_display's arithmetic, in the same float64 steps
        x = float(value) * slope + intercept if rescaled else float(value)
        scaled = min(max((x - low) / step + 0.5, 0.0), 1.0)
        return round((1 - scaled if mono1 else scaled) * 255)

    # grey is monotonic in the stored value (every step rounds monotonically), so beyond two bisections the
    # table is the constant ends: only the window's ramp is computed value by value
    levels = 1 << stored
    values = range(-(levels >> 1), levels >> 1) if signed else range(levels)
    first, last = grey(values[0]), grey(values[-1])
    start = bisect.bisect_left(values, True, key=lambda v: grey(v) != first)
    end = bisect.bisect_left(values, True, lo=start, key=lambda v: grey(v) == last)
    table = [first] * start + [grey(v) for v in values[start:end]] + [last] * (len(values) - end)
    if signed:  # indexed by the stored bits: two's complement puts the negative half second
        table = table[levels >> 1:] + table[:levels >> 1]
    table *= 1 << (bits - stored)  # the bits above BitsStored are ignored (PS3.5 8.1.1)
    offset = header.pixel_offset + (frames // 2) * plane
    with open(header.path, "rb", buffering=0) as fh:
        if os.fstat(fh.fileno()).st_size < offset + plane:
            return None  # truncated: the general path says so (and nothing is allocated from the header's sizes)
        buffer = bytearray(plane)
        if os.preadv(fh.fileno(), [buffer], offset) != plane:
            return None
    if bits == 8:
        image = Image.frombytes("L", (columns, rows), buffer).point(table)
    else:
        image = Image.frombytes("I", (columns, rows), buffer, "raw", "I;16").point(table, "L")
    aspect = header.get("PixelSpacing") or header.get("ImagerPixelSpacing") or header.get("PixelAspectRatio")
    return resize(image, *fit(aspect, rows, columns, size))


def overlay(base: Any, masks: list[tuple[int, Any]]) -> Any:
    """Segments drawn on a Pillow image: translucent fills in turn (overlaps mix), then opaque outlines."""
    import numpy as np
    from PIL import Image
    from scipy.ndimage import binary_erosion

    out = np.asarray(base.convert("RGB"), dtype=np.float64)
    resized = []
    for number, mask in masks:
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(base.size, Image.Resampling.NEAREST)) > 0
        colour = np.array(PALETTE[(number - 1) % len(PALETTE)], dtype=np.float64)
        out[m] = out[m] * (1 - FILL_ALPHA) + colour * FILL_ALPHA
        resized.append((colour, m))
    for colour, m in resized:
        out[m & ~binary_erosion(m)] = colour
    return Image.fromarray(np.rint(out).astype(np.uint8))


def legend(image: Any, entries: list[tuple[int, str]]) -> Any:
    """A legend drawn in the lower left corner: one line per segment (colour swatch, number, label) on a
    translucent dark box; lines that do not fit in half the image height end in "+N more"."""
    from PIL import Image, ImageDraw, ImageFont

    if not entries:
        return image
    size = max(8, round(min(image.size) / 22))
    font = ImageFont.load_default(size=size)
    line = size + max(2, size // 3)
    fits = max(1, (image.size[1] // 2) // line)
    shown = entries if len(entries) <= fits else entries[: fits - 1]
    texts = [f"{number} {name}"[:40] for number, name in shown]
    if len(shown) < len(entries):
        texts.append(f"+{len(entries) - len(shown)} more")
    draw = ImageDraw.Draw(image)
    width = max(draw.textlength(t, font=font) for t in texts) + size + 3 * (size // 3 + 2)
    width = min(width, image.size[0])
    top = image.size[1] - len(texts) * line - size // 3 - 2
    box = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(box).rectangle((0, top, width, image.size[1]), fill=(0, 0, 0, 160))
    image = Image.alpha_composite(image.convert("RGBA"), box).convert("RGB")
    draw = ImageDraw.Draw(image)
    pad = size // 3 + 2
    for k, text in enumerate(texts):
        y = top + pad + k * line
        if k < len(shown):
            colour = PALETTE[(shown[k][0] - 1) % len(PALETTE)]
            draw.rectangle((pad, y, pad + size - 1, y + size - 1), fill=colour)
        draw.text((2 * pad + size, y), text, fill=(255, 255, 255), font=font)
    return image


class NotAnImage(Exception):
    """A series without pixel data (SR, RT plan, waveform...): skipped, not failed."""


@dataclass
class ThumbnailOperator(BaseOperator):
    """``OUT/<SeriesInstanceUID>.png`` per series."""

    size: int = 300
    reference: Path | None = None
    name: str = "thumbnail"
    grouped: bool = True

    def options(self) -> dict[str, Any]:
        return {"size": self.size, "reference": str(self.reference) if self.reference else None}

    def group_key(self, path: Path) -> str | None:
        """The SeriesInstanceUID; a file without one stands alone under its SOPInstanceUID (or name)."""
        ds = dicom.read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        return str(ds.get("SeriesInstanceUID") or ds.get("SOPInstanceUID") or path.name)

    def scan(self, path: Path) -> tuple[str | None, Any]:
        """The series key and, from the same header read, where the file sorts (``Item.notes``)."""
        from kaapcli.core import dicomscan

        header = None
        with contextlib.suppress(OSError):
            header = dicomscan.scan(path)
        if header is None:
            return self.group_key(path), None
        try:
            key = str(header.get("SeriesInstanceUID") or header.get("SOPInstanceUID") or path.name)
            return key, Peek(slice_key(header, path), str(header.get("SOPClassUID") or ""))
        except dicomscan.Unsupported:
            return self.group_key(path), None

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        warnings: list[str] = []
        try:
            image = self.thumbnail(item, warnings)
        except NotAnImage as exc:
            return Outcome(skipped=True, message=f"not an image ({exc})")
        dest = ctx.out / f"{fsio.safe_name(item.key)}.png"
        with fsio.atomic_write(dest) as fh:
            image.save(fh, format="PNG")
        return Outcome(outputs=[dest], warnings=warnings)

    def thumbnail(self, item: Item, warnings: list[str]) -> Any:
        """The Pillow image of one series; raises NotAnImage for series without pixels (SR, RT plans, ...).

        The middle file comes from the plan's header peeks (``Item.notes``), so only that file is decoded."""
        from kaapcli.core import dicomscan

        where = (lambda p: f"{p}: ") if len(item.paths) > 1 else (lambda p: "")  # one file: the engine names it
        peeks = []
        for path, note in zip(item.paths, item.notes or (None,) * len(item.paths), strict=True):
            try:
                peeks.append((path, note if note is not None else peek(path)))
            except DataError as exc:
                raise DataError(where(path) + exc.message) from exc
        path = sorted(peeks, key=lambda entry: entry[1].key)[len(peeks) // 2][0]
        if peeks[0][1].sop_class in (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS):
            return self.seg_thumbnail(path, warnings)
        with contextlib.suppress(OSError, dicomscan.Unsupported):
            header = dicomscan.scan(path)
            image = windowed(header, self.size) if header is not None else None
            if image is not None:
                return image
        ds, arr = self._decode(path, where)
        try:
            pixels = to_display(ds, arr)
        except DataError as exc:
            raise DataError(where(path) + exc.message) from exc
        return render(pixels, *display_size(ds, pixels.shape[0], pixels.shape[1], self.size))

    def _decode(self, path: Path, where: Any) -> tuple[Any, Any]:
        """Header and the shown frame's stored pixels: read directly for native monochrome images, else pydicom."""
        from kaapcli.core import dicomscan

        with contextlib.suppress(OSError, dicomscan.Unsupported):
            header = dicomscan.scan(path)
            if header is not None and str(header.get("PhotometricInterpretation", "")).upper() in (
                    "MONOCHROME1", "MONOCHROME2") and "PerFrameFunctionalGroupsSequence" not in header \
                    and "SharedFunctionalGroupsSequence" not in header:
                frames = header.get("NumberOfFrames") or 1
                arr = dicomscan.pixel_array(header, frames // 2 if frames > 1 else None)
                for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "PixelSpacing",
                                "ImagerPixelSpacing", "PixelAspectRatio", "BitsStored"):
                    header.get(keyword)  # every value to_display / display_size read decodes as pydicom's
                if "VOILUTSequence" in header or "ModalityLUTSequence" in header:
                    raise dicomscan.Unsupported("LUT sequences are pydicom's")
                return header, arr
        ds = dicom.read(path)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise NotAnImage(str(getattr(ds.get("SOPClassUID"), "name", "") or ds.get("Modality", "no pixel data")))
        try:
            return ds, frame_pixels(ds)
        except DataError as exc:
            raise DataError(where(path) + exc.message) from exc

    def seg_thumbnail(self, seg_path: Path, warnings: list[str]) -> Any:
        """The referenced slice with the most labelled voxels, segments / ROIs overlaid (via core.seg)."""
        import numpy as np

        from kaapcli.core.seg import read_segments

        masks, seg_warnings = read_segments(seg_path, roots=[self.reference] if self.reference else [],
                                            own_grid=False)  # the overlay needs the image slices
        warnings.extend(seg_warnings)
        if not masks:
            raise DataError(f"{seg_path}: no segments")
        counts = np.sum([m.array.sum(axis=(1, 2)) for m in masks], axis=0)
        best = int(np.argmax(counts))
        frame = masks[0].reference.stack.frames[best]
        ds = dicom.read(frame.path)
        base = to_display(ds, frame_pixels(ds, frame.index), frame.index)
        image = render(base, *display_size(ds, base.shape[0], base.shape[1], self.size))
        image = overlay(image, [(m.number, m.array[best]) for m in masks])
        return legend(image, [(m.number, m.name) for m in masks])
