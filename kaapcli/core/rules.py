"""Rules: which jobs run when a series (or a group of series) is complete.

A rules file (JSON or TOML with a top-level ``rules`` array) is a list of::

    {"name": "seg-to-nifti",
     "search_tags": {"0x0008,0x0060": "SEG,RTSTRUCT"},   # comma = OR within a tag, AND across tags
     "match": "BodyPartExamined:CHEST",                  # optional, the index query language
     "run": ["kaapcli", "seg2itk", "{series_dir}", "-o", "{out}/{series_uid}/nifti"],
     "depends_on": ["other-rule"], "priority": 10, "sortPosition": 0, "timeout": 600,
     "params": {"THRESHOLD": "0.5"},                     # environment variables of the run
     "callback": "mymodule:wanted",                      # dcm-processor: decides, returns (bool, dict)
     "worker": "mymodule:process",                       # dcm-processor: a Python function instead of run
     "inputs": {"ct": {"required_values": {"Modality": "^CT$"},
                       "complete_when": {"instances_from": ["ImagesInAcquisition"]}},
                "pet": {"required_tags": ["RadiopharmaceuticalInformationSequence"]}},
     "group_by": "PatientID",                            # DicomNode: fires once per complete group
     "reply": true, "outputs": "{out}/{patient_id}"}     # DicomNode: send outputs back to the sender

dcm-processor's settings.json keys (``jobName``, ``dependsOn``, ``sortPosition``, ``description``,
``"priority": "default"``, ``"timeout": "1h"``) and Kaapana's ``trigger_rule.json`` (``search_tags`` +
``dag_ids``, with a table mapping each DAG id to a command) load into the same rules.

Placeholders are filled with path-safe tokens (never a separator, ``..``, a leading ``-`` or a control
character), so a header value cannot change a command's structure or escape ``{out}``; each is also
exported as ``KAAPCLI_<NAME>`` (and the header's own value as ``KAAPCLI_RAW_<NAME>``).  A placeholder
inside a shell or interpreter script string (``sh -c '... {patient_id} ...'``) is refused: the script
reads the environment variable instead.  Loading never runs anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.core import fsio
from kaapcli.core.runs import FAILED, RAW_LIMIT, Job, Journal, RunRecord, new_id, now, run_batch
from kaapcli.exitcodes import ConfigError, UsageError

# placeholders whose value comes from a header or the network (tokens), and those that are our own paths
VALUE_PLACEHOLDERS = ("series_uid", "study_uid", "patient_id", "calling_aet", "called_aet")
PATH_PLACEHOLDERS = ("series_dir", "study_dir", "out", "run_dir", "batch_dir")
PLACEHOLDERS = (*PATH_PLACEHOLDERS[:2], *VALUE_PLACEHOLDERS, *PATH_PLACEHOLDERS[2:])
RULE_KEYS = {"name", "search_tags", "match", "run", "depends_on", "priority", "timeout", "params", "inputs",
             "group_by", "description", "sortPosition", "callback", "worker", "header_fields", "reply",
             "reply_port", "outputs", "channel", "retries"}
ALIASES = {"jobName": "name", "dependsOn": "depends_on", "headerFields": "header_fields"}  # dcm-processor
COMPLETE_KEYS = {"instances_from", "min_instances", "timeout"}
DEFAULT_SORT_POSITION = 999  # dcm-processor's default: services without a position run last
DEFAULT_HEADER_FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription",
                         "StudyDescription", "BodyPartExamined", "PerformedProcedureStepDescription")
# Programs that run their argument as code, and the options that introduce it (sh -c SCRIPT, python -c CODE).
SHELLS = {"sh", "bash", "zsh", "dash", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox"}
INTERPRETER_FLAGS = {"python": {"-c"}, "perl": {"-e", "-E"}, "ruby": {"-e"}, "node": {"-e", "-p", "--eval",
                     "--print"}, "nodejs": {"-e", "-p", "--eval"}, "php": {"-r"}, "Rscript": {"-e"},
                     "R": {"-e"}, "lua": {"-e"}, "tclsh": set(), "pwsh": {"-c", "-command", "-Command"}}
PROGRAM_ARG = {"awk", "gawk", "mawk", "nawk", "sed", "jq"}  # the first operand is a program
COMMAND_OPTION = {"su", "runuser", "flock", "script", "watch"}  # -c CMD (anywhere after them) goes to a shell
REMOTE_SHELL = {"ssh", "rsh"}  # every argument after them reaches a remote shell
_PLACEHOLDER = re.compile(r"{(\w+)}")


@dataclass(frozen=True)
class Completeness:
    """When a series counts as complete for an input (DicomNode): an expected instance count read from the
    header (the product of the tags, e.g. NumberOfSlices × NumberOfTemporalPositions), a minimum count,
    and/or its own quiet time."""

    instances_from: tuple[int, ...] = ()
    min_instances: int = 0
    timeout: float | None = None

    def expected(self, header: Mapping[int, list[str]]) -> int | None:
        if not self.instances_from:
            return None
        try:
            counts = [int(float(header[tag][0])) for tag in self.instances_from]
        except (KeyError, IndexError, ValueError):
            return None
        return math.prod(counts) if all(c > 0 for c in counts) else None

    def satisfied(self, header: Mapping[int, list[str]], instances: int) -> bool:
        expected = self.expected(header)
        return instances >= max(expected or 0, self.min_instances)


@dataclass(frozen=True)
class InputSpec:
    """A named input of a group rule: a series qualifies when its header satisfies every condition."""

    name: str
    required_tags: tuple[int, ...] = ()
    required_values: tuple[tuple[int, re.Pattern[str]], ...] = ()
    complete_when: Completeness | None = None

    def accepts(self, header: Mapping[int, list[str]]) -> bool:
        if any(not header.get(tag) for tag in self.required_tags):
            return False
        return all(any(rx.search(v) for v in header.get(tag, [])) for tag, rx in self.required_values)

    def tags(self) -> set[int]:
        extra = set(self.complete_when.instances_from) if self.complete_when else set()
        return set(self.required_tags) | {tag for tag, _ in self.required_values} | extra


@dataclass(frozen=True)
class Rule:
    name: str
    run: tuple[str, ...] = ()
    worker: str | None = None
    callback: str | None = None
    search_tags: tuple[tuple[int, frozenset[str]], ...] = ()
    match: str | None = None
    depends_on: tuple[str, ...] = ()
    priority: int = 0
    sort_position: int = DEFAULT_SORT_POSITION
    queue: str = ""
    timeout: float | None = None
    retries: int = 0  # runs again after a failure, a timeout or a lost queue worker
    retry_intervals: tuple[float, ...] = ()  # backoff before each retry (the last repeats)
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[InputSpec, ...] = ()
    group_by: int = 0x00100020  # PatientID
    header_fields: tuple[str, ...] = ()
    description: str = ""
    reply: bool = False
    reply_port: int | None = None
    outputs: str | None = None
    dag: str | None = None  # Kaapana: the DAG id this rule runs
    fetch_method: str = ""  # Kaapana: "copy" gives the run a private copy of the series
    single_execution: bool = True  # Kaapana: False = one run over every matching series of a batch
    base_dir: str = ""  # where callback and worker modules are imported from (the rules file's folder)

    @property
    def is_group_rule(self) -> bool:
        return bool(self.inputs)

    @property
    def is_batch_rule(self) -> bool:
        return self.dag is not None and not self.single_execution

    def tags_needed(self) -> set[int]:
        from kaapcli.core.dicom import parse_tag

        tags = {tag for tag, _ in self.search_tags} | {self.group_by}
        for spec in self.inputs:
            tags |= spec.tags()
        if self.callback or self.worker:  # their `headers`
            tags |= {parse_tag(name) for name in self.header_fields or DEFAULT_HEADER_FIELDS}
        return tags

    def matches_tags(self, header: Mapping[int, list[str]]) -> bool:
        """Kaapana's search_tags: every tag must have one of the listed values (exact, after trimming)."""
        return all(any(v in wanted for v in header.get(tag, [])) for tag, wanted in self.search_tags)

    def might_accept(self, header: Mapping[int, list[str]]) -> bool:
        """Whether one instance could belong to this rule (``receive --reject-unmatched``): its search_tags,
        or one of its inputs; a ``match`` query and a callback are judged on the complete series."""
        if self.inputs:
            return any(spec.accepts(header) for spec in self.inputs)
        return self.matches_tags(header)


