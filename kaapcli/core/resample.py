"""Images on grids: reading NIfTI/NRRD/MetaImage (or a DICOM series), comparing and resampling grids.

Also the home of the image-file helpers ``radiomics`` and ``merge-masks`` share: :func:`load_image`,
:func:`same_grid` and :func:`is_label_image`.  SimpleITK is imported inside the functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome, describe_exception
from kaapcli.exitcodes import DataError, NoInputError, UsageError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_HINT = "expected NIfTI (.nii/.nii.gz), NRRD or MetaImage"
INTERPOLATORS = ("linear", "nearest", "bspline", "sinc")  # sinc: ITK's Hamming-windowed sinc
KINDS = ("auto", "image", "labels")
MAX_LABELS = 256  # an integer image with more distinct values than this is an intensity image
DETACHED = {".nhdr": ".nrrd", ".mhd": ".mha"}  # header + data-file formats are written as one file
GRID_TOLERANCE = 1e-4  # mm (origin, spacing) and cosine (direction): what counts as "the same grid"


def image_suffix(path: Path) -> str | None:
    """The image-file suffix of ``path`` (``.nii.gz`` counts as one), or None for other files."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def image_stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def is_image_file(path: Path) -> bool:
    return image_suffix(path) is not None


def read_image_file(path: Path) -> Any:
    """One NIfTI/NRRD/MetaImage file as a SimpleITK image; unreadable or truncated files become a DataError."""
    import SimpleITK as sitk

    if image_suffix(path) in (".nii", ".nii.gz"):
        check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1].split("ERROR:", 1)[-1].strip() if lines else ""
        raise DataError(f"cannot read image{': ' + reason if reason else ''}",
                        hint=IMAGE_HINT) from exc


def read_scalar_volume(path: Path, what: str = "image") -> Any:
    """A 3-D scalar image file (NIfTI/NRRD/MetaImage), every failure a DataError naming the file."""
    try:
        image = read_image_file(path)
    except DataError as exc:
        reason = exc.message.replace(str(path), path.name)
        if not reason.startswith("cannot read image"):
            reason = f"cannot read image: {reason}"
        raise DataError(f"{path}: {reason}", hint=exc.hint) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: {what} must be a 3-D scalar image (got {image.GetDimension()}-D, "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s))")
    return image


def check_nifti_complete(path: Path) -> None:
    """Fail on a truncated NIfTI file, which ITK's reader would silently fill with zeros.

    The header gives the expected byte count; a ``.nii`` must be at least that long, and the
    gzip trailer of a ``.nii.gz`` records the uncompressed length (mod 2**32).
    """
    import nibabel as nib

    try:
        nii: Any = nib.load(str(path))  # a Nifti1Image (typed as nibabel's base class)
        proxy = nii.dataobj  # the header copy on the image has its offset reset; the proxy keeps the file's
        expected = int(proxy.offset) + int(proxy.dtype.itemsize) * math.prod(proxy.shape)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad headers
        raise DataError(f"not a valid NIfTI file ({describe_exception(exc)})", hint=IMAGE_HINT) from exc
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            complete = int.from_bytes(fh.read(4), "little") == expected % 2**32
        if not complete:  # a multi-member gzip (as volume.write_image makes) has per-member trailers: count
            complete = _gunzipped_size(path) >= expected
    else:
        complete = path.stat().st_size >= expected
    if not complete:
        raise DataError("truncated NIfTI file (less data than its header declares)")


def _gunzipped_size(path: Path) -> int:
    import gzip
    import zlib

    size = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                size += len(chunk)
    except (EOFError, OSError, zlib.error):
        return -1
    return size


def load_images(paths: Sequence[Path]) -> list[tuple[str, Any]]:
    """(name suffix, image) pairs: one for an image file, one per stack of a DICOM series."""
    if len(paths) == 1 and is_image_file(paths[0]):
        return [("", read_image_file(paths[0]))]
    dicoms = [p for p in paths if fsio.is_dicom(p)]
    if not dicoms:
        raise DataError("not an image: expected NIfTI/NRRD/MetaImage or DICOM")
    from kaapcli.core.volume import as_written, load_series

    # the series exactly as its converted NIfTI reads back: one result whichever of the two is resampled
    return [(v.suffix, as_written(v.image)) for v in load_series(dicoms)]


