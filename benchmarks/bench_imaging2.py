#!/usr/bin/env python3
"""thumbnail vs DCMTK, itk2seg vs dcmqi, resample vs a bare SimpleITK script, on a 512x512 mock CT.

    python benchmarks/bench_imaging2.py [--quick] [--json] [--only thumbnail|itk2seg|resample] [--slices 300]
                                        [--segments 50] [--repeat 5] [--workdir DIR]

- thumbnail (target <= 3x DCMTK for a series): ``kaapcli thumbnail SERIES`` against DCMTK doing the same job in
  one shell pipeline: ``dcmdump`` reads every header (stopping before the pixel data) for ImagePositionPatient and
  ImageOrientationPatient, awk sorts the files along the slice normal and picks the middle one, ``dcmj2pnm``
  renders it (first window, 300 pixels wide).  Also, unfavourable and printed with the same target: ``dcmj2pnm``
  handed the middle file only (no header reading at all).
- itk2seg (targets: peak RSS <= 2 GiB for --segments labels on the CT; not slower than before): a label map of
  ellipsoid blobs, ``kaapcli itk2seg`` against dcmqi's ``itkimage2segimage`` writing the same binary SEG (same
  segments, same frames) from the same files, for information; with ``--baseline REF`` also against the kaapcli
  of git revision REF (``git archive``'d into the work directory, run with it first on PYTHONPATH): the
  "not slower" figure.  The code before this round needs ~11 GiB for 50 labels.
- resample (for information): the series onto a 2 mm grid, kaapcli (DICOM in, NIfTI out) against the same
  SimpleITK calls in a bare script.

Interleaved pairs, medians of --repeat (thumbnail) or one run each (itk2seg, resample: seconds long); peak RSS
from ``wait4``.  Human text on stderr; ``--json``: one JSON object per figure on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_kaapcli  # noqa: E402

KAAPCLI = [sys.executable, "-m", "kaapcli"]
REPO = Path(__file__).resolve().parent.parent
# DCMTK for a series: headers of every file (no pixel data), middle along the normal, render it (argv: out.png files)
DCMTK_SERIES = r"""
out=$1; shift
dcmdump -q -M +sb 7fe0,0010 +F +P 0020,0032 +P 0020,0037 "$@" | awk '
/^# dcmdump/ { file = $NF }
/\(0020,0032\)/ { match($0, /\[[^]]*\]/); split(substr($0, RSTART + 1, RLENGTH - 2), p, "\\") }
/\(0020,0037\)/ { match($0, /\[[^]]*\]/); split(substr($0, RSTART + 1, RLENGTH - 2), o, "\\")
  nx = o[2] * o[6] - o[3] * o[5]; ny = o[3] * o[4] - o[1] * o[6]; nz = o[1] * o[5] - o[2] * o[4]
  printf "%.6f %s\n", nx * p[1] + ny * p[2] + nz * p[3], file }' | sort -g | awk '{ f[NR] = $2 }
END { print f[int(NR / 2) + 1] }' | xargs -I{} dcmj2pnm --write-png +Wi 1 +Sxv 300 {} "$out"
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, largest process of its tree) of one command; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err}")
    return elapsed, usage.ru_maxrss * 1024


def figure(name: str, value: float, target: float | None, unit: str = "") -> dict[str, object]:
    met = None if target is None else value <= target
    say(f"  {name}: {value:.2f}{unit}" + ("" if target is None else
                                         f" (target <= {target}{unit}: {'met' if met else 'NOT met'})"))
    return {"benchmark": "imaging", "figure": name, "value": round(value, 3),
            "target": None if target is None else f"<= {target}{unit}", "met": met}