@dataclass
class Series:
    """A complete series as rules see it (header values raw, as sent)."""

    series_uid: str
    series_dir: Path
    study_uid: str = ""
    patient_id: str = ""
    calling_aet: str = ""
    called_aet: str = ""
    calling_host: str = ""
    header: dict[int, list[str]] = field(default_factory=dict)
    document: dict[str, Any] | None = None  # the metadata document, for `match`
    files: list[Path] = field(default_factory=list)

    def values(self, out: Path | None) -> dict[str, str]:
        """Placeholder values: header and network values as path-safe tokens, paths absolute."""
        series_dir = self.series_dir.absolute()
        raw = {"series_uid": self.series_uid, "study_uid": self.study_uid, "patient_id": self.patient_id,
               "calling_aet": self.calling_aet, "called_aet": self.called_aet}
        return {**{k: token(v) for k, v in raw.items()}, "series_dir": str(series_dir),
                "study_dir": str(series_dir.parent), "out": str((out or series_dir.parent).absolute())}

    def raw_values(self) -> dict[str, str]:
        return {"series_uid": self.series_uid, "study_uid": self.study_uid, "patient_id": self.patient_id,
                "calling_aet": self.calling_aet, "called_aet": self.called_aet}

    def headers(self, fields: Iterable[str]) -> dict[str, Any]:
        """dcm-processor's ``headers``: the selected fields by keyword (raw values), plus where the series is."""
        from kaapcli.core.dicom import parse_tag

        out: dict[str, Any] = {}
        for name in fields:
            values = self.header.get(parse_tag(name), [])
            out[name] = values[0] if len(values) == 1 else values if values else ""
        out.update(seriesId=self.series_uid, dcmpath=str(self.series_dir.absolute()),
                   instances=len(self.files))
        return out


def token(value: object) -> str:
    """A header or network value as a path-safe token: one path component, never ``..`` nor a leading ``-``
    (an option), no control character, at most 120 characters."""
    text = fsio.safe_name(str(value).replace("\0", ""))
    return "_" + text[1:] if text.startswith("-") else text


def environment(values: Mapping[str, str], raw: Mapping[str, str]) -> dict[str, str]:
    """``KAAPCLI_<NAME>`` for every placeholder (the token), ``KAAPCLI_RAW_<NAME>`` for header values."""
    env = {f"KAAPCLI_{k.upper()}": v for k, v in values.items()}
    env.update({f"KAAPCLI_RAW_{k.upper()}": v.replace("\0", "")[:RAW_LIMIT] for k, v in raw.items()})
    return env


