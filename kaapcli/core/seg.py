"""Segmentations: label masks → DICOM SEG (highdicom), and DICOM SEG / RTSTRUCT → masks.

Masks are returned in the full geometry of the referenced image series (every slice, empty
ones included) when that series is given or found; otherwise in the SEG's own geometry (its
frames' positions, as dcmqi's segimage2itkimage and highdicom do).  SimpleITK images in LPS,
voxel (i, j, k) = column, row, slice as :mod:`kaapcli.core.volume` lays them out.

SEG types: BINARY, FRACTIONAL (probabilities kept as float in [0, 1], or thresholded on request;
never binarized silently) and label-map SEGs (Label Map Segmentation Storage, pixel value =
segment number).

Never: sizes a volume from header values unchecked (a SEG's own grid is bounded), or resamples
frames that lie off the grid (they are refused with the reason).

Public API (stable; other operators import it):

- ``reference_from(paths) -> Reference``: the image grid of a referenced series (headers only).
- ``read_segments(path, reference_paths, *, threshold=0.5) -> tuple[list[Mask], list[str]]``: SEG or
  RTSTRUCT → one mask per segment / ROI, plus warnings (``threshold=None``: FRACTIONAL kept as float).
- ``seg_to_masks(seg_path, reference_paths) -> dict[str, sitk.Image]``: label name → mask.
- ``masks_to_seg(mask_paths, reference_paths, dest, ...) -> list[str]``: write a binary SEG.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kaapcli.core import dicom, fsio, volume
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage (Supplement 243)
SEG_CLASSES = (SEG_STORAGE, LABELMAP_SEG_STORAGE)
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
GRID_TOL = 1e-3  # mm / direction cosine: grids closer than this are the same grid
MAX_OWN_SLICES = 20000  # a SEG's own grid: more slices than this is a hostile or broken header
MAX_OWN_VOXELS = 2**31


# --------------------------------------------------------------------------- reference grid

@dataclass
class Reference:
    """The grid of a referenced image series: where slice k, row j, column i is in the world."""

    stack: volume.Stack
    geometry: volume.Geometry
    own: bool = False  # the SEG's own grid (no image series), not a referenced series

    @property
    def size(self) -> tuple[int, int, int]:  # (columns, rows, slices), ITK order
        f = self.stack.frames[0]
        return f.columns, f.rows, len(self.stack.frames)

    @property
    def shape(self) -> tuple[int, int, int]:  # numpy order (slices, rows, columns)
        c, r, k = self.size
        return k, r, c

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) voxel indices of world points (N, 3)."""
        g = self.geometry
        matrix = g.direction * np.asarray(g.spacing)
        return np.linalg.solve(matrix, (np.asarray(points, dtype=float) - g.origin).T).T

    def image(self, array: np.ndarray, size: tuple[int, int, int] | None = None) -> Any:
        """A SimpleITK image on this grid from a (slices, rows, columns) array (or an empty one of ``size``)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(array) if size is None else sitk.Image(size, sitk.GetImageFromArray(array)
                                                                            .GetPixelID())
        img.SetOrigin(tuple(float(v) for v in self.geometry.origin))
        img.SetSpacing(tuple(float(v) for v in self.geometry.spacing))
        img.SetDirection(tuple(float(v) for v in self.geometry.direction.flatten()))
        return img

    def datasets(self) -> list[Any]:
        """The referenced instances (headers only), in slice order."""
        return [dicom.read(f.path, stop_before_pixels=True) for f in self.stack.frames]


def reference_from(paths: Sequence[Path], series_uid: str | None = None) -> Reference:
    """The grid of the image series in ``paths`` (the one with ``series_uid`` when given)."""
    stacks = [s for s in volume.split_stacks(paths) if series_uid is None or s.series_uid == series_uid]
    if not stacks:
        raise DataError(f"referenced series {series_uid or ''} not found among {len(paths)} file(s)".replace("  ", " "))
    stack = max(stacks, key=lambda s: len(s.frames))  # several stacks: the main one, not a localizer
    geometry = volume.stack_geometry(stack)
    if geometry.problem:
        raise DataError(f"referenced series {stack.label}: {geometry.problem}: masks need a regular grid")
    return Reference(stack, geometry)


SEARCH_LIMIT = 20000  # files walked per directory when guessing where a reference lives


@cache
def _series_index(root: Path, limit: int | None = None) -> dict[str, tuple[Path, ...]]:
    """SeriesInstanceUID → image files below ``root`` (cached per worker process; at most ``limit`` files)."""
    index: dict[str, list[Path]] = {}
    files = fsio.walk_files(root) if root.is_dir() else iter([root])
    for n, path in enumerate(files):
        if limit is not None and n >= limit:
            break
        if not fsio.is_dicom(path):
            continue
        try:
            ds = dicom.read(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Rows"])
        except DataError:
            continue
        if "Rows" in ds and ds.get("SeriesInstanceUID"):
            index.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return {uid: tuple(paths) for uid, paths in index.items()}


def find_reference(series_uid: str, near: Path, roots: Sequence[Path]) -> list[Path]:
    """Files of ``series_uid`` under ``roots``, else beside ``near``: its directory, then the one above
    (the study directory of a patient/study/series tree), each walked up to SEARCH_LIMIT files."""
    siblings = [near.parent, near.parent.parent]
    candidates = list(dict.fromkeys([*roots, *siblings]))
    for root in candidates:
        found = _series_index(root.resolve(), None if root in roots else SEARCH_LIMIT).get(series_uid)
        if found:
            return list(found)
    where = ", ".join(str(r) for r in candidates)
    raise DataError(f"referenced series {series_uid} not found (searched {where})",
                    hint="pass --reference DIR holding the referenced image series")


# --------------------------------------------------------------------------- reading SEG / RTSTRUCT

@dataclass
class Mask:
    """One segment or ROI on the reference grid, kept as its non-empty planes (a full volume per
    segment would cost 50 x 78 MB for 50 segments on a 300 x 512 x 512 CT)."""

    number: int  # SegmentNumber / ROINumber: the label value
    name: str
    reference: Reference
    planes: list[tuple[int, int, int, np.ndarray]] = field(default_factory=list)  # (slice, row, column, 2-D)

    @property
    def fractional(self) -> bool:
        """Planes hold probabilities (float32 in [0, 1]), not booleans."""
        return any(p.dtype != bool for *_, p in self.planes)

    def paint(self, target: np.ndarray, value: Any = True) -> int:
        """Set this mask's voxels of ``target`` (slices, rows, columns) to ``value`` (probability planes: their
        values, the larger where frames meet); returns how many already non-zero voxels were set."""
        overlap = 0
        for k, r, c, pixels in self.planes:
            region = target[k, r:r + pixels.shape[0], c:c + pixels.shape[1]]
            if pixels.dtype != bool:
                overlap += int(np.count_nonzero(region[pixels > 0]))
                np.maximum(region, pixels, out=region)
                continue
            overlap += int(np.count_nonzero(region[pixels]))
            region[pixels] = value
        return overlap

    @property
    def array(self) -> np.ndarray:
        """The full boolean volume (slices, rows, columns)."""
        out = np.zeros(self.reference.shape, dtype=bool)
        self.paint(out)
        return out

    def empty(self) -> bool:
        return not any(p.any() for *_, p in self.planes)

    def image(self) -> Any:
        """The mask as a uint8 SimpleITK image on the reference grid."""
        out = np.zeros(self.reference.shape, dtype=np.uint8)
        self.paint(out, 1)
        return self.reference.image(out)


def referenced_series(ds: Any) -> str:
    """The SeriesInstanceUID a SEG or RTSTRUCT refers to."""
    for item in ds.get("ReferencedSeriesSequence") or []:
        if item.get("SeriesInstanceUID"):
            return str(item.SeriesInstanceUID)
    for frame_ref in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame_ref.get("RTReferencedStudySequence") or []:
            for series in study.get("RTReferencedSeriesSequence") or []:
                if series.get("SeriesInstanceUID"):
                    return str(series.SeriesInstanceUID)
    raise DataError("no referenced series (ReferencedSeriesSequence / RTReferencedSeriesSequence)")


def read_segments(path: Path, reference_paths: Sequence[Path] | None = None, *,
                  roots: Sequence[Path] = (), threshold: float | None = 0.5, own_grid: bool = True,
                  ) -> tuple[list[Mask], list[str]]:
    """A SEG's segments or an RTSTRUCT's ROIs as masks on the referenced grid, plus warnings.

    The reference is ``reference_paths`` when given, else searched under ``roots`` or beside ``path``;
    a SEG whose reference is not found uses its own frames' grid (``own_grid``; an RTSTRUCT has none).
    ``threshold``: FRACTIONAL voxels with a probability >= it are in the segment; None keeps the values.
    """
    ds = dicom.read(path)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (*SEG_CLASSES, RTSTRUCT_STORAGE):
        raise DataError(f"not a DICOM SEG or RTSTRUCT (Modality {ds.get('Modality', '?')})")
    warnings: list[str] = []
    uid = referenced_series(ds) if sop_class == RTSTRUCT_STORAGE or not own_grid else _referenced_or_empty(ds)
    if reference_paths:
        reference = reference_from(reference_paths)
    else:
        try:
            if not uid:
                raise DataError("the SEG names no referenced series")
            reference = reference_from(find_reference(uid, path, roots), uid)
        except DataError as exc:
            if sop_class == RTSTRUCT_STORAGE or not own_grid:
                raise
            reference = own_reference(ds, path)
            warnings.append(f"{exc.message.split(' (searched')[0]}: masks on the SEG's own grid "
                            f"({'x'.join(map(str, reference.size))})")
    if sop_class in SEG_CLASSES:
        masks, notes = _seg_masks(ds, path, reference, threshold)
    else:
        masks, notes = _rtstruct_masks(ds, reference)
    return masks, warnings + notes


def _referenced_or_empty(ds: Any) -> str:
    try:
        return referenced_series(ds)
    except DataError:
        return ""


def own_reference(ds: Any, path: Path) -> Reference:
    """The grid a SEG's own frames span (as dcmqi segimage2itkimage / highdicom): their orientation and pixel
    spacing, slices from the lowest frame position to the highest along the normal, spaced by
    SpacingBetweenSlices when the SEG says it, else by the smallest gap between frame positions."""
    import dataclasses

    frames = volume.frames_of(ds, path)
    first = frames[0]
    if any(np.max(np.abs(np.asarray(f.orientation) - first.orientation)) > GRID_TOL for f in frames):
        raise DataError("SEG frames have several orientations: no single grid without a reference",
                        hint="pass --reference DIR holding the referenced image series")
    normal = first.normal
    d = np.array([np.dot(f.position, normal) for f in frames])
    distinct = np.unique(np.round(d / volume.POSITION_TOL)) * volume.POSITION_TOL
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    measures = (shared.get("PixelMeasuresSequence") or [None])[0] if shared is not None else None
    declared = measures.get("SpacingBetweenSlices") if measures is not None else None
    try:
        dz = float(declared) if declared not in (None, "") else 0.0
    except (TypeError, ValueError):
        dz = 0.0
    if not (np.isfinite(dz) and dz > 0):
        dz = float(np.min(np.diff(distinct))) if len(distinct) > 1 else float(
            (measures.get("SliceThickness") if measures is not None else None) or 1.0)
    steps = (distinct - distinct[0]) / dz
    if np.max(np.abs(steps - np.rint(steps))) > 0.01:
        raise DataError(f"SEG frame positions are not on a regular {dz:g} mm grid: no single grid without a reference",
                        hint="pass --reference DIR holding the referenced image series")
    n = int(np.rint(steps[-1])) + 1
    if n > MAX_OWN_SLICES or n * first.rows * first.columns > MAX_OWN_VOXELS:
        raise DataError(f"SEG frames span {n} slices of {first.rows}x{first.columns} at {dz:g} mm: too large a grid")
    origin = np.asarray(frames[int(np.argmin(d))].position, dtype=float)
    points = [origin + k * dz * normal for k in range(n)]
    slices = [dataclasses.replace(first, index=k, position=(float(x), float(y), float(z)))
              for k, (x, y, z) in enumerate(points)]
    stack = volume.Stack(_referenced_or_empty(ds) or str(ds.get("SeriesInstanceUID", "")), slices)
    o = np.asarray(first.orientation, dtype=float)
    geometry = volume.Geometry(origin, np.column_stack([o[:3], o[3:], normal]),
                               (first.spacing[1], first.spacing[0], dz), origin @ normal + np.arange(n) * dz,
                               np.array([f.position for f in slices]))
    return Reference(stack, geometry, own=True)


def seg_to_masks(seg_path: Path, reference_paths: Sequence[Path] | None = None) -> dict[str, Any]:
    """Label name → binary SimpleITK mask (uint8) on the referenced grid, for a SEG or RTSTRUCT."""
    masks, _ = read_segments(seg_path, reference_paths)
    return {m.name: m.image() for m in masks}


def _seg_frames(ds: Any, threshold: float | None = 0.5) -> Any:
    """Frame f of a SEG as an array, decoded on demand (BINARY native data unpacked per frame): bool for BINARY
    (and FRACTIONAL with a ``threshold``), float32 probabilities in [0, 1] for FRACTIONAL without one, segment
    numbers for a LABELMAP SEG."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    count = int(ds.get("NumberOfFrames") or 1)
    kind = str(ds.get("SegmentationType", "BINARY")).upper()
    binary = kind == "BINARY"
    native = not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or \
        not ds.file_meta.TransferSyntaxUID.is_compressed
    if binary and native and int(ds.get("BitsAllocated", 1)) == 1 and (rows * columns) % 8 == 0:
        packed = np.frombuffer(ds.PixelData, dtype=np.uint8)
        size = rows * columns // 8
        if packed.size < size * count:
            raise DataError(f"SEG pixel data holds {packed.size} bytes, {size * count} expected")

        def frame(f: int) -> np.ndarray | None:
            chunk = packed[f * size:(f + 1) * size]
            if not chunk.any():
                return None
            return np.unpackbits(chunk, bitorder="little").reshape(rows, columns).view(bool)

        return count, frame
    try:
        frames = np.asarray(ds.pixel_array).reshape((-1, rows, columns))
    except Exception as exc:  # noqa: BLE001 - a decoder failure is bad data
        reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise DataError(f"cannot decode SEG pixel data: {reason}") from None
    if kind == "LABELMAP":
        return frames.shape[0], lambda f: frames[f] if frames[f].any() else None
    if kind == "FRACTIONAL":  # a probability / occupancy map, stored 0..MaximumFractionalValue
        try:
            top = float(ds.get("MaximumFractionalValue") or 255)
        except (TypeError, ValueError):
            top = 255.0
        if not (np.isfinite(top) and top > 0):
            raise DataError(f"invalid MaximumFractionalValue {ds.get('MaximumFractionalValue')!r}")
        scaled = frames.astype(np.float32) / np.float32(top)
        frames = scaled >= threshold if threshold is not None else np.minimum(scaled, 1)
    else:
        frames = frames.astype(bool)
    return frames.shape[0], lambda f: frames[f] if frames[f].any() else None


