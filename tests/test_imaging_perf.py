"""Performance properties of convert, thumbnail and itk2seg that a timing cannot prove: each file read once, one
volume in memory, one file decoded for a thumbnail, no per-segment volumes for a SEG (tracemalloc counts numpy)."""

from __future__ import annotations

import collections
import gzip
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from kaapcli.core import batch, dicomscan, volume
from tests.conftest import dicom_files, kaapcli


@pytest.fixture(scope="module")
def ct40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 slices of 256x256 (5 MiB of voxels): large enough that copies show above the fixed allocations."""
    out = tmp_path_factory.mktemp("ct40")
    proc = kaapcli("mock", "-o", out, "--slices", "40", "--rows", "256", "--columns", "256", "--seed", "5", "-q")
    assert proc.returncode == 0, proc.stderr
    return dicom_files(out)[0].parent


def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, collections.Counter[str]]:
    """Count header parses (fast reader), pydicom reads and pixel reads, by file name."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    parse, dcmread, preadv, fromfile = dicomscan.parse, pydicom.dcmread, os.preadv, np.fromfile

    def counted_parse(path: Path, *args: Any, **kwargs: Any) -> Any:
        result = parse(path, *args, **kwargs)
        if result is not False:  # a second, longer read of the same header is still one parse
            counts["parse"][Path(path).name] += 1
        return result

    def counted_dcmread(fp: Any, *args: Any, **kwargs: Any) -> Any:
        counts["pydicom"][Path(str(fp)).name] += 1
        return dcmread(fp, *args, **kwargs)

    def counted_fromfile(file: Any, *args: Any, **kwargs: Any) -> Any:
        counts["pixels"][Path(str(file)).name] += 1
        return fromfile(file, *args, **kwargs)

    def counted_preadv(fd: int, buffers: Any, offset: int) -> int:
        counts["pixels"][Path(os.readlink(f"/proc/self/fd/{fd}")).name] += 1
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(dicomscan, "parse", counted_parse)
    monkeypatch.setattr(pydicom, "dcmread", counted_dcmread)
    monkeypatch.setattr(np, "fromfile", counted_fromfile)
    monkeypatch.setattr(os, "preadv", counted_preadv)
    return counts


