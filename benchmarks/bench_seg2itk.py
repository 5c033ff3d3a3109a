"""Benchmark: ``kaapcli seg2itk`` on a 50-segment DICOM SEG over a 300-slice 512x512 CT (target: under 5 s).

    python benchmarks/bench_seg2itk.py [--slices 300] [--size 512] [--segments 50] [--workdir DIR]

Generates the CT with ``kaapcli mock``, a label map of --segments blobs spread through the volume,
the SEG with ``kaapcli itk2seg`` (timed too, for information), then times ``seg2itk`` (one file
per segment, and --labelmap).  There is no installed anchor for SEG decoding (dcmqi is not
packaged in Debian), so the figure is compared with the target.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed, proc.stdout


def kaapcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kaapcli", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--segments", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import SimpleITK as sitk

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-seg2itk-"))
    data = work / "ct"
    if not data.exists():
        timed(kaapcli("mock", "-o", str(data), "--slices", str(args.slices), "--rows", str(args.size),
                      "--columns", str(args.size), "-q"))
    series = next(p.parent for p in data.rglob("*.dcm"))
    nii = work / "nii"
    if not nii.exists():
        timed(kaapcli("convert", str(series), "-o", str(nii), "-q"))
    image = sitk.ReadImage(str(next(nii.glob("*.nii.gz"))))
    k, r, c = image.GetSize()[2], image.GetSize()[1], image.GetSize()[0]
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:k, :r, :c]
    labels = np.zeros((k, r, c), np.uint8)
    for n in range(1, args.segments + 1):  # ellipsoid blobs, each over ~15% of the slices
        cz, cy, cx = rng.uniform(0.1, 0.9, 3) * (k, r, c)
        rz, ry, rx = k * 0.08, r * rng.uniform(0.03, 0.08), c * rng.uniform(0.03, 0.08)
        labels[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = n
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    sitk.WriteImage(mask, str(work / "labels.nii.gz"), True)
    seg_dir = work / "seg"
    shutil.rmtree(seg_dir, ignore_errors=True)
    t_seg, out = timed(kaapcli("itk2seg", str(work / "labels.nii.gz"), "-r", str(series), "-o", str(seg_dir), "-q"))
    seg = Path(out.split()[0])
    frames = int(subprocess.run([sys.executable, "-c", f"import pydicom; print(pydicom.dcmread('{seg}', "
                                 "stop_before_pixels=True).NumberOfFrames)"], capture_output=True, text=True).stdout)
    results = {}
    for label, extra in (("per segment", []), ("--labelmap", ["--labelmap"])):
        out_dir = work / f"masks{len(extra)}"
        shutil.rmtree(out_dir, ignore_errors=True)
        results[label], _ = timed(kaapcli("seg2itk", str(seg), "-r", str(series), "-o", str(out_dir), "-q", *extra))
    print(f"CT: {k} slices {c}x{r}; SEG: {args.segments} segments, {frames} frames, "
          f"{seg.stat().st_size / 1e6:.1f} MB")
    print(f"itk2seg (for information): {t_seg:.2f} s")
    for label, seconds in results.items():
        print(f"seg2itk {label}: {seconds:.2f} s (target < 5 s: {'met' if seconds < 5 else 'NOT met'})")


if __name__ == "__main__":
    main()
