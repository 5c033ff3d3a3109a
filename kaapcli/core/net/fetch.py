"""Retrieving from one peer: C-GET, C-MOVE into a built-in receiver, or WADO-RS for DICOMweb peers; and
what to retrieve from where for series the index knows (``retrieve --from-query`` with search records,
``retrieve --dataset``).

Shared by ``kaapcli retrieve`` and ``kaapcli collect``.  A source recorded in the index is used only when it
is a configured peer: index documents and file meta are data, and data never picks a host to connect to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.core.net.scp import DEFAULT_LAYOUT


class Fetcher:
    """A context manager: ``fetch(uids)`` per request; the C-MOVE receiver lives as long as the fetcher."""

    def __init__(self, peer: Peer, out: Path, *, method: str = "get", calling_aet: str = "KAAPCLI",
                 timeouts: Timeouts | None = None, layout: str = DEFAULT_LAYOUT, move_aet: str | None = None,
                 bind: str = "127.0.0.1", port: int = 11112, on_stored: Callable[[Path], None] | None = None,
                 destination: str | None = None, allow_aets: list[str] | None = None,
                 allow_hosts: list[str] | None = None):
        from kaapcli.core.net.scp import Receiver, StoreWriter

        self.peer, self.method, self.calling_aet = peer, method, calling_aet
        self.timeouts = timeouts or Timeouts()
        self.on_stored = on_stored
        self.writer = StoreWriter(out, layout)
        self.receiver: Any = None
        self.destination = destination  # C-MOVE to this third AE instead of a receiver of ours
        if not peer.web and method == "move" and destination is None:
            # The C-MOVE receiver takes files only from the peer being asked (its AE title and host) unless told
            # otherwise: anyone else pushing into OUT while it listens is refused and reported.
            self.receiver = Receiver(out, aet=move_aet or calling_aet, bind=bind, port=port, layout=layout,
                                     series_timeout=3600, timeouts=self.timeouts, on_stored=on_stored,
                                     allow_aets=allow_aets or [peer.aet], allow_hosts=allow_hosts or [peer.host],
                                     tls=peer.tls)

    def __enter__(self) -> Fetcher:
        if self.receiver is not None:
            self.receiver.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.receiver is not None:
            self.receiver.stop(grace=5)

    def fetch(self, uids: dict[str, str]) -> Any:
        """Retrieve one study/series/instance; returns a RetrieveOutcome with counts and files."""
        from kaapcli.core.net import dicomweb, dimse
        from kaapcli.core.net.query import retrieve_query

        if self.peer.web:
            return dicomweb.retrieve(self.peer, uids, self.writer, self.timeouts, self.on_stored)
        if self.method == "move":
            return dimse.move(self.peer, retrieve_query(uids), self.receiver, calling_aet=self.calling_aet,
                              destination=self.destination or self.receiver.aet, timeouts=self.timeouts)
        return dimse.get(self.peer, retrieve_query(uids), self.writer, calling_aet=self.calling_aet,
                         timeouts=self.timeouts, on_stored=self.on_stored)

    def find(self, query: Any) -> list[dict[str, Any]]:
        """C-FIND or QIDO-RS matches (DICOM JSON records)."""
        from kaapcli.core.net import dicomweb, dimse

        if self.peer.web:
            return list(dicomweb.query(self.peer, query, self.timeouts))
        return list(dimse.find(self.peer, query, calling_aet=self.calling_aet, timeouts=self.timeouts))


# --------------------------------------------------------------------------- requests from the index

# Where a series came from, in the order retrieve trusts them: the [pacs.NAME] profile kaapcli index --source
# recorded; Kaapana's DICOMweb endpoint; the AE titles of the file meta (PS3.10 7.1) the receiver wrote.
SOURCE_KEYS = (("profile", "00000000 SourcePeer_keyword"), ("url", "00020026 SourcePresentationAddress_keyword"),
               ("aet", "00020017 SendingApplicationEntityTitle_keyword"),
               ("aet", "00020016 SourceApplicationEntityTitle_keyword"))
_STUDY, _SERIES = "0020000D StudyInstanceUID_keyword", "0020000E SeriesInstanceUID_keyword"


@dataclass(frozen=True)
class Request:
    """One retrieve: its UIDs and, for a series from the index, where the index says it came from."""

    uids: dict[str, str]
    source: tuple[str, str] | None = None  # (kind, value): profile | url | aet
    indexed: bool = False  # a series of the index (a search/dataset record), not a UID given or queried

    @property
    def label(self) -> str:
        level = "series" if "SeriesInstanceUID" in self.uids else "study" if len(self.uids) == 1 else "instance"
        return f"{level} {list(self.uids.values())[-1]}"


def record_request(record: dict[str, Any]) -> Request | None:
    """The request of a ``kaapcli search``/``dataset show`` document (its series, its source) or of a DICOM
    JSON record of ``kaapcli query``; None when it names no Study/Series/SOP Instance UID."""
    from kaapcli.core.net.query import uids_of

    if _SERIES in record:
        uids = {k: str(v[0] if isinstance(v, list) and len(v) == 1 else v).strip()
                for k, v in (("StudyInstanceUID", record.get(_STUDY)), ("SeriesInstanceUID", record.get(_SERIES)))
                if isinstance(v, str) or (isinstance(v, list) and len(v) == 1 and isinstance(v[0], str))}
        uids = {k: v for k, v in uids.items() if v}
        if "SeriesInstanceUID" not in uids:
            return None
        source = next(((kind, str(record[key]).strip()) for kind, key in SOURCE_KEYS
                       if isinstance(record.get(key), str) and record[key].strip()), None)
        return Request(uids, source, indexed=True)
    found = uids_of(record)
    return Request(found) if found else None


def dataset_requests(config: Any, index: str | None, project: str | None, dataset: str | None,
                     include_tags: Sequence[str] | None = None, exclude_tags: Sequence[str] | None = None,
                     limit: int | None = None) -> list[Request]:
    """``retrieve --dataset``: the series of a dataset of the index (Kaapana's LocalGetInputData) holding every
    ``include_tags`` tag and none of ``exclude_tags``, at most ``limit`` of them (in SeriesInstanceUID order)."""
    from kaapcli.core.index.base import open_index
    from kaapcli.core.index.query import TAGS_KEY, And, Field, InDataset, Not, Term
    from kaapcli.exitcodes import UsageError

    if dataset is None:
        if include_tags or exclude_tags:
            raise UsageError("--include-tag/--exclude-tag select series of a dataset: give --dataset NAME")
        return []
    tags = Field("Tags", (TAGS_KEY,))
    node = And((InDataset(dataset), *(Term(tags, t) for t in include_tags or ()),
                *(Not(Term(tags, t)) for t in exclude_tags or ())))
    fields = [_STUDY, _SERIES, *(key for _, key in SOURCE_KEYS)]
    with open_index(index, project, config=config) as ix:
        found = [record_request(doc) for doc in ix.search(node, fields=fields, limit=limit)]
    return [r for r in found if r is not None]


def plan(requests: Sequence[Request], config: Any, fallback: Peer | None) -> tuple[list[tuple[Peer, list[Request]]],
                                                                                  list[str]]:
    """Requests grouped by the peer to retrieve them from (in order of first appearance): ``fallback``
    (``--from``/PEER) when given, else the source the index recorded, which must be a configured [pacs.NAME]
    profile (by name, AE title or DICOMweb root) — a header value never makes kaapcli connect to a host the
    configuration does not name.  Also one line per request that has nowhere to come from."""
    groups: dict[str, tuple[Peer, list[Request]]] = {}
    problems: list[str] = []
    resolved: dict[tuple[str, str], Peer | str] = {}
    for request in requests:
        if fallback is not None:
            peer: Peer | str = fallback
        elif request.source is None:
            peer = "the index does not record where it came from" if request.indexed else "no PEER given"
        else:
            if request.source not in resolved:
                resolved[request.source] = resolve_source(*request.source, config)
            peer = resolved[request.source]
        if isinstance(peer, str):
            problems.append(f"{request.label}: {peer}")
            continue
        groups.setdefault(peer.label, (peer, []))[1].append(request)
    return list(groups.values()), problems


def resolve_source(kind: str, value: str, config: Any) -> Peer | str:
    """The configured peer a recorded source names, or why there is none."""
    from kaapcli.core.net.peers import parse_peer
    from kaapcli.exitcodes import KaapcliError

    names = sorted((getattr(config, "profiles", None) or {}).get("pacs", {}))

    def profile(name: str) -> Peer | str:
        try:
            return parse_peer(name, config)
        except KaapcliError as exc:
            return f"[pacs.{name}]: {exc.message}"

    if kind == "profile":
        return profile(value) if value in names else f"came from [pacs.{value}], which the configuration lacks"
    matches = []
    for name in names:
        peer = profile(name)
        if isinstance(peer, Peer) and ((kind == "aet" and peer.aet == value) or
                                       (kind == "url" and peer.url and peer.url == value.rstrip("/"))):
            matches.append(peer)
    what = f"AE title {value!r}" if kind == "aet" else f"DICOMweb endpoint {value!r}"
    if len(matches) == 1:
        return matches[0]
    if matches:
        return f"came from {what}, which several [pacs.*] profiles have: {', '.join(p.label for p in matches)}"
    return f"came from {what}, which no [pacs.NAME] profile of the configuration names"