def _seg_masks(ds: Any, path: Path, ref: Reference, threshold: float | None = 0.5) -> tuple[list[Mask], list[str]]:
    warnings: list[str] = []
    count, frame_pixels = _seg_frames(ds, threshold)
    labelmap = str(ds.get("SegmentationType", "")).upper() == "LABELMAP"
    geometry = volume.frames_of(ds, path)
    if len(geometry) != count:
        raise DataError(f"SEG has {count} frames of pixel data but {len(geometry)} frame descriptions")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or f"segment_{s.SegmentNumber}")
                for s in ds.get("SegmentSequence") or []}
    if labelmap:
        segments.pop(0, None)  # pixel value 0 is "no segment" (dcmqi's label maps list it as Background)
    masks = {n: Mask(n, name, ref) for n, name in segments.items()}
    ref_orientation = ref.geometry.direction[:, :2].T.flatten()
    n_slices, rows, columns = ref.shape
    positions = ref.to_index(np.asarray([frame.position for frame in geometry]))
    outside = 0
    unknown: set[int] = set()
    for f, frame in enumerate(geometry):
        item = per_frame[f] if f < len(per_frame) else None
        ident = item.get("SegmentIdentificationSequence") if item is not None else None
        number = int(ident[0].ReferencedSegmentNumber) if ident else 1
        if number not in masks and not labelmap:
            raise DataError(f"frame {f + 1} references segment {number}, not in SegmentSequence")
        if (np.max(np.abs(np.asarray(frame.orientation) - ref_orientation)) > GRID_TOL
                or abs(frame.spacing[0] - ref.geometry.spacing[1]) > GRID_TOL
                or abs(frame.spacing[1] - ref.geometry.spacing[0]) > GRID_TOL):
            raise DataError(f"SEG frame {f + 1} is not on the grid of series {ref.stack.series_uid} "
                            "(other orientation or pixel spacing)")
        i, j, k = positions[f]
        ii, jj, kk = (int(round(v)) for v in (i, j, k))
        if max(abs(i - ii), abs(j - jj), abs(k - kk)) > 0.01:
            raise DataError(f"SEG frame {f + 1} lies between the voxels of series {ref.stack.series_uid}")
        pixels = frame_pixels(f)
        if pixels is None:
            continue
        if not 0 <= kk < n_slices:
            outside += 1
            continue
        # frames may be cropped or shifted on the grid: keep the part inside the image
        r0, c0 = max(jj, 0), max(ii, 0)
        r1, c1 = min(jj + pixels.shape[0], rows), min(ii + pixels.shape[1], columns)
        if r1 <= r0 or c1 <= c0:
            continue
        crop = pixels[r0 - jj:r1 - jj, c0 - ii:c1 - ii]
        if labelmap:  # one frame holds every segment: pixel value = segment number (0 = none)
            for value in np.unique(crop):
                if value and int(value) in masks:
                    masks[int(value)].planes.append((kk, r0, c0, crop == value))
                elif value:
                    unknown.add(int(value))
        else:
            masks[number].planes.append((kk, r0, c0, crop))
    if outside:
        warnings.append(f"{outside} non-empty SEG frame(s) outside series {ref.stack.series_uid}: dropped")
    if unknown:
        warnings.append(f"label map values {sorted(unknown)} are not in SegmentSequence: ignored")
    result = [masks[n] for n in sorted(masks)]
    warnings += [f"segment {m.number} ({m.name}) is empty" for m in result if m.empty()]
    return result, warnings