def bench_thumbnail(series: Path, work: Path, repeat: int) -> list[dict[str, object]]:
    import pydicom

    files = sorted(series.glob("*.dcm"))

    def along_normal(p: Path) -> float:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        o = [float(v) for v in ds.ImageOrientationPatient]
        n = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
        return sum(a * float(b) for a, b in zip(n, ds.ImagePositionPatient, strict=True))

    middle = sorted(files, key=along_normal)[len(files) // 2]
    cases = {"kaapcli": [*KAAPCLI, "thumbnail", str(series), "-o", str(work / "thumb"), "-q", "--force"],
             "dcmtk series": ["sh", "-c", DCMTK_SERIES, "sh", str(work / "dcmtk.png"), *map(str, files)],
             "dcmj2pnm middle": ["dcmj2pnm", "--write-png", "+Wi", "1", "+Sxv", "300", str(middle),
                                 str(work / "middle.png")]}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, cmd in cases.items():
            times[name].append(run(cmd)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    say(f"thumbnail of {len(files)} slices: kaapcli {med['kaapcli']:.3f} s, DCMTK pipeline for the series "
        f"{med['dcmtk series']:.3f} s, dcmj2pnm on the middle file alone {med['dcmj2pnm middle']:.3f} s "
        f"(medians of {repeat})")
    return [figure(f"thumbnail, {len(files)}-slice series: time kaapcli / DCMTK (dcmdump headers + dcmj2pnm)",
                   med["kaapcli"] / med["dcmtk series"], 3.0),
            figure(f"thumbnail, {len(files)}-slice series: time kaapcli / dcmj2pnm on the middle file only",
                   med["kaapcli"] / med["dcmj2pnm middle"], 3.0)]


def label_map(reference: Path, dest: Path, segments: int) -> None:
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(reference))
    k, r, c = image.GetSize()[2], image.GetSize()[1], image.GetSize()[0]
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:k, :r, :c]
    labels = np.zeros((k, r, c), np.uint8)
    for n in range(1, segments + 1):  # ellipsoid blobs, each over ~15% of the slices
        cz, cy, cx = rng.uniform(0.1, 0.9, 3) * (k, r, c)
        rz, ry, rx = k * 0.08, r * rng.uniform(0.03, 0.08), c * rng.uniform(0.03, 0.08)
        labels[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = n
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    sitk.WriteImage(mask, str(dest), True)


def baseline(work: Path, ref: str) -> tuple[dict[str, str], Path]:
    """An environment and working directory (``-m`` puts it first on sys.path) whose ``python -m kaapcli`` is the
    kaapcli of git revision ``ref``."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True,
                            text=True).stdout.strip()
    dest = work / f"baseline-{commit}"
    if not (dest / "kaapcli").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "kaapcli"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "kaapcli")], check=True,
                       stdout=subprocess.DEVNULL)
    return {**os.environ, "PYTHONPATH": str(dest)}, dest


def bench_itk2seg(series: Path, work: Path, segments: int, before_ref: str | None) -> list[dict[str, object]]:
    nii = work / "nii"
    if not nii.exists():
        subprocess.run([*KAAPCLI, "convert", str(series), "-o", str(nii), "-q"], check=True, stdout=subprocess.DEVNULL)
    labels = work / f"labels-{segments}.nii.gz"
    if not labels.exists():
        # in a child: a child's ru_maxrss starts from the RSS of the process it was forked from (Linux records the
        # replaced mm's high-water mark at exec), so this process must stay small for the RSS figures to hold
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"from bench_imaging2 import label_map; from pathlib import Path; "
                        f"label_map(Path({str(next(nii.glob('*.nii.gz')))!r}), Path({str(labels)!r}), {segments})"],
                       check=True)
    tissue = {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Tissue"}
    meta = work / "dcmqi.json"
    meta.write_text(json.dumps({
        "ContentCreatorName": "bench", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "Segmentation", "SeriesNumber": "900", "InstanceNumber": "1",
        "ContentLabel": "SEGMENTATION", "ContentDescription": "", "BodyPartExamined": "",
        "segmentAttributes": [[{"labelID": n, "SegmentDescription": f"label_{n}", "SegmentLabel": f"label_{n}",
                                "SegmentAlgorithmType": "MANUAL", "SegmentedPropertyCategoryCodeSequence": tissue,
                                "SegmentedPropertyTypeCodeSequence": tissue} for n in range(1, segments + 1)]]}))
    dcmqi = shutil.which("itkimage2segimage") or str(Path(sys.executable).parent / "itkimage2segimage")
    if not Path(dcmqi).exists():
        sys.exit("itkimage2segimage (dcmqi) not installed: pip install -e '.[bench]'")
    shutil.rmtree(work / "seg", ignore_errors=True)
    ours, ours_rss = run([*KAAPCLI, "itk2seg", str(labels), "-r", str(series), "-o", str(work / "seg"), "-q"])
    theirs, theirs_rss = run([dcmqi, "--inputImageList", str(labels), "--inputDICOMDirectory", str(series),
                              "--inputMetadata", str(meta), "--outputDICOM", str(work / "dcmqi.dcm"), "--skip"])
    import pydicom

    frames = [int(pydicom.dcmread(p, stop_before_pixels=True).NumberOfFrames)
              for p in (next((work / "seg").glob("*.dcm")), work / "dcmqi.dcm")]
    slices = len(list(series.glob("*.dcm")))
    say(f"itk2seg, {segments} labels x {slices} slices: kaapcli {ours:.2f} s {ours_rss / 2**30:.2f} GiB, "
        f"dcmqi itkimage2segimage {theirs:.2f} s {theirs_rss / 2**30:.2f} GiB; frames {frames[0]} / {frames[1]}")
    if frames[0] != frames[1]:
        sys.exit("itk2seg: kaapcli and dcmqi wrote different frame counts: not equal work")
    name = f"itk2seg, {segments} labels x {slices} slices"
    before: list[dict[str, object]] = []
    if before_ref:
        shutil.rmtree(work / "seg-before", ignore_errors=True)
        env, cwd = baseline(work, before_ref)
        probe = subprocess.run([sys.executable, "-c", "import kaapcli; print(kaapcli.__file__)"], env=env, cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        if not probe.startswith(str(cwd)):
            sys.exit(f"--baseline: python -m kaapcli would import {probe}, not the baseline in {cwd}")
        old, old_rss = run([*KAAPCLI, "itk2seg", str(labels), "-r", str(series), "-o", str(work / "seg-before"), "-q"],
                           env=env, cwd=cwd)
        say(f"itk2seg before ({before_ref}): {old:.2f} s {old_rss / 2**30:.2f} GiB")
        before = [figure(f"{name}: time kaapcli / kaapcli before ({before_ref})", ours / old, 1.0),
                  figure(f"{name}: peak RSS kaapcli before ({before_ref})", old_rss / 2**30, None, " GiB")]
    return [*before, figure(f"{name}: peak RSS", ours_rss / 2**30, 2.0, " GiB"),
            figure(f"{name}: time kaapcli / dcmqi itkimage2segimage", ours / theirs, None),
            figure(f"{name}: peak RSS kaapcli / dcmqi itkimage2segimage", ours_rss / theirs_rss, None)]


def bench_resample(series: Path, work: Path) -> list[dict[str, object]]:
    ref = work / "ref.nrrd"
    script = f"""
import SimpleITK as sitk
r = sitk.ImageSeriesReader(); r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames({str(series)!r}))
img = r.Execute()
size = [int(round(n * s / 2.0)) for n, s in zip(img.GetSize(), img.GetSpacing())]
ref = sitk.Image(size, sitk.sitkUInt8); ref.SetSpacing((2.0, 2.0, 2.0)); ref.SetOrigin(img.GetOrigin())
ref.SetDirection(img.GetDirection()); sitk.WriteImage(ref, {str(ref)!r})
out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, img.GetPixelID())
sitk.WriteImage(out, {str(work / 'anchor.nii.gz')!r}, True)
"""
    theirs = run([sys.executable, "-c", script])[0]
    ours = run([*KAAPCLI, "resample", str(series), "-r", str(ref), "-o", str(work / "res"), "-q", "--force"])[0]
    say(f"resample {len(list(series.glob('*.dcm')))} slices -> 2 mm: kaapcli {ours:.2f} s, SimpleITK script "
        f"{theirs:.2f} s")
    return [figure("resample onto 2 mm: time kaapcli / SimpleITK script", ours / theirs, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 10 labels: for make bench")
    parser.add_argument("--json", action="store_true", help="one JSON object per figure on stdout")
    parser.add_argument("--only", choices=("thumbnail", "itk2seg", "resample"), default=None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--segments", type=int, default=None, help="itk2seg labels (default 50, --quick 10)")
    parser.add_argument("--repeat", type=int, default=None, help="thumbnail pairs (default 5, --quick 3)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--baseline", default=None, metavar="REF",
                        help="also run itk2seg with the kaapcli of this git revision (e.g. main)")
    args = parser.parse_args()
    for tool in ("dcmdump", "dcmj2pnm"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed (apt-get install dcmtk)")
    compile_kaapcli()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-imaging-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"ct-{args.slices}-{args.size}"
    if not data.exists():
        subprocess.run([*KAAPCLI, "mock", "-o", str(data), "--slices", str(args.slices), "--rows", str(args.size),
                        "--columns", str(args.size), "-q"], check=True, stdout=subprocess.DEVNULL)
    series = next(p.parent for p in data.rglob("*.dcm"))
    say(f"{args.slices}-slice {args.size}x{args.size} mock CT; {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}")
    figures = []
    if args.only in (None, "thumbnail"):
        figures += bench_thumbnail(series, work, args.repeat or (3 if args.quick else 5))
    if args.only in (None, "itk2seg"):
        figures += bench_itk2seg(series, work, args.segments or (10 if args.quick else 50), args.baseline)
    if args.only in (None, "resample") and not args.quick:
        figures += bench_resample(series, work)
    if args.json:
        for f in figures:
            print(json.dumps(f))


if __name__ == "__main__":
    main()
