"""Rules: which commands run when a series (or a group of series) is complete, and the run journal.

A rules file (JSON or TOML with a top-level ``rules`` array) is a list of::

    {"name": "seg-to-nifti",
     "search_tags": {"0x0008,0x0060": "SEG,RTSTRUCT"},   # comma = OR within a tag, AND across tags
     "match": "BodyPartExamined:CHEST",                  # optional, the index query language
     "run": ["kaapcli", "seg2itk", "{series_dir}", "-o", "{out}/{series_uid}/nifti"],
     "depends_on": ["other-rule"], "priority": 10, "timeout": 600,
     "params": {"THRESHOLD": "0.5"},                     # environment variables of the run
     "inputs": {"ct": {"required_tags": ["Modality"], "required_values": {"Modality": "^CT$"}},
                "pet": {"required_values": {"Modality": "^PT$"}}},
     "group_by": "PatientID"}                            # DicomNode-style: fires once per complete group

Every run is appended to a JSON-lines journal (rule, series, start, end, status, exit code, log).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import subprocess
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.exitcodes import ConfigError, UsageError

PLACEHOLDERS = ("series_dir", "study_dir", "series_uid", "study_uid", "patient_id", "calling_aet", "called_aet",
                "out")
RULE_KEYS = {"name", "search_tags", "match", "run", "depends_on", "priority", "timeout", "params", "inputs",
             "group_by"}


@dataclass(frozen=True)
class InputSpec:
    """A named input of a group rule: a series qualifies when its header satisfies every condition."""

    name: str
    required_tags: tuple[int, ...] = ()
    required_values: tuple[tuple[int, re.Pattern[str]], ...] = ()

    def accepts(self, header: Mapping[int, list[str]]) -> bool:
        if any(not header.get(tag) for tag in self.required_tags):
            return False
        return all(any(rx.search(v) for v in header.get(tag, [])) for tag, rx in self.required_values)


@dataclass(frozen=True)
class Rule:
    name: str
    run: tuple[str, ...]
    search_tags: tuple[tuple[int, frozenset[str]], ...] = ()
    match: str | None = None
    depends_on: tuple[str, ...] = ()
    priority: int = 0
    timeout: float | None = None
    params: tuple[tuple[str, str], ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    group_by: int = 0x00100020  # PatientID

    @property
    def is_group_rule(self) -> bool:
        return bool(self.inputs)

    def tags_needed(self) -> set[int]:
        tags = {tag for tag, _ in self.search_tags} | {self.group_by}
        for spec in self.inputs:
            tags |= set(spec.required_tags) | {tag for tag, _ in spec.required_values}
        return tags

    def matches_tags(self, header: Mapping[int, list[str]]) -> bool:
        """Kaapana's search_tags: every tag must have one of the listed values (exact, after trimming)."""
        return all(any(v in wanted for v in header.get(tag, [])) for tag, wanted in self.search_tags)


@dataclass
class Series:
    """A complete series as rules see it."""

    series_uid: str
    series_dir: Path
    study_uid: str = ""
    patient_id: str = ""
    calling_aet: str = ""
    called_aet: str = ""
    header: dict[int, list[str]] = field(default_factory=dict)
    document: dict[str, Any] | None = None  # the metadata document, for `match`

    def placeholders(self, out: Path | None) -> dict[str, str]:
        return {"series_dir": str(self.series_dir), "study_dir": str(self.series_dir.parent),
                "series_uid": self.series_uid, "study_uid": self.study_uid, "patient_id": self.patient_id,
                "calling_aet": self.calling_aet, "called_aet": self.called_aet,
                "out": str(out) if out else str(self.series_dir.parent)}


# --------------------------------------------------------------------------- loading and checking

