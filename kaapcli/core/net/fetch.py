"""Retrieving from one peer: C-GET, C-MOVE into a built-in receiver, or WADO-RS for DICOMweb peers.

Shared by ``kaapcli retrieve`` and ``kaapcli collect``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kaapcli.core.net.peers import Peer, Timeouts
from kaapcli.core.net.scp import DEFAULT_LAYOUT


class Fetcher:
    """A context manager: ``fetch(uids)`` per request; the C-MOVE receiver lives as long as the fetcher."""

    def __init__(self, peer: Peer, out: Path, *, method: str = "get", calling_aet: str = "KAAPCLI",
                 timeouts: Timeouts | None = None, layout: str = DEFAULT_LAYOUT, move_aet: str | None = None,
                 bind: str = "127.0.0.1", port: int = 11112, on_stored: Callable[[Path], None] | None = None,
                 allow_aets: list[str] | None = None, allow_hosts: list[str] | None = None):
        from kaapcli.core.net.scp import Receiver, StoreWriter

        self.peer, self.method, self.calling_aet = peer, method, calling_aet
        self.timeouts = timeouts or Timeouts()
        self.on_stored = on_stored
        self.writer = StoreWriter(out, layout)
        self.receiver: Any = None
        if not peer.web and method == "move":
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
        if self.receiver is not None:
            return dimse.move(self.peer, retrieve_query(uids), self.receiver, calling_aet=self.calling_aet,
                              destination=self.receiver.aet, timeouts=self.timeouts)
        return dimse.get(self.peer, retrieve_query(uids), self.writer, calling_aet=self.calling_aet,
                         timeouts=self.timeouts, on_stored=self.on_stored)

    def find(self, query: Any) -> list[dict[str, Any]]:
        """C-FIND or QIDO-RS matches (DICOM JSON records)."""
        from kaapcli.core.net import dicomweb, dimse

        if self.peer.web:
            return list(dicomweb.query(self.peer, query, self.timeouts))
        return list(dimse.find(self.peer, query, calling_aet=self.calling_aet, timeouts=self.timeouts))