# --------------------------------------------------------------------------- loading and checking

def load_rules(path: Path, dags: Path | None = None) -> list[Rule]:
    """Read and validate a rules file (and the DAG table of a Kaapana trigger_rule.json); every problem is a
    ConfigError naming the rule and the key."""
    data = _read(path)
    header_fields: list[str] = []
    if isinstance(data, dict) and ("jobName" in data or "run" in data or "worker" in data):
        data = [data]  # dcm-processor: one service per settings.json
    elif isinstance(data, dict) and "rules" in data:
        header_fields = data.get("headerFields") or data.get("header_fields") or []
        data = data["rules"]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of rules (or a 'rules' array)")
    base = str(path.absolute().parent)
    table = _dag_table(dags) if dags else None
    rules: list[Rule] = []
    for i, raw in enumerate(data, 1):
        if isinstance(raw, dict) and "dag_ids" in raw:
            rules += _kaapana_rules(path, i, raw, table, dags, base, [r.name for r in rules])
        else:
            rules.append(_rule(path, i, raw, base, header_fields))
    names = [r.name for r in rules]
    for name in {n for n in names if names.count(n) > 1}:
        raise ConfigError(f"{path}: rule name {name!r} is used twice")
    for index, rule in enumerate(rules, 1):
        for dep in rule.depends_on:
            if dep not in names:
                raise ConfigError(f"{path}: rule {index} ({rule.name!r}): depends_on {dep!r}: no such rule")
    run_order(rules)  # raises on cycles
    return rules


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rules: {exc.strerror}") from exc
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc


def _rule(path: Path, index: int, raw: Any, base: str, header_fields: list[str]) -> Rule:
    where = f"{path}: rule {index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object")
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    name = raw.get("name", f"rule{index}")
    where = f"{path}: rule {index} ({name!r})"
    unknown = set(raw) - RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                          hint=f"keys are {', '.join(sorted(RULE_KEYS))}")
    run, worker, callback = raw.get("run"), raw.get("worker"), raw.get("callback")
    if worker is not None and run is not None:
        raise ConfigError(f"{where}: give 'run' (a command) or 'worker' (a Python function), not both")
    for key, value in (("worker", worker), ("callback", callback)):
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[\w.]+[:.]\w+", value)):
            raise ConfigError(f"{where}: '{key}' must name a Python function, e.g. \"package.module:function\"")
    if worker is None and not (isinstance(run, list) and run and all(isinstance(a, str) for a in run)):
        raise ConfigError(f"{where}: 'run' must be a non-empty list of strings (an argv)",
                          hint="or name a Python function as 'worker'")
    inputs = raw.get("inputs", {})
    if not isinstance(inputs, dict):
        raise ConfigError(f"{where}: 'inputs' must be an object of name: {{required_tags, required_values}}")
    specs = tuple(_input(where, n, spec) for n, spec in inputs.items())
    check_argv(where, run or [], {f"input_{s.name}" for s in specs})
    outputs = raw.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, str):
            raise ConfigError(f"{where}: 'outputs' must be a directory (placeholders allowed)")
        check_argv(where, [outputs], {f"input_{s.name}" for s in specs}, what="outputs")
    if raw.get("reply") and outputs is None:
        raise ConfigError(f"{where}: 'reply' needs 'outputs': the directory whose DICOM files are sent back")
    search_tags = raw.get("search_tags", {})
    if not isinstance(search_tags, dict):
        raise ConfigError(f"{where}: 'search_tags' must be an object of tag: 'value,value'")
    match = raw.get("match")
    if match is not None:
        if not isinstance(match, str):
            raise ConfigError(f"{where}: 'match' must be a query string")
        _check_query(where, match)
    priority: Any = raw.get("priority", 0)
    queue = str(raw.get("channel") or "")
    if isinstance(priority, str) and not re.fullmatch(r"-?\d+", priority.strip()):
        priority, queue = 0, queue or priority  # dcm-processor: "priority" names an RQ queue ("default")
    try:
        priority = int(priority)
        sort_position = int(raw.get("sortPosition", DEFAULT_SORT_POSITION))
        reply_port = int(raw["reply_port"]) if raw.get("reply_port") is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'priority', 'sortPosition' and 'reply_port' must be integers") from None
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'params' must be an object of NAME: value")
    depends = raw.get("depends_on") or []
    if isinstance(depends, str):
        depends = [depends]
    fields = raw.get("header_fields") or header_fields
    for field_name in fields:
        _tag(where, field_name)
    retries, intervals = _retries(where, raw.get("retries"))
    return Rule(name=str(name), run=tuple(run or ()), worker=worker, callback=callback,
                search_tags=_search_tags(where, search_tags), match=match, depends_on=tuple(map(str, depends)),
                priority=priority, sort_position=sort_position, queue=queue,
                timeout=duration(where, raw.get("timeout")), retries=retries, retry_intervals=intervals,
                params=dict(params), inputs=specs,
                group_by=_tag(where, raw.get("group_by", "PatientID")), header_fields=tuple(fields),
                description=str(raw.get("description") or ""), reply=bool(raw.get("reply")),
                reply_port=reply_port, outputs=outputs, base_dir=base)


def _search_tags(where: str, search_tags: dict[str, Any]) -> tuple[tuple[int, frozenset[str]], ...]:
    return tuple((_tag(where, t), frozenset(v.strip() for v in str(vals).split(",")))
                 for t, vals in search_tags.items())