def load_rules(path: Path) -> list[Rule]:
    """Read and validate a rules file; every problem is a ConfigError naming the rule and the key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rules: {exc.strerror}") from exc
    try:
        data: Any = tomllib.loads(text).get("rules") if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of rules (or a 'rules' array)")
    rules = [_rule(path, i, raw) for i, raw in enumerate(data, 1)]
    names = [r.name for r in rules]
    for name in {n for n in names if names.count(n) > 1}:
        raise ConfigError(f"{path}: rule name {name!r} is used twice")
    for index, rule in enumerate(rules, 1):
        for dep in rule.depends_on:
            if dep not in names:
                raise ConfigError(f"{path}: rule {index} ({rule.name!r}): depends_on {dep!r}: no such rule")
    run_order(rules)  # raises on cycles
    return rules


def _rule(path: Path, index: int, raw: Any) -> Rule:
    where = f"{path}: rule {index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object")
    name = raw.get("name", f"rule{index}")
    where = f"{path}: rule {index} ({name!r})"
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                          hint=f"keys are {', '.join(sorted(RULE_KEYS))}")
    run = raw.get("run")
    if not (isinstance(run, list) and run and all(isinstance(a, str) for a in run)):
        raise ConfigError(f"{where}: 'run' must be a non-empty list of strings (an argv)")
    for arg in run:
        for field_name in re.findall(r"{(\w+)}", arg):
            if field_name not in PLACEHOLDERS and not field_name.startswith("input_"):
                raise ConfigError(f"{where}: unknown placeholder {{{field_name}}} in run",
                                  hint=f"placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    search_tags = raw.get("search_tags", {})
    if not isinstance(search_tags, dict):
        raise ConfigError(f"{where}: 'search_tags' must be an object of tag: 'value,value'")
    tags = tuple((_tag(where, t), frozenset(v.strip() for v in str(vals).split(",")))
                 for t, vals in search_tags.items())
    match = raw.get("match")
    if match is not None:
        if not isinstance(match, str):
            raise ConfigError(f"{where}: 'match' must be a query string")
        _check_query(where, match)
    inputs = raw.get("inputs", {})
    if not isinstance(inputs, dict):
        raise ConfigError(f"{where}: 'inputs' must be an object of name: {{required_tags, required_values}}")
    specs = tuple(_input(where, n, spec) for n, spec in inputs.items())
    try:
        timeout = float(raw["timeout"]) if raw.get("timeout") is not None else None
        priority = int(raw.get("priority", 0))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'timeout' and 'priority' must be numbers") from None
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'params' must be an object of NAME: value")
    depends = raw.get("depends_on", [])
    if isinstance(depends, str):
        depends = [depends]
    return Rule(name=str(name), run=tuple(run), search_tags=tags, match=match, depends_on=tuple(depends),
                priority=priority, timeout=timeout, params=tuple((str(k), str(v)) for k, v in params.items()),
                inputs=specs, group_by=_tag(where, raw.get("group_by", "PatientID")))


def _tag(where: str, text: str) -> int:
    from kaapcli.core.dicom import parse_tag

    try:
        return parse_tag(str(text))
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def _input(where: str, name: str, spec: Any) -> InputSpec:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: input {name!r} must be an object")
    values = []
    for tag, pattern in spec.get("required_values", {}).items():
        try:
            values.append((_tag(where, tag), re.compile(str(pattern))))
        except re.error as exc:
            raise ConfigError(f"{where}: input {name!r}: bad regular expression {pattern!r}: {exc}") from None
    return InputSpec(name, tuple(_tag(where, t) for t in spec.get("required_tags", [])), tuple(values))


def _check_query(where: str, query: str) -> None:
    try:
        from kaapcli.core.index import query as q
    except ImportError:  # pragma: no cover - the index package is part of kaapcli
        return
    try:
        q.parse(query)
    except UsageError as exc:
        raise ConfigError(f"{where}: match: {exc.message}") from None


def run_order(rules: list[Rule]) -> list[Rule]:
    """Dependencies first; among rules whose dependencies are met, higher priority first, then name."""
    by_name = {r.name: r for r in rules}
    done: list[Rule] = []
    pending = sorted(rules, key=lambda r: (-r.priority, r.name))
    while pending:
        ready = [r for r in pending if all(d in {x.name for x in done} or d not in by_name for d in r.depends_on)]
        if not ready:
            raise ConfigError(f"rules depend on each other in a cycle: {', '.join(r.name for r in pending)}")
        done.append(ready[0])
        pending.remove(ready[0])
    return done


# --------------------------------------------------------------------------- matching

def read_header(path: Path, tags: Iterable[int]) -> dict[int, list[str]]:
    """The string values of some tags of a DICOM file (multi-valued → several strings)."""
    from kaapcli.core import dicom

    wanted = set(tags) | {0x0020000E, 0x0020000D, 0x00100020}
    ds = dicom.read(path, stop_before_pixels=True, specific_tags=sorted(wanted))
    header: dict[int, list[str]] = {}
    for tag in wanted:
        elem = ds.get(tag)
        if elem is None or elem.value is None or elem.VR == "SQ":
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        header[tag] = [str(v).strip() for v in values]
    return header


def series_from_files(paths: list[Path], tags: Iterable[int], aets: tuple[str, str] = ("", "")) -> Series:
    header = read_header(paths[0], tags)
    series_dirs = {p.parent for p in paths}
    series_dir = series_dirs.pop() if len(series_dirs) == 1 else Path(os.path.commonpath([str(p) for p in paths]))
    return Series(series_uid=header.get(0x0020000E, [""])[0], series_dir=series_dir,
                  study_uid=header.get(0x0020000D, [""])[0], patient_id=header.get(0x00100020, [""])[0],
                  calling_aet=aets[0], called_aet=aets[1], header=header)


def matches(rule: Rule, series: Series) -> bool:
    if not rule.matches_tags(series.header):
        return False
    if rule.match:
        return series.document is not None and document_matches(rule.match, series.document)
    return True


def document_matches(query: str, document: dict[str, Any]) -> bool:
    """Evaluate an index query on one document with the embedded index itself (in memory), so a rule's
    ``match`` means exactly what ``kaapcli search`` means."""
    from kaapcli.core.index import query as q
    from kaapcli.core.index.sqlite import SqliteIndex

    with SqliteIndex(Path(":memory:"), "rules", create=True) as index:
        index.write([document], replace=True)
        return index.count(q.parse(query)) > 0


def complete_groups(rule: Rule, series: Iterable[Series]) -> Iterator[tuple[str, dict[str, Series]]]:
    """DicomNode-style groups: (group value, {input name: series}) for each group with every input present."""
    groups: dict[str, dict[str, Series]] = {}
    for s in series:
        key = (s.header.get(rule.group_by) or [""])[0]
        for spec in rule.inputs:
            if spec.accepts(s.header):
                groups.setdefault(key, {}).setdefault(spec.name, s)
    for key in sorted(groups):
        if len(groups[key]) == len(rule.inputs):
            yield key, groups[key]


# --------------------------------------------------------------------------- running and the journal

@dataclass
class RunRecord:
    id: str
    rule: str
    series_uid: str
    argv: list[str]
    start: str
    end: str = ""
    status: str = "running"  # ok | failed | timeout | skipped
    exit_code: int | None = None
    log: str = ""
    message: str = ""
    env: dict[str, str] = field(default_factory=dict)


class Journal:
    """An append-only JSON-lines file of runs; appends are locked, so workers and receivers can share it."""

    def __init__(self, path: Path):
        self.path = path
        self.logs = path.parent / "logs"

    def append(self, record: RunRecord) -> None:
        fsio.ensure_dir(self.path.parent)
        line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line)

    def records(self) -> list[RunRecord]:
        """The latest record of each run id, in order of first appearance."""
        latest: dict[str, RunRecord] = {}
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    latest[data["id"]] = RunRecord(**data)
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"{self.path}:{n}: not a run record") from None
        return list(latest.values())


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def execute(rule_name: str, series_uid: str, argv: list[str], journal: Journal, *, timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: Path | None = None) -> RunRecord:
    """Run one argv, logging to the journal's log directory; never raises for a failing command."""
    run_id = secrets.token_hex(6)
    fsio.ensure_dir(journal.logs)
    log = journal.logs / f"{run_id}.log"
    record = RunRecord(id=run_id, rule=rule_name, series_uid=series_uid, argv=argv, start=now(), log=str(log),
                       env=dict(env or {}))
    journal.append(record)
    start = time.monotonic()
    with open(log, "wb") as fh:
        try:
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd,
                                  env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
            record.exit_code = proc.returncode
            record.status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            record.status, record.message = "timeout", f"killed after {timeout:g} s"
        except OSError as exc:
            record.status, record.message = "failed", f"cannot run {argv[0]}: {exc.strerror}"
    record.end = now()
    if not record.message:
        record.message = f"exit {record.exit_code} after {time.monotonic() - start:.1f} s"
    journal.append(record)
    return record


