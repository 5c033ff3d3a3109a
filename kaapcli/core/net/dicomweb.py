"""DICOMweb (PS3.18) over ``requests``: QIDO-RS queries, WADO-RS retrieval, STOW-RS in batched requests."""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kaapcli.core.batch import ItemResult
from kaapcli.core.net.dimse import Instance, RetrieveOutcome
from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.core.net.query import Query
from kaapcli.exitcodes import ExitCode, KaapcliError, NoInputError, UnavailableError, UsageError

DICOM_JSON = "application/dicom+json"
STOW_BATCH_FILES = 50
STOW_BATCH_BYTES = 64 * 1024 * 1024


def request(peer: Peer, method: str, url: str, timeouts: Timeouts, **kwargs: Any) -> Any:
    """One HTTP request; a dead, refusing or failing server is an UnavailableError naming it."""
    import requests

    headers = {**kwargs.pop("headers", {}), **peer.headers()}
    try:
        response = requests.request(method, url, auth=peer.auth(), headers=headers,
                                    timeout=(timeouts.connect, timeouts.network), **kwargs)
    except requests.Timeout as exc:
        raise UnavailableError(f"{peer}: no answer within the timeout ({type(exc).__name__})") from exc
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
        raise UnavailableError(f"{peer}: {reason}") from exc
    except requests.RequestException as exc:
        raise UnavailableError(f"{peer}: {type(exc).__name__}: {exc}") from exc
    if response.status_code in (401, 403):
        raise UnavailableError(f"{peer}: refused: HTTP {response.status_code} {response.reason}",
                               hint="check the bearer token (--token, or token/token_env of the [pacs] profile)"
                               if peer.token else "check username/password of the [pacs] profile, or give a "
                               "bearer token (--token)")
    if response.status_code >= 500:
        raise UnavailableError(f"{peer}: server error: HTTP {response.status_code} {_excerpt(response)}")
    return response


def _excerpt(response: Any) -> str:
    text = " ".join((response.text or "").split())
    return text[:200]


def echo(peer: Peer, timeouts: Timeouts) -> dict[str, Any]:
    """A QIDO-RS probe: the cheapest request every DICOMweb server answers."""
    import time

    start = time.perf_counter()
    response = request(peer, "GET", f"{peer.url}/studies", timeouts, params={"limit": "1"},
                       headers={"Accept": DICOM_JSON})
    ms = round((time.perf_counter() - start) * 1000, 1)
    return {"peer": peer.address, "ok": response.status_code in (200, 204), "ms": ms,
            "status": f"HTTP {response.status_code} {response.reason or ''}".rstrip()}


# --------------------------------------------------------------------------- QIDO-RS

def query(peer: Peer, q: Query, timeouts: Timeouts) -> Iterator[dict[str, Any]]:
    response = request(peer, "GET", f"{peer.url}/{q.qido_path()}?{q.qido_query()}", timeouts,
                       headers={"Accept": DICOM_JSON})
    if response.status_code == 204:
        return
    if response.status_code >= 400:
        raise KaapcliError(f"{peer}: QIDO-RS refused the query: HTTP {response.status_code} {_excerpt(response)}",
                           code=ExitCode.UNAVAILABLE)
    try:
        matches = response.json()
    except ValueError as exc:
        raise UnavailableError(f"{peer}: QIDO-RS answer is not DICOM JSON") from exc
    yield from matches[:q.limit] if q.limit else matches


# --------------------------------------------------------------------------- STOW-RS

