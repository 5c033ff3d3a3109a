"""Deleting a study or series on a PACS through its REST API (there is no DIMSE delete).

* Orthanc: ``POST /tools/lookup`` finds the Orthanc ID of the UID, then ``DELETE /studies|series/{id}``.
* dcm4chee-arc: reject for quality reasons (``113001^DCM``, as Kaapana does) with
  ``POST {rs}/studies/{uid}[/series/{uid}]/reject/113001^DCM``; a rejected study is then removed with
  ``DELETE {rs}/studies/{uid}``. A rejected series is hidden at once and purged by the archive's
  rejection policy (its REST API has no per-series delete).

The PEER is the DICOMweb root (``.../dcm4chee-arc/aets/AET/rs``, Orthanc's ``.../dicom-web``) or, for
Orthanc, its REST root; the profile key ``rest`` overrides the derived REST root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kaapcli.core.net import dicomweb
from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.core.net.query import Query
from kaapcli.exitcodes import ExitCode, KaapcliError, NoInputError, UsageError

REJECT_CODE = "113001%5EDCM"  # Rejected for Quality Reasons (CID 7011)


def _check(peer: Peer, response: Any, what: str) -> None:
    if response.status_code == 404:
        raise NoInputError(f"{peer}: {what}: not found")
    if response.status_code >= 400:
        raise KaapcliError(f"{peer}: {what} refused: HTTP {response.status_code} {dicomweb._excerpt(response)}",
                           code=ExitCode.UNAVAILABLE)


def orthanc_root(peer: Peer) -> str:
    if peer.rest:
        return peer.rest
    url = peer.url
    return url[:-len("/dicom-web")] if url.endswith("/dicom-web") else url


def delete_orthanc(peer: Peer, uid: str, level: str, timeouts: Timeouts) -> list[str]:
    root = orthanc_root(peer)
    response = dicomweb.request(peer, "POST", f"{root}/tools/lookup", timeouts, data=uid)
    _check(peer, response, f"lookup of {uid}")
    matches = [m for m in response.json() if str(m.get("Type", "")).lower() == level]
    if not matches:
        raise NoInputError(f"{peer}: no {level} {uid}")
    deleted = []
    for match in matches:
        path = str(match.get("Path") or f"/{level}s/{match['ID']}")
        _check(peer, dicomweb.request(peer, "DELETE", f"{root}{path}", timeouts), f"delete of {level} {uid}")
        deleted.append(f"{root}{path}")
    return deleted


def delete_dcm4chee(peer: Peer, study: str | None, series: str | None, timeouts: Timeouts) -> list[str]:
    rs = peer.rest or peer.url
    if series and not study:
        matches = list(dicomweb.query(peer, Query("series", {"SeriesInstanceUID": series}), timeouts))
        if not matches:
            raise NoInputError(f"{peer}: no series {series}")
        study = str(dicomweb._value(matches[0], "0020000D"))
    target = f"{rs}/studies/{study}" + (f"/series/{series}" if series else "")
    _check(peer, dicomweb.request(peer, "POST", f"{target}/reject/{REJECT_CODE}", timeouts),
           f"rejection of {'series ' + series if series else 'study ' + str(study)}")
    done = [f"rejected {target}"]
    if not series:
        _check(peer, dicomweb.request(peer, "DELETE", target, timeouts), f"delete of study {study}")
        done.append(f"deleted {target}")
    return done


def delete(peer: Peer, *, study: str | None, series: str | None, kind: str, timeouts: Timeouts) -> list[str]:
    """Delete one study or series; returns what was done, one line each."""
    if not peer.url and not peer.rest:
        raise UsageError(f"{peer}: delete needs an http(s) peer (DICOMweb or REST root)")
    if kind == "orthanc":
        return delete_orthanc(peer, series or str(study), "series" if series else "study", timeouts)
    if kind == "dcm4chee":
        return delete_dcm4chee(peer, study, series, timeouts)
    raise UsageError(f"{peer}: unknown server type", hint="pass --server-type orthanc|dcm4chee, "
                     "or set kind = \"orthanc\" in the [pacs] profile")


@dataclass
class Deletion:
    """What became of one named study or series: the lines of what was done, or the error."""

    level: str
    uid: str
    done: list[str] = field(default_factory=list)
    error: KaapcliError | None = None


def delete_all(peer: Peer, targets: list[tuple[str, str]], *, kind: str, timeouts: Timeouts) -> list[Deletion]:
    """Delete every (level, uid) of ``targets``; one that is missing or refused is reported and the rest go on.
    An unreachable server ends the whole run (UnavailableError), as nothing else could be deleted either."""
    from kaapcli.exitcodes import UnavailableError

    outcomes = []
    for level, uid in targets:
        outcome = Deletion(level, uid)
        try:
            outcome.done = delete(peer, study=uid if level == "study" else None,
                                  series=uid if level == "series" else None, kind=kind, timeouts=timeouts)
        except UnavailableError:
            raise
        except (NoInputError, KaapcliError) as exc:
            if isinstance(exc, UsageError):
                raise
            outcome.error = exc
        outcomes.append(outcome)
    return outcomes