def duration(where: str, value: Any, key: str = "timeout") -> float | None:
    """Seconds, from a number or dcm-processor's / RQ's "90s", "10m", "1h", "1d"."""
    if value is None or value == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
    if match is None or isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be seconds or a duration like 90s, 10m, 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _retries(where: str, value: Any) -> tuple[int, tuple[float, ...]]:
    """``"retries": 3`` (backoff 10 s, 1 min, 5 min) or ``{"max": 3, "interval": "30s" | [10, "1m"]}`` (RQ's Retry:
    the last interval repeats)."""
    if value is None:
        return 0, ()
    spec = value if isinstance(value, dict) else {"max": value}
    unknown = set(spec) - {"max", "interval"}
    if unknown or isinstance(spec.get("max"), bool):
        raise ConfigError(f"{where}: 'retries' is a count or {{\"max\": N, \"interval\": ...}}")
    try:
        count = int(spec.get("max", 0))
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise ConfigError(f"{where}: 'retries' must be a count >= 0", hint='e.g. "retries": 2')
    interval = spec.get("interval")
    if interval is None:
        return count, ()
    items = interval if isinstance(interval, list) else [interval]
    intervals = tuple(duration(where, v, "retries interval") for v in items)
    if not intervals or any(v is None for v in intervals):
        raise ConfigError(f"{where}: 'retries' interval must be seconds or durations like 30s, 5m")
    return count, tuple(float(v or 0) for v in intervals)


def _kaapana_rules(path: Path, index: int, raw: dict[str, Any], table: dict[str, Any] | None, dags: Path | None,
                   base: str, taken: list[str]) -> list[Rule]:
    """A Kaapana trigger rule: its search_tags, and one rule per DAG id (the command from the DAG table)."""
    where = f"{path}: trigger rule {index}"
    unknown = set(raw) - {"search_tags", "dag_ids"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}", hint="keys are search_tags, dag_ids")
    if table is None:
        raise ConfigError(f"{where}: a Kaapana trigger rule needs the DAG table: which command each DAG id runs",
                          hint="--dags dags.json with {\"dag-id\": [\"command\", \"{batch_dir}\", ...]}")
    dag_ids = raw.get("dag_ids")
    if not isinstance(dag_ids, dict) or not dag_ids:
        raise ConfigError(f"{where}: 'dag_ids' must be an object of dag id: {{fetch_method, single_execution}}")
    search_tags = raw.get("search_tags") or {}
    if not isinstance(search_tags, dict):
        raise ConfigError(f"{where}: 'search_tags' must be an object of tag: 'value,value'")
    rules = []
    for dag_id, options in dag_ids.items():
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: dag {dag_id!r}: must be an object")
        entry = table.get(dag_id)
        if entry is None:
            raise ConfigError(f"{where}: dag {dag_id!r}: not in the DAG table {dags}",
                              hint=f"add \"{dag_id}\": [\"command\", ...] to {dags}")
        entry = {"run": entry} if isinstance(entry, list) else dict(entry)
        name = dag_id if dag_id not in taken else f"{dag_id}#{index}"
        taken = [*taken, name]
        rule = _rule(dags or path, index, {**entry, "name": name}, base, [])
        rules.append(Rule(**{**rule.__dict__, "search_tags": _search_tags(where, search_tags), "dag": dag_id,
                             "fetch_method": str(options.get("fetch_method", "")),
                             "single_execution": bool(options.get("single_execution", True))}))
    return rules


