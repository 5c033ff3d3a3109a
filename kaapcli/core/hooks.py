"""What happens when a received (or watched) series is complete: index it, run rules.

Both are plain callables over a :class:`~kaapcli.core.net.scp.SeriesReceipt`, plugged into
``Receiver.hooks`` by ``kaapcli receive`` and ``kaapcli watch``.  Kaapana's convention applies:
a called AE title ``kp-<project>`` names the index project, a calling AE title ``kp-<dataset>``
adds the series to that dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KAAPANA_PREFIX = "kp-"


def kaapana_name(aet: str) -> str | None:
    aet = aet.strip()
    return aet[len(KAAPANA_PREFIX):] if aet.lower().startswith(KAAPANA_PREFIX) and len(aet) > 3 else None


class IndexHook:
    """Indexes each complete series (its metadata document) into an embedded or OpenSearch index."""

    def __init__(self, target: str | None, project: str | None, config: Any = None):
        self.target, self.project, self.config = target, project, config

    def __call__(self, receipt: Any) -> None:
        from kaapcli.core.index.base import open_index
        from kaapcli.core.index.ingest import index_series
        from kaapcli.core.index.query import Ids

        project = self.project or kaapana_name(receipt.called_aet)
        with open_index(self.target, project, config=self.config, create=True) as index:
            index_series(index, receipt.series_uid, [Path(f) for f in receipt.files])  # document + file list
            dataset = kaapana_name(receipt.calling_aet)
            if dataset:
                index.dataset_change(dataset, Ids((receipt.series_uid,)))


class RulesHook:
    """Hands each complete series to a :class:`~kaapcli.core.rules.RuleRunner` (a bounded pool)."""

    def __init__(self, rules_file: Path, journal: Path | None, out: Path | None, jobs: int):
        from kaapcli.core import rules

        self.runner = rules.RuleRunner(rules.load_rules(rules_file), journal or rules.default_journal(), out, jobs)

    def __call__(self, receipt: Any) -> None:
        self.runner.series_complete([Path(f) for f in receipt.files], (receipt.calling_aet, receipt.called_aet))

    def close(self) -> None:
        self.runner.close()
