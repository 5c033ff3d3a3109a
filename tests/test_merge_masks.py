"""merge-masks: combine and fuse, overlap skipping, seg_info.json, grouping, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tests.conftest import kaapcli

SHAPE = (6, 10, 12)


def write(array: np.ndarray, path: Path, spacing: tuple[float, ...] = (1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def block(z: slice, y: slice, x: slice) -> np.ndarray:
    a = np.zeros(SHAPE, np.uint8)
    a[z, y, x] = 1
    return a


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def make_case(root: Path) -> dict[str, np.ndarray]:
    masks = {
        "liver": block(slice(0, 2), slice(0, 4), slice(0, 4)),
        "spleen": block(slice(3, 5), slice(0, 4), slice(0, 4)),
        "tumor": block(slice(1, 4), slice(0, 2), slice(0, 2)),  # overlaps liver (4) and spleen (4)
    }
    for i, (name, a) in enumerate(masks.items(), 1):
        write(a, root / f"case1--{i}--{name}.nii.gz")
    write(block(slice(0, 1), slice(5, 6), slice(5, 6)), root / "case2--1--liver.nii.gz")
    return masks


def test_combine_skips_overlapping_mask(tmp_path: Path) -> None:
    masks = make_case(tmp_path / "in")
    proc = kaapcli("merge-masks", tmp_path / "in", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "tumor (case1--3--tumor.nii.gz) overlaps liver, spleen in 8 voxels: skipped" in proc.stderr
    merged = read(tmp_path / "out" / "case1" / "case1.nii.gz")
    assert np.array_equal(merged, masks["liver"] * 1 + masks["spleen"] * 2)
    info = json.loads((tmp_path / "out" / "case1" / "seg_info.json").read_text())
    assert info["seg_info"] == [{"label_name": "liver", "label_int": "1"}, {"label_name": "spleen", "label_int": "2"}]
    assert read(tmp_path / "out" / "case2" / "case2.nii.gz").sum() == 1
    # the geometry of the inputs is kept
    assert sitk.ReadImage(str(tmp_path / "out" / "case1" / "case1.nii.gz")).GetSpacing() == (1.0, 1.0, 2.0)


def test_fuse_labels_into_one(tmp_path: Path) -> None:
    masks = make_case(tmp_path / "in")
    proc = kaapcli("merge-masks", tmp_path / "in", "-o", tmp_path / "out", "--mode", "fuse",
                   "--labels", "liver,3", "--into", "lesion_liver")
    assert proc.returncode == 0, proc.stderr
    # tumor now shares a label with liver, so only its 4 voxels on the spleen clash: skipped
    assert "overlaps spleen in 4 voxels: skipped" in proc.stderr
    merged = read(tmp_path / "out" / "case1" / "case1.nii.gz")
    assert np.array_equal(merged, masks["liver"] * 1 + masks["spleen"] * 2)
    info = json.loads((tmp_path / "out" / "case1" / "seg_info.json").read_text())
    assert [e["label_name"] for e in info["seg_info"]] == ["lesion_liver", "spleen"]


def test_folder_of_binary_masks_and_seg_info_keys(tmp_path: Path) -> None:
    # TotalSegmentator-like: one folder per case, binary masks named after the organ, all value 1
    case = tmp_path / "s0001"
    write(block(slice(0, 2), slice(0, 2), slice(0, 2)), case / "spleen.nii.gz")
    write(block(slice(3, 5), slice(3, 5), slice(3, 5)), case / "aorta.nii.gz")
    (case / "seg_info.json").write_text(json.dumps({"algorithm": "TotalSegmentator", "task_body_part": "abdomen"}))
    proc = kaapcli("merge-masks", case, "-o", tmp_path / "out", "--group-by", "folder")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "out" / "s0001" / "seg_info.json").read_text())
    assert info["algorithm"] == "TotalSegmentator" and info["task_body_part"] == "abdomen"
    assert info["seg_info"] == [{"label_name": "aorta", "label_int": "1"}, {"label_name": "spleen", "label_int": "2"}]
    assert sorted(np.unique(read(tmp_path / "out" / "s0001" / "s0001.nii.gz")).tolist()) == [0, 1, 2]


def test_other_geometry_and_bad_files_fail_cleanly(tmp_path: Path) -> None:
    write(block(slice(0, 2), slice(0, 2), slice(0, 2)), tmp_path / "in" / "c--1--a.nii.gz")
    write(np.ones((6, 10, 13)), tmp_path / "in" / "c--2--b.nii.gz")  # another size
    (tmp_path / "in" / "d--1--x.nii.gz").write_text("not an image")
    proc = kaapcli("merge-masks", tmp_path / "in", "-o", tmp_path / "out")
    assert proc.returncode == 65, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr
    assert any("c--2--b.nii.gz" in e and "geometry" in e for e in errors)
    assert any("d--1--x.nii.gz" in e for e in errors)
    assert not [p for p in (tmp_path / "out").rglob("*.nii.gz")]
    usage = kaapcli("merge-masks", tmp_path / "in", "-o", tmp_path / "out", "--mode", "fuse")
    assert usage.returncode == 2 and "--labels" in usage.stderr
