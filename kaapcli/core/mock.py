"""Synthetic, standard-conformant DICOM studies for tests, demos and benchmarks.

Everything is derived from the seed: UIDs (under 2.25), names, dates and the
anatomy, so the same command writes the same bytes.  The phantom is an axial
body ellipse with lungs, liver, kidneys, spine and aorta of distinct values, so a
threshold gives a sensible mask.  Geometry is a regular axial stack
(ImageOrientationPatient 1\\0\\0\\0\\1\\0, spacing = slice thickness) sharing one
FrameOfReference per study.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from kaapcli.core import dicom
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}

# Tissue values per modality: CT in HU; MR and PT in arbitrary, positive units.
TISSUES: dict[str, dict[str, float]] = {
    "CT": {"air": -1000, "body": 40, "lung": -850, "liver": 65, "kidney": 150, "bone": 700, "aorta": 250},
    "MR": {"air": 0, "body": 400, "lung": 40, "liver": 650, "kidney": 900, "bone": 200, "aorta": 1200},
    "PT": {"air": 0, "body": 1000, "lung": 300, "liver": 3000, "kidney": 6000, "bone": 1500, "aorta": 2000},
}
FIRST_NAMES = ["Alex", "Sam", "Robin", "Kim", "Jo", "Charlie", "Maria", "Jan", "Noor", "Lea"]
LAST_NAMES = ["Muster", "Weber", "Schmidt", "Novak", "Rossi", "Jansen", "Larsen", "Costa", "Meyer", "Dubois"]
BODY_PARTS = {"CT": "CHEST", "MR": "ABDOMEN", "PT": "WHOLEBODY"}
SLICE_BLOCK = 16


@dataclass(frozen=True)
class MockSpec:
    studies: int = 1
    series: int = 1
    slices: int = 20
    modality: str = "CT"
    seed: int = 0
    rows: int = 512
    columns: int = 512
    pixel_spacing: float = 0.8
    slice_thickness: float = 2.5


def phantom_slice(z_frac: float, rows: int, columns: int, modality: str) -> np.ndarray:
    """One axial slice of the phantom at relative height ``z_frac`` (0 = feet, 1 = head), in tissue units."""
    t = TISSUES[modality]
    y, x = np.ogrid[-1:1:rows * 1j, -1:1:columns * 1j]
    img = np.full((rows, columns), t["air"], dtype=np.float32)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return bool_mask(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0)

    img[ellipse(0, 0, 0.85, 0.6)] = t["body"]
    if z_frac > 0.45:  # thorax: lungs
        img[ellipse(-0.38, -0.05, 0.28, 0.38)] = t["lung"]
        img[ellipse(0.38, -0.05, 0.28, 0.38)] = t["lung"]
    if 0.25 < z_frac < 0.6:  # upper abdomen: liver on the patient's right (image left)
        r = 0.3 * np.sin(np.pi * (z_frac - 0.25) / 0.35) + 0.05
        img[ellipse(-0.35, 0.05, r, r * 0.8)] = t["liver"]
    if 0.1 < z_frac < 0.35:  # kidneys
        img[ellipse(-0.3, 0.3, 0.1, 0.14)] = t["kidney"]
        img[ellipse(0.3, 0.3, 0.1, 0.14)] = t["kidney"]
    img[ellipse(0, 0.4, 0.09, 0.09)] = t["bone"]  # spine
    img[ellipse(0.08, 0.22, 0.05, 0.05)] = t["aorta"]
    return img


def bool_mask(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=bool)


class MockOperator(BaseOperator):
    """Writes one synthetic series per item (item key = ``study/series`` index)."""

    name = "mock"
    grouped = True

    def __init__(self, spec: MockSpec):
        self.spec = spec

    def options(self) -> dict[str, Any]:
        return dict(self.spec.__dict__)

    def items(self) -> list[Item]:
        """One item per block of slices, so even a single series is written in parallel."""
        spec = self.spec
        return [Item(f"study{s:04d}/series{r:04d}/slices{b:05d}", ()) for s in range(spec.studies)
                for r in range(spec.series) for b in range(0, spec.slices, SLICE_BLOCK)]

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        study_index, series_index, first = (int(n) for n in re.findall(r"\d+", item.key))
        written = self.series_files(study_index, series_index, ctx.out,
                                    range(first, min(first + SLICE_BLOCK, self.spec.slices)))
        return Outcome(outputs=[ctx.out / rel for rel in written])

    # The dataset builders -------------------------------------------------------------
    def study_context(self, study_index: int) -> dict[str, Any]:
        spec = self.spec
        rng = random.Random(f"{spec.seed}/study/{study_index}")
        patient_index = study_index  # one patient per study keeps studies independent
        prng = random.Random(f"{spec.seed}/patient/{patient_index}")
        birth = date(1940, 1, 1) + timedelta(days=prng.randrange(0, 365 * 60))
        study_day = date(2018, 1, 1) + timedelta(days=rng.randrange(0, 365 * 6))
        age_years = (study_day - birth).days // 365
        base = f"kaapcli-mock/{spec.seed}/{study_index}"
        return {
            "PatientName": f"{prng.choice(LAST_NAMES)}^{prng.choice(FIRST_NAMES)}",
            "PatientID": f"MOCK-{spec.seed:04d}-{patient_index:04d}",
            "PatientBirthDate": birth.strftime("%Y%m%d"),
            "PatientSex": prng.choice(["F", "M"]),
            "PatientAge": f"{age_years:03d}Y",
            "PatientWeight": f"{prng.randrange(50, 110)}",
            "PatientSize": f"{prng.randrange(150, 200) / 100:.2f}",
            "StudyInstanceUID": dicom.uid_from(base + "/study"),
            "FrameOfReferenceUID": dicom.uid_from(base + "/for"),
            "StudyDate": study_day.strftime("%Y%m%d"),
            "StudyTime": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
            "AccessionNumber": f"ACC{spec.seed:03d}{study_index:05d}",
            "StudyID": f"{study_index + 1}",
            "StudyDescription": {"CT": "CT Thorax Abdomen", "MR": "MR Abdomen", "PT": "PET/CT Whole Body"}[
                spec.modality],
            "ReferringPhysicianName": f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
            "InstitutionName": "Kaapcli Mock Hospital",
        }

    def series_files(self, study_index: int, series_index: int, write_to: Path, slices: range) -> list[Path]:
        """Build and write some instances of one series; returns their paths relative to ``write_to``."""
        spec = self.spec
        study = self.study_context(study_index)
        base = f"kaapcli-mock/{spec.seed}/{study_index}/{series_index}/{spec.modality}"  # PET/CT: one study
        series_uid = dicom.uid_from(base + "/series")
        rel_dir = Path(study["PatientID"]) / study["StudyInstanceUID"] / series_uid
        written = []
        for i in slices:
            ds = self.instance(study, series_index, series_uid, i, base)
            rel = rel_dir / f"{ds.SOPInstanceUID}.dcm"
            dicom.save(ds, write_to / rel)
            written.append(rel)
        return written

    def instance(self, study: dict[str, Any], series_index: int, series_uid: str, i: int, base: str) -> Any:
        from pydicom.dataset import Dataset

        spec = self.spec
        sop_class = SOP_CLASSES[spec.modality]
        sop_uid = dicom.uid_from(f"{base}/instance/{i}")
        ds = Dataset()
        ds.file_meta = dicom.file_meta(sop_class, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        for key, value in study.items():
            if key != "FrameOfReferenceUID":
                setattr(ds, key, value)
        ds.Modality = spec.modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_index + 1
        ds.SeriesDescription = f"{spec.modality} mock series {series_index + 1}"
        ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study["StudyDate"]
        ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study["StudyTime"]
        ds.BodyPartExamined = BODY_PARTS[spec.modality]
        if spec.modality != "PT":  # PET says it with PatientOrientationCodeSequence instead
            ds.PatientPosition = "HFS"
        ds.Manufacturer = "kaapcli"
        ds.ManufacturerModelName = "mock"
        ds.DeviceSerialNumber = "0001"
        ds.SoftwareVersions = "0.1"
        ds.StationName = "MOCK01"
        ds.FrameOfReferenceUID = study["FrameOfReferenceUID"]
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # Geometry: patient z grows towards the head; slice 1 is the lowest.
        z = -spec.slice_thickness * (spec.slices - 1) / 2 + i * spec.slice_thickness
        half_w = spec.pixel_spacing * (spec.columns - 1) / 2
        half_h = spec.pixel_spacing * (spec.rows - 1) / 2
        ds.ImagePositionPatient = [f"{-half_w:.4f}", f"{-half_h:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
        ds.SliceThickness = spec.slice_thickness
        ds.SpacingBetweenSlices = spec.slice_thickness
        ds.SliceLocation = f"{z:.4f}"
        self._modality_module(ds, i)
        self._pixels(ds, i)
        return ds

    def _modality_module(self, ds: Any, i: int) -> None:
        from pydicom.dataset import Dataset

        m = self.spec.modality
        if m == "CT":
            ds.KVP = 120
            ds.ExposureTime = 500
            ds.XRayTubeCurrent = 200
            ds.ConvolutionKernel = "STANDARD"
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            ds.WindowCenter = 40
            ds.WindowWidth = 400
        elif m == "MR":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = 500
            ds.EchoTime = 15
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
            ds.ImagingFrequency = 63.9
            ds.ImagedNucleus = "1H"
            ds.FlipAngle = 90
            ds.WindowCenter = 600
            ds.WindowWidth = 1200
        else:  # PT
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.SeriesType = ["STATIC", "IMAGE"]
            ds.Units = "BQML"
            ds.CountsSource = "EMISSION"
            ds.DecayCorrection = "START"
            ds.CorrectedImage = ["DECY", "ATTN"]
            ds.RandomsCorrectionMethod = "DLYD"
            ds.AttenuationCorrectionMethod = "CT"
            ds.ReconstructionMethod = "OSEM"
            ds.DecayFactor = 1.0
            ds.FrameReferenceTime = 0
            ds.PrimaryPromptsCountsAccumulated = 0
            ds.ImageIndex = i + 1
            ds.NumberOfSlices = self.spec.slices
            ds.CollimatorType = "NONE"
            ds.PatientOrientationCodeSequence = []
            ds.PatientGantryRelationshipCodeSequence = []
            ds.ActualFrameDuration = 180000
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.LargestImagePixelValue = 0  # replaced in _pixels
            radio = Dataset()
            radio.Radiopharmaceutical = "Fluorodeoxyglucose"
            radio.RadionuclideHalfLife = 6586.2
            radio.RadionuclideTotalDose = 350000000
            radio.RadiopharmaceuticalStartTime = "070000"
            radio.RadionuclidePositronFraction = 0.97
            code = Dataset()
            code.CodeValue = "77004003"
            code.CodingSchemeDesignator = "SCT"
            code.CodeMeaning = "^18^Fluorine"
            radio.RadionuclideCodeSequence = [code]
            ds.RadiopharmaceuticalInformationSequence = [radio]
            ds.WindowCenter = 3000
            ds.WindowWidth = 6000

    def _pixels(self, ds: Any, i: int) -> None:
        spec = self.spec
        z_frac = i / max(1, spec.slices - 1)
        values = phantom_slice(z_frac, spec.rows, spec.columns, spec.modality)
        noise = np.random.default_rng(hash_seed(spec.seed, i)).normal(0, 8, values.shape).astype(np.float32)
        values = values + noise
        if spec.modality == "CT":
            stored = np.clip(np.rint(values + 1024), 0, 4095).astype(np.uint16)
            ds.BitsStored = 12
            ds.HighBit = 11
        else:
            stored = np.clip(np.rint(values), 0, 32767).astype(np.uint16)
            ds.BitsStored = 16
            ds.HighBit = 15
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.BitsAllocated = 16
        ds.PixelRepresentation = 0
        if spec.modality == "PT":
            ds.LargestImagePixelValue = int(stored.max())
            ds["LargestImagePixelValue"].VR = "US"
        ds.PixelData = stored.tobytes()


def hash_seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + i) & 0xFFFFFFFF
