#!/usr/bin/env python3
"""thumbnail vs DCMTK dcmj2pnm, resample vs a bare SimpleITK script, on a 300-slice 512x512 CT.

Usage: python benchmarks/bench_imaging2.py [--slices 300] [--size 512]
Prints wall-clock seconds per tool and the ratio kaapcli / anchor.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    kaapcli = [sys.executable, "-m", "kaapcli"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([*kaapcli, "mock", "-o", root / "ct", "--slices", str(args.slices), "--rows", str(args.size),
                        "--columns", str(args.size), "-q"], check=True, capture_output=True)
        files = sorted((root / "ct").rglob("*.dcm"))
        series = files[0].parent
        # dcmj2pnm converts one file it is handed; kaapcli first finds the middle slice among all headers.
        import pydicom

        middle = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                   .ImagePositionPatient[2]))[len(files) // 2]
        anchor = timed(["/usr/bin/dcmj2pnm", "--write-png", "+Wi", "1", "+Sxv", "300", str(middle),
                        str(root / "anchor.png")])
        ours = timed([*kaapcli, "thumbnail", str(series), "-o", str(root / "thumb"), "-q", "--force"])
        print(f"thumbnail  {len(files)} slices: kaapcli {ours:.2f} s, dcmj2pnm (middle file only) {anchor:.2f} s, "
              f"ratio {ours / anchor:.1f}")

        # resample the series onto a 2 mm isotropic grid: kaapcli (DICOM in, NIfTI out) vs the same
        # SimpleITK calls in a bare script (GDCM series reader, sitk.Resample, sitk.WriteImage).
        ref = root / "ref.nrrd"
        script = f"""
import SimpleITK as sitk
r = sitk.ImageSeriesReader(); r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames({str(series)!r}))
img = r.Execute()
size = [int(round(n * s / 2.0)) for n, s in zip(img.GetSize(), img.GetSpacing())]
ref = sitk.Image(size, sitk.sitkUInt8); ref.SetSpacing((2.0, 2.0, 2.0)); ref.SetOrigin(img.GetOrigin())
ref.SetDirection(img.GetDirection()); sitk.WriteImage(ref, {str(ref)!r})
out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, img.GetPixelID())
sitk.WriteImage(out, {str(root / 'anchor.nii.gz')!r}, True)
"""
        anchor = timed([sys.executable, "-c", script])
        ours = timed([*kaapcli, "resample", str(series), "-r", str(ref), "-o", str(root / "res"), "-q", "--force"])
        print(f"resample   {len(files)} slices -> 2 mm: kaapcli {ours:.2f} s, SimpleITK script {anchor:.2f} s, "
              f"ratio {ours / anchor:.1f}")


if __name__ == "__main__":
    main()