def even_odd_fill(polygons: Sequence[np.ndarray], rows: int, columns: int) -> np.ndarray:
    """Rasterize closed polygons (pixel coordinates x=column, y=row) with the even-odd rule.

    A pixel is inside when a ray from its centre crosses the polygon edges an odd number of
    times, counting the edges of *all* polygons together, so a contour inside another is a hole.
    Vectorized: each edge toggles, on every pixel row it spans, all pixels right of its crossing.
    """
    toggles = np.zeros((rows, columns + 1), dtype=np.int32)
    for poly in polygons:
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        keep = y0 != y1
        x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
        lo = np.ceil(np.minimum(y0, y1)).astype(np.int64)  # rows r with min <= r < max
        hi = np.ceil(np.maximum(y0, y1)).astype(np.int64)
        counts = np.maximum(hi - lo, 0)
        if not counts.sum():
            continue
        edge = np.repeat(np.arange(len(lo)), counts)
        r = lo[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        xc = x0[edge] + (r - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        inside_rows = (r >= 0) & (r < rows)
        r, xc = r[inside_rows], xc[inside_rows]
        c = np.clip(np.floor(xc).astype(np.int64) + 1, 0, columns)  # first pixel centre right of the crossing
        np.add.at(toggles, (r, c), 1)
    return (np.cumsum(toggles, axis=1)[:, :columns] % 2).astype(bool)


def _rtstruct_masks(ds: Any, ref: Reference) -> tuple[list[Mask], list[str]]:
    warnings: list[str] = []
    names = {int(r.ROINumber): str(r.get("ROIName", "") or f"roi_{r.ROINumber}")
             for r in ds.get("StructureSetROISequence") or []}
    contours: dict[int, list[Any]] = {n: [] for n in names}
    for roi in ds.get("ROIContourSequence") or []:
        contours.setdefault(int(roi.ReferencedROINumber), []).extend(roi.get("ContourSequence") or [])
    n_slices, rows, columns = ref.shape
    masks = []
    for number in sorted(contours):
        name = names.get(number, f"roi_{number}")
        by_slice: dict[int, list[np.ndarray]] = {}
        clipped = dropped = skipped = 0
        for contour in contours[number]:
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
            points = np.asarray(contour.get("ContourData") or [], dtype=float)
            if kind != "CLOSED_PLANAR" or points.size < 9:
                skipped += 1  # POINT / OPEN_PLANAR / degenerate contours enclose no area
                continue
            idx = ref.to_index(points.reshape(-1, 3))
            k = int(round(float(idx[:, 2].mean())))
            if np.ptp(idx[:, 2]) > 0.5 or not 0 <= k < n_slices:
                dropped += 1
                continue
            if (idx[:, 0].min() < -0.5 or idx[:, 1].min() < -0.5 or idx[:, 0].max() > columns - 0.5
                    or idx[:, 1].max() > rows - 0.5):
                clipped += 1
            by_slice.setdefault(k, []).append(idx[:, :2])
        mask = Mask(number, name, ref, [(k, 0, 0, even_odd_fill(polygons, rows, columns))
                                        for k, polygons in sorted(by_slice.items())])
        label = f"ROI {number} ({name})"
        if clipped:
            warnings.append(f"{label}: {clipped} contour(s) extend beyond the image: clipped")
        if dropped:
            warnings.append(f"{label}: {dropped} contour(s) off the slices of series {ref.stack.series_uid}: dropped")
        if skipped:
            warnings.append(f"{label}: {skipped} POINT/OPEN contour(s) enclose no area: ignored")
        if mask.empty():
            warnings.append(f"{label} is empty")
        masks.append(mask)
    return masks, warnings


# --------------------------------------------------------------------------- writing SEG

@dataclass
class SegInfo:
    """Kaapana's seg_info.json: algorithm and label names (``label_int`` → ``label_name``)."""

    algorithm: str = ""
    algorithm_type: str = ""
    body_part: str = ""
    labels: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> SegInfo:
        if path is None:
            return cls()
        try:
            doc = json.loads(path.read_text())
            labels = {int(e["label_int"]): str(e["label_name"]) for e in doc.get("seg_info", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not a seg_info.json ({type(exc).__name__}: {exc})",
                            hint='expected {"algorithm": ..., "seg_info": [{"label_name": ..., "label_int": ...}]}') \
                from None
        return cls(str(doc.get("algorithm", "")), str(doc.get("algorithm_type", "")),
                   str(doc.get("task_body_part", "")), labels)


@cache
def _code_table() -> dict[str, Any]:
    return json.loads(resources.files("kaapcli").joinpath("data/seg_codes.json").read_text())


def coded_concepts(label: str) -> tuple[Any, Any]:
    """(segmented property category, type) for a label: SNOMED CT where the name maps, a generic code otherwise."""
    from pydicom.sr.codedict import codes

    table = _code_table()
    words = re.sub(r"[_\-\s]+", " ", label).strip().lower()
    keyword = table["synonyms"].get(words) or "".join(w.capitalize() for w in words.split())
    try:
        concept = getattr(codes.SCT, keyword)
    except AttributeError:
        return getattr(codes.SCT, table["generic"]["category"]), getattr(codes.SCT, table["generic"]["type"])
    category = table["category"].get(keyword, table["default_category"])
    return getattr(codes.SCT, category), concept


@dataclass
class Segment:
    """One value of a label image: the image is shared by the segments of one file, never copied per segment
    (50 segments of a 300 x 512 x 512 CT as boolean volumes were 3.9 GB)."""

    number: int
    label: str
    labels: np.ndarray  # the label image (slices, rows, columns) on the reference grid, smallest unsigned type
    value: int
    source: str
    voxels: int = 0  # how many voxels carry ``value``

    @property
    def array(self) -> np.ndarray:
        """The segment as a boolean volume (made on demand)."""
        return self.labels == self.value


def _same_grid(image: Any, ref: Reference) -> bool:
    g = ref.geometry
    return (tuple(image.GetSize()) == ref.size
            and np.allclose(image.GetSpacing(), g.spacing, atol=GRID_TOL)
            and np.allclose(image.GetOrigin(), g.origin, atol=GRID_TOL)
            and np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), g.direction, atol=GRID_TOL))


def mask_on_reference(path: Path, ref: Reference) -> tuple[np.ndarray, list[str]]:
    """A label image read from ``path`` on the reference grid (nearest-neighbour resampled if needed)."""
    import SimpleITK as sitk

    from kaapcli.core.resample import read_scalar_volume

    image = read_scalar_volume(path, "a mask")
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.mod(values, 1) == 0):
        raise DataError(f"{path}: not a label image (non-integer values)")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if low < 0:
        raise DataError(f"{path}: not a label image (negative values)")
    warnings = []
    if not _same_grid(image, ref):
        g = ref.geometry
        same_frame = (np.allclose(image.GetSpacing(), g.spacing, atol=GRID_TOL)
                      and np.allclose(image.GetOrigin(), g.origin, atol=GRID_TOL))
        if same_frame:  # same origin and spacing, other size: another series' mask, not a resolution change
            raise DataError(f"{path}: mask size {'x'.join(map(str, image.GetSize()))} differs from the reference "
                            f"{'x'.join(map(str, ref.size))} on the same grid",
                            hint="is this the mask of another series?")
        grid = ref.image(np.zeros(ref.shape, dtype=np.uint8))
        resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
        if values.any() and not sitk.GetArrayViewFromImage(resampled).any():
            raise DataError(f"{path}: mask lies outside the referenced series {ref.stack.series_uid}")
        warnings.append(f"{path.name}: geometry differs from the reference "
                        f"({'x'.join(map(str, image.GetSize()))} vs {'x'.join(map(str, ref.size))}): "
                        "resampled (nearest neighbour)")
        image = resampled
    labels = sitk.GetArrayViewFromImage(image)
    dtype = np.uint8 if high < 2**8 else np.uint16 if high < 2**16 else np.uint32 if high < 2**32 else np.uint64
    return labels.astype(dtype), warnings  # one copy, in the smallest type (not int64: 8x the memory)