def test_convert_reads_each_file_once(ct40: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's header parse is reused by the conversion: one header parse and one pixel read per file (plus the
    first file's header again for the sidecar), no pydicom at all (before: pydicom read every file twice)."""
    from kaapcli.core.convert import ConvertOperator

    counts = counting(monkeypatch)
    files = sorted(ct40.iterdir())
    summary = batch.run_batch(ConvertOperator(fmt="nii"), files, tmp_path / "out", batch.BatchOptions(workers=1))
    assert summary.exit_code == 0 and summary.count("ok") == 1
    assert not counts["pydicom"]
    assert sorted(counts["pixels"].values()) == [1] * len(files)
    parses = sorted(counts["parse"].values())
    assert parses == [1] * (len(files) - 1) + [2]


def test_convert_start_up_loads_only_what_it_uses(ct40: Path, tmp_path: Path) -> None:
    """Start-up is most of an uncompressed conversion: the CLI imports numpy without starting an OpenBLAS thread
    (the environment left as it was, a user's own setting kept), and a conversion in one process imports neither
    multiprocessing (no worker forks), numpy.ma, tomllib, nor the libraries of the general path."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    blas = ("import os; from kaapcli.cli.common import import_numpy; import_numpy(); "
            "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('Threads:')][0], "
            "os.environ.get('OPENBLAS_NUM_THREADS'))")
    proc = subprocess.run([sys.executable, "-c", blas], capture_output=True, text=True, env=env)
    assert proc.stdout.split() == ["1", "None"], proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-c", blas], capture_output=True, text=True,
                          env={**env, "OPENBLAS_NUM_THREADS": "2"})
    assert proc.stdout.split()[1] == "2", proc.stdout + proc.stderr
    run = ("import os, sys; from kaapcli.cli.app import main; "
           f"code = main(['convert', {str(ct40)!r}, '-o', {str(tmp_path / 'out')!r}, '--to', 'nii', '-q']); "
           "print(code, os.environ.get('OPENBLAS_NUM_THREADS'), sorted(m for m in ('multiprocessing', 'numpy.ma', "
           "'tomllib', 'pydicom', 'nibabel', 'SimpleITK') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=env)
    assert proc.stdout.splitlines()[-1] == "0 None []", proc.stdout + proc.stderr


def test_convert_holds_one_volume(ct40: Path, tmp_path: Path) -> None:
    """Peak allocations while converting are one volume plus a little: pixels are read into the preallocated
    volume, rescaled where they lie and written from it (before: the stored planes, the rescaled copy and ITK's
    copy, about 4 volumes)."""
    files = sorted(ct40.iterdir())
    voxels = len(files) * 256 * 256 * 2
    for dest in (tmp_path / "v.nii", tmp_path / "v.nii.gz"):
        tracemalloc.start()
        try:
            (vol,) = volume.load_series(files)
            volume.write_volume(vol, dest)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert vol.voxels.dtype == np.int16
        assert peak < 1.4 * voxels, (dest.name, peak / voxels)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(dest))), vol.voxels)


def test_thumbnail_decodes_only_the_middle_file(mock_ct: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """The middle slice comes from the plan's header peeks; only that file's pixels are read (before: pydicom read
    every header of the series again, then the middle file)."""
    from kaapcli.core.thumbnail import ThumbnailOperator

    series = dicom_files(mock_ct)[0].parent
    files = sorted(series.iterdir())
    counts = counting(monkeypatch)
    summary = batch.run_batch(ThumbnailOperator(), files, tmp_path / "out", batch.BatchOptions(workers=1))
    assert summary.exit_code == 0 and summary.count("ok") == 1
    assert not counts["pydicom"]
    assert sum(counts["pixels"].values()) == 1
    positions = {p.name: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files}
    (shown,) = counts["pixels"]
    assert shown == sorted(positions, key=positions.__getitem__)[len(files) // 2]



def test_thumbnail_of_a_plain_series_imports_neither_numpy_nor_pydicom(mock_ct: Path, tmp_path: Path) -> None:
    """A windowed native CT series is rendered through a lookup table: numpy (~0.1 s to import), pydicom and
    multiprocessing (no worker runs) stay out of the process, which DCMTK's two programs beat on start-up alone."""
    code = ("import atexit, sys; atexit.register(lambda: print(sorted(m for m in ('numpy', 'pydicom', "
            "'multiprocessing') if m in sys.modules), file=sys.stderr)); from kaapcli.__main__ import main; "
            "sys.argv[0] = 'kaapcli'; sys.exit(main())")
    series = dicom_files(mock_ct)[0].parent
    proc = subprocess.run([sys.executable, "-c", code, "thumbnail", str(series), "-o", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["[]"]
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_itk2seg_holds_no_volume_per_segment(ct40: Path, tmp_path: Path) -> None:
    """40 labels: peak allocations stay a few label volumes (before: one boolean volume per segment, the stacked
    copy and an int64 copy of the labels, > 80 volumes)."""
    from kaapcli.core.seg import masks_to_seg

    files = sorted(ct40.iterdir())
    labels = np.zeros((len(files), 256, 256), np.uint8)
    for n in range(1, 41):
        labels[(n - 1) % len(files), 4 * n:4 * n + 30, 10:200] = n  # overlaps in the plane, not between labels
    reference = volume.load_series(files)[0].image
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(reference)
    sitk.WriteImage(mask, str(tmp_path / "labels.nii.gz"))
    one = sitk.GetImageFromArray((labels == 1).astype(np.uint8))
    one.CopyInformation(reference)
    sitk.WriteImage(one, str(tmp_path / "one.nii.gz"))
    masks_to_seg([tmp_path / "one.nii.gz"], files, tmp_path / "warm")  # highdicom's tables load once per process
    tracemalloc.start()
    try:
        dest, warnings = masks_to_seg([tmp_path / "labels.nii.gz"], files, tmp_path / "seg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * labels.nbytes, peak / labels.nbytes
    seg = pydicom.dcmread(dest)
    assert len(seg.SegmentSequence) == 40 and int(seg.NumberOfFrames) == 40
    proc = kaapcli("seg2itk", dest, "-r", ct40, "-o", tmp_path / "back", "--labelmap")
    assert proc.returncode == 0, proc.stderr
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(next((tmp_path / "back").glob("*.nii.gz")))))
    np.testing.assert_array_equal(back, labels)


def test_uncompressed_nifti_is_the_mapped_volume_and_equals_the_gzip_one(ct40: Path, tmp_path: Path) -> None:
    """--to nii reads the pixels into the mapped output file itself: its bytes are the .nii.gz's, decompressed."""
    assert kaapcli("convert", ct40, "-o", tmp_path / "plain", "--to", "nii", "-q").returncode == 0
    assert kaapcli("convert", ct40, "-o", tmp_path / "gz", "-q").returncode == 0
    (plain,) = (tmp_path / "plain").glob("*.nii")
    (packed,) = (tmp_path / "gz").glob("*.nii.gz")
    assert plain.read_bytes() == gzip.decompress(packed.read_bytes())
    assert not list((tmp_path / "plain").glob(".*"))  # no temporary file left


def test_uncompressed_nifti_on_a_full_disk_fails_cleanly(ct40: Path, tmp_path: Path) -> None:
    """The mapped file's blocks are reserved before a pixel is read: a full disk is exit 73 naming the file and
    nothing is left behind (a store into a mapping the file system cannot back would be a SIGBUS instead)."""
    from tests.test_net_hostile import _mount_tmpfs

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        proc = kaapcli("convert", ct40, "-o", disk / "out", "--to", "nii", "-q")
        assert proc.returncode == 73, proc.stderr
        assert "cannot write" in proc.stderr and ".nii" in proc.stderr and "Traceback" not in proc.stderr
        assert not [p for p in (disk / "out").rglob("*") if p.suffix == ".nii" or "kaapcli-part" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_convert_output_is_byte_stable_across_runs_and_worker_counts(ct40: Path, tmp_path: Path) -> None:
    """Slices are deflated on threads but written in order: the .nii.gz and its sidecar do not depend on the run
    or on --workers."""
    runs = []
    for n, workers in enumerate(("1", "2")):
        out = tmp_path / f"run{n}"
        proc = kaapcli("convert", ct40, "-o", out, "-q", "--workers", workers)
        assert proc.returncode == 0, proc.stderr
        runs.append({p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")})
    assert runs[0] == runs[1] and len(runs[0]) == 2
