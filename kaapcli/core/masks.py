"""Mask files and their labels, and ``merge-masks`` (combine masks into one label map, or fuse labels).

Naming (DESIGN §3.4): a file ``<stem>--<label_int>--<label_name>.nii.gz`` holds one label (its
non-zero voxels); any other mask file is a label map whose names come from a ``seg_info.json``
beside it (``{"seg_info": [{"label_name": "liver", "label_int": "1"}]}``).  A label map without one
names a single label after the file (TotalSegmentator's ``liver.nii.gz``), several as ``label_<int>``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.core.resample import image_stem, is_image_file, read_image_file, require_same_grid
from kaapcli.exitcodes import DataError, UsageError

MASK_NAME = re.compile(r"^(?P<stem>.*?)--(?P<int>\d+)--(?P<name>.+)$")
SEG_INFO = "seg_info.json"
MODES = ("combine", "fuse")
GROUP_BY = ("stem", "folder", "all")


@dataclass(frozen=True)
class Label:
    """One label of a mask file: which voxels (``value``; None = every non-zero voxel) and what it is."""

    label_int: int
    name: str
    value: int | None = None


def case_stem(path: Path) -> str:
    """The case a mask belongs to: the file name before ``--<int>--<name>``, else the name without extension."""
    stem = image_stem(path)
    match = MASK_NAME.match(stem)
    return match["stem"] if match and match["stem"] else stem


def read_seg_info(folder: Path) -> dict[str, Any]:
    """``folder/seg_info.json`` as a dict ({} when absent); a damaged one is a DataError."""
    path = folder / SEG_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        entries = info.get("seg_info", [])
        if not isinstance(entries, list):
            raise ValueError("seg_info is not a list")
        for entry in entries:
            int(entry["label_int"]), str(entry["label_name"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"{path}: invalid seg_info.json ({exc})",
                        hint='expected {"seg_info": [{"label_name": "liver", "label_int": "1"}]}') from exc
    return dict(info)


def seg_info_names(info: dict[str, Any]) -> dict[int, str]:
    return {int(e["label_int"]): str(e["label_name"]) for e in info.get("seg_info", [])}


def mask_labels(path: Path, array: Any) -> list[Label]:
    """The labels of a mask file whose voxels are ``array`` (see the module docstring for the naming)."""
    import numpy as np

    match = MASK_NAME.match(image_stem(path))
    if match:
        return [Label(int(match["int"]), match["name"])]
    if array.dtype.kind == "f":
        if not np.all(np.mod(array, 1) == 0):
            raise DataError("mask has non-integer values", hint="masks are integer label images")
    values = [int(v) for v in np.unique(array) if v != 0]
    if any(v < 0 for v in values):
        raise DataError("mask has negative values", hint="masks are integer label images")
    names = seg_info_names(read_seg_info(path.parent))
    if len(values) == 1 and values[0] not in names:
        return [Label(values[0], image_stem(path), values[0])]
    return [Label(v, names.get(v, f"label_{v}"), v) for v in values]


def label_voxels(array: Any, label: Label) -> Any:
    return array != 0 if label.value is None else array == label.value


@dataclass
class MergeResult:
    labelmap: Any  # numpy array, z-y-x
    seg_info: list[dict[str, str]]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    path: Path
    label: Label
    target: str  # the output label name


def merge_arrays(arrays: dict[Path, Any], labels: dict[Path, list[Label]], mode: str,
                 fuse: Sequence[str] = (), into: str = "") -> MergeResult:
    """Paint every label into one label map, in order of (label_int, name, file).

    A label whose voxels overlap voxels already painted with *another* output label is skipped
    whole, with a warning naming both labels and the voxel count (Kaapana's rule).  In ``fuse``
    mode the labels named in ``fuse`` (by name or label_int) become the one label ``into``.
    Output ints keep the source label_int when free, else take the next free one.
    """
    import numpy as np

    warnings: list[str] = []
    wanted = {f.strip().lower() for f in fuse if f.strip()}
    found: set[str] = set()

    def target(label: Label) -> str:
        keys = {label.name.lower(), str(label.label_int)}
        if mode == "fuse" and keys & wanted:
            found.update(keys & wanted)
            return into
        return label.name

    sources = sorted((Source(p, lab, target(lab)) for p, labs in labels.items() for lab in labs),
                     key=lambda s: (s.label.label_int, s.label.name, str(s.path)))
    if mode == "fuse":
        missing = sorted(wanted - found)
        if missing:
            warnings.append(f"--labels not found: {', '.join(missing)}")
    shape = next(iter(arrays.values())).shape
    ints: dict[str, int] = {}
    names: dict[int, str] = {}
    out = np.zeros(shape, dtype=np.uint16)
    for src in sources:
        value = ints.get(src.target)
        if value is None:
            value = src.label.label_int if src.label.label_int not in names and src.label.label_int > 0 \
                else max(names, default=0) + 1
        voxels = label_voxels(arrays[src.path], src.label)
        clash = voxels & (out != 0) & (out != value)
        if clash.any():
            others = ", ".join(f"{names[int(v)]}" for v in np.unique(out[clash]))
            warnings.append(f"{src.label.name} ({src.path.name}) overlaps {others} in {int(clash.sum())} voxels: "
                            "skipped")
            continue
        ints[src.target] = value
        names[value] = src.target
        out[voxels] = value
    if max(names, default=0) > 65535:
        raise DataError("more than 65535 labels")
    labelmap = out.astype(np.uint8) if max(names, default=0) <= 255 else out
    seg_info = [{"label_name": names[v], "label_int": str(v)} for v in sorted(names)]
    return MergeResult(labelmap, seg_info, warnings)


def group_masks(files: Iterable[Path], group_by: str) -> list[Item]:
    """Items of mask files: one per case stem, per folder, or one for all; keys are the output names."""
    groups: dict[Any, list[Path]] = {}
    for path in files:
        if is_image_file(path):
            key: Any = {"stem": case_stem(path), "folder": path.parent.resolve(), "all": "merged"}[group_by]
            groups.setdefault(key, []).append(path)
    if group_by != "folder":
        return [Item(fsio.safe_name(k), tuple(sorted(v))) for k, v in sorted(groups.items())]
    # Folders are named after themselves; two folders of one name (a/case1, b/case1) by their path instead.
    counts: dict[str, int] = {}
    for folder in groups:
        counts[folder.name] = counts.get(folder.name, 0) + 1
    root = Path(os.path.commonpath([str(f) for f in groups])) if groups else Path()
    items = []
    for folder, paths in groups.items():
        name = folder.name if counts[folder.name] == 1 else str(folder.relative_to(root.parent))
        items.append(Item(fsio.safe_name(name), tuple(sorted(paths))))
    return sorted(items, key=lambda i: i.key)


@dataclass
class MergeMasksOperator(BaseOperator):
    """Merge the mask files of one item into ``OUT/<key>/<key>.nii.gz`` plus ``seg_info.json``."""

    mode: str = "combine"
    fuse: tuple[str, ...] = ()
    into: str = ""
    name: str = "merge-masks"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: expected one of {', '.join(MODES)}")
        if self.mode == "fuse" and (not self.fuse or not self.into):
            raise UsageError("--mode fuse needs --labels a,b and --into NAME")
        if self.mode == "combine" and (self.fuse or self.into):
            raise UsageError("--labels/--into only apply to --mode fuse")

    def options(self) -> dict[str, Any]:
        return {"mode": self.mode, "fuse": list(self.fuse), "into": self.into}

    def accepts(self, path: Path) -> bool:
        return is_image_file(path)

    def process(self, item: Item, ctx: Context) -> Outcome:
        import SimpleITK as sitk

        from kaapcli.core.volume import write_image

        assert ctx.out is not None
        first = None
        arrays: dict[Path, Any] = {}
        labels: dict[Path, list[Label]] = {}
        infos: list[dict[str, Any]] = []
        for path in item.paths:
            try:
                img = read_image_file(path)
                if first is None:
                    first = img
                else:
                    require_same_grid(first, img, "mask")
                arrays[path] = sitk.GetArrayFromImage(img)
                labels[path] = mask_labels(path, arrays[path])
                infos.append(read_seg_info(path.parent))
            except DataError as exc:
                raise DataError(f"{path}: {exc.message}", hint=exc.hint) from exc
        assert first is not None
        result = merge_arrays(arrays, labels, self.mode, self.fuse, self.into)
        out_img = sitk.GetImageFromArray(result.labelmap)
        out_img.CopyInformation(first)
        folder = ctx.out / item.key
        dest = folder / f"{item.key}.nii.gz"
        write_image(out_img, dest)
        info_path = folder / SEG_INFO
        fsio.write_json(info_path, merged_seg_info(infos, result.seg_info))
        return Outcome(outputs=[dest, info_path], warnings=result.warnings)


def merged_seg_info(infos: list[dict[str, Any]], entries: list[dict[str, str]]) -> dict[str, Any]:
    """The inputs' seg_info.json keys (algorithm, task_body_part, ...; distinct values joined) with new labels."""
    out: dict[str, Any] = {}
    for info in infos:
        for key, value in info.items():
            if key == "seg_info":
                continue
            if key not in out:
                out[key] = value
            elif isinstance(out[key], str) and isinstance(value, str) and value not in out[key].split(", "):
                out[key] = f"{out[key]}, {value}"
    out.setdefault("algorithm", "kaapcli merge-masks")
    out["seg_info"] = entries
    return out