def _stem(path: Path) -> str:
    return re.sub(r"\.(nii\.gz|nii|nrrd|mha|mhd)$", "", path.name)


def _label_name(path: Path, value: int, values: list[int], info: SegInfo) -> str:
    from kaapcli.core.masks import MASK_NAME

    stem = _stem(path)
    named = MASK_NAME.match(stem)
    if named and len(values) == 1:  # <stem>--<label_int>--<label_name> (DESIGN §3.4): the name is in the file name
        return named["name"]
    by_name = {name.lower(): name for name in info.labels.values()}
    if stem.lower() in by_name:  # one file per label, named after it
        return by_name[stem.lower()]
    if value in info.labels:
        return info.labels[value]
    return stem if len(values) == 1 else f"label_{value}"


def collect_segments(mask_paths: Sequence[Path], ref: Reference, info: SegInfo) -> tuple[list[Segment], list[str]]:
    """One segment per (file, label value); a label map gives several, a binary mask one."""
    segments: list[Segment] = []
    warnings: list[str] = []
    for path in mask_paths:
        labels, notes = mask_on_reference(path, ref)
        warnings += notes
        if labels.dtype.itemsize <= 2:
            counts = np.bincount(labels.reshape(-1))
            present = {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v}
        else:
            found, numbers = np.unique(labels, return_counts=True)
            present = {int(v): int(n) for v, n in zip(found, numbers, strict=True) if v}
        values = sorted(present)
        if len(mask_paths) == 1 and info.labels:  # a label map: labels of seg_info absent from it stay, empty
            values = sorted(set(values) | set(info.labels))
        if not values:  # an empty mask file: one empty segment, named from seg_info or the file
            stem = _stem(path).lower()
            values = [v for v, name in info.labels.items() if name.lower() == stem][:1] or [1]
        for value in values:
            segments.append(Segment(len(segments) + 1, _label_name(path, value, values, info), labels, value,
                                    path.name, present.get(value, 0)))
    for s in segments:
        if not s.voxels:
            warnings.append(f"segment {s.number} ({s.label}, from {s.source}) is empty")
    return segments, warnings