def load_image(paths: Sequence[Path]) -> Any:
    """One image: an image file, or a DICOM series that forms a single volume."""
    images = load_images(paths)
    if len(images) > 1:
        raise DataError(f"the DICOM series holds {len(images)} volumes ({', '.join(s for s, _ in images)}); "
                        "expected one", hint="convert it first (kaapcli dcm2nifti) and pick one")
    return images[0][1]


@functools.lru_cache(maxsize=2)
def load_reference(path: Path) -> Any:
    """The reference grid: an image file, or a DICOM file / directory holding one series.

    Cached: the CLI loads it once up front (failing fast), and forked workers inherit the cache.
    """
    if not path.exists():
        raise NoInputError(f"--reference {path}: no such file or directory")
    if path.is_file() and is_image_file(path):
        return read_image_file(path)
    files = [path] if path.is_file() else [p for p in fsio.walk_files(path) if fsio.is_dicom(p)]
    if path.is_dir() and not files:
        images = [p for p in fsio.walk_files(path) if is_image_file(p)]
        if len(images) == 1:
            return read_image_file(images[0])
    if not files:
        raise UsageError(f"--reference {path}: no image or DICOM series found")
    if path.is_file():  # a DICOM file stands for its whole series: take its siblings of that series
        from kaapcli.core import dicom

        uid = dicom.series_uid(path)
        files = [p for p in fsio.walk_files(path.parent) if fsio.is_dicom(p) and _series_uid_or_none(p) == uid]
    return load_image(files)


def _series_uid_or_none(path: Path) -> str | None:
    from kaapcli.core import dicom

    try:
        return dicom.series_uid(path)
    except DataError:
        return None


def describe_grid(img: Any) -> str:
    size = "x".join(str(n) for n in img.GetSize())
    spacing = "x".join(f"{s:g}" for s in img.GetSpacing())
    return f"{size} voxels of {spacing} mm"


def same_grid(a: Any, b: Any, tolerance: float = GRID_TOLERANCE) -> bool:
    """Same size, and origin, spacing and direction equal within ``tolerance``."""
    if a.GetSize() != b.GetSize():
        return False
    pairs = ((a.GetOrigin(), b.GetOrigin()), (a.GetSpacing(), b.GetSpacing()), (a.GetDirection(), b.GetDirection()))
    return all(abs(x - y) <= tolerance for u, v in pairs for x, y in zip(u, v, strict=True))


def require_same_grid(image: Any, other: Any, what: str) -> None:
    if not same_grid(image, other):
        raise DataError(f"{what} has another geometry ({describe_grid(other)} vs {describe_grid(image)}, "
                        "or other origin/direction)",
                        hint="bring it onto the image grid with: kaapcli resample --interpolator nearest --reference")


def is_label_image(img: Any) -> bool:
    """An integer image with no negative values and at most MAX_LABELS distinct values."""
    import numpy as np
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        return False
    integer_types = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                     sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64}
    if img.GetPixelID() not in integer_types:
        return False
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size == 0 or arr.min() < 0 or arr.max() > 65535:
        return False
    # bincount is one linear pass, much faster than np.unique's sort on a large volume
    return int(np.count_nonzero(np.bincount(arr.ravel()))) <= MAX_LABELS


