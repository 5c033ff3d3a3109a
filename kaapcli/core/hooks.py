"""What happens when a received (or watched) series is complete: index it, run rules, run a command.

Each is a plain callable over a :class:`~kaapcli.core.net.scp.SeriesReceipt`, plugged into
``Receiver.hooks`` by ``kaapcli receive`` and ``kaapcli watch``.  The AE titles name the index project
and dataset by one of two conventions (``--aet-convention``):

- ``seed`` (Kaapana's documented one, the default): ``dcmsend --call <dataset>`` — the called AE title
  names the dataset; the project is ``--project`` (else admin);
- ``kp``: a called AE title ``kp-<project>`` names the project, a calling AE title ``kp-<dataset>``
  adds the series to that dataset.

A command hook (``--on-complete``) never runs a shell: its placeholders are path-safe tokens, also
exported as ``KAAPCLI_*``, and a placeholder inside a script string is refused when the hook is made.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kaapcli.exitcodes import UsageError

KAAPANA_PREFIX = "kp-"
AET_CONVENTIONS = ("seed", "kp", "none")
LOG = logging.getLogger("kaapcli.net")


def kaapana_name(aet: str) -> str | None:
    aet = aet.strip()
    return aet[len(KAAPANA_PREFIX):] if aet.lower().startswith(KAAPANA_PREFIX) and len(aet) > 3 else None


def project_and_dataset(calling: str, called: str, convention: str = "seed") -> tuple[str | None, str | None]:
    """(project, dataset) that the AE titles of an association name under a convention."""
    if convention == "kp":
        return kaapana_name(called), kaapana_name(calling)
    if convention == "seed":
        return None, called.strip() or None
    return None, None


class IndexHook:
    """Indexes each complete series (its metadata document) into an embedded or OpenSearch index."""

    def __init__(self, target: str | None, project: str | None, config: Any = None, convention: str = "seed"):
        self.target, self.project, self.config, self.convention = target, project, config, convention

    def __call__(self, receipt: Any) -> None:
        from kaapcli.core.index.base import open_index
        from kaapcli.core.index.ingest import index_series
        from kaapcli.core.index.query import Ids

        aet_project, dataset = project_and_dataset(receipt.calling_aet, receipt.called_aet, self.convention)
        with open_index(self.target, self.project or aet_project, config=self.config, create=True) as index:
            index_series(index, receipt.series_uid, [Path(f) for f in receipt.files])  # document + file list
            if dataset:
                index.dataset_change(dataset, Ids((receipt.series_uid,)))


class RulesHook:
    """Hands each complete series to a :class:`~kaapcli.core.rules.RuleRunner` (a bounded pool); also what the
    receiver asks before storing an instance (``accept``) and while a series is open (``ready``)."""

    def __init__(self, rules_file: Path, journal: Path | None, out: Path | None, jobs: int, *,
                 dags: Path | None = None, aet: str = "KAAPCLI", config: Any = None):
        from kaapcli.core import rules

        self.runner = rules.RuleRunner(rules.load_rules(rules_file, dags), journal or rules.default_journal(), out,
                                       jobs, aet=aet, config=config)

    def __call__(self, receipt: Any) -> None:
        self.runner.series_complete([Path(f) for f in receipt.files], (receipt.calling_aet, receipt.called_aet),
                                    getattr(receipt, "calling_host", ""))

    def accept(self, incoming: Any) -> bool:
        """``--reject-unmatched``: whether a received instance could feed any rule (read from its header)."""
        import pydicom

        from kaapcli.core.rules import header_of

        try:  # the spool file holds the whole instance (file meta first) by the time the receiver asks
            ds = pydicom.dcmread(incoming.path, stop_before_pixels=True, specific_tags=sorted(self.runner.tags))
        except Exception:  # noqa: BLE001 - unreadable: let the store step report it
            return True
        return self.runner.accepts(header_of(ds, self.runner.tags))

    def ready(self, receipt: Any, quiet: float) -> bool | None:
        if not receipt.files:
            return None
        return self.runner.ready(receipt.series_uid, Path(receipt.files[0]), receipt.instances, quiet)

    def close(self) -> None:
        self.runner.close()


class CommandHook:
    """``receive --on-complete CMD``: one command per complete series (an argv split like a shell would, never
    run by one)."""

    def __init__(self, template: str, warn: Any = None):
        import shlex

        from kaapcli.core import rules
        from kaapcli.exitcodes import ConfigError

        try:
            self.argv = shlex.split(template)
        except ValueError as exc:
            raise UsageError(f"--on-complete: {exc}") from None
        if not self.argv:
            raise UsageError("--on-complete: empty command")
        try:
            rules.check_argv("--on-complete", self.argv)
        except ConfigError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
        self.warn = warn or LOG.warning

    def __call__(self, receipt: Any) -> None:
        from kaapcli.core import rules

        series = rules.Series(series_uid=receipt.series_uid, series_dir=Path(receipt.series_dir),
                              study_uid=receipt.study_uid, calling_aet=receipt.calling_aet,
                              called_aet=receipt.called_aet)
        values = series.values(None)
        env = {**os.environ, **rules.environment(values, series.raw_values())}
        proc = subprocess.run(rules.fill(self.argv, values), stdin=subprocess.DEVNULL, stdout=sys.stderr, env=env,
                              check=False)
        if proc.returncode != 0:
            self.warn(f"--on-complete for series {receipt.series_uid} exited with {proc.returncode}")