def seg_pixels(segments: Sequence[Segment], shape: tuple[int, ...]) -> np.ndarray:
    """The pixel array for highdicom: a label map of segment numbers (slices, rows, columns) when no two segments
    share a voxel, so no per-segment volume is ever made; only overlapping masks need the stacked
    (slices, rows, columns, segments) form."""
    top = max(s.number for s in segments)
    dtype = np.uint8 if top < 2**8 else np.uint16
    sources = {id(s.labels): s.labels for s in segments}
    if top < 2**16 and len(sources) == 1:  # one label image: renumber its values, if they are not already
        labels = next(iter(sources.values()))
        if all(s.value == s.number for s in segments) and labels.dtype.itemsize <= 2 and (
                not labels.size or int(labels.max()) <= top):
            return labels if labels.dtype == dtype else labels.astype(dtype)
        lut = np.zeros(max(int(labels.max()) if labels.size else 0, *(s.value for s in segments)) + 1, dtype=dtype)
        for s in segments:
            lut[s.value] = s.number
        return lut[labels]
    if top < 2**16:  # several files: one label map while they do not overlap
        out = np.zeros(shape, dtype=dtype)
        for s in segments:
            where = s.array
            if out[where].any():
                break
            out[where] = s.number
        else:
            return out
        del out
    return np.stack([s.array for s in segments], axis=-1).astype(np.uint8)


