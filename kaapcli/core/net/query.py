"""What a query asks: level, matching keys, return keys — one meaning for C-FIND and QIDO-RS."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kaapcli.exitcodes import UsageError

LEVELS = ("patient", "study", "series", "instance")
# The keys returned at each level unless asked otherwise (the unique key of the level comes first).
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "patient": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    "study": ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "StudyDescription",
              "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"),
    "series": ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"),
    "instance": ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber"),
}
# Modality Worklist (PS3.4 K.6.1.2.2): keys of the request/patient level, and those that live inside the
# Scheduled Procedure Step Sequence item (a -k of these is matched there).
WORKLIST_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
                 "RequestedProcedureID", "RequestedProcedureDescription", "ReferringPhysicianName")
WORKLIST_STEP_KEYS = ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                      "ScheduledProcedureStepStartTime", "ScheduledPerformingPhysicianName",
                      "ScheduledProcedureStepDescription", "ScheduledProcedureStepID", "ScheduledStationName",
                      "ScheduledProcedureStepLocation", "ScheduledProcedureStepStatus")
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


def keyword_of(name: str) -> str:
    """A DICOM keyword from a keyword or a tag (``00100020``, ``0010,0020``); UsageError when unknown."""
    from pydicom.datadict import keyword_for_tag, tag_for_keyword

    name = name.strip()
    match = _TAG.match(name)
    if match:
        keyword = keyword_for_tag(int(match[1] + match[2], 16))
        if keyword:
            return str(keyword)
    elif tag_for_keyword(name) is not None:
        return name
    raise UsageError(f"{name!r}: not a DICOM keyword or tag", hint="e.g. -k PatientID=LUNG1-001 -r StudyDescription")


@dataclass
class Query:
    level: str = "study"
    keys: dict[str, str] = field(default_factory=dict)
    returns: list[str] = field(default_factory=list)
    limit: int | None = None

    @classmethod
    def parse(cls, level: str, keys: list[str], returns: list[str], limit: int | None = None) -> Query:
        if level not in (*LEVELS, "worklist"):
            raise UsageError(f"--level {level!r}: one of {', '.join(LEVELS)}")
        parsed: dict[str, str] = {}
        for item in keys:
            name, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"-k {item!r}: expected Keyword=value (value may be empty)")
            parsed[keyword_of(name)] = value
        return cls(level, parsed, [keyword_of(r) for r in returns], limit)

    def identifier(self) -> Any:
        """The C-FIND/C-GET/C-MOVE identifier (PS3.4 C.4): level, return keys empty, matching keys set."""
        from pydicom.dataset import Dataset

        if self.level == "worklist":
            return self.worklist_identifier()
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if self.level == "instance" else self.level.upper()
        for keyword in (*RETURN_KEYS[self.level], *self.returns):
            setattr(ds, keyword, None)
        for keyword, value in self.keys.items():
            setattr(ds, keyword, value or None)
        return ds

    def worklist_identifier(self) -> Any:
        """The Modality Worklist C-FIND identifier (PS3.4 K.6.1.2.2): no QueryRetrieveLevel; the Scheduled
        Procedure Step keys (Modality, ScheduledStationAETitle, ScheduledProcedureStepStartDate, ...) inside one
        item of the ScheduledProcedureStepSequence, the others at the top level."""
        from pydicom.dataset import Dataset

        ds, step = Dataset(), Dataset()
        for keyword in (*WORKLIST_KEYS, *WORKLIST_STEP_KEYS, *self.returns):
            setattr(step if keyword in WORKLIST_STEP_KEYS else ds, keyword, None)
        for keyword, value in self.keys.items():
            setattr(step if keyword in WORKLIST_STEP_KEYS else ds, keyword, value or None)
        ds.ScheduledProcedureStepSequence = [step]
        return ds

    def retrieve_identifier(self) -> Any:
        """The C-GET/C-MOVE identifier: the level and its unique keys only (PS3.4 C.4.2.2.1, C.4.3.2.1);
        return keys there make some SCPs (Orthanc at the study level) look up the wrong resource."""
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if self.level == "instance" else self.level.upper()
        for keyword, value in self.keys.items():
            setattr(ds, keyword, value)
        return ds

    def qido_path(self) -> str:
        if self.level == "worklist":
            raise UsageError("--worklist: a Modality Worklist is queried over DIMSE (C-FIND); DICOMweb has none",
                             hint="give the worklist SCP as AET@host:port")
        if self.level == "patient":
            raise UsageError("--level patient: QIDO-RS has no patient level",
                             hint="query studies with -k PatientID=...")
        return {"study": "studies", "series": "series", "instance": "instances"}[self.level]

    def qido_params(self) -> list[tuple[str, str]]:
        params = [(k, v) for k, v in self.keys.items()]
        params += [("includefield", r) for r in (*RETURN_KEYS[self.level], *self.returns)
                   if r not in self.keys]
        if self.limit:
            params.append(("limit", str(self.limit)))
        return params

    def qido_query(self) -> str:
        """The QIDO-RS query string: wildcards ``*`` and ``?`` stay literal (PS3.18 8.3.4.6; they are legal in a
        URI query, and Orthanc matches nothing for their percent-encoded forms); everything else is encoded."""
        from urllib.parse import quote

        return "&".join(f"{quote(k, safe='')}={quote(v, safe='*?,')}" for k, v in self.qido_params())


def uids_of(record: dict[str, Any]) -> dict[str, str]:
    """Study/Series/SOP Instance UIDs of a DICOM JSON record (a line of ``kaapcli query``)."""
    found = {}
    for keyword, tag in (("StudyInstanceUID", "0020000D"), ("SeriesInstanceUID", "0020000E"),
                         ("SOPInstanceUID", "00080018")):
        element = record.get(tag) or {}
        values = element.get("Value") or []
        if values and values[0]:
            found[keyword] = str(values[0])
    return found


def retrieve_query(uids: dict[str, str]) -> Query:
    """The retrieve request for the most specific UID given (instance > series > study)."""
    if "SOPInstanceUID" in uids:
        level = "instance"
    elif "SeriesInstanceUID" in uids:
        level = "series"
    elif "StudyInstanceUID" in uids:
        level = "study"
    else:
        raise UsageError("nothing to retrieve: need StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
    order = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    keys = {k: uids[k] for k in order[:order.index(RETURN_KEYS[level][0]) + 1] if k in uids}
    return Query(level, keys)


def referenced_series(ds: Any) -> list[dict[str, str]]:
    """The series a SEG or RTSTRUCT refers to (Kaapana's GetRefSeries), as retrieve UIDs."""
    found: list[dict[str, str]] = []
    study = str(ds.get("StudyInstanceUID", "") or "")
    for item in ds.get("ReferencedSeriesSequence", None) or []:  # SEG and most derived objects
        if item.get("SeriesInstanceUID"):
            found.append({"StudyInstanceUID": study, "SeriesInstanceUID": str(item.SeriesInstanceUID)})
    for frame in ds.get("ReferencedFrameOfReferenceSequence", None) or []:  # RTSTRUCT
        for ref_study in frame.get("RTReferencedStudySequence", None) or []:
            study_uid = str(ref_study.get("ReferencedSOPInstanceUID", "") or study)
            for ref_series in ref_study.get("RTReferencedSeriesSequence", None) or []:
                series_uid = str(ref_series.get("SeriesInstanceUID", "") or "")
                if series_uid:
                    found.append({"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid})
    unique = {f["SeriesInstanceUID"]: f for f in found}
    return [{k: v for k, v in f.items() if v} for f in unique.values()]
