"""Benchmark: memory per input file of the per-file commands, the way to a million files.

    python benchmarks/bench_scale.py [--files 100000] [--base 10000] [--quick]

Generates ``--files`` small DICOM files (one 16x16 CT template, copied with a new SOPInstanceUID per
file and a new SeriesInstanceUID per 1,000 files, in directories of 1,000: a few seconds for 100k),
then runs ``kaapcli sort``, ``anonymize`` and ``dcm2json`` over the first ``--base`` files and over all
of them, each a fresh process measured by GNU time (peak RSS of the largest process, workers included).

The figure is the marginal memory per input file, (RSS(all) - RSS(base)) / (all - base): what each
further file costs, which is what a million-file tree multiplies (target <= 0.5 KB, so a million files
need < 1 GB more than a small run).  The absolute peaks and the time per 1,000 files are shown too.
The re-run of each command (every output up to date) is measured the same way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli, figure, peak_rss_kib, quick_parser, say  # noqa: E402

UID_WIDTH = 44  # "2.25." + 39 digits: an even length, so a UID is never padded and can be replaced in place
PER_DIRECTORY = 1000


def uid(kind: int, number: int) -> str:
    return f"2.25.{kind}{number:038d}"


def template() -> bytes:
    """One small CT image with placeholder UIDs of fixed width."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid(1, 0)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid(1, 0)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(3, 0), uid(2, 0)
    ds.FrameOfReferenceUID = uid(4, 0)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Scale^Bench", "SCALE01", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(root: Path, count: int) -> None:
    """``count`` files: the template with this file's SOPInstanceUID (meta and dataset) and its series' UID."""
    blob = template()
    sop, series = uid(1, 0).encode(), uid(2, 0).encode()
    assert len(sop) == UID_WIDTH and blob.count(sop) == 2 and blob.count(series) == 1
    head, middle = blob.split(series)
    for number in range(count):
        directory = root / f"d{number // PER_DIRECTORY:04d}"
        if number % PER_DIRECTORY == 0:
            directory.mkdir(parents=True)
            series_blob = head + uid(2, number // PER_DIRECTORY).encode() + middle
        (directory / f"f{number:07d}.dcm").write_bytes(series_blob.replace(sop, uid(1, number).encode()))


def main() -> int:
    parser = quick_parser(__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--base", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.files, args.base = 6_000, 1_000
    compile_kaapcli()
    kaapcli = [sys.executable, "-m", "kaapcli"]
    workers = ["--workers", str(args.workers)] if args.workers else []
    commands = {"sort": ["sort"], "anonymize": ["anonymize", "--key", "scale-bench"], "dcm2json": ["dcm2json"]}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        data = root / "all"
        generate(data, args.files)
        base = root / "base"  # the first --base files, as hard links (no more disk)
        for directory in sorted(data.iterdir())[: args.base // PER_DIRECTORY]:
            shutil.copytree(directory, base / directory.name, copy_function=os.link)
        say(f"data: {args.files} files in {args.files // PER_DIRECTORY} series, base run {args.base} files")
        worst = 0.0
        for name, cmd in commands.items():
            rss: dict[str, tuple[float, int]] = {}
            for label, src, n in (("base", base, args.base), ("all", data, args.files)):
                out = root / f"out-{name}-{label}"
                run = [*kaapcli, *cmd, str(src), "-o", str(out), "-q", *workers]
                rss[label] = peak_rss_kib(run)
                wall, kib = rss[label]
                say(f"{name} {n} files: {wall:.1f} s ({1000 * wall / n:.2f} s per 1,000), "
                    f"peak RSS {kib / 1024:.0f} MiB")
                if label == "all":
                    again, again_kib = peak_rss_kib(run)
                    say(f"{name} {n} files, re-run (all up to date): {again:.1f} s, "
                        f"peak RSS {again_kib / 1024:.0f} MiB")
                shutil.rmtree(out)
            per_file = (rss["all"][1] - rss["base"][1]) * 1024 / (args.files - args.base)
            worst = max(worst, per_file)
            figure("scale", f"{name}: bytes of RSS per further input file", per_file, "<= 512",
                   note=f"{args.base} -> {args.files} files, peak {rss['all'][1] / 1024:.0f} MiB")
            figure("scale", f"{name}: seconds per 1,000 files at {args.files}", 1000 * rss["all"][0] / args.files)
        say(f"worst: {worst:.0f} bytes per file -> {worst * 1e6 / 2**30:.2f} GiB more at a million files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
