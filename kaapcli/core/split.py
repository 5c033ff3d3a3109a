"""``split``: a deterministic train/test split of series, grouped so no patient is on both sides.

Each series is read once (header only) for PatientID, StudyInstanceUID and SeriesInstanceUID.
Groups (patients, studies or series, per ``by``) are ordered by SHA-256 of ``seed:key`` and the
first ``round(train * groups)`` go to train.  The order of one group does not depend on the
others, so adding data moves few groups.  With 0 < train < 1 and at least two groups, both sides
get at least one group.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.exitcodes import KaapcliError, UsageError

BY = ("patient", "study", "series")


@dataclass
class Series:
    uid: str
    study: str
    patient: str
    files: list[Path] = field(default_factory=list)

    @property
    def directory(self) -> str:
        """The deepest directory holding all of the series' files."""
        return os.path.commonpath([str(f.parent) for f in self.files])

    def record(self) -> dict[str, Any]:
        return {"series": self.uid, "study": self.study, "patient": self.patient, "path": self.directory,
                "files": len(self.files)}


@dataclass
class Scan:
    series: dict[str, Series] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: int = 0


def scan(files: list[Path]) -> Scan:
    """Group DICOM files into series; non-DICOM files are counted, unreadable ones reported."""
    result = Scan()
    no_patient: set[str] = set()
    for path in files:
        try:
            dicom_file = fsio.looks_like_dicom(fsio.read_head(path))
        except OSError as exc:
            result.failures.append(f"{path}: cannot read: {exc.strerror}")
            continue
        if not dicom_file:
            result.skipped += 1
            continue
        try:
            ds = dicom.read(path, stop_before_pixels=True,
                            specific_tags=["PatientID", "StudyInstanceUID", "SeriesInstanceUID"])
            uid = str(dicom.require(ds, "SeriesInstanceUID"))
            study = str(dicom.require(ds, "StudyInstanceUID"))
        except KaapcliError as exc:
            result.failures.append(f"{path}: {exc.message}")
            continue
        patient = str(ds.get("PatientID", "") or "")
        if not patient:
            no_patient.add(study)
        series = result.series.setdefault(uid, Series(uid, study, patient))
        if (series.study, series.patient) != (study, patient):
            result.warnings.append(f"{path}: series {uid} has files of several studies/patients; "
                                   f"kept with {series.patient or series.study}")
        series.files.append(path)
    for study in sorted(no_patient):
        result.warnings.append(f"study {study}: no PatientID; its series are grouped by study instead")
    return result


def group_key(series: Series, by: str) -> str:
    if by == "series":
        return series.uid
    if by == "study" or not series.patient:
        return "study:" + series.study
    return "patient:" + series.patient


def assign(keys: list[str], train: float, seed: int) -> tuple[set[str], set[str]]:
    """Split group keys into (train, test) deterministically."""
    if not 0.0 <= train <= 1.0:
        raise UsageError(f"--train {train}: must be between 0 and 1")
    order = sorted(set(keys), key=lambda k: (hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), k))
    n_train = round(train * len(order))
    if 0.0 < train < 1.0 and len(order) >= 2:
        n_train = min(max(n_train, 1), len(order) - 1)
    return set(order[:n_train]), set(order[n_train:])


@dataclass
class Split:
    train: list[Series]
    test: list[Series]

    def groups(self, side: list[Series], by: str) -> int:
        return len({group_key(s, by) for s in side})


def split_series(series: dict[str, Series], train: float, seed: int, by: str) -> Split:
    if by not in BY:
        raise UsageError(f"--by {by}: choose one of {', '.join(BY)}")
    train_keys, _ = assign([group_key(s, by) for s in series.values()], train, seed)
    ordered = [series[uid] for uid in sorted(series)]
    return Split([s for s in ordered if group_key(s, by) in train_keys],
                 [s for s in ordered if group_key(s, by) not in train_keys])


def write_split(result: Split, out: Path, fmt: str, meta: dict[str, Any]) -> list[Path]:
    """``train.txt``/``test.txt`` (one SeriesInstanceUID per line) or ``split.json``."""
    if fmt == "json":
        dest = out / "split.json"
        fsio.write_json(dest, {**meta, "train": [s.record() for s in result.train],
                               "test": [s.record() for s in result.test]})
        return [dest]
    written = []
    for name, side in (("train", result.train), ("test", result.test)):
        dest = out / f"{name}.txt"
        fsio.write_bytes(dest, "".join(f"{s.uid}\n" for s in side).encode())
        written.append(dest)
    return written
