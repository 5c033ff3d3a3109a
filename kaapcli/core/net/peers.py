"""Peers: ``AET@host:port`` (DIMSE), ``http(s)://host/path`` (a DICOMweb root) or a ``[pacs.NAME]`` profile."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from kaapcli.core.net.tls import TLS
from kaapcli.exitcodes import ConfigError, UsageError

_DIMSE = re.compile(r"^(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")
SERVER_KINDS = ("orthanc", "dcm4chee")


@dataclass(frozen=True)
class Timeouts:
    """Seconds: TCP connect, association negotiation (ACSE), DIMSE responses and idle network."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0

    @classmethod
    def of(cls, timeout: float | None = None, connect: float | None = None) -> Timeouts:
        base = cls() if timeout is None else cls(connect=min(timeout, cls.connect), acse=timeout, dimse=timeout,
                                                  network=timeout)
        return base if connect is None else replace(base, connect=connect)


@dataclass(frozen=True)
class Peer:
    """Where a DICOM service is: a DIMSE address, a DICOMweb root, or both (a profile)."""

    label: str
    aet: str = ""
    host: str = ""
    port: int = 0
    url: str = ""  # DICOMweb root, e.g. http://pacs:8042/dicom-web
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)  # DICOMweb bearer token (Authorization: Bearer)
    kind: str = ""  # server type for `delete`: orthanc | dcm4chee
    rest: str = ""  # REST root for `delete` (default: derived from url)
    prefer_web: bool = False
    tls: TLS | None = None  # DIMSE over TLS (PS3.15 B.1); None: plain TCP

    @property
    def has_dimse(self) -> bool:
        return bool(self.aet and self.host and self.port)

    @property
    def web(self) -> bool:
        """Whether commands talk DICOMweb to this peer (rather than DIMSE)."""
        return bool(self.url) and (self.prefer_web or not self.has_dimse)

    @property
    def address(self) -> str:
        return self.url if self.web else f"{self.aet}@{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.label if self.label == self.address else f"{self.label} ({self.address})"

    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username and not self.token else None

    def headers(self) -> dict[str, str]:
        """HTTP headers every DICOMweb request carries: the bearer token, when there is one (RFC 6750)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def with_aet(self, aet: str) -> Peer:
        return replace(self, aet=aet)

    def with_token(self, token: str | None) -> Peer:
        return replace(self, token=token) if token else self

    def with_tls(self, tls: TLS | None) -> Peer:
        return replace(self, tls=tls)


def check_aet(aet: str, what: str = "AE title") -> str:
    """An AE title per PS3.5 (AE VR, the default character repertoire): 1–16 printable ASCII characters, no
    backslash, as ``ul.wire_aet`` reads them from the network."""
    value = aet.strip()
    if not 1 <= len(value) <= 16 or "\\" in value or not all(" " <= c <= "~" for c in value):
        raise UsageError(f"{what} {aet!r}: must be 1-16 printable ASCII characters without backslash")
    return value


def parse_peer(text: str, config: Any = None) -> Peer:
    """Resolve a PEER argument; raises UsageError/ConfigError with a one-line reason."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        if not parts.hostname:
            raise UsageError(f"peer {text!r}: URL without a host")
        user, password = parts.username or "", parts.password or ""
        clean = text.rstrip("/")
        if user:  # keep credentials out of the URL (and out of messages)
            netloc = parts.netloc.rsplit("@", 1)[1]
            clean = parts._replace(netloc=netloc).geturl().rstrip("/")
        return Peer(label=clean, url=clean, username=user, password=password)
    match = _DIMSE.match(text)
    if match:
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise UsageError(f"peer {text!r}: port must be 1-65535")
        return Peer(label=text, aet=check_aet(match["aet"]), host=match["host"].strip("[]"), port=port)
    profile = config.profile("pacs", text) if config is not None else None
    if profile is None:
        raise UsageError(f"peer {text!r}: not AET@host:port, an http(s) URL, or a [pacs.{text}] profile",
                         hint="e.g. ORTHANC@127.0.0.1:4242 or http://127.0.0.1:8042/dicom-web")
    return _from_profile(text, profile)


def _from_profile(name: str, profile: dict[str, Any]) -> Peer:
    where = f"[pacs.{name}]"
    try:
        port = int(profile.get("port", 0) or 0)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} port: not a number: {profile.get('port')!r}") from None
    kind = str(profile.get("kind", "")).lower()
    if kind and kind not in SERVER_KINDS:
        raise ConfigError(f"{where} kind: {kind!r} is not one of {', '.join(SERVER_KINDS)}")
    peer = Peer(label=name, aet=str(profile.get("aet", "")), host=str(profile.get("host", "")), port=port,
                url=str(profile.get("dicomweb", "")).rstrip("/"), username=str(profile.get("username", "")),
                password=str(profile.get("password", "")), token=str(profile.get("token", "") or ""), kind=kind,
                rest=str(profile.get("rest", "")).rstrip("/"),
                prefer_web=str(profile.get("prefer", "")).lower() == "dicomweb", tls=tls_of_profile(where, profile))
    if not peer.has_dimse and not peer.url:
        raise ConfigError(f"{where}: needs aet, host and port, or dicomweb")
    if peer.aet:
        check_aet(peer.aet, f"{where} aet")
    return peer


TLS_KEYS = ("tls_cert", "tls_key", "tls_ca", "tls_verify")


def tls_of_profile(where: str, profile: dict[str, Any]) -> TLS | None:
    """The TLS settings of a profile: ``tls = true`` plus ``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_verify``
    (``host`` or ``chain``) and ``tls_key_password`` (usually ``tls_key_password_env``)."""
    enabled = profile.get("tls", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where} tls: must be true or false, not {enabled!r}")
    if not enabled:
        given = [key for key in TLS_KEYS if profile.get(key)]
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} without tls = true")
        return None
    return TLS(cert=str(profile.get("tls_cert", "")), key=str(profile.get("tls_key", "")),
               ca=str(profile.get("tls_ca", "")), verify=str(profile.get("tls_verify", "host")),
               key_password=str(profile.get("tls_key_password", "")), where=where)
