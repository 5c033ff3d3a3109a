"""Configuration: options > ``KAAPCLI_*`` environment > TOML config file > defaults.

The config file is the first of ``$KAAPCLI_CONFIG``, ``./kaapcli.toml`` and
``~/.config/kaapcli/config.toml`` (``$XDG_CONFIG_HOME`` honoured) that exists::

    [defaults]              # default values of command options, by option name
    workers = 4
    calling_aet = "KAAPCLI"
    index = "/data/kaapcli/index.db"

    [pacs.orthanc]          # a PACS profile: --pacs orthanc, or "orthanc" as a PEER
    aet = "ORTHANC"
    host = "127.0.0.1"
    port = 4242
    dicomweb = "http://127.0.0.1:8042/dicom-web"
    username = "kaapcli"
    password_env = "ORTHANC_PASSWORD"   # secrets may come from the environment

    [index.prod]            # --index prod
    url = "https://opensearch.example.org:9200"
    project = "admin"

    [s3.minio]              # --s3 minio
    endpoint = "http://127.0.0.1:9000"
    access_key = "..."
    secret_key_env = "MINIO_SECRET"

    [queue.cluster]         # --queue cluster: RQ workers on Redis
    url = "redis://redis.example.org:6379/0"
    password_env = "REDIS_PASSWORD"

Option values from the environment and from ``[defaults]`` are applied by the CLI
(click's envvar and default_map); this module only reads and resolves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaapcli.exitcodes import ConfigError

PROFILE_KINDS = ("pacs", "index", "s3", "queue")
SECRET_WORDS = ("password", "secret", "token", "key")
PATH_KEYS = ("tls_key",)  # where a secret is, not the secret: shown, so that a wrong path can be seen


def config_paths() -> list[Path]:
    paths = []
    if os.environ.get("KAAPCLI_CONFIG"):
        paths.append(Path(os.environ["KAAPCLI_CONFIG"]))
    paths.append(Path("kaapcli.toml"))
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(xdg) / "kaapcli" / "config.toml")
    return paths


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "kaapcli"


@dataclass
class Config:
    path: Path | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def profile(self, kind: str, name: str) -> dict[str, Any] | None:
        """A named profile with ``*_env`` indirections resolved, or None when there is none."""
        raw = self.profiles.get(kind, {}).get(name)
        if raw is None:
            return None
        resolved: dict[str, Any] = {}
        for key, value in raw.items():
            if key.endswith("_env"):
                env_value = os.environ.get(str(value))
                if env_value is None:
                    raise ConfigError(f"{self.path}: [{kind}.{name}] {key}: environment variable {value} is not set")
                resolved[key[:-4]] = env_value
            else:
                resolved.setdefault(key, value)
        return resolved

    def masked(self) -> dict[str, Any]:
        """Everything, secrets masked, for ``kaapcli config show``."""
        return {
            "file": str(self.path) if self.path else None,
            "defaults": mask_secrets(self.defaults),
            "profiles": {kind: {name: mask_secrets(p) for name, p in profs.items()}
                         for kind, profs in self.profiles.items()},
            "environment": mask_secrets({k: v for k, v in sorted(os.environ.items()) if k.startswith("KAAPCLI_")}),
        }


def is_secret(key: str) -> bool:
    low = key.lower()
    return any(word in low for word in SECRET_WORDS) and not low.endswith("_env") and low not in PATH_KEYS


def mask_secrets(values: dict[str, Any]) -> dict[str, Any]:
    return {k: ("****" if is_secret(k) and v else v) for k, v in values.items()}


def load_config(path: Path | None = None) -> Config:
    candidates = [path] if path else config_paths()
    for candidate in candidates:
        try:
            found = candidate.is_file()
        except OSError as exc:  # e.g. another user's home: a default location we may not look into is no config
            if path is not None:
                raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
            continue
        if found:
            return _parse(candidate)
    if path is not None:
        raise ConfigError(f"{path}: config file not found")
    return Config()


def _parse(path: Path) -> Config:
    import tomllib  # only when there is a file: ~3 ms of every start otherwise

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    unknown = set(data) - {"defaults", *PROFILE_KINDS}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s): {', '.join(sorted(unknown))}",
                          hint=f"sections are [defaults] and [{'|'.join(PROFILE_KINDS)}.NAME]")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    profiles: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in PROFILE_KINDS:
        section = data.get(kind, {})
        if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
            raise ConfigError(f"{path}: [{kind}] must hold tables like [{kind}.NAME]")
        profiles[kind] = section
    return Config(path=path, defaults={k.replace("-", "_"): v for k, v in defaults.items()}, profiles=profiles)
