"""Shape and first-order radiomics features per label, named as the IBSI reference manual names them.

pyradiomics has no wheel for this Python (its sdist fails to build), so the features are computed
here with numpy, scikit-image (marching cubes) and scipy (convex hull), following the IBSI
definitions (Zwanenburg et al., IBSI reference manual, chapters 3.1 morphology and 3.3
intensity-based statistics; codes in ``FEATURES``):

- the *mesh* is marching cubes at level 0.5 on the zero-padded mask, in mm; its volume comes from
  the signed tetrahedra of the faces (divergence theorem), its area from the triangles;
- ``Approximate volume`` counts voxels; axis lengths use the covariance of voxel centres (in mm);
- statistics use every voxel of the label, unweighted, population moments (divide by N); skewness
  and kurtosis are 0 when the variance is 0; percentiles interpolate linearly (numpy's default);
- the histogram features discretise with a fixed bin width from the label's minimum (IBSI FBS).
Undefined values (a ratio over zero) are ``None`` in JSON and empty in CSV.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.core.masks import Label, label_voxels, mask_labels
from kaapcli.core.resample import image_stem, is_image_file, load_image, read_image_file, require_same_grid
from kaapcli.exitcodes import DataError

# (name, IBSI code, unit); "I" stands for the image's intensity unit (HU for CT).
FEATURES: list[tuple[str, str, str]] = [
    ("Volume (mesh)", "RNU0", "mm³"),
    ("Approximate volume", "YEKZ", "mm³"),
    ("Surface area (mesh)", "C0JK", "mm²"),
    ("Surface to volume ratio", "2PR5", "1/mm"),
    ("Compactness 2", "BQWJ", ""),
    ("Spherical disproportion", "KRCK", ""),
    ("Sphericity", "QCFX", ""),
    ("Asphericity", "25C7", ""),
    ("Maximum 3D diameter", "L0JK", "mm"),
    ("Major axis length", "TDIC", "mm"),
    ("Minor axis length", "P9VJ", "mm"),
    ("Least axis length", "7J51", "mm"),
    ("Elongation", "Q3CK", ""),
    ("Flatness", "N17B", ""),
    ("Mean", "Q4LE", "I"),
    ("Variance", "ECT3", "I²"),
    ("Skewness", "KE2A", ""),
    ("Kurtosis", "IPH6", ""),
    ("Median", "Y12H", "I"),
    ("Minimum", "1GSF", "I"),
    ("10th percentile", "QG58", "I"),
    ("90th percentile", "8DWT", "I"),
    ("Maximum", "84IY", "I"),
    ("Interquartile range", "SALO", "I"),
    ("Range", "2OJQ", "I"),
    ("Mean absolute deviation", "4FUA", "I"),
    ("Robust mean absolute deviation", "1128", "I"),
    ("Median absolute deviation", "N72L", "I"),
    ("Coefficient of variation", "7TET", ""),
    ("Quartile coefficient of dispersion", "9S40", ""),
    ("Energy", "N8CA", "I²"),
    ("Root mean square", "5ZWQ", "I"),
    ("Intensity histogram entropy", "TLU2", "bits"),
    ("Intensity histogram uniformity", "BJ5W", ""),
]
FEATURE_NAMES = [name for name, _, _ in FEATURES]
DEFAULT_BIN_WIDTH = 25.0  # pyradiomics' default; in image units (HU for CT)

Features = dict[str, float | None]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def morphology(mask: Any, spacing: Sequence[float]) -> Features:
    """Shape features of a boolean z-y-x mask with voxel ``spacing`` (x, y, z) in mm."""
    import numpy as np
    from skimage.measure import marching_cubes, mesh_surface_area

    zyx = np.asarray(spacing[::-1], dtype=float)
    nz = np.argwhere(mask)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    crop = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1).astype(np.float32)
    verts, faces, _normals, _values = marching_cubes(crop, level=0.5, spacing=tuple(zyx))
    tri = verts[faces]
    volume = abs(float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum()) / 6.0)
    area = float(mesh_surface_area(verts, faces))
    cube = 36 * math.pi * volume ** 2
    aspheric = _ratio(area ** 3, cube)
    centres = nz * zyx
    eig = np.sort(np.linalg.eigvalsh(np.cov(centres.T, bias=True))) if len(nz) > 1 else np.zeros(3)
    least, minor, major = (float(max(v, 0.0)) for v in eig)
    return {
        "Volume (mesh)": volume,
        "Approximate volume": float(len(nz) * np.prod(zyx)),
        "Surface area (mesh)": area,
        "Surface to volume ratio": _ratio(area, volume),
        "Compactness 2": _ratio(cube, area ** 3),
        "Spherical disproportion": _ratio(area, cube ** (1 / 3)),
        "Sphericity": _ratio(cube ** (1 / 3), area),
        "Asphericity": aspheric ** (1 / 3) - 1 if aspheric is not None else None,
        "Maximum 3D diameter": max_diameter(verts),
        "Major axis length": 4 * math.sqrt(major),
        "Minor axis length": 4 * math.sqrt(minor),
        "Least axis length": 4 * math.sqrt(least),
        "Elongation": math.sqrt(minor / major) if major else None,
        "Flatness": math.sqrt(least / major) if major else None,
    }


def max_diameter(verts: Any) -> float:
    """The largest distance between two mesh vertices (searched on the convex hull's vertices)."""
    import numpy as np
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    points = verts
    try:
        points = verts[ConvexHull(verts).vertices]
    except (QhullError, ValueError):
        pass  # flat or tiny meshes: all vertices (few) instead of the hull
    return float(pdist(points).max()) if len(points) > 1 else 0.0 if len(points) else float(np.nan)


def intensity(values: Any, bin_width: float = DEFAULT_BIN_WIDTH) -> Features:
    """First-order statistics and histogram features of the voxel values of one label."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    dev = x - mean
    m2 = float(np.mean(dev ** 2))
    p10, p25, median, p75, p90 = (float(v) for v in np.percentile(x, [10, 25, 50, 75, 90]))
    robust = x[(x >= p10) & (x <= p90)]
    bins = np.floor((x - x.min()) / bin_width).astype(np.int64)
    p = np.bincount(bins) / x.size
    p = p[p > 0]
    return {
        "Mean": mean,
        "Variance": m2,
        "Skewness": float(np.mean(dev ** 3)) / m2 ** 1.5 if m2 > 0 else 0.0,
        "Kurtosis": float(np.mean(dev ** 4)) / m2 ** 2 - 3 if m2 > 0 else 0.0,
        "Median": median,
        "Minimum": float(x.min()),
        "10th percentile": p10,
        "90th percentile": p90,
        "Maximum": float(x.max()),
        "Interquartile range": p75 - p25,
        "Range": float(x.max() - x.min()),
        "Mean absolute deviation": float(np.mean(np.abs(dev))),
        "Robust mean absolute deviation": float(np.mean(np.abs(robust - robust.mean()))),
        "Median absolute deviation": float(np.mean(np.abs(x - median))),
        "Coefficient of variation": _ratio(math.sqrt(m2), mean),
        "Quartile coefficient of dispersion": _ratio(p75 - p25, p75 + p25),
        "Energy": float(np.sum(x ** 2)),
        "Root mean square": float(math.sqrt(np.mean(x ** 2))),
        "Intensity histogram entropy": float(-(p * np.log2(p)).sum()) + 0.0,  # + 0.0: no "-0.0" for one bin
        "Intensity histogram uniformity": float((p ** 2).sum()),
    }


def label_features(image: Any, mask: Any, spacing: Sequence[float], bin_width: float) -> Features:
    """All features of one label (``mask`` boolean, same z-y-x shape as ``image``), in FEATURES order."""
    feats = {**morphology(mask, spacing), **intensity(image[mask], bin_width)}
    return {name: _finite(feats[name]) for name in FEATURE_NAMES}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


Results = dict[str, dict[str, Features]]


def mask_features(image: Any, mask_path: Path, bin_width: float, warnings: list[str]) -> dict[str, Features]:
    """``{label_name: {feature: value}}`` of one mask file; an empty label gets a warning and no features."""
    import SimpleITK as sitk

    try:
        mask_img = read_image_file(mask_path)
        require_same_grid(image, mask_img, "mask")
        array = sitk.GetArrayViewFromImage(mask_img)
        labels: list[Label] = mask_labels(mask_path, array)
    except DataError as exc:
        raise DataError(f"{mask_path}: {exc.message}", hint=exc.hint) from exc
    pixels = sitk.GetArrayViewFromImage(image)
    out: dict[str, Features] = {}
    for label in labels:
        voxels = label_voxels(array, label)
        if not voxels.any():
            warnings.append(f"{mask_path.name}: label {label.name} is empty: no features")
            out[label.name] = {}
            continue
        out[label.name] = label_features(pixels, voxels, image.GetSpacing(), bin_width)
    if not labels:
        warnings.append(f"{mask_path.name}: no labelled voxels: no features")
    return out


def to_csv(results: Results) -> str:
    """One row per (mask, label) with features; columns in FEATURES order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["mask", "label", *FEATURE_NAMES])
    for mask, labels in results.items():
        for label, feats in labels.items():
            if feats:
                writer.writerow([mask, label, *("" if feats[n] is None else repr(feats[n]) for n in FEATURE_NAMES)])
    return buf.getvalue()