def _batches(instances: list[Instance]) -> Iterator[list[Instance]]:
    batch: list[Instance] = []
    size = 0
    for inst in instances:
        if batch and (len(batch) >= STOW_BATCH_FILES or size + inst.nbytes > STOW_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(inst)
        size += inst.nbytes
    if batch:
        yield batch


def _multipart(instances: list[Instance], boundary: str) -> Iterator[bytes]:
    for inst in instances:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield inst.path.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((body.get(tag) or {}).get("Value") or [])


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def stow(instances: list[Instance], peer: Peer, timeouts: Timeouts,
         on_result: Callable[[ItemResult], None],
         acknowledged: Callable[[Instance, str], None] | None = None) -> list[ItemResult]:
    """STOW-RS in multipart/related batches; each file's fate read from the response (PS3.18 10.5.3): in the
    ReferencedSOPSequence it is stored (with a warning when it has a WarningReason), in the FailedSOPSequence it
    failed with its FailureReason — whatever the HTTP status (200, 202, 409 and 400 all carry them). A batch
    refused whole without saying which file is to blame is split and sent again, down to single files, so one
    bad file fails alone."""
    results: list[ItemResult] = []

    def emit(result: ItemResult) -> None:
        results.append(result)
        on_result(result)

    pending = deque(_batches(instances))
    while pending:
        batch = pending.popleft()
        boundary = os.urandom(16).hex()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": DICOM_JSON}
        response = request(peer, "POST", f"{peer.url}/studies", timeouts, data=b"".join(_multipart(batch, boundary)),
                           headers=headers)
        stored, failed = _fates(response)
        if response.status_code >= 400 and not stored and not failed and len(batch) > 1:
            half = len(batch) // 2
            pending.extendleft([batch[half:], batch[:half]])
            continue
        for inst in batch:
            emit(_fate(inst, response, stored, failed, acknowledged))
    return results


def _fates(response: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """SOP Instance UID -> item of the response's ReferencedSOPSequence and FailedSOPSequence."""
    try:
        body = response.json() if response.content else {}
    except ValueError:
        body = {}
    if isinstance(body, list):
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return {}, {}
    stored = {str(_value(i, "00081155")): i for i in _sequence(body, "00081199")}
    failed = {str(_value(i, "00081155")): i for i in _sequence(body, "00081198")}
    return stored, failed


def _fate(inst: Instance, response: Any, stored: dict[str, dict[str, Any]], failed: dict[str, dict[str, Any]],
          acknowledged: Callable[[Instance, str], None] | None) -> ItemResult:
    from kaapcli.core.net.dimse import describe_status

    http = f"HTTP {response.status_code}"
    if inst.sop_instance in stored and inst.sop_instance not in failed:
        reason = _value(stored[inst.sop_instance], "00081196")  # WarningReason
        warnings = [f"STOW-RS warning: {describe_status(int(reason))[1]}"] if reason else []
        if acknowledged is not None:
            acknowledged(inst, "warning" if warnings else "ok")
        return ItemResult(str(inst.path), "ok", nbytes=inst.nbytes, warnings=warnings)
    if inst.sop_instance in failed:
        reason = _value(failed[inst.sop_instance], "00081197")  # FailureReason
        why = f"failure reason {describe_status(int(reason))[1]}" if reason is not None else "in the failed list"
    elif response.status_code >= 400:
        why = f"refused: {_excerpt(response) or 'no reason given'}"
    else:
        why = "not in the response's stored list"
    return ItemResult(str(inst.path), "failed", code=int(ExitCode.ITEMS_FAILED),
                      message=f"{inst.path}: STOW-RS failed ({http}): {why}")


# --------------------------------------------------------------------------- WADO-RS

def _study_of(peer: Peer, uids: dict[str, str], timeouts: Timeouts) -> str:
    if "StudyInstanceUID" in uids:
        return uids["StudyInstanceUID"]
    for match in query(peer, Query("series", {"SeriesInstanceUID": uids.get("SeriesInstanceUID", "")}), timeouts):
        study = _value(match, "0020000D")
        if study:
            return str(study)
    raise NoInputError(f"{peer}: no series {uids.get('SeriesInstanceUID')} found")


def _parts(response: Any) -> Iterator[bytes]:
    """The bodies of a multipart/related response, streamed part by part."""
    ctype = response.headers.get("Content-Type", "")
    boundary = ""
    for param in ctype.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise UnavailableError(f"WADO-RS answer is not multipart/related: {ctype or 'no Content-Type'}")
    delimiter = b"\r\n--" + boundary.encode()
    buffer = b"\r\n"
    for chunk in response.iter_content(1 << 20):
        buffer += chunk
        while True:
            start = buffer.find(delimiter)
            end = buffer.find(delimiter, start + len(delimiter)) if start >= 0 else -1
            if end < 0:
                break
            part = buffer[start + len(delimiter):end]
            buffer = buffer[end:]
            head, sep, body = part.partition(b"\r\n\r\n")
            if sep:
                yield body
    # whatever follows the last delimiter is "--" (the close delimiter): nothing left to yield


def retrieve(peer: Peer, uids: dict[str, str], writer: Any, timeouts: Timeouts,
             on_stored: Callable[[Path], None] | None = None) -> RetrieveOutcome:
    """WADO-RS of a study, series or instance into ``writer`` (a StoreWriter)."""
    study = _study_of(peer, uids, timeouts)
    url = f"{peer.url}/studies/{study}"
    if "SeriesInstanceUID" in uids:
        url += f"/series/{uids['SeriesInstanceUID']}"
        if "SOPInstanceUID" in uids:
            url += f"/instances/{uids['SOPInstanceUID']}"
    outcome = RetrieveOutcome(request=" ".join(f"{k}={v}" for k, v in uids.items()))
    response = request(peer, "GET", url, timeouts, stream=True,
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    if response.status_code == 404:
        raise NoInputError(f"{peer}: nothing found at {url}")
    if response.status_code >= 400:
        raise UnavailableError(f"{peer}: WADO-RS refused: HTTP {response.status_code} {_excerpt(response)}")
    for body in _parts(response):
        try:
            dest, _ = writer.write(body)
        except KaapcliError as exc:
            outcome.failed += 1
            outcome.message = exc.message
            continue
        outcome.completed += 1
        outcome.files.append(dest)
        if on_stored is not None:
            on_stored(dest)
    outcome.status = f"HTTP {response.status_code}"
    if not outcome.files and not outcome.failed:
        outcome.message = "WADO-RS returned no instances"
    return outcome


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UsageError(f"--from-query line {n}: not JSON ({exc.msg})") from exc
    return records