def fill(argv: Iterable[str], values: Mapping[str, str]) -> list[str]:
    return [re.sub(r"{(\w+)}", lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def run_rules(fired: list[tuple[Rule, dict[str, str]]], journal: Journal, series_uid: str) -> list[RunRecord]:
    """Run the fired rules of one series in dependency and priority order; dependents of a failure are skipped.

    ``fired`` pairs each matching rule with its placeholder values.  A dependency that did not fire for
    this series counts as not met.
    """
    values_of = {rule.name: values for rule, values in fired}
    results: dict[str, RunRecord] = {}
    for rule in run_order([r for r, _ in fired]):
        unmet = [d for d in rule.depends_on if d not in results or results[d].status != "ok"]
        if unmet:
            record = RunRecord(id=secrets.token_hex(6), rule=rule.name, series_uid=series_uid,
                               argv=fill(rule.run, values_of[rule.name]), start=now(), end=now(), status="skipped",
                               message=f"dependency not met: {', '.join(unmet)}")
            journal.append(record)
        else:
            record = execute(rule.name, series_uid, fill(rule.run, values_of[rule.name]), journal,
                             timeout=rule.timeout, env=dict(rule.params))
        results[rule.name] = record
    return list(results.values())


# --------------------------------------------------------------------------- live mode (receive, watch)

class RuleRunner:
    """Runs rules for series as they complete, in a bounded thread pool (each run is a subprocess).

    Series rules run once per matching series; a group rule runs once per complete group, when the
    last of its inputs arrives.  A failing rule is journalled and never stops the caller.
    """

    def __init__(self, rules: list[Rule], journal: Path, out: Path | None = None, jobs: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.series_rules = [r for r in rules if not r.is_group_rule]
        self.group_rules = [r for r in rules if r.is_group_rule]
        self.tags = set().union(*(r.tags_needed() for r in rules)) if rules else set()
        self.journal = Journal(journal)
        self.out = out
        self.pool = ThreadPoolExecutor(max(1, jobs), thread_name_prefix="kaapcli-rules")
        self.futures: list[Any] = []
        self.completed: list[Series] = []
        self.fired_groups: set[tuple[str, str]] = set()

    def series_complete(self, files: list[Path], aets: tuple[str, str] = ("", "")) -> Series:
        """Called once per complete series: schedules its matching rules and any group that is now complete."""
        series = series_from_files(sorted(files), self.tags, aets)
        if any(r.match for r in self.series_rules):
            from kaapcli.core.meta import series_document

            series.document, _ = series_document(sorted(files))
        fired = [(r, series.placeholders(self.out)) for r in self.series_rules if matches(r, series)]
        if fired:
            self.futures.append(self.pool.submit(run_rules, fired, self.journal, series.series_uid))
        self.completed.append(series)
        for rule in self.group_rules:
            for key, members in complete_groups(rule, self.completed):
                if (rule.name, key) in self.fired_groups:
                    continue
                self.fired_groups.add((rule.name, key))
                first = members[rule.inputs[0].name]
                values = first.placeholders(self.out)
                values.update({f"input_{name}": str(s.series_dir) for name, s in members.items()})
                self.futures.append(self.pool.submit(run_rules, [(rule, values)], self.journal, first.series_uid))
        return series

    def close(self) -> list[RunRecord]:
        """Wait for every scheduled run; return all their records."""
        self.pool.shutdown(wait=True)
        return [record for fut in self.futures for record in fut.result()]


# --------------------------------------------------------------------------- batch mode (kaapcli trigger)

def default_journal() -> Path:
    from kaapcli.core.config import data_home

    return Path(os.environ.get("KAAPCLI_JOURNAL") or data_home() / "runs.jsonl")


class TriggerOperator:
    """The batch engine's operator for ``kaapcli trigger``: one item per series, its matching rules run."""

    name = "trigger"
    grouped = True
    supports_dry_run = True

    def __init__(self, rules: list[Rule], journal: Path, out: Path | None):
        self.rules = [r for r in rules if not r.is_group_rule]
        self.journal = journal
        self.out = out
        self.tags = set().union(*(r.tags_needed() for r in self.rules)) if self.rules else set()

    def options(self) -> dict[str, Any]:
        return {}

    def accepts(self, path: Path) -> bool:
        return fsio.is_dicom(path)

    def group_key(self, path: Path) -> str | None:
        from kaapcli.core import dicom

        return dicom.series_uid(path)

    def process(self, item: Any, ctx: Any) -> Any:
        from kaapcli.core.batch import Outcome

        series = series_from_files(list(item.paths), self.tags)
        if any(r.match for r in self.rules):
            from kaapcli.core.meta import series_document

            series.document, _ = series_document(list(item.paths))
        fired = [(r, series.placeholders(self.out)) for r in self.rules if matches(r, series)]
        if not fired:
            return Outcome(skipped=True, message="no rule matches")
        if ctx.dry_run:
            return Outcome(message="would run " + ", ".join(r.name for r, _ in fired))
        records = run_rules(fired, Journal(self.journal), series.series_uid)
        return outcome_of(records)


def outcome_of(records: list[RunRecord]) -> Any:
    """Turn the runs of one series into an Outcome (failures raise so the item counts as failed)."""
    from kaapcli.core.batch import Outcome
    from kaapcli.exitcodes import ExitCode, KaapcliError

    summary = ", ".join(f"{r.rule}: {r.status}" for r in records)
    bad = [r for r in records if r.status != "ok"]
    if bad:
        raise KaapcliError(f"rules {summary} (logs: {', '.join(r.log for r in bad if r.log)})",
                           code=ExitCode.ITEMS_FAILED)
    return Outcome(outputs=[Path(r.log) for r in records], message=summary)

