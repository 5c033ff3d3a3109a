"""Benchmark: ``kaapcli seg2itk`` on a 50-segment DICOM SEG over a 300-slice 512x512 CT (target: under 5 s).

    python benchmarks/bench_seg2itk.py [--quick] [--slices 300] [--size 512] [--segments 50] [--workdir DIR]

Generates the CT with ``kaapcli mock``, a label map of --segments blobs spread through the volume,
the SEG with ``kaapcli itk2seg`` (timed too, for information), then times ``seg2itk`` (one file
per segment, and --labelmap).  There is no installed anchor for SEG decoding (dcmqi is not
packaged in Debian), so the figure is compared with the target.  Human text on stderr, one JSON object per
figure on stdout; --quick: 60 slices of 256x256, 10 segments.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import figure, quick_parser, say


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
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--segments", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    args.slices = args.slices or (60 if args.quick else 300)
    args.size = args.size or (256 if args.quick else 512)
    args.segments = args.segments or (10 if args.quick else 50)
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
    say(f"CT: {k} slices {c}x{r}; SEG: {args.segments} segments, {frames} frames, {seg.stat().st_size / 1e6:.1f} MB")
    figure("seg2itk", "itk2seg: seconds", t_seg)
    for label, seconds in results.items():
        figure("seg2itk", f"seg2itk {label}: seconds; {args.segments} segments over {k} slices of {c}x{r}", seconds,
               "<= 5")

if __name__ == "__main__":
    main()