def _dag_table(path: Path) -> dict[str, Any]:
    data = _read(path)
    if isinstance(data, dict) and "dags" in data:
        data = data["dags"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the DAG table must be an object of dag id: command (an argv) or rule fields")
    return data


def check_argv(where: str, argv: Iterable[str], extra: Iterable[str] = (), what: str = "run") -> None:
    """Unknown placeholders, and placeholders inside a script string, are configuration errors."""
    argv, extra = list(argv), set(extra)
    for arg in argv:
        for name in _PLACEHOLDER.findall(arg):
            if name not in PLACEHOLDERS and name not in extra:
                raise ConfigError(f"{where}: unknown placeholder {{{name}}} in {what}",
                                  hint=f"placeholders: {', '.join('{' + p + '}' for p in (*PLACEHOLDERS, *extra))}")
    for program, position in script_positions(argv):
        names = _PLACEHOLDER.findall(argv[position])
        if names:
            variable = f"KAAPCLI_{names[0].upper()}"
            code = " ".join(argv[program:position])
            raise ConfigError(f"{where}: placeholder {{{names[0]}}} inside the script of `{code} ...`: "
                              f"a header value must never become code",
                              hint=f"read it from the environment instead: \"${variable}\" (quoted), or pass it "
                                   f"as an argument after the script (sh -c 'cmd \"$1\"' sh {{{names[0]}}})")


def script_positions(argv: list[str]) -> list[tuple[int, int]]:
    """(program, script) indices of the arguments that a shell or interpreter runs as code (``sh -c SCRIPT``,
    ``python -c``, ``env X=1 bash -lc``, ``awk PROGRAM``, ``find -exec sh -c``, ...), wherever the program is."""
    found = []
    for i, arg in enumerate(argv):
        program = os.path.basename(arg)
        family = re.sub(r"[\d.]+$", "", program)  # python3.11 → python
        if program in SHELLS or family in SHELLS:
            flags: set[str] | None = None  # any option cluster with c: -c, -ec, -lc, --command
        elif family in INTERPRETER_FLAGS:
            flags = INTERPRETER_FLAGS[family]
        elif family in REMOTE_SHELL:
            found += [(i, j) for j in range(i + 1, len(argv))]
            continue
        elif family in COMMAND_OPTION:
            found += [(i, j + 1) for j in range(i + 1, len(argv) - 1) if argv[j] in ("-c", "--command")]
            if family == "watch":  # watch runs its operands through sh -c
                found += [(i, j) for j in range(i + 1, len(argv)) if not argv[j].startswith("-")]
            continue
        elif family in PROGRAM_ARG:
            rest = argv[i + 1:]
            if rest and not any(a in ("-f", "--file") or a.startswith("--file=") for a in rest):
                operand = next((j for j, a in enumerate(rest) if not a.startswith("-")), None)
                for j, a in enumerate(rest):  # sed -e SCRIPT / awk -e, else the first operand
                    if a in ("-e", "--expression", "--source") and j + 1 < len(rest):
                        found.append((i, i + 2 + j))
                if operand is not None and not any(a in ("-e", "--expression") for a in rest):
                    found.append((i, i + 1 + operand))
            continue
        else:
            continue
        for j in range(i + 1, len(argv)):
            option = argv[j]
            if not option.startswith("-") or option == "--":
                break
            wanted = (flags is None and (option == "--command" or (not option.startswith("--") and "c" in option))
                      or flags is not None and option in flags)
            if wanted and j + 1 < len(argv):
                found.append((i, j + 1))
                break
    return found


def _tag(where: str, text: Any) -> int:
    from kaapcli.core.dicom import parse_tag

    try:
        return parse_tag(str(text))
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def _input(where: str, name: str, spec: Any) -> InputSpec:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: input {name!r} must be an object")
    unknown = set(spec) - {"required_tags", "required_values", "complete_when"}
    if unknown:
        raise ConfigError(f"{where}: input {name!r}: unknown key(s) {', '.join(sorted(unknown))}",
                          hint="keys are required_tags, required_values, complete_when")
    values = []
    for tag, pattern in spec.get("required_values", {}).items():
        try:
            values.append((_tag(where, tag), re.compile(str(pattern))))
        except re.error as exc:
            raise ConfigError(f"{where}: input {name!r}: bad regular expression {pattern!r}: {exc}") from None
    complete = spec.get("complete_when")
    completeness = None
    if complete is not None:
        if not isinstance(complete, dict) or set(complete) - COMPLETE_KEYS or not complete:
            raise ConfigError(f"{where}: input {name!r}: 'complete_when' takes {', '.join(sorted(COMPLETE_KEYS))}",
                              hint='e.g. {"instances_from": ["NumberOfSlices", "NumberOfTemporalPositions"]}')
        tags = complete.get("instances_from", [])
        tags = [tags] if isinstance(tags, str) else tags
        try:
            minimum = int(complete.get("min_instances", 0))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: input {name!r}: 'min_instances' must be an integer") from None
        completeness = Completeness(tuple(_tag(where, t) for t in tags), minimum,
                                    duration(where, complete.get("timeout")))
    return InputSpec(name, tuple(_tag(where, t) for t in spec.get("required_tags", [])), tuple(values),
                     completeness)


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
    """Dependencies first; among rules whose dependencies are met: lower sortPosition first, then higher
    priority, then name."""
    by_name = {r.name: r for r in rules}
    done: list[Rule] = []
    names: set[str] = set()
    pending = sorted(rules, key=lambda r: (r.sort_position, -r.priority, r.name))
    while pending:
        ready = [r for r in pending if all(d in names or d not in by_name for d in r.depends_on)]
        if not ready:
            raise ConfigError(f"rules depend on each other in a cycle: {', '.join(r.name for r in pending)}")
        done.append(ready[0])
        names.add(ready[0].name)
        pending.remove(ready[0])
    return done


# --------------------------------------------------------------------------- matching

def read_header(path: Path, tags: Iterable[int]) -> dict[int, list[str]]:
    """The string values of some tags of a DICOM file (multi-valued → several strings; a sequence →
    one value per item, so ``required_tags`` means "present with at least one item")."""
    from kaapcli.core import dicom

    wanted = set(tags) | {0x0020000E, 0x0020000D, 0x00100020}
    ds = dicom.read(path, stop_before_pixels=True, specific_tags=sorted(wanted))
    return header_of(ds, wanted)


def header_of(ds: Any, wanted: Iterable[int]) -> dict[int, list[str]]:
    header: dict[int, list[str]] = {}
    for tag in wanted:
        elem = ds.get(tag)
        if elem is None or elem.value is None:
            continue
        if elem.VR == "SQ":
            header[tag] = [f"item {n}" for n in range(1, len(elem.value) + 1)]
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        header[tag] = [str(v).strip() for v in values]
    return header


def series_from_files(paths: list[Path], tags: Iterable[int], aets: tuple[str, str] = ("", ""),
                      host: str = "") -> Series:
    header = read_header(paths[0], tags)
    series_dirs = {p.parent for p in paths}
    series_dir = series_dirs.pop() if len(series_dirs) == 1 else Path(os.path.commonpath([str(p) for p in paths]))
    return Series(series_uid=header.get(0x0020000E, [""])[0], series_dir=series_dir,
                  study_uid=header.get(0x0020000D, [""])[0], patient_id=header.get(0x00100020, [""])[0],
                  calling_aet=aets[0], called_aet=aets[1], calling_host=host, header=header, files=list(paths))


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


def input_accepts(spec: InputSpec, series: Series) -> bool:
    """An input takes a series that satisfies its conditions and, with ``complete_when``, arrived whole."""
    if not spec.accepts(series.header):
        return False
    return spec.complete_when is None or spec.complete_when.satisfied(series.header, len(series.files))


def complete_groups(rule: Rule, series: Iterable[Series]) -> Iterator[tuple[str, dict[str, Series]]]:
    """DicomNode-style groups: (group value, {input name: series}) for each group with every input present."""
    groups: dict[str, dict[str, Series]] = {}
    for s in series:
        key = (s.header.get(rule.group_by) or [""])[0]
        for spec in rule.inputs:
            if input_accepts(spec, s):
                groups.setdefault(key, {}).setdefault(spec.name, s)
    for key in sorted(groups):
        if len(groups[key]) == len(rule.inputs):
            yield key, groups[key]


# --------------------------------------------------------------------------- planning: fired rules → jobs

@dataclass
class Firing:
    """A rule that fired, with what its job is filled from."""

    rule: Rule
    series: Series  # the series (of a group: its first input's)
    values: dict[str, str]  # placeholder values (tokens and our own paths)
    raw: dict[str, str] = field(default_factory=dict)  # raw header values (for KAAPCLI_RAW_*)
    members: list[Series] = field(default_factory=list)  # a group's or a batch's series


@dataclass
class Context:
    """What planning needs besides the rules: where runs keep their files, who we are, the config."""

    journal: Journal
    aet: str = "KAAPCLI"
    config: Any = None
    host: str = field(default_factory=lambda: token(socket.gethostname()))


def fill(argv: Iterable[str], values: Mapping[str, str]) -> list[str]:
    """Substitute placeholders; each value is already a token or one of our own absolute paths."""
    return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def plan(firings: list[Firing], ctx: Context) -> tuple[list[Job], list[RunRecord]]:
    """Jobs for rules fired together (one series, or one group), in run order, with dependencies as job
    ids; callbacks are evaluated here (in a child Python).  Also the records decided without running:
    dependents of a rule that did not fire (skipped, not a failure) and rules whose callback failed."""
    from kaapcli.core.runs import evaluate_callback

    batch = new_id()
    by_name = {f.rule.name: f for f in firings}
    jobs: dict[str, Job] = {}
    decided: dict[str, RunRecord] = {}
    for rule in run_order([f.rule for f in firings]):
        firing = by_name[rule.name]
        job = _job(firing, ctx, batch)
        absent = [d for d in rule.depends_on if d not in jobs and d not in decided]
        if absent:  # a dependency that did not fire for this series: not a failure
            decided[rule.name] = RunRecord.of(job, start=now(), end=now(), status="skipped",
                                              message=f"dependency did not fire: {', '.join(absent)}")
            continue
        job.depends_on = [(jobs[d].id if d in jobs else decided[d].id) for d in rule.depends_on]
        for dep in rule.depends_on:
            if dep in jobs:  # a copy: run_batch adds each dependency's results to its dependents' own
                job.added_params.update(json.loads(json.dumps(jobs[dep].added_params)))
        if rule.callback:
            try:
                wanted, extra = evaluate_callback(job, rule.callback, ctx.journal)
            except RuntimeError as exc:
                decided[rule.name] = RunRecord.of(job, start=now(), end=now(), status="failed", message=str(exc),
                                                  log=str(ctx.journal.log_path(job.id)))
                continue
            if not wanted:
                continue  # the callback says no: the rule does not fire (nor do its dependents)
            job.added_params[rule.name] = extra
        jobs[rule.name] = job
        if rule.reply:
            reply = _reply_job(firing, job, ctx, batch)
            jobs[f"{rule.name}:reply"] = reply
    return list(jobs.values()), list(decided.values())


def _job(firing: Firing, ctx: Context, batch: str) -> Job:
    rule = firing.rule
    job_id = new_id()
    values = dict(firing.values)
    run_dir = (ctx.journal.path.parent / "work" / job_id).absolute()
    values["run_dir"], values["batch_dir"] = str(run_dir), str(run_dir / "batch")
    uses = " ".join([*rule.run, rule.outputs or ""])
    layout: dict[str, Any] = {}
    if "{batch_dir}" in uses or rule.dag is not None:  # Kaapana's <run>/batch/<series>/get-input-data/
        layout = {"run_dir": str(run_dir), "copy": rule.fetch_method == "copy",
                  "batch": {token(m.series_uid): [str(p.absolute()) for p in m.files]
                            for m in firing.members or [firing.series]}}
    elif "{run_dir}" in uses:
        layout = {"run_dir": str(run_dir)}
    env = {k: v if isinstance(v, str) else json.dumps(v) for k, v in rule.params.items()}
    env.update(environment(values, firing.raw))
    fields = rule.header_fields or tuple(sorted({*DEFAULT_HEADER_FIELDS, *_keywords(rule.tags_needed())}))
    if not (rule.callback or rule.worker):
        fields = ()  # a command reads the files itself; its journal entry keeps no header values
    kwargs = {"headers": firing.series.headers(fields), "params": dict(rule.params), **values}
    reads = [str(m.series_dir.absolute()) for m in firing.members or [firing.series]]
    if "{study_dir}" in uses:
        reads.append(values["study_dir"])
    if rule.depends_on and "{out}" in uses:  # what its dependencies wrote there
        reads.append(values["out"])
    return Job(id=job_id, rule=rule.name, series_uid=firing.series.series_uid, batch=batch,
               argv=fill(rule.run, values), worker=rule.worker or "", kwargs=kwargs, env=env, timeout=rule.timeout,
               python_path=[rule.base_dir] if rule.base_dir else [], queue=queue_of(rule), retries=rule.retries,
               retry_intervals=list(rule.retry_intervals), layout=layout, inputs=list(dict.fromkeys(reads)),
               description=describe(rule.name, firing.series.series_uid, ctx))


def describe(rule: str, series_uid: str, ctx: Context) -> str:
    """A run in one readable line (the queue's dashboard shows it): rule, series, node; header values as tokens."""
    return f"rule {rule}, series {token(series_uid)}, node {token(ctx.aet)}@{ctx.host}"


def queue_of(rule: Rule) -> str:
    """The RQ queue of a rule's jobs: dcm-processor's queue name, else high/default/low by priority."""
    return rule.queue or ("high" if rule.priority > 0 else "low" if rule.priority < 0 else "default")


def _keywords(tags: Iterable[int]) -> list[str]:
    from pydicom.datadict import keyword_for_tag

    return [k for k in (keyword_for_tag(t) for t in tags) if k]


def _reply_job(firing: Firing, job: Job, ctx: Context, batch: str) -> Job:
    """DicomNode's reply: after the rule succeeded, its outputs go back to the sender, as a run of its own
    (``kaapcli send``): to the [pacs] profile whose AE title is the calling one, else to the calling AE at
    the association's host on ``reply_port``."""
    import sys

    rule, series = firing.rule, firing.series
    outputs = fill([rule.outputs or ""], {**firing.values, **{k: v for k, v in job.kwargs.items()
                                                              if isinstance(v, str)}})[0]
    target = _reply_target(rule, series, ctx)
    argv = [sys.executable, "-m", "kaapcli", "send", outputs, "--to", target, "--calling-aet", ctx.aet, "-q"]
    env = {k: v for k, v in job.env.items() if k.startswith("KAAPCLI_")}
    if ctx.config is not None and getattr(ctx.config, "path", None):
        env["KAAPCLI_CONFIG"] = str(ctx.config.path)
    return Job(id=new_id(), rule=f"{rule.name}:reply", series_uid=series.series_uid, batch=batch, argv=argv,
               env=env, depends_on=[job.id], timeout=rule.timeout, queue=job.queue, retries=rule.retries,
               retry_intervals=list(rule.retry_intervals), inputs=[outputs],
               description=describe(f"{rule.name}:reply", series.series_uid, ctx))


def _reply_target(rule: Rule, series: Series, ctx: Context) -> str:
    calling = series.calling_aet.strip()
    profiles = getattr(ctx.config, "profiles", {}).get("pacs", {}) if ctx.config is not None else {}
    for name, profile in sorted(profiles.items()):
        if str(profile.get("aet", "")).strip() == calling:
            return str(name)
    if series.calling_host and rule.reply_port:
        from kaapcli.core.net.peers import check_aet

        try:
            return f"{check_aet(calling)}@{series.calling_host}:{rule.reply_port}"
        except UsageError:
            pass
    return f"no-profile-for-{token(calling)}"  # the reply run fails with send's own message, journalled


# --------------------------------------------------------------------------- live mode (receive, watch)

class RuleRunner:
    """Runs rules for series as they complete, in a bounded thread pool (each job is a child process).

    Series rules run once per matching series; a group rule runs once per complete group, when the
    last of its inputs arrives.  A failing rule is journalled and never stops the caller.
    """

    def __init__(self, rules: list[Rule], journal: Path, out: Path | None = None, jobs: int = 2, *,
                 aet: str = "KAAPCLI", config: Any = None, dispatcher: Any = None):
        from concurrent.futures import ThreadPoolExecutor

        self.rules = rules
        self.series_rules = [r for r in rules if not r.is_group_rule]
        self.group_rules = [r for r in rules if r.is_group_rule]
        self.tags = set().union(*(r.tags_needed() for r in rules)) if rules else set()
        self.ctx = Context(Journal(journal), aet, config)
        self.out = out
        self.pool = ThreadPoolExecutor(max(1, jobs), thread_name_prefix="kaapcli-rules")
        self.futures: list[Any] = []
        self.completed: list[Series] = []
        self.fired_groups: set[tuple[str, str]] = set()
        self._headers: dict[str, dict[int, list[str]]] = {}
        self.dispatcher = dispatcher  # a kaapcli.core.queue.Dispatcher: jobs go to queue workers

    # ---- what the receiver asks before storing an instance, and while a series is open

    def accepts(self, header: Mapping[int, list[str]]) -> bool:
        """Whether any rule or input could take this instance (``--reject-unmatched``)."""
        return any(rule.might_accept(header) for rule in self.rules)

    def ready(self, series_uid: str, first_file: Path, instances: int, quiet: float) -> bool | None:
        """DicomNode's completeness: True when an input's expected instance count has arrived, False to hold
        a series whose input asks for a longer quiet time, None to leave it to the series timeout."""
        specs = [s for r in self.group_rules for s in r.inputs if s.complete_when is not None]
        if not specs:
            return None
        header = self._headers.get(series_uid)
        if header is None:
            try:
                header = self._headers[series_uid] = read_header(first_file, self.tags)
            except Exception:  # noqa: BLE001 - an unreadable file: leave the series to the timeout
                return None
        verdict: bool | None = None
        for spec in specs:
            if not spec.accepts(header) or spec.complete_when is None:
                continue
            expected = spec.complete_when.expected(header)
            if expected and instances >= max(expected, spec.complete_when.min_instances):
                return True
            if spec.complete_when.timeout is not None:
                if quiet >= spec.complete_when.timeout:
                    return True
                verdict = False
        return verdict

    # ---- a series is complete

    def series_complete(self, files: list[Path], aets: tuple[str, str] = ("", ""), host: str = "") -> Series:
        """Called once per complete series: schedules its matching rules and any group that is now complete."""
        series = series_from_files(sorted(files), self.tags, aets, host)
        self._headers.pop(series.series_uid, None)
        if any(r.match for r in self.series_rules):
            from kaapcli.core.meta import series_document

            series.document, _ = series_document(sorted(files))
        fired = [Firing(r, series, series.values(self.out), series.raw_values())
                 for r in self.series_rules if matches(r, series)]
        if fired:
            self.futures.append(self.pool.submit(self._run, fired))
        self.completed.append(series)
        for rule in self.group_rules:
            for key, members in complete_groups(rule, self.completed):
                if (rule.name, key) in self.fired_groups:
                    continue
                self.fired_groups.add((rule.name, key))
                self.futures.append(self.pool.submit(self._run, [group_firing(rule, members, self.out)]))
        return series

    def _run(self, firings: list[Firing]) -> list[RunRecord]:
        jobs, decided = plan(firings, self.ctx)
        if self.dispatcher is not None:
            return list(self.dispatcher.submit(jobs, decided))
        return run_batch(jobs, self.ctx.journal, decided)

    def close(self) -> list[RunRecord]:
        """Wait for every scheduled run (or, on a queue, until each is handed over); return their records."""
        self.pool.shutdown(wait=True)
        if self.dispatcher is not None:
            self.dispatcher.close()
        return [record for fut in self.futures for record in fut.result()]


def group_firing(rule: Rule, members: dict[str, Series], out: Path | None) -> Firing:
    first = members[rule.inputs[0].name]
    values = first.values(out)
    values.update({f"input_{name}": str(s.series_dir.absolute()) for name, s in members.items()})
    return Firing(rule, first, values, first.raw_values(), list(members.values()))


# --------------------------------------------------------------------------- batch mode (kaapcli trigger)

def default_journal() -> Path:
    from kaapcli.core.config import data_home

    return Path(os.environ.get("KAAPCLI_JOURNAL") or data_home() / "runs.jsonl")


class TriggerOperator:
    """The batch engine's operator for ``kaapcli trigger``: one item per series, its matching rules run."""

    name = "trigger"
    grouped = True
    supports_dry_run = True

    def __init__(self, rules: list[Rule], journal: Path, out: Path | None, config: Any = None, *,
                 queue: Any = None, stage: Any = None):
        self.rules = [r for r in rules if not r.is_group_rule and not r.is_batch_rule]
        self.ctx = Context(Journal(journal), config=config)
        self.out = out
        self.tags = set().union(*(r.tags_needed() for r in self.rules)) if self.rules else set()
        self.queue, self.stage = queue, stage  # QueueSettings, Stage: hand the runs to queue workers
        self._dispatcher: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dispatcher": None}  # a Redis connection stays in its process

    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            from kaapcli.core.queue import Dispatcher

            self._dispatcher = Dispatcher(self.queue, self.ctx.journal, self.stage, follow=False)
        return self._dispatcher

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
        fired = [Firing(r, series, series.values(self.out), series.raw_values())
                 for r in self.rules if matches(r, series)]
        if not fired:
            return Outcome(skipped=True, message="no rule matches")
        if ctx.dry_run:
            return Outcome(message="would run " + ", ".join(f.rule.name for f in fired))
        jobs, decided = plan(fired, self.ctx)
        if self.queue is not None:
            return queued_outcome(self.dispatcher().submit(jobs, decided))
        return outcome_of(run_batch(jobs, self.ctx.journal, decided))


def batch_firings(rules: list[Rule], series: list[Series], out: Path | None) -> list[Firing]:
    """Kaapana's ``single_execution: false``: one run per rule over every matching series of the batch."""
    firings = []
    for rule in rules:
        members = [s for s in series if matches(rule, s)]
        if members:
            firings.append(Firing(rule, members[0], members[0].values(out), members[0].raw_values(), members))
    return firings


def outcome_of(records: list[RunRecord]) -> Any:
    """Turn the runs of one series into an Outcome; a failed, timed-out or cancelled run fails the item (a
    rule skipped because its dependency did not fire does not)."""
    from kaapcli.core.batch import Outcome
    from kaapcli.exitcodes import ExitCode, KaapcliError

    summary = ", ".join(f"{r.rule}: {r.status}" for r in records)
    bad = [r for r in records if r.status in FAILED]
    if bad:
        raise KaapcliError(f"rules {summary} (logs: {', '.join(r.log for r in bad if r.log)})",
                           code=ExitCode.ITEMS_FAILED)
    return Outcome(outputs=[Path(r.log) for r in records if r.log], message=summary)


def queued_outcome(records: list[RunRecord]) -> Any:
    """The Outcome of a series whose runs went to a queue: ok once handed over (or kept pending); failed when
    a run was settled as failed right away (its callback)."""
    from kaapcli.core.batch import Outcome

    failed = [r for r in records if r.status in FAILED]
    if failed:
        return outcome_of(records)
    counts = {s: sum(r.status == s for r in records) for s in ("queued", "pending", "skipped")}
    return Outcome(message=", ".join(f"{n} {s}" for s, n in counts.items() if n))
