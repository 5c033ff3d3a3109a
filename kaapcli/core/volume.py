"""DICOM series → SimpleITK volumes: stack splitting, geometry checks, rescale, NIfTI/NRRD writing.

The one home of image geometry.  A series is read as *frames* (one per single-frame file,
one per frame of an enhanced/legacy multi-frame object), frames are split into *stacks*
(same orientation, image type, echo, matrix; duplicated positions split by acquisition or
temporal position), and a stack becomes one :class:`Volume`: a SimpleITK image in LPS world
space whose voxel (i, j, k) is column i, row j of the k-th slice sorted along the slice
normal (``row cosine × column cosine``), exactly as ITK, MITK and Kaapana lay them out.

A Siemens MOSAIC image (ImageType ...\\MOSAIC) is one file holding a whole volume as tiles: it
is unpacked into NumberOfImagesInMosaic frames (from the CSA image header, read with nibabel's
CSA reader), placed as dcm2niix places them: ImagePositionPatient is corrected from the corner of
the mosaic to the first tile, and tiles run along the CSA SliceNormalVector.

With ``four_d=True``, stacks of one series that repeat the same slice positions (an fMRI time
series, the volumes of a diffusion series: acquisition / temporal position / b-value) become one
4-D volume, as dcm2niix writes them; otherwise each is its own 3-D stack.  Per volume, the b-value
and gradient direction (LPS) are kept for ``.bval``/``.bvec`` files.

A stack with irregular spacing, missing slices or a gantry tilt is refused with a
:class:`DataError` naming the reason, unless ``resample=True`` puts it on a regular grid.

Never: guesses a mosaic's slice count, or sizes an allocation from a header value it has not
checked against the pixel matrix.

Public API (stable; other operators import it):

- ``split_stacks(paths, *, four_d=False) -> list[Stack]``: headers only, no pixel decoding.
- ``load_series(paths, *, resample=False, four_d=False, scanned=None, allocate=None) -> list[Volume]``: every
  stack of a series, each file read once (``scanned``: the plan's :func:`scan_file` notes; ``allocate``: the
  array each stack's voxels are read into, e.g. a :class:`MappedNifti`'s).
- ``load_stack(stack, *, resample=False) -> Volume``.
- ``write_image(image, dest, *, level=1) -> int``: atomic ``.nii.gz``/``.nii``/``.nrrd``/``.mha`` writer;
  ``write_nifti(nifti_header(image), array, dest)`` writes arrays on one grid without SimpleITK images;
  ``write_volume(vol, dest, mapped=...)`` commits an uncompressed NIfTI its voxels were read into.
- ``to_nifti(image)`` / ``nifti_affine(image)``: the NIfTI view (RAS affine) of a SimpleITK image.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kaapcli.core import dicom, fsio
from kaapcli.exitcodes import CantCreateError, DataError

MAX_MOSAIC_TILES = 1024  # Siemens mosaics hold at most a few hundred slices: more is a hostile or broken header
ORIENTATION_TOL = 1e-3  # direction cosines closer than this are the same orientation
POSITION_TOL = 1e-2  # mm: slice positions and in-plane offsets closer than this are equal


@dataclass(frozen=True)
class Frame:
    """One 2-D image plane of a series: where it is, what it is, and where its pixels live."""

    path: Path
    index: int  # 0-based frame index within its file (0 for single-frame objects)
    sop_uid: str
    sop_class: str
    position: tuple[float, float, float]  # ImagePositionPatient: centre of the first pixel, LPS mm
    orientation: tuple[float, float, float, float, float, float]  # ImageOrientationPatient
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) mm
    rows: int
    columns: int
    slope: float
    intercept: float
    image_type: str
    echo: str  # echo number / effective echo time, "" when not MR
    acquisition: str  # acquisition number / temporal position: splits stacks with duplicated positions
    stack_id: str  # FrameContentSequence StackID of enhanced objects
    mosaic: int = 0  # Siemens mosaic: tiles per mosaic row, ``index`` is the tile; 0 otherwise
    bvalue: float | None = None  # diffusion b-value (s/mm²), None when the header gives none
    gradient: tuple[float, float, float] | None = None  # diffusion gradient direction, LPS patient axes
    slice_time: float | None = None  # ms from the start of the volume (Siemens MosaicRefAcqTimes)
    instance: float = 0.0  # InstanceNumber: orders volumes within one acquisition number
    thickness: float | None = None  # SliceThickness: the slice spacing of a single-slice stack

    @property
    def volume_key(self) -> tuple[str, str, str]:
        """What tells apart the volumes of a series that repeat the same slice positions (a mosaic file is a
        whole volume by itself)."""
        bvec = "" if self.gradient is None else ",".join(f"{v:.5f}" for v in self.gradient)
        weighting = "" if self.bvalue is None and not bvec else f"b{self.bvalue}:{bvec}"
        return self.acquisition, weighting, self.sop_uid if self.mosaic else ""

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=float)
        return np.cross(o[:3], o[3:])


@dataclass
class Stack:
    """Frames of one series forming one volume, sorted along the slice normal."""

    series_uid: str
    frames: list[Frame]  # volume after volume, each sorted along the normal
    suffix: str = ""  # "" when the series holds one stack; else e.g. "_e2", "_a3", "_sag"
    volumes: int = 1  # > 1: a 4-D stack of ``volumes`` volumes on one grid

    @property
    def label(self) -> str:
        return self.series_uid + self.suffix

    @property
    def slices(self) -> list[Frame]:
        """The frames of the first volume: the stack's grid."""
        return self.frames[: len(self.frames) // self.volumes]

    def volume_frames(self, v: int) -> list[Frame]:
        n = len(self.frames) // self.volumes
        return self.frames[v * n:(v + 1) * n]


@dataclass
class Volume:
    """One stack as a voxel array (rescaled values) on its grid, plus what it came from.

    ``voxels`` is (slices, rows, columns), or (volumes, slices, rows, columns) for a 4-D stack: C order, so its
    bytes are NIfTI's (i, j, k[, t]) voxel order as they are.  ``frames[k]`` is the source of slice k, unless
    ``resampled`` (then ``frames`` are the sorted source frames and slices are interpolated between them);
    ``frames`` runs volume after volume.  ``image`` is the SimpleITK image (LPS; a 4-D image's 4th spacing is
    ``tr``, RepetitionTime in s, or 1), built on first use.
    """

    voxels: np.ndarray
    geometry: Geometry
    series_uid: str
    suffix: str
    frames: list[Frame]
    header: Any  # the first frame's file without pixel data: a pydicom Dataset or a dicomscan.Header
    warnings: list[str] = field(default_factory=list)
    resampled: bool = False
    volumes: int = 1
    tr: float = 1.0

    @property
    def slices(self) -> list[Frame]:
        return self.frames[: len(self.frames) // self.volumes]

    @property
    def size(self) -> tuple[int, ...]:
        """ITK / NIfTI order: (columns, rows, slices[, volumes])."""
        return tuple(int(n) for n in self.voxels.shape[::-1])

    @property
    def spacing(self) -> tuple[float, ...]:
        g = self.geometry.spacing
        return (float(g[0]), float(g[1]), float(g[2]), *((self.tr,) if self.volumes > 1 else ()))

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 RAS affine of the spatial grid."""
        return ras_affine(self.geometry.direction, self.geometry.spacing, self.geometry.origin)

    @property
    def image(self) -> Any:
        """The SimpleITK image of the voxels (a copy; origin, spacing and direction of the grid)."""
        if self._image is None:
            import SimpleITK as sitk

            g = self.geometry
            image = sitk.GetImageFromArray(self.voxels, isVector=False)
            if self.volumes > 1:
                direction = np.eye(4)
                direction[:3, :3] = g.direction
                image.SetOrigin((*(float(v) for v in g.origin), 0.0))
                image.SetSpacing(self.spacing)
                image.SetDirection(tuple(float(v) for v in direction.flatten()))
            else:
                image.SetOrigin(tuple(float(v) for v in g.origin))
                image.SetSpacing(tuple(float(v) for v in g.spacing))
                image.SetDirection(tuple(float(v) for v in g.direction.flatten()))
            self._image = image
        return self._image

    _image: Any = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- reading frames

def _seq_item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def functional_groups(ds: Any, index: int) -> list[Any]:
    """The functional groups of frame ``index`` of an enhanced object: per-frame first, then shared (or [])."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    return [g for g in (per_frame[index] if 0 <= index < len(per_frame) else None, shared) if g is not None]


def fg_attr(groups: Sequence[Any], seq_keyword: str, attr: str) -> Any:
    """``attr`` from the first functional group (per-frame, then shared) holding ``seq_keyword``."""
    for group in groups:
        if group is None:
            continue
        item = _seq_item(group, seq_keyword)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _floats(value: Any, n: int, what: str, path: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: invalid {what}: {value!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise DataError(f"{path}: invalid {what}: {value!r}")
    return out


def siemens_csa(ds: Any) -> dict[str, Any] | None:
    """The Siemens CSA image header (0029,xx10 of block "SIEMENS CSA HEADER"), parsed, or None when absent or
    unreadable.  ``ds``: a pydicom Dataset or a :class:`dicomscan.Header`."""
    from kaapcli.core import dicomscan

    if isinstance(ds, dicomscan.Header):
        raw = ds.private(0x0029, "SIEMENS CSA HEADER", 0x10)
    else:
        if (0x0029, 0x0010) not in ds:
            return None
        try:
            raw = ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value
        except (KeyError, ValueError):
            return None
    return parse_csa(raw) if isinstance(raw, bytes) else None


_CSA_NUMBERS = {"FL": float, "FD": float, "DS": float, "SS": int, "US": int, "SL": int, "UL": int, "IS": int}
MAX_CSA_ITEMS = 1000  # as nibabel: more tags or items than this is a damaged header


def parse_csa(raw: bytes) -> dict[str, Any] | None:
    """A Siemens CSA header (CSA1, or CSA2 starting "SV10") as ``{"tags": {name: {"vr", "vm", "items"}}}``, numbers
    converted by their CSA VR; the layout nibabel's csareader reads, without importing nibabel (~0.3 s).
    None when the header is damaged: a private header is never trusted."""
    import struct

    try:
        csa2 = raw[:4] == b"SV10"
        pos = 8 if csa2 else 0
        n_tags = struct.unpack_from("<I", raw, pos)[0]
        pos += 8
        if not 0 < n_tags <= MAX_CSA_ITEMS:
            return None
        tags: dict[str, Any] = {}
        first_items = 0
        for tag_no in range(n_tags):
            name_b, vm, vr_b, _syngodt, n_items, _last = struct.unpack_from("<64si4s3i", raw, pos)
            pos += 84
            name, vr = _csa_text(name_b), _csa_text(vr_b)
            if tag_no == 1:
                first_items = n_items  # CSA1 item lengths are offset by this (as nibabel reads them)
            if not 0 <= n_items <= MAX_CSA_ITEMS or (not csa2 and tag_no == 0 and n_items):
                return None
            n_values = vm if vm else n_items
            convert = _CSA_NUMBERS.get(vr)
            items: list[Any] = []
            for item_no in range(n_items):
                x0, x1, _x2, _x3 = struct.unpack_from("<4i", raw, pos)
                pos += 16
                length = x1 if csa2 else x0 - first_items
                if length < 0 or pos + length > len(raw):
                    if csa2:
                        return None
                    if item_no < vm:
                        items.append("")
                    break
                if item_no >= n_values:
                    if length:
                        return None
                    continue
                text = _csa_text(raw[pos:pos + length])
                pos += length + (-length % 4)
                if convert is not None:
                    if length == 0:
                        n_values = item_no
                        continue
                    items.append(convert(text))
                else:
                    items.append(text)
            tags[name] = {"vr": vr, "vm": vm, "items": items}
    except (struct.error, ValueError):
        return None
    return {"tags": tags}


def _csa_text(raw: bytes) -> str:
    end = raw.find(b"\x00")
    return (raw if end < 0 else raw[:end]).decode("latin-1")


def csa_values(csa: dict[str, Any] | None, name: str) -> list[Any]:
    item = (csa or {}).get("tags", {}).get(name) or {}
    return list(item.get("items") or [])


def _csa_float(csa: dict[str, Any] | None, name: str) -> float | None:
    values = csa_values(csa, name)
    try:
        value = float(values[0]) if values else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _is_mosaic(ds: Any) -> bool:
    return any(str(v).upper() == "MOSAIC" for v in (ds.get("ImageType") or []))


@dataclass(frozen=True)
class _Mosaic:
    count: int  # tiles holding slices
    per_row: int  # tiles per mosaic row (and column): ceil(sqrt(count))
    rows: int  # of one tile
    columns: int
    normal: np.ndarray  # unit vector the tiles run along: ±(row cosine × column cosine), sign from the CSA
    spacing: float  # mm between tiles


def _mosaic_layout(ds: Any, path: Path, csa: dict[str, Any] | None, orientation: tuple[float, ...],
                   rows: int, columns: int) -> _Mosaic:
    """Tile count, size and slice direction of a Siemens mosaic (as dcm2niix: nii_dicom.cpp set_nii_header_x)."""
    count = _csa_float(csa, "NumberOfImagesInMosaic")
    if count is None:
        private = ds.get((0x0019, 0x100A))  # Siemens' public copy of NumberOfImagesInMosaic
        try:
            count = float(private.value) if private is not None and private.VM == 1 else None
        except (TypeError, ValueError):
            count = None
    if count is None or not count.is_integer() or count < 1:
        raise DataError(f"{path}: Siemens MOSAIC without a usable NumberOfImagesInMosaic in its CSA header "
                        f"({count if count is not None else 'missing'}): cannot unpack the tiles")
    n = int(count)
    if n > MAX_MOSAIC_TILES:
        raise DataError(f"{path}: Siemens MOSAIC claims {n} images (at most {MAX_MOSAIC_TILES} are plausible)")
    per_row = math.ceil(math.sqrt(n))
    tile_rows, tile_columns = rows // per_row, columns // per_row
    if tile_rows < 1 or tile_columns < 1:
        raise DataError(f"{path}: Siemens MOSAIC of {rows}x{columns} pixels cannot hold {n} images")
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    csa_normal = csa_values(csa, "SliceNormalVector")
    with contextlib.suppress(TypeError, ValueError):
        if len(csa_normal) == 3 and float(np.dot(np.asarray(csa_normal, dtype=float), normal)) < 0:
            normal = -normal  # tiles run opposite to row x column (e.g. Siemens sagittal, R>>L)
    spacing = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
    try:
        dz = float(spacing)
    except (TypeError, ValueError):
        dz = float("nan")
    if not math.isfinite(dz) or dz <= 0:
        raise DataError(f"{path}: invalid SpacingBetweenSlices/SliceThickness {spacing!r} of a Siemens MOSAIC")
    return _Mosaic(n, per_row, tile_rows, tile_columns, normal / np.linalg.norm(normal), dz)


def _diffusion(ds: Any, groups: Sequence[Any], csa: dict[str, Any] | None
               ) -> tuple[float | None, tuple[float, float, float] | None]:
    """b-value and gradient direction (LPS): MR Diffusion Macro, then classic tags, then the Siemens CSA."""
    bvalue = fg_attr(groups, "MRDiffusionSequence", "DiffusionBValue")
    direction = None
    for group in groups:
        diff = _seq_item(group, "MRDiffusionSequence") if group is not None else None
        grad = _seq_item(diff, "DiffusionGradientDirectionSequence") if diff is not None else None
        if grad is not None and "DiffusionGradientOrientation" in grad:
            direction = grad.DiffusionGradientOrientation
            break
    if bvalue is None:
        bvalue = ds.get("DiffusionBValue")
    if direction is None:
        direction = ds.get("DiffusionGradientOrientation")
    if bvalue is None:
        bvalue = _csa_float(csa, "B_value")
    if direction is None:
        values = csa_values(csa, "DiffusionGradientDirection")
        direction = values if len(values) == 3 else None
    try:
        b = float(bvalue) if bvalue not in (None, "") else None
        g = tuple(float(v) for v in direction) if direction is not None else None
    except (TypeError, ValueError):
        return None, None
    if b is not None and not (math.isfinite(b) and b >= 0):
        b = None
    if g is not None and (len(g) != 3 or not all(math.isfinite(v) for v in g)):
        g = None
    return b, g  # type: ignore[return-value]


def frames_of(ds: Any, path: Path) -> list[Frame]:
    """The image planes of one dataset, with their geometry (classic, enhanced, mosaic and RT Dose objects)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "Rows" not in ds:
        raise DataError(f"{path}: not an image (no pixel data; SOP class {ds.get('SOPClassUID', '?')})")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DataError(f"{path}: colour images ({ds.get('PhotometricInterpretation', '?')}) cannot become a "
                        "scalar volume")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    nframes = int(ds.get("NumberOfFrames") or 1)
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if nframes < 1 or (per_frame is not None and len(per_frame) != nframes):
        raise DataError(f"{path}: NumberOfFrames {nframes} but {len(per_frame or [])} per-frame functional groups")
    image_type = "\\".join(str(v) for v in (ds.get("ImageType") or []))
    base_echo = str(ds.get("EchoNumbers", "") or "")
    base_acq = str(ds.get("TemporalPositionIdentifier", "") or ds.get("AcquisitionNumber", "") or "")
    sop_uid, sop_class = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
    try:
        instance = float(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        instance = 0.0
    csa = siemens_csa(ds) if str(ds.get("Manufacturer", "")).upper().startswith("SIEMENS") else None
    try:
        thickness: float | None = float(ds.get("SliceThickness") or 0) or None
    except (TypeError, ValueError):
        thickness = None
    frames = []
    for f in range(nframes):
        groups = [per_frame[f] if per_frame is not None and f < len(per_frame) else None, shared]
        if per_frame is not None or shared is not None:
            ipp = fg_attr(groups, "PlanePositionSequence", "ImagePositionPatient")
            iop = fg_attr(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = fg_attr(groups, "PixelMeasuresSequence", "PixelSpacing")
            slope = fg_attr(groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = fg_attr(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            echo = fg_attr(groups, "MREchoSequence", "EffectiveEchoTime")
            temporal = fg_attr(groups, "FrameContentSequence", "TemporalPositionIndex")
            stack_id = fg_attr(groups, "FrameContentSequence", "StackID")
        else:
            ipp, iop, spacing = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), None
            slope = intercept = echo = temporal = stack_id = None
        ipp = ipp if ipp is not None else ds.get("ImagePositionPatient")
        iop = iop if iop is not None else ds.get("ImageOrientationPatient")
        spacing = spacing if spacing is not None else ds.get("PixelSpacing")
        if ipp is None or iop is None:
            raise DataError(f"{path}: no ImagePositionPatient/ImageOrientationPatient: not a slice of a volume")
        position = _floats(ipp, 3, "ImagePositionPatient", path)
        offsets = ds.get("GridFrameOffsetVector")  # RT Dose: frames along the normal from the one position
        orientation = _floats(iop, 6, "ImageOrientationPatient", path)
        if offsets is not None and nframes > 1:
            normal = np.cross(orientation[:3], orientation[3:])
            position = tuple(float(v) for v in np.asarray(position) + float(offsets[f]) * normal)
        pixel_spacing = _floats(spacing, 2, "PixelSpacing", path) if spacing is not None else (1.0, 1.0)
        if min(pixel_spacing) <= 0:
            raise DataError(f"{path}: invalid PixelSpacing {pixel_spacing}")
        if slope is None:
            slope = ds.get("RescaleSlope", ds.get("DoseGridScaling", 1))
        if intercept is None:
            intercept = ds.get("RescaleIntercept", 0)
        bvalue, gradient = _diffusion(ds, groups, csa)
        frame = Frame(
            path=path, index=f, sop_uid=sop_uid, sop_class=sop_class, position=position,  # type: ignore[arg-type]
            orientation=orientation, spacing=pixel_spacing, rows=rows, columns=columns,  # type: ignore[arg-type]
            slope=float(slope if slope not in (None, "") else 1), intercept=float(intercept or 0),
            image_type=image_type, echo=str(echo) if echo is not None else base_echo,
            acquisition=str(temporal) if temporal is not None else base_acq,
            stack_id=str(stack_id or ""), bvalue=bvalue, gradient=gradient,
            instance=instance if math.isfinite(instance) else 0.0, thickness=thickness)
        if nframes == 1 and _is_mosaic(ds):
            return _unpack_mosaic(ds, path, csa, frame)
        frames.append(frame)
    return frames


def _unpack_mosaic(ds: Any, path: Path, csa: dict[str, Any] | None, frame: Frame) -> list[Frame]:
    """The tiles of a Siemens mosaic as frames: tile k at the corrected position + k * spacing along the normal."""
    m = _mosaic_layout(ds, path, csa, frame.orientation, frame.rows, frame.columns)
    o = np.asarray(frame.orientation, dtype=float)
    row_step = o[:3] * frame.spacing[1]  # one column further along a row
    col_step = o[3:] * frame.spacing[0]  # one row further down
    # ImagePositionPatient is the mosaic's top-left pixel as if it were one tile centred in the mosaic
    # (dcm2niix set_nii_header_x: lFactor = (dim - dim / nRowCol) / 2, in pixels, not rounded)
    first = (np.asarray(frame.position, dtype=float)
             + row_step * (frame.columns - frame.columns / m.per_row) / 2
             + col_step * (frame.rows - frame.rows / m.per_row) / 2)
    times = csa_values(csa, "MosaicRefAcqTimes")
    frames = []
    common = {**vars(frame), "rows": m.rows, "columns": m.columns, "mosaic": m.per_row}  # 4x dataclasses.replace
    for per_tile in ("index", "position", "slice_time"):
        del common[per_tile]
    step = m.spacing * m.normal
    positions = (first + np.arange(m.count)[:, None] * step).tolist()  # first + k * step, all tiles at once
    for k, (x, y, z) in enumerate(positions):
        slice_time = None
        with contextlib.suppress(TypeError, ValueError, IndexError):
            slice_time = float(times[k]) if len(times) >= m.count and math.isfinite(float(times[k])) else None
        frames.append(Frame(**common, index=k, position=(x, y, z), slice_time=slice_time))
    return frames


# --------------------------------------------------------------------------- stacks

def _orientation_label(orientation: Sequence[float] | np.ndarray) -> str:
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    axis = int(np.argmax(normal))
    if normal[axis] < 0.999:
        return "obl"
    return ("sag", "cor", "ax")[axis]


def _split_duplicates(frames: list[Frame]) -> list[list[Frame]]:
    """Frames of one orientation; when positions repeat, split into volumes by acquisition / temporal position
    / diffusion weighting, in order of acquisition (then of first appearance)."""
    normal = frames[0].normal
    positions = np.round(np.array([np.dot(f.position, normal) for f in frames]) / POSITION_TOL)
    if len(set(positions.tolist())) == len(frames):
        return [frames]
    groups: dict[tuple[str, str, str], list[Frame]] = {}
    for f in frames:
        groups.setdefault(f.volume_key, []).append(f)
    order = {key: i for i, key in enumerate(groups)}
    return [groups[k] for k in sorted(groups, key=lambda k: (_natural(k[0]), groups[k][0].instance, order[k]))]


def _natural(text: str) -> tuple[int, float, str]:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _sorted_along_normal(frames: list[Frame]) -> list[Frame]:
    normal = frames[0].normal
    return sorted(frames, key=lambda f: (float(np.dot(f.position, normal)), f.index))


def _same_grid(volumes: list[list[Frame]]) -> list[list[list[Frame]]]:
    """Volumes grouped by their slice positions: each group can be one 4-D stack."""
    groups: dict[tuple[float, ...], list[list[Frame]]] = {}
    for frames in volumes:
        normal = frames[0].normal
        # round() as np.round (half to even, exact), without its per-call overhead (~5000 calls for 60 mosaics)
        key = tuple(sorted(float(round(float(np.dot(f.position, normal)) / POSITION_TOL)) for f in frames))
        groups.setdefault(key, []).append(frames)
    return list(groups.values())


def group_frames(series_uid: str, frames: list[Frame], *, four_d: bool = False) -> list[Stack]:
    """Split the frames of one series into stacks and name them (suffix only when there are several).

    ``four_d``: volumes repeating the same slice positions form one 4-D stack instead of one stack each.
    """
    clusters: list[tuple[tuple[Any, ...], np.ndarray, list[Frame]]] = []
    cluster_of: dict[tuple[Any, ...], list[Frame]] = {}  # where an identical key and orientation went
    for f in frames:
        key = (f.image_type, f.echo, f.stack_id, f.rows, f.columns)
        same = cluster_of.get((*key, f.orientation))
        if same is not None:  # the first match cannot change: clusters are only appended
            same.append(f)
            continue
        o = np.asarray(f.orientation)
        for ckey, corient, members in clusters:
            if ckey == key and np.max(np.abs(corient - o)) < ORIENTATION_TOL:
                members.append(f)
                break
        else:
            members = [f]
            clusters.append((key, o, members))
        cluster_of[(*key, f.orientation)] = members
    stacks: list[tuple[dict[str, str], list[list[Frame]]]] = []
    for (image_type, echo, stack_id, _r, _c), orient, members in clusters:
        parts = _split_duplicates(members)
        labels = [p[0].acquisition for p in parts]
        if len(set(labels)) < len(labels):  # volumes told apart by diffusion weighting only: number them
            labels = [str(i + 1) for i in range(len(parts))]
        label_of = {id(p): label for p, label in zip(parts, labels, strict=True)}
        runs = _same_grid(parts) if four_d else [[p] for p in parts]
        for run in runs:
            desc = {"orientation": _orientation_label(orient), "echo": echo, "stack": stack_id,
                    "type": image_type.split("\\")[2] if image_type.count("\\") >= 2 else image_type,
                    "acquisition": label_of[id(run[0])] if len(runs) > 1 else ""}
            stacks.append((desc, run))
    result = []
    varying = {k for k in ("orientation", "type", "echo", "stack", "acquisition")
               if len({d[k] for d, _ in stacks}) > 1}
    prefix = {"orientation": "", "type": "", "echo": "e", "stack": "s", "acquisition": "a"}
    seen: dict[str, int] = {}
    for desc, run in stacks:
        suffix = "".join(f"_{prefix[k]}{fsio.safe_name(desc[k], 'x')}" for k in sorted(varying, key=list(prefix).index))
        if len(stacks) > 1 and not suffix:
            suffix = "_1"
        if suffix in seen:  # same description twice (e.g. two oblique stacks): number them
            seen[suffix] += 1
            suffix = f"{suffix}_{seen[suffix]}"
        else:
            seen[suffix] = 1
        ordered = [f for part in run for f in _sorted_along_normal(part)]
        result.append(Stack(series_uid, ordered, suffix, volumes=len(run)))
    return result


def split_stacks(paths: Sequence[Path], *, four_d: bool = False) -> list[Stack]:
    """The stacks of the image series in ``paths`` (headers only).  Raises DataError on a bad file.

    Files of several series are grouped per SeriesInstanceUID first; stacks are returned in a
    stable order (series in input order, then stack order).  ``four_d``: see :func:`group_frames`.
    """
    by_series: dict[str, list[Frame]] = {}
    for path in paths:
        ds = dicom.read(path, stop_before_pixels=True)
        uid = str(dicom.require(ds, "SeriesInstanceUID"))
        by_series.setdefault(uid, []).extend(frames_of(ds, path))
    return [stack for uid, frames in by_series.items() for stack in group_frames(uid, frames, four_d=four_d)]


# --------------------------------------------------------------------------- geometry

@dataclass
class Geometry:
    """A stack's grid: positions along the normal and what is wrong with them, if anything."""

    origin: np.ndarray
    direction: np.ndarray  # 3x3, columns: row cosine, column cosine, normal
    spacing: tuple[float, float, float]  # (columns, rows, slices) mm
    distances: np.ndarray  # per frame, along the normal
    positions: np.ndarray  # per frame, ImagePositionPatient
    problem: str = ""  # "" when the frames form a regular grid


def _median(values: np.ndarray) -> float:
    """np.median of a non-empty float array, bit for bit, without the numpy.ma import its NaN check costs (~8 ms)."""
    ordered = np.sort(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else float((ordered[mid - 1] + ordered[mid]) / 2)


def stack_geometry(stack: Stack) -> Geometry:
    """The grid of a stack (of its first volume: the volumes of a 4-D stack share their slice positions)."""
    frames = stack.slices
    first = frames[0]
    o = np.asarray(first.orientation, dtype=float)
    row, col = o[:3], o[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(np.dot(row, col)) > 0.01:
        raise DataError(f"series {stack.label}: ImageOrientationPatient {tuple(o)} is not two orthogonal unit "
                        "vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.array([f.position for f in frames], dtype=float)
    d = positions @ normal
    dx, dy = first.spacing[1], first.spacing[0]
    problem = ""
    if len(frames) == 1:
        dz = first.thickness or 1.0
    else:
        gaps = np.diff(d)
        if np.any(gaps < POSITION_TOL):
            i = int(np.argmin(gaps))
            raise DataError(f"series {stack.label}: {int(np.sum(gaps < POSITION_TOL))} duplicated slice position(s), "
                            f"e.g. {d[i]:.2f} mm along the normal",
                            hint="the series mixes acquisitions kaapcli cannot tell apart")
        dz = _median(gaps)
        tol = max(POSITION_TOL, 0.01 * dz)
        offsets = positions - positions[0] - np.outer(d - d[0], normal)  # in-plane shift of each slice
        shear = float(np.max(np.linalg.norm(offsets, axis=1)))
        if shear > tol:
            angle = math.degrees(math.atan2(shear, d[-1] - d[0]))
            problem = f"gantry tilt or sheared stack ({angle:.2f} degrees)"
        elif np.max(np.abs(gaps - dz)) > tol:
            ratio = gaps / dz
            missing = int(np.sum(np.rint(ratio[ratio > 1.5]) - 1))
            if missing and np.allclose(ratio, np.rint(ratio), atol=0.05):
                i = int(np.argmax(gaps))
                problem = (f"{missing} missing slice(s) (gap of {gaps[i]:.2f} mm after {d[i]:.2f} mm, "
                           f"spacing {dz:.2f} mm)")
            else:
                problem = f"irregular slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm)"
    direction = np.column_stack([row, col, normal])
    return Geometry(positions[0], direction, (dx, dy, dz), d, positions, problem)


# --------------------------------------------------------------------------- pixels

@dataclass(frozen=True)
class PixelSource:
    """Where the stored pixels of a file the fast reader handled are: native little endian bytes at ``offset``."""

    path: Path
    offset: int
    dtype: str  # numpy dtype of the stored values, e.g. "<u2"
    bits_stored: int
    rows: int  # of the stored plane (a whole mosaic for a Siemens mosaic file)
    columns: int
    frames: int

    @property
    def plane_bytes(self) -> int:
        return self.rows * self.columns * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Scanned:
    """What the fast header reader learnt of one image file: its series, its frames, where its pixels are.

    Small and picklable: the batch engine's plan hands it to ``load_series``, so each file is read once."""

    series_uid: str
    frames: tuple[Frame, ...]
    pixels: PixelSource


def scan_file(path: Path) -> Scanned | None:
    """Frames and pixel location of an uncompressed little endian image file, read without pydicom; None when
    the file needs pydicom (compressed, enhanced multi-frame, big endian, a value the fast reader leaves to
    pydicom, ...) or is not an image.  Raises DataError for a file that cannot be read or whose geometry is bad."""
    from kaapcli.core import dicomscan

    try:
        header = dicomscan.scan(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if header is None or header.pixel_offset < 0:
        return None
    try:
        uid = header.get("SeriesInstanceUID")
        bits, stored = header.get("BitsAllocated"), header.get("BitsStored")
        signed, rows, columns = header.get("PixelRepresentation"), header.get("Rows"), header.get("Columns")
        nframes = header.get("NumberOfFrames") or 1
        if (not uid or not isinstance(uid, str) or bits not in (8, 16, 32) or signed not in (0, 1)
                or not isinstance(rows, int) or not isinstance(columns, int) or not isinstance(nframes, int)
                or not isinstance(stored, int) or not 0 < stored <= bits or rows < 1 or columns < 1 or nframes < 1
                or (header.get("SamplesPerPixel") or 1) != 1):
            return None
        frames = frames_of(header, path)
    except dicomscan.Unsupported:
        return None
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    source = PixelSource(path, header.pixel_offset, dtype, stored, rows, columns, nframes)
    if header.pixel_length < source.plane_bytes * nframes or header.pixel_offset + source.plane_bytes * nframes \
            > path.stat().st_size:
        return None  # short pixel data: pydicom's reading says what is wrong
    return Scanned(uid, tuple(frames), source)


def _decode(path: Path) -> tuple[Any, np.ndarray]:
    """Header (without pixel data) and stored pixels (frames, rows, columns) of one file, through pydicom."""
    ds = dicom.read(path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure is bad data for this file
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts) or "unknown transfer syntax"
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
        raise DataError(f"{path}: cannot decode pixel data ({name}): {reason or type(exc).__name__}") from None
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            del ds[keyword]
    arr = np.asarray(arr)
    return ds, arr.reshape((-1, *arr.shape[-2:]))


Pixels = dict[Path, tuple[Any, np.ndarray]]  # pydicom-decoded files: (header, stored pixels)
Sources = dict[Path, PixelSource | np.ndarray]  # per file: where its pixels are (fast reader) or its decoded pixels


def read_pixels(paths: Sequence[Path]) -> tuple[Pixels, list[str]]:
    """Decode files on threads (I/O and the numpy/pylibjpeg decoders overlap); pydicom's warnings as lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(min(8, max(1, len(paths)))) as pool:
            pixels = dict(zip(paths, pool.map(_decode, paths), strict=True))
    return pixels, list(dict.fromkeys(f"pydicom: {str(w.message).splitlines()[0]}" for w in caught))


def _stored_dtype(source: PixelSource | np.ndarray) -> np.dtype[Any]:
    return np.dtype(source.dtype) if isinstance(source, PixelSource) else source.dtype


def _read_planes(source: PixelSource, first: int, count: int, out: np.ndarray, *, mask: bool = True) -> None:
    """Read ``count`` stored planes from frame ``first`` on straight into ``out`` (count, rows, columns); ``mask``:
    clear (or sign-extend) the bits above BitsStored as pydicom does (PS3.5 8.1.1: their values are not to be
    assumed)."""
    view = out.data.cast("B")
    fd = os.open(source.path, os.O_RDONLY)
    try:
        done, offset = 0, source.offset + first * source.plane_bytes
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise DataError(f"{source.path}: truncated pixel data")
            done += n
    finally:
        os.close(fd)
    if mask:
        _mask_unused_bits(out, source.bits_stored)


def _mask_unused_bits(planes: np.ndarray, bits_stored: int) -> None:
    shift = planes.dtype.itemsize * 8 - bits_stored
    if shift > 0:
        np.left_shift(planes, shift, out=planes)
        np.right_shift(planes, shift, out=planes)


def _stored_range(bits_stored: int, dtype: np.dtype[Any]) -> tuple[int, int]:
    """The values BitsStored bits can hold in ``dtype`` (signed: two's complement)."""
    if dtype.kind == "i":
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


Allocate = Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray]  # the array a stack's voxels are read into
StackAllocate = Callable[["Stack", Any, tuple[int, ...], np.dtype[Any]], np.ndarray]  # per stack and its header


def _fill(stack: Stack, sources: Sources, dtype: np.dtype[Any], convert: Any = None, allocate: Allocate | None = None,
          rescale: Callable[[int, np.ndarray], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stack's stored planes in one preallocated (frames, rows, columns) array of ``dtype`` (from ``allocate``
    when given, e.g. the mapped output file), read on threads, with each plane's minimum and maximum (unless
    ``convert``).  Each plane is finished in the thread that read it, while it is in the cache: its range taken,
    its bits above BitsStored masked when they are set (PS3.5 8.1.1: their values are not to be assumed; pydicom
    masks them too), then ``rescale(k, plane)`` when given.

    Planes of one file are read straight into the array when their type is ``dtype`` and they are consecutive;
    otherwise (mosaic tiles, mixed types, ``convert``: a per-plane rescale into float) through a per-file buffer.
    """
    first = stack.frames[0]
    shape = (len(stack.frames), first.rows, first.columns)
    out = np.empty(shape, dtype=dtype) if allocate is None else allocate(shape, dtype)
    mins, maxs = np.zeros(len(stack.frames), dtype=np.int64), np.zeros(len(stack.frames), dtype=np.int64)
    by_file: dict[Path, list[tuple[int, Frame]]] = {}
    for k, f in enumerate(stack.frames):
        by_file.setdefault(f.path, []).append((k, f))

    def finish(ks: list[int], bits_stored: int) -> None:
        """Range (masked where needed) and rescale of planes ``ks``: one reduction over them when consecutive."""
        lowest_k = min(ks)
        runs = [(lowest_k, lowest_k + len(ks))] if sorted(ks) == list(range(lowest_k, lowest_k + len(ks))) \
            else [(k, k + 1) for k in ks]
        for a, b in runs:
            block = out[a:b].reshape(b - a, -1)
            low, high = block.min(axis=1).astype(np.int64), block.max(axis=1).astype(np.int64)
            if bits_stored < dtype.itemsize * 8:
                lowest, highest = _stored_range(bits_stored, dtype)
                for j in np.flatnonzero((low < lowest) | (high > highest)):  # most files leave the unused bits 0
                    _mask_unused_bits(block[j], bits_stored)
                    low[j], high[j] = block[j].min(), block[j].max()
            mins[a:b], maxs[a:b] = low, high
        if rescale is not None:
            for k in ks:
                rescale(k, out[k])

    def load(path: Path) -> None:
        placed = by_file[path]
        source = sources[path]
        if isinstance(source, np.ndarray):
            for k, f in placed:
                plane = _plane(source, f)
                out[k] = plane if convert is None else convert(plane, f)
            if convert is None:
                finish([k for k, _ in placed], dtype.itemsize * 8)  # decoded by pydicom: its values as they are
            return
        ks = [k for k, _ in placed]
        direct = (convert is None and not first.mosaic and np.dtype(source.dtype) == dtype
                  and ks == list(range(ks[0], ks[0] + len(ks)))
                  and [f.index for _, f in placed] == list(range(placed[0][1].index, placed[0][1].index + len(ks))))
        if direct:
            _read_planes(source, placed[0][1].index, len(ks), out[ks[0]:ks[0] + len(ks)], mask=False)
            finish(ks, source.bits_stored)
            return
        # one buffer per reader while the files are alike: a fresh one per mosaic cost its page faults each time
        shape = (source.frames, source.rows, source.columns)
        if getattr(buffers, "key", None) != (shape, source.dtype):
            buffers.key, buffers.array = (shape, source.dtype), np.empty(shape, dtype=source.dtype)
        buffer = buffers.array
        _read_planes(source, 0, source.frames, buffer)
        for k, f in placed:
            plane = _plane(buffer, f)
            out[k] = plane if convert is None else convert(plane, f)
        if convert is None:
            finish(ks, dtype.itemsize * 8)  # masked as read

    buffers = threading.local()
    paths = list(by_file)
    workers = min(4, os.cpu_count() or 1, len(paths))
    run = max(1, min(16, len(paths) // (4 * workers)))  # files a task: fewer futures and GIL hand-offs, still balanced

    def load_run(start: int) -> None:
        for path in paths[start:start + run]:
            load(path)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(load_run, range(0, len(paths), run)))
    return out, mins, maxs


def _integral(stack: Stack, sources: Sources) -> bool:
    return (all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in stack.frames)
            and all(np.issubdtype(_stored_dtype(sources[path]), np.integer) for path in _files(stack)))


def _files(stack: Stack) -> dict[Path, None]:
    """The files of a stack, once each (a mosaic or multi-frame file holds many of its frames)."""
    return dict.fromkeys(f.path for f in stack.frames)


def _int16_rescale(stack: Stack, sources: Sources, stored_type: np.dtype[Any]
                   ) -> Callable[[int, np.ndarray], None] | None:
    """The rescale of each plane into int16 in place, when it is known before reading: every file read by the fast
    reader, stored in 16 bits whose BitsStored bounds both the stored values and the rescaled ones to int16.  Then
    :func:`_stack_values` decides int16 from the values read in any case, and the stored values mean the same read
    as int16, so each plane is rescaled in its reading thread instead of in one more pass.  None otherwise."""
    if stored_type.itemsize != 2 or not all(isinstance(sources[f.path], PixelSource) for f in stack.frames):
        return None
    int16 = np.iinfo(np.int16)
    slopes, intercepts = [int(f.slope) for f in stack.frames], [int(f.intercept) for f in stack.frames]
    for f, slope, intercept in zip(stack.frames, slopes, intercepts, strict=True):
        source = sources[f.path]
        assert isinstance(source, PixelSource)
        low, high = _stored_range(min(source.bits_stored, 16), stored_type)
        if low < int16.min or high > int16.max or not (int16.min <= min(low * slope, high * slope) + intercept
                                                       and max(low * slope, high * slope) + intercept <= int16.max):
            return None

    def rescale(k: int, plane: np.ndarray) -> None:
        if slopes[k] == 1 and intercepts[k] == 0:
            return
        values = plane.view(np.int16)
        if slopes[k] == 1:
            np.add(values, np.int16(intercepts[k]), out=values)
        else:
            values[...] = (plane.astype(np.int64) * slopes[k] + intercepts[k]).astype(np.int16)

    return rescale


def _stack_values(stack: Stack, sources: Sources, allocate: Allocate | None = None) -> np.ndarray:
    """Decode and rescale a stack: each frame's slope/intercept applied; integral results as int16 (uint16 or
    int32 if the range needs it), others as float32.  One preallocated array (``allocate``'s); it is rescaled in
    place when the result has the stored type's size (a CT's uint16 with intercept -1024 becomes int16 where it
    lies), else the result is a new array."""
    frames = stack.frames
    if not _integral(stack, sources):
        def to_float(plane: np.ndarray, f: Frame) -> np.ndarray:
            return plane.astype(np.float64) * f.slope + f.intercept

        return _fill(stack, sources, np.dtype(np.float32), to_float, allocate)[0]
    stored_type = np.result_type(*{_stored_dtype(sources[path]) for path in _files(stack)})
    rescale = _int16_rescale(stack, sources, stored_type)
    stored, mins, maxs = _fill(stack, sources, stored_type, allocate=allocate, rescale=rescale)
    if rescale is not None:
        return stored.view(np.int16)
    slopes = np.array([int(f.slope) for f in frames], dtype=np.int64)
    intercepts = np.array([int(f.intercept) for f in frames], dtype=np.int64)
    low, high = np.minimum(mins * slopes, maxs * slopes) + intercepts, np.maximum(mins * slopes, maxs * slopes) \
        + intercepts
    lo, hi = int(low.min()), int(high.max())
    fits = [(np.dtype(t), np.iinfo(t)) for t in (np.int16, np.uint16, np.int32)
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max]
    target, limits = fits[0] if fits else (np.dtype(np.float32), None)
    identity = bool(np.all(slopes == 1) and np.all(intercepts == 0))
    if target.itemsize == stored.dtype.itemsize and target.kind in "iu":
        # same size: reinterpret where the stored values mean the same in the target type, then rescale in place
        assert limits is not None
        same_bits = int(mins.min()) >= 0 and int(maxs.max()) <= limits.max if stored.dtype.kind == "u" \
            else int(mins.min()) >= limits.min and (target.kind == "i" or int(mins.min()) >= 0)
        if same_bits:
            out = stored.view(target)
            if identity:
                return out
            shared = len(set(zip(slopes.tolist(), intercepts.tolist(), strict=True))) == 1
            if shared and slopes[0] == 1:
                np.add(out, target.type(intercepts[0]), out=out)
                return out
            for k in range(len(frames)):
                out[k] = (stored[k].astype(np.int64) * slopes[k] + intercepts[k]).astype(target)
            return out
    out = np.empty(stored.shape, dtype=target)
    for k in range(len(frames)):
        out[k] = stored[k] if identity else stored[k].astype(np.int64) * slopes[k] + intercepts[k]
    return out


def _plane(arr: np.ndarray, f: Frame) -> np.ndarray:
    """The stored pixels of one frame: a plane of a (multi-frame) pixel array, or a tile of a mosaic."""
    if f.mosaic:
        r0, c0 = (f.index // f.mosaic) * f.rows, (f.index % f.mosaic) * f.columns
        if arr.shape[0] < 1 or arr.shape[1] < r0 + f.rows or arr.shape[2] < c0 + f.columns:
            raise DataError(f"{f.path}: pixel data of {arr.shape[1:]} cannot hold mosaic tile {f.index + 1} "
                            f"of {f.rows}x{f.columns}")
        return arr[0, r0:r0 + f.rows, c0:c0 + f.columns]
    if f.index >= arr.shape[0] or arr.shape[1:] != (f.rows, f.columns):
        raise DataError(f"{f.path}: pixel data holds {arr.shape[0]} frame(s) of {arr.shape[1:]}, header says "
                        f"frame {f.index + 1} of {f.rows}x{f.columns}")
    return arr[f.index]


def repetition_time(header: Any) -> float | None:
    """RepetitionTime in seconds: classic attribute, else the enhanced MR timing macro (shared groups)."""
    value = header.get("RepetitionTime")
    if value in (None, ""):
        shared = _seq_item(header, "SharedFunctionalGroupsSequence")
        value = fg_attr([shared], "MRTimingAndRelatedParametersSequence", "RepetitionTime")
    try:
        tr = float(value) / 1000 if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return tr if tr is not None and math.isfinite(tr) and tr > 0 else None


def header_of(path: Path) -> Any:
    """The header of ``path`` for sidecars and names: the fast reader's when it handles the file, else pydicom's."""
    from kaapcli.core import dicomscan

    with contextlib.suppress(OSError):
        header = dicomscan.scan(path)
        if header is not None:
            return header
    return dicom.read(path, stop_before_pixels=True)


def load_stack(stack: Stack, *, resample: bool = False, pixels: Sources | Pixels | None = None,
               headers: dict[Path, Any] | None = None, allocate: StackAllocate | None = None) -> Volume:
    """Decode and rescale one stack into a :class:`Volume` (see the module docstring for the layout).

    ``pixels``: per file, a :class:`PixelSource`, decoded stored pixels, or (header, pixels) as :func:`read_pixels`
    returns them; files missing from it are read here.  ``headers``: pydicom headers already read, by path.
    ``allocate(stack, header, shape, dtype)``: the array to read the voxels into (None: a new one).
    """
    geometry = stack_geometry(stack)
    if geometry.problem and not resample:
        raise DataError(f"series {stack.label}: {geometry.problem}",
                        hint="use --resample to resample onto a regular grid")
    sources: Sources = {}
    headers = dict(headers or {})
    for path, value in (pixels or {}).items():
        if isinstance(value, tuple):
            headers[path], sources[path] = value
        else:
            sources[path] = value
    missing = [p for p in dict.fromkeys(f.path for f in stack.frames) if p not in sources]
    notes: list[str] = []
    if missing:
        decoded, notes = read_pixels(missing)
        for path, (ds, arr) in decoded.items():
            headers[path], sources[path] = ds, arr
    first = stack.frames[0].path
    header = headers.get(first)
    if header is None:
        header = header_of(first)
    values = _stack_values(stack, sources, None if allocate is None or geometry.problem else
                           lambda shape, dtype: allocate(stack, header, shape, dtype))
    if geometry.problem:
        per_volume = values.reshape(stack.volumes, -1, *values.shape[1:])
        regular = [_regularize(v, geometry) for v in per_volume]
        values, geometry = np.concatenate([v for v, _g in regular]), regular[0][1]
        notes.append(f"{geometry.problem}: resampled onto a regular {geometry.spacing[2]:.3f} mm grid")
    tr = (repetition_time(header) or 1.0) if stack.volumes > 1 else 1.0
    if stack.volumes > 1:
        values = values.reshape(stack.volumes, -1, *values.shape[1:])
    return Volume(values, geometry, stack.series_uid, stack.suffix, stack.frames, header, notes,
                  bool(geometry.problem), stack.volumes, tr)


def load_series(paths: Sequence[Path], *, resample: bool = False, four_d: bool = False,
                scanned: Sequence[Scanned | None] | None = None, allocate: StackAllocate | None = None
                ) -> list[Volume]:
    """Every stack of the series in ``paths`` as a :class:`Volume`, each file read once.

    ``scanned``: per path, what :func:`scan_file` returned during planning (None: not known); files the fast
    reader handles are read with it, the others through pydicom.  ``four_d``: volumes repeating the same slice
    positions become one 4-D volume (see :func:`group_frames`).  ``allocate``: as for :func:`load_stack`.
    """
    known = list(scanned) if scanned is not None else [None] * len(paths)
    notes_by_path: dict[Path, Scanned] = {}
    for path, note in zip(paths, known, strict=True):
        note = note if note is not None else scan_file(path)
        if note is not None:
            notes_by_path[path] = note
    slow = [p for p in paths if p not in notes_by_path]
    pixels, notes = read_pixels(slow) if slow else ({}, [])
    by_series: dict[str, list[Frame]] = {}
    sources: Sources = {}
    headers: dict[Path, Any] = {}
    for path in paths:  # in input order, whichever reader: stacks are grouped and named alike
        if path in notes_by_path:
            note = notes_by_path[path]
            by_series.setdefault(note.series_uid, []).extend(note.frames)
            sources[path] = note.pixels
            continue
        ds, arr = pixels[path]
        uid = str(dicom.require(ds, "SeriesInstanceUID")) if "SeriesInstanceUID" in ds else ""
        if not uid:
            raise DataError(f"{path}: missing SeriesInstanceUID")
        by_series.setdefault(uid, []).extend(frames_of(ds, path))
        headers[path], sources[path] = ds, arr
    stacks = [s for uid, frames in by_series.items() for s in group_frames(uid, frames, four_d=four_d)]
    volumes = [load_stack(s, resample=resample, pixels=sources, headers=headers, allocate=allocate) for s in stacks]
    if volumes:
        volumes[0].warnings[:0] = notes
    return volumes


def _regularize(values: np.ndarray, g: Geometry) -> tuple[np.ndarray, Geometry]:
    """Resample slices at irregular / sheared positions onto a regular grid along the normal.

    Each target slice blends (linearly, by distance) the two source slices around it, each
    shifted in-plane (linear interpolation) by its offset from the first slice, so a gantry
    tilt becomes a straight stack.  Voxels no source slice covers get the volume minimum.
    """
    import SimpleITK as sitk

    d = g.distances
    dz = g.spacing[2]
    n = int(round((d[-1] - d[0]) / dz)) + 1
    row, col, normal = g.direction[:, 0], g.direction[:, 1], g.direction[:, 2]
    fill = float(values.min())
    src = values.astype(np.float32)
    cache: dict[int, np.ndarray] = {}

    def aligned(i: int) -> np.ndarray:
        if i not in cache:
            offset = g.positions[i] - g.origin - (d[i] - d[0]) * normal  # in-plane shear of slice i
            shift = (float(np.dot(offset, row)), float(np.dot(offset, col)))
            if max(abs(shift[0]), abs(shift[1])) < POSITION_TOL:
                cache[i] = src[i]
            else:
                img = sitk.GetImageFromArray(src[i])
                img.SetSpacing(g.spacing[:2])
                moved = sitk.Resample(img, img, sitk.TranslationTransform(2, (-shift[0], -shift[1])),
                                      sitk.sitkLinear, fill)
                cache[i] = sitk.GetArrayFromImage(moved)
        return cache[i]

    out = np.empty((n, *values.shape[1:]), dtype=np.float32)
    for k in range(n):
        t = d[0] + k * dz
        b = int(min(np.searchsorted(d, t - 1e-6), len(d) - 1))
        a = max(b - 1, 0)
        if b == 0 or abs(d[b] - t) < 1e-6:
            out[k] = aligned(b)
        else:
            w = (t - d[a]) / (d[b] - d[a])
            out[k] = (1 - w) * aligned(a) + w * aligned(b)
    if np.issubdtype(values.dtype, np.integer):
        out = np.rint(out).astype(values.dtype)
    distances = d[0] + np.arange(n) * dz
    positions = g.origin + np.outer(distances - d[0], normal)
    return out, Geometry(g.origin, g.direction, g.spacing, distances, positions, g.problem)


# --------------------------------------------------------------------------- writing

NIFTI_TYPES = {"uint8": (2, 8), "int16": (4, 16), "int32": (8, 32), "float32": (16, 32), "float64": (64, 64),
               "int8": (256, 8), "uint16": (512, 16), "uint32": (768, 32), "int64": (1024, 64),
               "uint64": (1280, 64)}  # numpy type -> NIfTI-1 datatype code, bitpix
NIFTI1_HEAD = 352  # bytes before the voxels of a single-file NIfTI-1: the header and an empty extension flag
_NIFTI1 = struct.Struct("<i10s18sihcB8h3f4h8f3fhBB2f2f2i80s24s2h6f12f16s4s")  # the 348-byte header


def ras_affine(direction: np.ndarray, spacing: Sequence[float] | np.ndarray, origin: Sequence[float] | np.ndarray
               ) -> np.ndarray:
    """The 4x4 RAS voxel-to-world affine of an LPS grid (ITK is LPS: x and y flip sign)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=float) * np.asarray(spacing[:3], dtype=float)
    affine[:3, 3] = np.asarray(origin[:3], dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def nifti_affine(image: Any) -> np.ndarray:
    """The 4x4 RAS affine of a SimpleITK image (ITK is LPS: x and y flip sign)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]  # 4-D: the spatial block
    return ras_affine(direction, image.GetSpacing(), image.GetOrigin())


def _quaternion(affine: np.ndarray) -> tuple[float, np.ndarray]:
    """qfac and the (w, x, y, z) quaternion of the rotation in ``affine`` (NIfTI-1 qform), computed as nibabel's
    set_qform does: the nearest orthonormal matrix (SVD) of the unit columns, the last one flipped when the
    determinant is negative, then the largest eigenvector of Bar-Itzhack's K matrix, w >= 0."""
    rzs = affine[:3, :3]
    rotation = rzs / np.sqrt(np.sum(rzs * rzs, axis=0))
    qfac = 1.0
    if np.linalg.det(rotation) <= 0:
        qfac = -1.0
        rotation[:, -1] *= -1
    p, _s, qs = np.linalg.svd(rotation)
    m = np.dot(p, qs)
    qxx, qyx, qzx, qxy, qyy, qzy, qxz, qyz, qzz = m.flat
    k = np.array([[qxx - qyy - qzz, 0, 0, 0], [qyx + qxy, qyy - qxx - qzz, 0, 0],
                  [qzx + qxz, qzy + qyz, qzz - qxx - qyy, 0], [qyz - qzy, qzx - qxz, qxy - qyx, qxx + qyy + qzz]]) / 3.0
    values, vectors = np.linalg.eigh(k)
    q = vectors[[3, 0, 1, 2], np.argmax(values)]
    if q[0] < 0:
        q *= -1
    return qfac, q


def nifti1_header(shape: Sequence[int], dtype: Any, affine: np.ndarray, zooms: Sequence[float]) -> bytes:
    """The 352 bytes (348-byte NIfTI-1 header and an empty extension flag) before the voxels of a ``.nii``.

    ``shape`` and ``zooms`` in NIfTI order (i, j, k[, t]); sform and qform both scanner (code 1), units mm and s,
    no scaling (scl_slope NaN, as nibabel writes it): the header nibabel writes for the same image, field for field.
    """
    code, bitpix = NIFTI_TYPES[np.dtype(dtype).name]
    qfac, quat = _quaternion(affine.copy())
    dims = [len(shape), *shape, *([1] * (7 - len(shape)))]
    pixdim = [qfac, *zooms, *([1.0] * (7 - len(zooms)))]
    rows = [float(v) for v in affine[:3].flat]
    return _NIFTI1.pack(
        348, b"", b"", 0, 0, b"\0", 0, *dims, 0.0, 0.0, 0.0, 0, code, bitpix, 0, *pixdim, 352.0, math.nan, math.nan,
        0, 0, 2 | 8, 0.0, 0.0, 0.0, 0.0, 0, 0, b"", b"", 1, 1, *(float(v) for v in quat[1:]),
        *(float(v) for v in affine[:3, 3]), *rows, b"", b"n+1\0") + b"\0\0\0\0"


def nifti_header(image: Any, dtype: Any = None) -> bytes:
    """The 352 bytes that precede the voxels of a single-file NIfTI-1 of a SimpleITK image (or of an array of
    ``dtype`` on its grid).  ITK's buffer (k, j, i) in C order is exactly NIfTI's (i, j, k) in Fortran order, so
    the voxel bytes that follow are the buffer as it is."""
    if dtype is None:
        import SimpleITK as sitk

        dtype = sitk.GetArrayViewFromImage(sitk.Image([1] * image.GetDimension(), image.GetPixelID())).dtype
    return nifti1_header(image.GetSize(), dtype, nifti_affine(image), image.GetSpacing())


def volume_header(vol: Volume) -> bytes:
    """The NIfTI-1 header of a :class:`Volume` (as :func:`nifti_header` of its SimpleITK image, without building it)."""
    return nifti1_header(vol.size, vol.voxels.dtype, vol.affine, vol.spacing)


def as_written(image: Any) -> Any:
    """``image`` with the geometry ITK reads back from its NIfTI as :func:`write_image` writes it (float32 header
    fields), so a DICOM series and its converted NIfTI are the same image to every later step, bit for bit.

    Only the 352-byte header is written (to a temporary file) and read (``ReadImageInformation``).
    """
    import tempfile

    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="kaapcli-") as tmp:
        header = Path(tmp) / "header.nii"
        header.write_bytes(nifti_header(image))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(header))
        reader.ReadImageInformation()
        image.SetOrigin(reader.GetOrigin())
        image.SetSpacing(reader.GetSpacing())
        image.SetDirection(reader.GetDirection())
    return image


def deflater(level: int) -> Any:
    """A thread-safe ``compress(data) -> gzip member`` for gzip ``level`` (zlib's scale), chosen by measurement
    (docs/imaging.md): the fastest deflate that compresses at least about as well as zlib at that level.

    Level 1: ISA-L at its level 3, 3x zlib's speed, output within 0.1 % of zlib's level 1 on noisy CT and 2 %
    smaller on MR (ISA-L's levels 1-2 are 0.5-2 % larger).  Levels 2-9: zlib-ng at the same level, 1.3-5x zlib's
    speed, output within 1 % of zlib's (zlib-ng's own level 1 is a quick mode ~50 % larger on CT).  Both release
    the GIL, so planes compress on all cores.
    """
    if level <= 1:
        from isal import isal_zlib

        return lambda data: isal_zlib.compress(data, 3, wbits=31)
    from zlib_ng import zlib_ng

    deflate = min(9, level)
    return lambda data: zlib_ng.compress(data, deflate, wbits=31)


def gzip_members(head: bytes, voxels: np.ndarray, level: int = 1) -> Any:
    """gzip of ``head`` + the voxel bytes as a stream of members: one per 2-D plane, compressed on threads
    (:func:`deflater`), a bounded number in flight, yielded in order (so the bytes never depend on the thread count).

    Empty planes share one precomputed member, so a sparse mask costs little.  A multi-member gzip file is
    standard (RFC 1952 2.2) and read by gzip, zlib's gzread (ITK), nibabel and dcm2niix alike.
    """
    from collections import deque

    compress = deflater(level)
    planes = voxels.reshape(-1, voxels.shape[-2] * voxels.shape[-1]) if voxels.ndim > 2 else \
        voxels.reshape(max(1, voxels.shape[0] if voxels.ndim > 1 else 1), -1)
    empty = compress(bytes(planes[0].nbytes))

    def member(k: int) -> bytes:
        plane = planes[k]
        return compress(plane.data.cast("B")) if plane.any() else empty

    yield compress(head)
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Any] = deque()
        for k in range(len(planes)):
            pending.append(pool.submit(member, k))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_nifti(head: bytes, voxels: np.ndarray, dest: Path, *, level: int = 1) -> int:
    """Write ``nifti_header`` bytes and a (slices, rows, columns) array as ``dest`` (.nii.gz or .nii), atomically.

    Lets callers writing many volumes on one grid (masks) skip building a SimpleITK image each time.
    """
    voxels = np.ascontiguousarray(voxels)
    written = 0
    with fsio.atomic_write(dest) as fh:  # inside a batch item the engine renames it later: count, do not stat
        if dest.name.endswith(".gz"):
            for chunk in gzip_members(head, voxels, level):
                written += fh.write(chunk)
        else:
            written += fh.write(head)
            written += fh.write(voxels.reshape(-1).data.cast("B"))
    return written


class MappedNifti:
    """An uncompressed ``.nii`` whose voxels are the volume itself: a temporary file beside ``dest`` is sized, its
    blocks reserved (posix_fallocate: a full disk fails here with ENOSPC, never as a SIGBUS on a later store) and
    mapped; the pixels are read straight into the page cache that becomes the file, so the voxels are neither
    held twice nor copied by a write.  :func:`write_volume` writes the header into it and commits it when the
    volume's voxels are still this mapping (else, e.g. after a rescale into a wider type, it is discarded)."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.tmp: Path | None = None
        self.array: np.ndarray | None = None
        self._map: Any = None

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        import mmap

        self.discard()
        size = NIFTI1_HEAD + math.prod(shape) * dtype.itemsize
        self.tmp = fsio.temp_beside(self.dest)
        try:
            fd = os.open(self.tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            try:
                os.posix_fallocate(fd, 0, size)
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.discard()
            raise CantCreateError(f"{self.dest}: cannot write: {exc.strerror or exc}") from None
        self.array = np.frombuffer(self._map, dtype, math.prod(shape), NIFTI1_HEAD).reshape(shape)
        return self.array

    def holds(self, voxels: np.ndarray) -> bool:
        return (self.array is not None and voxels.flags.c_contiguous and voxels.nbytes == self.array.nbytes
                and voxels.__array_interface__["data"][0] == self.array.__array_interface__["data"][0])

    def commit(self, head: bytes) -> int:
        """Write the header, hand the file to :func:`fsio.commit`; the mapping lives on while the volume does (its
        pages are the file's page cache: nothing more to flush before the rename)."""
        assert self.tmp is not None and len(head) == NIFTI1_HEAD
        self._map[:NIFTI1_HEAD] = head
        size = len(self._map)
        fsio.commit(self.tmp, self.dest)
        self.tmp = self.array = None
        return size

    def discard(self) -> None:
        if self.tmp is not None:
            fsio.discard(self.tmp)
        self.tmp = self.array = None


def write_volume(vol: Volume, dest: Path, *, level: int = 1, mapped: MappedNifti | None = None) -> int:
    """Write a :class:`Volume` atomically: NIfTI straight from its array (an uncompressed one that ``mapped``
    holds by committing that file), other formats through ITK."""
    if mapped is not None:
        if mapped.dest == dest and mapped.holds(vol.voxels):
            return mapped.commit(volume_header(vol))
        mapped.discard()
    if dest.name.endswith((".nii.gz", ".nii")):
        return write_nifti(volume_header(vol), vol.voxels, dest, level=level)
    return write_image(vol.image, dest, level=level)


def write_image(image: Any, dest: Path, *, level: int = 1) -> int:
    """Write a SimpleITK image atomically; format from the suffix (.nii.gz .nii .nrrd .mha).

    gzip level 1 by default: on CT noise, level 6 costs about six times the time for ~3 % smaller files.
    """
    import SimpleITK as sitk

    name = dest.name
    if name.endswith((".nii.gz", ".nii")):
        voxels = sitk.GetArrayViewFromImage(image)
        return write_nifti(nifti_header(image, voxels.dtype), voxels, dest, level=level)
    # Other formats through ITK: a hidden temporary name (keeping the suffix ITK picks the format by).
    tmp = fsio.temp_beside(dest, "".join(dest.suffixes[-1:]))
    try:
        sitk.WriteImage(image, str(tmp), True)
        size = tmp.stat().st_size
    except BaseException:
        fsio.discard(tmp)
        raise
    fsio.commit(tmp, dest)
    return size


__all__ = ["Frame", "Geometry", "PixelSource", "Scanned", "Stack", "Volume", "as_written", "csa_values", "fg_attr",
           "frames_of", "functional_groups", "group_frames", "gzip_members", "header_of", "load_series",
           "load_stack", "MappedNifti", "nifti1_header", "nifti_affine", "nifti_header", "parse_csa", "ras_affine",
           "repetition_time", "scan_file", "siemens_csa", "split_stacks", "stack_geometry", "volume_header",
           "write_image", "write_nifti", "write_volume"]
