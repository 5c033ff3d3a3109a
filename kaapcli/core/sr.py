"""``json2sr``: measurements per segment as a TID 1500 Measurement Report (Comprehensive 3D SR).

Inputs are the JSON of ``kaapcli radiomics`` (``{mask_name: {label_name: {feature_name: value}}}``)
or the dcmqi ``tid1500writer`` document Kaapana's Json2DcmSR operator builds
(``{"Measurements": [{"ReferencedSegment": n, "measurementItems": [...]}]}``).  Each (mask, label)
becomes one TID 1411 Volumetric ROI measurement group that references its SEG segment and the
source series.  Feature names map to standard codes where DICOM has one (see :data:`STANDARD`: the
IBSI-coded concepts of CID 7469 for morphology, so mesh volume RNU0 and voxel-count volume YEKZ stay
apart); other features get a code of the private scheme ``99KAAPCLI`` whose meaning is the feature name.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError, NoInputError

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PRIVATE_SCHEME = "99KAAPCLI"
SERIES_NUMBER = 950

# (CodeValue, CodingSchemeDesignator, CodeMeaning)
CodeTuple = tuple[str, str, str]
VOLUME: CodeTuple = ("118565006", "SCT", "Volume")  # how it was measured unknown
# IBSI-coded morphology features of CID 7469 "Generic Intensity and Size Measurements" (scheme IBSI, PS3.16)
MESH_VOLUME: CodeTuple = ("RNU0", "IBSI", "Volume of Mesh")
VOXEL_VOLUME: CodeTuple = ("YEKZ", "IBSI", "Volume from Voxel Summation")
MESH_AREA: CodeTuple = ("C0JK", "IBSI", "Surface Area of Mesh")
AREA: CodeTuple = ("42798000", "SCT", "Area")
MAJOR_AXIS: CodeTuple = ("131187009", "SCT", "Major Axis")
MINOR_AXIS: CodeTuple = ("131188004", "SCT", "Minor Axis")
DIAMETER: CodeTuple = ("81827009", "SCT", "Diameter")
ATTENUATION: CodeTuple = ("112031", "DCM", "Attenuation Coefficient")  # CT intensity (TID 1419 with a derivation)
INTENSITY: CodeTuple = ("INTENSITY", PRIVATE_SCHEME, "Image intensity")  # MR/PT/...: no standard concept
MM3: CodeTuple = ("mm3", "UCUM", "cubic millimeter")
MM2: CodeTuple = ("mm2", "UCUM", "square millimeter")
MM: CodeTuple = ("mm", "UCUM", "millimeter")
HU: CodeTuple = ("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS: CodeTuple = ("1", "UCUM", "no units")
PER_MM: CodeTuple = ("/mm", "UCUM", "per millimeter")
UNKNOWN_UNIT: CodeTuple = ("{unit}", "UCUM", "unit")

# Derivations of CID 7464 "General Region of Interest Measurement Modifiers".
DERIVATIONS: dict[str, CodeTuple] = {
    "mean": ("373098007", "SCT", "Mean"),
    "median": ("373099004", "SCT", "Median"),
    "minimum": ("255605001", "SCT", "Minimum"),
    "maximum": ("56851009", "SCT", "Maximum"),
    "standarddeviation": ("386136009", "SCT", "Standard Deviation"),
    "mode": ("373100007", "SCT", "Mode"),
    "skewness": ("126051", "DCM", "Skewness"),
    "kurtosis": ("126052", "DCM", "Kurtosis"),
    "variance": ("C1711260", "UMLS", "Variance"),
    "rootmeansquare": ("C2347976", "UMLS", "Root Mean Square"),
}
UNITLESS_DERIVATIONS = {"skewness", "kurtosis"}

# Shape features: normalized name -> (concept, unit, derivation or None).
# Names as kaapcli radiomics (IBSI's), pyradiomics (original_shape_*) and plain words write them.
STANDARD: dict[str, tuple[CodeTuple, CodeTuple, CodeTuple | None]] = {
    "volume": (VOLUME, MM3, None),
    **dict.fromkeys(("volumemesh", "meshvolume"), (MESH_VOLUME, MM3, None)),
    **dict.fromkeys(("volumevoxelcounting", "voxelvolume", "approximatevolume"), (VOXEL_VOLUME, MM3, None)),
    "surfacearea": (AREA, MM2, None),
    "surfaceareamesh": (MESH_AREA, MM2, None),
    **dict.fromkeys(("surfacetovolumeratio", "surfacevolumeratio"), (("2PR5", "IBSI", "Surface to Volume Ratio"),
                                                                    PER_MM, None)),
    "compactness2": (("BQWJ", "IBSI", "Compactness 2"), NO_UNITS, None),
    "sphericaldisproportion": (("KRCK", "IBSI", "Spherical Disproportion"), NO_UNITS, None),
    "sphericity": (("QCFX", "IBSI", "Sphericity"), NO_UNITS, None),
    "asphericity": (("25C7", "IBSI", "Asphericity"), NO_UNITS, None),
    "elongation": (("Q3CK", "IBSI", "Elongation"), NO_UNITS, None),
    "flatness": (("N17B", "IBSI", "Flatness"), NO_UNITS, None),
    "maximum3ddiameter": (("L0JK", "IBSI", "Maximum 3D Diameter of a Mesh"), MM, None),
    "maximumdiameter": (DIAMETER, MM, DERIVATIONS["maximum"]),
    "majoraxislength": (("TDIC", "IBSI", "Major Axis in 3D Length"), MM, None),
    "minoraxislength": (("P9VJ", "IBSI", "Minor Axis in 3D Length"), MM, None),
    "leastaxislength": (("7J51", "IBSI", "Least Axis in 3D Length"), MM, None),
    "majoraxis": (MAJOR_AXIS, MM, None),
    "minoraxis": (MINOR_AXIS, MM, None),
}
_PREFIX = re.compile(r"^(original|wavelet[-_a-z]*|log[-_.a-z0-9]*)_(shape|firstorder|shape2d)_", re.I)


def normalize(feature: str) -> str:
    """``"Volume (mesh)"``, ``"original_shape_MeshVolume"`` → ``volumemesh`` / ``meshvolume``."""
    return re.sub(r"[^a-z0-9]", "", _PREFIX.sub("", feature).lower())


def private_code(feature: str) -> CodeTuple:
    """A stable private code for a feature DICOM has no code for (CodeValue is SH: 16 characters)."""
    return ("K" + hashlib.sha1(feature.encode()).hexdigest()[:12].upper(), PRIVATE_SCHEME, feature[:64])


def feature_concept(feature: str, modality: str) -> tuple[CodeTuple, CodeTuple, CodeTuple | None]:
    """Concept name, UCUM unit and derivation of one feature."""
    key = normalize(feature)
    if key in STANDARD:
        return STANDARD[key]
    if key in DERIVATIONS:
        concept = ATTENUATION if modality == "CT" else INTENSITY
        if key in UNITLESS_DERIVATIONS:
            unit = NO_UNITS
        elif modality == "CT" and key != "variance":
            unit = HU
        else:
            unit = UNKNOWN_UNIT
        return concept, unit, DERIVATIONS[key]
    return private_code(feature), UNKNOWN_UNIT, None


# --------------------------------------------------------------------------- inputs

@dataclass
class MeasurementSpec:
    name: CodeTuple
    value: float
    unit: CodeTuple
    derivation: CodeTuple | None = None


@dataclass
class Group:
    """The measurements of one segment, before the segment is looked up."""

    source: str  # file (and mask/label) it came from, for messages
    mask: str
    label: str
    segment_number: int | None = None
    seg_uid: str | None = None
    items: list[MeasurementSpec] = field(default_factory=list)


def _code(obj: Any, what: str, source: str) -> CodeTuple:
    try:
        return (str(obj["CodeValue"]), str(obj["CodingSchemeDesignator"]), str(obj["CodeMeaning"]))
    except (TypeError, KeyError):
        raise DataError(f"{source}: {what} needs CodeValue, CodingSchemeDesignator and CodeMeaning") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: bad JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def parse_measurements(doc: Any, source: str, modality: str, warnings: list[str]) -> list[Group]:
    """Groups of one JSON document, in either accepted shape (``source`` prefixes messages)."""
    if isinstance(doc, dict) and isinstance(doc.get("Measurements"), list):
        return _parse_dcmqi(doc["Measurements"], source, warnings)
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise DataError(f"{source}expected {{mask: {{label: {{feature: value}}}}}} or a dcmqi "
                        "document with \"Measurements\"")
    groups = []
    for mask, labels in doc.items():
        for label, features in labels.items():
            if not isinstance(features, dict):
                raise DataError(f"{source}: {mask}/{label}: expected {{feature: value}}")
            group = Group(f"{source}{mask}/{label}", str(mask), str(label))
            for feature, raw in features.items():
                value = _number(raw)
                if value is None:
                    warnings.append(f"{group.source}: feature {feature!r} is not a finite number; left out")
                    continue
                name, unit, derivation = feature_concept(str(feature), modality)
                group.items.append(MeasurementSpec(name, value, unit, derivation))
            groups.append(group)
    return groups


def _parse_dcmqi(measurements: list[Any], source: str, warnings: list[str]) -> list[Group]:
    groups = []
    for i, entry in enumerate(measurements, 1):
        where = f"{source}Measurements[{i}]"
        if not isinstance(entry, dict) or "ReferencedSegment" not in entry:
            raise DataError(f"{where}: needs ReferencedSegment")
        try:
            number = int(entry["ReferencedSegment"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: ReferencedSegment must be a segment number") from None
        label = str(entry.get("TrackingIdentifier") or f"segment {number}")
        group = Group(where, "", label, number, entry.get("segmentationSOPInstanceUID"))
        for item in entry.get("measurementItems", []):
            value = _number(item.get("value")) if isinstance(item, dict) else None
            if value is None:
                warnings.append(f"{where}: a measurement item without a finite value; left out")
                continue
            derivation = item.get("derivationModifier")
            group.items.append(MeasurementSpec(
                _code(item.get("quantity"), "quantity", where), value,
                _code(item.get("units"), "units", where) if item.get("units") else UNKNOWN_UNIT,
                _code(derivation, "derivationModifier", where) if derivation else None))
        groups.append(group)
    return groups


def _dicom_headers(root: Path) -> list[tuple[Path, Any]]:
    if not root.exists():
        raise NoInputError(f"{root}: no such file or directory")
    files = [root] if root.is_file() else list(fsio.walk_files(root))
    return [(f, dicom.read(f, stop_before_pixels=True)) for f in files if fsio.is_dicom(f)]


@dataclass
class Segment:
    seg: Any  # the SEG header dataset
    path: Path
    number: int
    label: str
    property_type: CodeTuple | None


def _segments(seg_headers: list[tuple[Path, Any]]) -> list[Segment]:
    segments = []
    for path, ds in seg_headers:
        for item in ds.get("SegmentSequence", []):
            ptype = item.get("SegmentedPropertyTypeCodeSequence")
            code = (str(ptype[0].CodeValue), str(ptype[0].CodingSchemeDesignator),
                    str(ptype[0].CodeMeaning)) if ptype else None
            segments.append(Segment(ds, path, int(item.SegmentNumber), str(item.get("SegmentLabel", "")), code))
    return segments


def match_segment(group: Group, segments: list[Segment]) -> Segment:
    """The SEG segment a group measures: by segment number (dcmqi) or by label (radiomics)."""
    if group.segment_number is not None:
        candidates = [s for s in segments if s.number == group.segment_number
                      and (not group.seg_uid or s.seg.SOPInstanceUID == group.seg_uid)]
    else:
        candidates = [s for s in segments if s.label.casefold() == group.label.casefold()]
        if not candidates and group.label.isdigit():
            candidates = [s for s in segments if s.number == int(group.label)]
        if len(candidates) > 1:  # the mask name may name the SEG file or series
            by_mask = [s for s in candidates if group.mask in (s.path.stem, str(s.seg.get("SeriesDescription", "")))]
            candidates = by_mask or candidates
    if len({(s.seg.SOPInstanceUID, s.number) for s in candidates}) != 1:
        known = ", ".join(sorted({f"{s.number}:{s.label}" for s in segments})) or "none"
        what = "matches several segments" if candidates else "matches no segment"
        raise DataError(f"{group.source} {what} of the SEG (segments: {known})",
                        hint="label names must equal SegmentLabel (or be the segment number)")
    return candidates[0]


# --------------------------------------------------------------------------- the report

def _concept(code: CodeTuple) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[0], scheme_designator=code[1], meaning=code[2])


class MeasurementsToSR(BaseOperator):
    """One Comprehensive 3D SR (TID 1500) from measurement JSON, SEG and source series (a single item)."""

    name = "json2sr"
    grouped = True

    def __init__(self, measurements: Path, seg: Path, reference: Path, title: str = "Imaging Measurement Report"):
        self.measurements = measurements
        self.seg = seg
        self.reference = reference
        self.title = title

    def options(self) -> dict[str, Any]:
        return {"measurements": str(self.measurements), "seg": str(self.seg), "reference": str(self.reference)}

    def json_files(self) -> list[Path]:
        if self.measurements.is_file():
            return [self.measurements]
        return [p for p in fsio.walk_files(self.measurements) if p.suffix.lower() == ".json"]

    def source_prefix(self, path: Path) -> str:
        """Messages already start with the MEASUREMENTS argument: name files only below a directory."""
        return "" if path == self.measurements else f"{path.relative_to(self.measurements)}: "

    def items(self) -> list[Item]:
        for root in (self.measurements, self.seg, self.reference):
            if not root.exists():
                raise NoInputError(f"{root}: no such file or directory")
        inputs = [*self.json_files(), *(p for r in (self.seg, self.reference)
                                        for p in ([r] if r.is_file() else fsio.walk_files(r)))]
        return [Item(str(self.measurements), tuple(inputs))]

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        warnings: list[str] = []
        references = _dicom_headers(self.reference)
        if not references:
            raise DataError(f"{self.reference}: no DICOM files in the reference series")
        series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in references}
        if len(series) != 1:
            raise DataError(f"{self.reference}: holds {len(series)} series; give the directory of one series")
        source_series = series.pop()
        modality = str(references[0][1].get("Modality", ""))
        segs = [(p, ds) for p, ds in _dicom_headers(self.seg) if str(ds.get("SOPClassUID", "")) == SEG_STORAGE]
        if not segs:
            raise DataError(f"{self.seg}: no DICOM SEG found")
        for path, ds in segs:
            refs = {str(r.get("SeriesInstanceUID", "")) for r in ds.get("ReferencedSeriesSequence", [])}
            if refs and source_series not in refs:
                warnings.append(f"{path}: the SEG references series {', '.join(sorted(refs))}, not the "
                                f"reference series {source_series}")
        files = self.json_files()
        if not files:
            raise DataError(f"{self.measurements}: no JSON files")
        groups = [g for f in files for g in parse_measurements(load_json(f), self.source_prefix(f), modality, warnings)]
        if not groups:
            raise DataError(f"{self.measurements}: no measurements")
        segments = _segments(segs)
        matched = [(g, match_segment(g, segments)) for g in groups]
        ds = self.build(matched, [d for _, d in segs], [d for _, d in references], source_series)
        dest = ctx.out / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        dicom.save(ds, dest)
        return Outcome(outputs=[dest], warnings=warnings)

    def build(self, matched: list[tuple[Group, Segment]], segs: list[Any], references: list[Any],
              source_series: str) -> Any:
        try:
            return self._build(matched, segs, references, source_series)
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom rejects what DICOM would not allow
            raise DataError(f"cannot build the SR: {exc}") from exc

    def _build(self, matched: list[tuple[Group, Segment]], segs: list[Any], references: list[Any],
               source_series: str) -> Any:
        import highdicom.sr as hsr
        from pydicom.sr.codedict import codes

        # UIDs from the content: the same inputs give the same SR series and instance.
        seed = "json2sr/" + hashlib.sha256(json.dumps(
            [[g.mask, g.label, s.seg.SOPInstanceUID, s.number, [(m.name, m.value, m.unit, m.derivation)
                                                                 for m in g.items]] for g, s in matched]
            + [source_series, self.title], default=str).encode()).hexdigest()
        groups = []
        for i, (group, segment) in enumerate(matched, 1):
            reference = hsr.ReferencedSegment(
                sop_class_uid=SEG_STORAGE, sop_instance_uid=segment.seg.SOPInstanceUID,
                segment_number=segment.number, source_series=hsr.SourceSeriesForSegmentation(source_series))
            measurements = [hsr.Measurement(name=_concept(m.name), value=m.value, unit=_concept(m.unit),
                                            derivation=_concept(m.derivation) if m.derivation else None)
                            for m in group.items]
            identifier = "/".join(p for p in (group.mask, group.label) if p)[:64]
            groups.append(hsr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hsr.TrackingIdentifier(uid=dicom.uid_from(f"{seed}/group/{i}"),
                                                           identifier=identifier),
                referenced_segment=reference,
                finding_type=_concept(segment.property_type) if segment.property_type else None,
                measurements=measurements))
        observer = hsr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hsr.DeviceObserverIdentifyingAttributes(
                uid=dicom.uid_from("kaapcli/json2sr/device"), name="kaapcli json2sr", manufacturer_name="kaapcli"))
        report = hsr.MeasurementReport(
            observation_context=hsr.ObservationContext(observer_device_context=observer),
            procedure_reported=_concept(("363679005", "SCT", "Imaging procedure")),
            imaging_measurements=groups)
        return hsr.Comprehensive3DSR(
            evidence=[*segs, *references], content=report, series_instance_uid=dicom.uid_from(seed + "/series"),
            series_number=SERIES_NUMBER, sop_instance_uid=dicom.uid_from(seed + "/instance"),
            instance_number=1, manufacturer="kaapcli", is_complete=True, series_description=self.title)
