"""Real scanner DICOM shipped inside installed packages (no download at test time).

- nibabel (a runtime dependency): ``nibabel/nicom/tests/data``: Siemens B17 DTI mosaics (b=0 and b=1000),
  a Siemens resting-state mosaic without pixel data, a Philips enhanced multi-frame MPRAGE.
- heudiconv's wheel (installed ``--no-deps`` by ``make venv`` for its data only): Siemens E11 multiband
  diffusion mosaics (3 volumes), a B17 fMRI mosaic, an XA30 enhanced MR localizer, a field-map phase image.

Where a package is missing the tests skip locally and fail under CI (``CI`` set), so CI cannot pass vacuously.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from pathlib import Path

import pytest


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing (heudiconv's own deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(what: str) -> None:
    message = f"{what} not installed (make venv installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def nibabel_data() -> Path:
    root = package_dir("nibabel")
    data = root / "nicom" / "tests" / "data" if root else None
    if data is None or not data.is_dir():
        _missing("nibabel's test data")
    return data  # type: ignore[return-value]


def heudiconv_data() -> Path:
    root = package_dir("heudiconv")
    data = root / "tests" / "data" if root else None
    if data is None or not data.is_dir():
        _missing("heudiconv (its test DICOMs)")
    return data  # type: ignore[return-value]


# name -> (package, files relative to its data folder); .gz files are unpacked
SERIES = {
    "siemens_mb_dwi": ("heudiconv", ["b0dwiForFmap/b0dwi_for_fmap+00001.dcm", "b0dwiForFmap/b0dwi_for_fmap+00002.dcm",
                                     "b0dwiForFmap/b0dwi_for_fmap+00003.dcm"]),
    "siemens_fmri_mosaic": ("heudiconv", ["axasc35.dcm"]),
    "siemens_xa_localizer": ("heudiconv", [
        "MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm"]),
    "siemens_fieldmap": ("heudiconv", ["01-fmap_acq-3mm/1.3.12.2.1107.5.2.43.66112.2016101409263663466202201.dcm"]),
    "siemens_dti": ("nibabel", ["siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"]),
    "siemens_mosaic_odd": ("nibabel", ["0.dcm", "1.dcm"]),
    "siemens_mosaic_nopixels": ("nibabel", ["csa_slice_norm.dcm"]),
    "philips_enhanced": ("nibabel", ["philips_mprage.dcm.gz"]),
}


def copy_series(name: str, dest: Path) -> Path:
    """Copy one real series into ``dest`` (a new directory) and return it."""
    package, files = SERIES[name]
    root = heudiconv_data() if package == "heudiconv" else nibabel_data()
    dest.mkdir(parents=True, exist_ok=True)
    for rel in files:
        src = root / rel
        if not src.is_file():
            _missing(f"{package} test file {rel}")
        if src.suffix == ".gz":
            (dest / src.stem).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, dest / src.name)
    return dest