def build_seg(ref: Reference, segments: Sequence[Segment], info: SegInfo, *, series_uid: str, sop_uid: str,
              series_number: int = 900, description: str = "") -> Any:
    """A binary DICOM SEG (highdicom) of ``segments`` referencing every instance of the reference series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from kaapcli import __version__

    algorithm_type = (info.algorithm_type or ("AUTOMATIC" if info.algorithm else "MANUAL")).upper()
    if algorithm_type not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        raise DataError(f"algorithm type {algorithm_type!r}: expected AUTOMATIC, SEMIAUTOMATIC or MANUAL")
    identification = None
    if algorithm_type != "MANUAL":
        identification = hd.AlgorithmIdentificationSequence(
            name=info.algorithm or "unknown", version="1", family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for s in segments:
        category, kind = coded_concepts(s.label)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=s.number, segment_label=s.label[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=algorithm_type, algorithm_identification=identification,
            tracking_uid=dicom.uid_from(f"{series_uid}/segment/{s.number}"), tracking_id=s.label[:64]))
    pixels = seg_pixels(segments, ref.shape)
    seg = hd.seg.Segmentation(
        source_images=ref.datasets(), pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="kaapcli", manufacturer_model_name="kaapcli",
        software_versions=__version__, device_serial_number="0", content_label="SEGMENTATION",
        content_description=(info.body_part or None), omit_empty_frames=any(s.voxels for s in segments))
    seg.SeriesDescription = (description or info.algorithm or "Segmentation")[:64]
    return seg


def masks_to_seg(mask_paths: Sequence[Path], reference_paths: Sequence[Path], dest_dir: Path, *,
                 info: SegInfo | None = None, skip_empty: bool = False, description: str = "",
                 dry_run: bool = False) -> tuple[Path, list[str]]:
    """Write one binary SEG of ``mask_paths`` on the series in ``reference_paths``; returns (path, warnings)."""
    info = info or SegInfo()
    ref = reference_from(reference_paths)
    segments, warnings = collect_segments(mask_paths, ref, info)
    if skip_empty:
        segments = [s for s in segments if s.voxels]
        for n, s in enumerate(segments, 1):
            s.number = n
    if not segments:
        raise DataError("no non-empty segment to write", hint="drop --skip-empty to keep empty segments")
    seed = "|".join([ref.stack.series_uid, *(p.name for p in mask_paths), *(s.label for s in segments)])
    series_uid = dicom.uid_from(f"itk2seg/{seed}/series")
    dest = dest_dir / f"{series_uid}.dcm"
    if not dry_run:
        seg = build_seg(ref, segments, info, series_uid=series_uid, sop_uid=dicom.uid_from(f"itk2seg/{seed}/sop"),
                        description=description)
        dicom.save(seg, dest)
    return dest, warnings


# --------------------------------------------------------------------------- operators

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _sop_class(path: Path) -> str:
    import warnings

    with warnings.catch_warnings():  # reading problems are reported when the item is processed
        warnings.simplefilter("ignore")
        try:
            return str(dicom.read(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID", ""))
        except DataError:
            return ""


@dataclass
class Seg2ItkOperator(BaseOperator):
    """DICOM SEG / RTSTRUCT → one NIfTI per segment (or one label map) on the referenced grid + meta JSON."""

    labelmap: bool = False
    only: tuple[str, ...] = ()  # segment names or numbers to keep (lower case); empty = all
    reference: Path | None = None
    roots: tuple[Path, ...] = ()  # where to look for referenced series when --reference is not given
    fmt: str = "nii.gz"  # nii.gz | nii | nrrd
    threshold: float | None = None  # FRACTIONAL: binarize at this probability; None keeps the probabilities

    name = "seg2itk"
    supports_dry_run = True
    input_kind = "DICOM SEG or RTSTRUCT"

    def options(self) -> dict[str, Any]:
        return {"labelmap": self.labelmap, "only": list(self.only),
                "reference": str(self.reference) if self.reference else None, "fmt": self.fmt,
                "threshold": self.threshold}

    def accepts(self, path: Path) -> bool:
        return fsio.is_dicom(path) and _sop_class(path) in (*SEG_CLASSES, RTSTRUCT_STORAGE)

    def _segments(self, path: Path) -> tuple[list[Mask], list[str]]:
        if self.reference is None:
            return read_segments(path, roots=self.roots, threshold=self.threshold)
        try:
            return read_segments(path, roots=(self.reference,), threshold=self.threshold, own_grid=False)
        except DataError as exc:
            series = _series_index(self.reference.resolve())
            if "not found" not in exc.message or len(series) != 1:
                raise
            (uid, paths), = series.items()  # the only series there: use it, but say so
            masks, warnings = read_segments(path, list(paths), threshold=self.threshold)
            return masks, [f"referenced series not in {self.reference}; using its only series {uid}", *warnings]

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        path = item.paths[0]
        masks, warnings = self._segments(path)
        if self.only:
            wanted = set(self.only)
            missing = wanted - {m.name.lower() for m in masks} - {str(m.number) for m in masks}
            warnings += [f"no segment named {name!r}" for name in sorted(missing)]
            masks = [m for m in masks if m.name.lower() in wanted or str(m.number) in wanted]
        if not masks:
            suffix = f" after --filter {','.join(self.only)}" if self.only else ""
            raise DataError(f"no segment left to write{suffix}")
        stem = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
        ref = masks[0].reference
        fractional = any(m.fractional for m in masks)
        if self.labelmap and fractional:
            raise DataError("a FRACTIONAL SEG holds probabilities, not labels: no label map without a threshold",
                            hint="add --threshold 0.5 (or drop --labelmap to keep the probabilities as float)")
        outputs = [ctx.out / f"{stem}.{self.fmt}"] if self.labelmap else [
            ctx.out / f"{stem}--{m.number}--{fsio.safe_name(m.name)}.{self.fmt}" for m in masks]
        meta_path = ctx.out / f"{stem}-meta.json"
        if ctx.dry_run:
            return Outcome(message="would write " + ", ".join(str(p) for p in [*outputs, meta_path]))
        if self.labelmap:
            dtype = np.uint8 if max(m.number for m in masks) < 256 else np.uint16
            labels = np.zeros(ref.shape, dtype=dtype)
            for m in masks:
                overlap = m.paint(labels, m.number)
                if overlap:
                    warnings.append(f"segment {m.number} ({m.name}) overlaps earlier segments in {overlap} voxel(s): "
                                    "it wins there")
            volume.write_image(ref.image(labels), outputs[0])
        else:
            heads: dict[Any, bytes] = {}
            for m, dest in zip(masks, outputs, strict=True):
                kind = "float32" if m.fractional else "uint8"
                voxels = np.zeros(ref.shape, dtype=kind)
                m.paint(voxels, 1)
                if self.fmt == "nrrd":
                    volume.write_image(ref.image(voxels), dest)
                    continue
                if kind not in heads:
                    heads[kind] = volume.nifti_header(ref.image(np.zeros((1, 1, 1), kind), size=ref.size))
                volume.write_nifti(heads[kind], voxels, dest)
        header = dicom.read(path, stop_before_pixels=True)
        algorithms = {str(s.SegmentAlgorithmName) for s in header.get("SegmentSequence") or []
                      if s.get("SegmentAlgorithmName")}
        fsio.write_json(meta_path, {
            "algorithm": ", ".join(sorted(algorithms)),
            "seg_info": [{"label_name": m.name, "label_int": str(m.number)} for m in masks],
            "Modality": str(header.get("Modality", "")),
            "SeriesInstanceUID": str(header.get("SeriesInstanceUID", "")),
            "ReferencedSeriesInstanceUID": ref.stack.series_uid,
            "geometry": "SEG frames" if ref.own else "referenced series",
            "SegmentationType": str(header.get("SegmentationType", "")),
            **({"values": "probability 0..1"} if fractional else {}),
            "labelmap": self.labelmap,
            "files": [p.name for p in outputs],
        })
        return Outcome(outputs=[*outputs, meta_path], warnings=warnings)


@dataclass
class Itk2SegOperator(BaseOperator):
    """Masks (one item: every file given) → one binary DICOM SEG on the reference series."""

    reference_paths: tuple[Path, ...] = ()
    info: SegInfo = field(default_factory=SegInfo)
    skip_empty: bool = False
    description: str = ""

    name = "itk2seg"
    supports_dry_run = True

    def options(self) -> dict[str, Any]:
        return {"info": self.info.__dict__, "skip_empty": self.skip_empty, "description": self.description,
                "reference": sorted(str(p) for p in self.reference_paths)}

    def accepts(self, path: Path) -> bool:
        return path.name.lower().endswith(MASK_SUFFIXES)

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        dest, warnings = masks_to_seg(item.paths, self.reference_paths, ctx.out, info=self.info,
                                      skip_empty=self.skip_empty, description=self.description, dry_run=ctx.dry_run)
        if ctx.dry_run:
            return Outcome(message=f"would write {dest}", warnings=warnings)
        return Outcome(outputs=[dest], warnings=warnings)