def resample_onto(img: Any, reference: Any, interpolator: str, default_value: float) -> Any:
    """``img`` resampled onto the grid of ``reference`` (identity transform: both in patient space).

    The pixel type is kept.  Integer images are interpolated in double precision, then rounded to the
    nearest integer and clipped to the type's range (ITK's own cast truncates, and wraps the overshoot
    of B-spline and sinc kernels).
    """
    import numpy as np
    import SimpleITK as sitk

    if img.GetDimension() != 3 or reference.GetDimension() != 3:
        raise DataError(f"only 3-D images are resampled (image {img.GetDimension()}-D, "
                        f"reference {reference.GetDimension()}-D)")
    method = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline,
              "sinc": sitk.sitkHammingWindowedSinc}
    dtype = sitk.GetArrayViewFromImage(img).dtype
    if interpolator == "nearest" or not np.issubdtype(dtype, np.integer):
        return sitk.Resample(img, reference, sitk.Transform(), method[interpolator], default_value, img.GetPixelID())
    values = sitk.Resample(img, reference, sitk.Transform(), method[interpolator], default_value, sitk.sitkFloat64)
    info = np.iinfo(dtype)
    rounded = np.clip(np.rint(sitk.GetArrayViewFromImage(values)), info.min, info.max).astype(dtype)
    out = sitk.GetImageFromArray(rounded)
    out.CopyInformation(values)
    return out


def overlaps(img: Any, reference: Any) -> bool:
    """Whether the physical bounding boxes of the two images intersect (else the result is all background)."""
    import numpy as np

    def box(im: Any) -> tuple[Any, Any]:
        size = im.GetSize()
        corners = [im.TransformContinuousIndexToPhysicalPoint([(c >> d & 1) * (size[d] - 1) for d in range(len(size))])
                   for c in range(2 ** len(size))]
        pts = np.array(corners)
        return pts.min(axis=0), pts.max(axis=0)

    (lo_a, hi_a), (lo_b, hi_b) = box(img), box(reference)
    return bool(np.all(lo_a <= hi_b + GRID_TOLERANCE) and np.all(lo_b <= hi_a + GRID_TOLERANCE))


@dataclass
class ResampleOperator(BaseOperator):
    """Resample images and label maps (files or DICOM series) onto one reference grid."""

    reference: Path
    interpolator: str | None = None  # None: linear for images, nearest for labels, silently
    kind: str = "auto"
    name: str = "resample"
    grouped: bool = True

    def options(self) -> dict[str, Any]:
        return {"reference": str(self.reference.resolve()), "interpolator": self.interpolator, "kind": self.kind}

    def accepts(self, path: Path) -> bool:
        return is_image_file(path) or fsio.is_dicom(path)

    def group_key(self, path: Path) -> str | None:
        if is_image_file(path):
            return str(path)
        from kaapcli.core import dicom

        return dicom.series_uid(path)

    def output_name(self, item: Item, suffix: str) -> str:
        """The input's name and format (detached headers become one file), or ``<SeriesUID>[_stack].nii.gz``."""
        if len(item.paths) == 1 and is_image_file(item.paths[0]):
            path = item.paths[0]
            ext = image_suffix(path) or ""
            return image_stem(path) + DETACHED.get(ext, ext)
        return f"{fsio.safe_name(item.key + suffix)}.nii.gz"

    def process(self, item: Item, ctx: Context) -> Outcome:
        from kaapcli.core.volume import write_image

        assert ctx.out is not None
        reference = load_reference(self.reference)
        outcome = Outcome()
        for suffix, img in load_images(item.paths):
            resampled, warnings = self.resample(img, reference)
            dest = ctx.out / self.output_name(item, suffix)
            write_image(resampled, dest)
            outcome.outputs.append(dest)
            outcome.warnings.extend(f"{suffix.lstrip('_')}: {w}" if suffix else w for w in warnings)
        return outcome

    def resample(self, img: Any, reference: Any) -> tuple[Any, list[str]]:
        import SimpleITK as sitk

        warnings: list[str] = []
        labels = self.kind == "labels" or (self.kind == "auto" and is_label_image(img))
        interpolator = self.interpolator or ("nearest" if labels else "linear")
        if labels and interpolator != "nearest":
            warnings.append(f"label image: resampled with nearest, not {interpolator} (use --kind image to force)")
            interpolator = "nearest"
        if not overlaps(img, reference):
            warnings.append("does not overlap the reference: the result is all background")
        default = 0.0 if labels else float(sitk.GetArrayViewFromImage(img).min())
        return resample_onto(img, reference, interpolator, default), warnings
