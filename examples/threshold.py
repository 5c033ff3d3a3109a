"""A threshold mask for the demo: the largest connected region of HU in [LOW, HIGH] of each CT volume.

usage: python threshold.py IMAGE.nii.gz... -o DIR [--low 50] [--high 90] [--label liver]
Writes DIR/<stem>--1--<label>.nii.gz and prints each path (like a kaapcli command).
"""

import argparse
from pathlib import Path

import SimpleITK as sitk

parser = argparse.ArgumentParser()
parser.add_argument("images", nargs="+", type=Path)
parser.add_argument("-o", "--out", type=Path, required=True)
parser.add_argument("--low", type=float, default=50)
parser.add_argument("--high", type=float, default=90)
parser.add_argument("--label", default="liver")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
for path in args.images:
    image = sitk.ReadImage(str(path))
    mask = sitk.BinaryThreshold(sitk.Median(image, [1, 1, 1]), args.low, args.high, 1, 0)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    stem = path.name.removesuffix(".nii.gz")
    dest = args.out / f"{stem}--1--{args.label}.nii.gz"
    tmp = dest.with_name(f".{dest.name}.part.nii.gz")
    sitk.WriteImage(sitk.Cast(largest, sitk.sitkUInt8), str(tmp), useCompression=True)
    tmp.replace(dest)
    print(dest)