@dataclass
class RadiomicsOperator(BaseOperator):
    """One item: the image and its masks; writes ``<stem>-radiomics.json`` and ``.csv``."""

    image: tuple[Path, ...] = ()
    masks: tuple[Path, ...] = ()
    bin_width: float = DEFAULT_BIN_WIDTH
    name: str = "radiomics"

    def options(self) -> dict[str, Any]:
        return {"bin_width": self.bin_width, "masks": [str(m) for m in self.masks]}

    def accepts(self, path: Path) -> bool:
        return is_image_file(path) or fsio.is_dicom(path)

    def item(self) -> Item:
        return Item(self.stem(), self.image + self.masks)

    def stem(self) -> str:
        if len(self.image) == 1 and is_image_file(self.image[0]):
            return image_stem(self.image[0])
        from kaapcli.core import dicom

        return dicom.series_uid(self.image[0])

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        if self.bin_width <= 0:
            raise DataError(f"--bin-width {self.bin_width}: must be > 0")
        image = load_image(self.image)
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise DataError("radiomics needs a 3-D scalar image")
        warnings: list[str] = []
        names = [m.name for m in self.masks]
        results: Results = {(m.name if names.count(m.name) == 1 else str(m)): mask_features(image, m, self.bin_width,
                                                                                            warnings)
                            for m in self.masks}
        stem = fsio.safe_name(item.key)
        json_path, csv_path = ctx.out / f"{stem}-radiomics.json", ctx.out / f"{stem}-radiomics.csv"
        fsio.write_json(json_path, results)
        fsio.write_bytes(csv_path, to_csv(results).encode())
        return Outcome(outputs=[json_path, csv_path], warnings=warnings)
