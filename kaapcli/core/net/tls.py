"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profiles): the TLS settings of a peer or a receiver, as SSL contexts.

A requester (``echo``, ``send``, ``query``, ``retrieve``) verifies the peer's certificate against ``ca`` (or the
system's trust store) and, with ``verify="host"`` (the default), that it names the host it connects to;
``cert``/``key`` are its own certificate for a peer that asks for one.  An acceptor (``receive``, the C-MOVE
receiver) presents ``cert``/``key`` and, given ``ca``, requires every client to present a certificate signed by
it (mutual authentication).  TLS 1.2 is the minimum, as BCP 195 requires; the cipher suites are OpenSSL's
defaults of the Python build.  Nothing here ever prints a key or its password.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kaapcli.exitcodes import ConfigError

if TYPE_CHECKING:
    import ssl

VERIFY_MODES = ("host", "chain")


@dataclass(frozen=True)
class TLS:
    """Where the PEM files are and how strictly the peer is verified."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    verify: str = "host"  # host: chain and host name; chain: the chain only (DCMTK's and Orthanc's check)
    key_password: str = field(default="", repr=False)
    where: str = "--tls"  # names the option or profile in messages

    def client_context(self) -> ssl.SSLContext:
        return _context(self, server=False)

    def server_context(self) -> ssl.SSLContext:
        if not (self.cert and self.key):
            raise ConfigError(f"{self.where}: a TLS receiver needs --tls-cert and --tls-key")
        return _context(self, server=True)


@functools.lru_cache(maxsize=8)
def _context(settings: TLS, server: bool) -> ssl.SSLContext:
    import ssl

    if settings.verify not in VERIFY_MODES:
        raise ConfigError(f"{settings.where}: tls_verify {settings.verify!r} is not one of {', '.join(VERIFY_MODES)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert or settings.key:
        if not (settings.cert and settings.key):
            raise ConfigError(f"{settings.where}: --tls-cert and --tls-key go together")
        try:
            ctx.load_cert_chain(settings.cert, settings.key, password=_password(settings))
        except OSError as exc:
            raise ConfigError(f"{settings.where}: cannot read {exc.filename or settings.cert}: {exc.strerror}") from exc
        except ssl.SSLError as exc:
            raise ConfigError(f"{settings.where}: {settings.cert} / {settings.key}: not a matching PEM certificate "
                              f"and key ({exc.reason or exc})",
                              hint="an encrypted key needs KAAPCLI_TLS_KEY_PASSWORD") from exc
    if server:
        if settings.ca:
            _load_ca(ctx, settings)
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual authentication: clients without a trusted certificate fail
        return ctx
    ctx.check_hostname = settings.verify == "host"
    ctx.verify_mode = ssl.CERT_REQUIRED
    if settings.ca:
        _load_ca(ctx, settings)
    else:
        ctx.load_default_certs()
    return ctx


def _load_ca(ctx: Any, settings: TLS) -> None:
    import ssl

    try:
        ctx.load_verify_locations(settings.ca)
    except OSError as exc:
        raise ConfigError(f"{settings.where}: cannot read {settings.ca}: {exc.strerror}") from exc
    except ssl.SSLError as exc:
        raise ConfigError(f"{settings.where}: {settings.ca}: no PEM certificate ({exc.reason or exc})") from exc


def _password(settings: TLS) -> Any:
    def password() -> str:
        # OpenSSL would otherwise prompt on the terminal and hang a non-interactive run
        if not settings.key_password:
            raise ConfigError(f"{settings.where}: {settings.key} is encrypted",
                              hint="set KAAPCLI_TLS_KEY_PASSWORD (or tls_key_password_env in the profile)")
        return settings.key_password

    return password


def describe(exc: BaseException) -> str:
    """One line for a failed TLS handshake, without OpenSSL's file and line numbers."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        if "mismatch" in (exc.verify_message or ""):
            return f"TLS: the peer's certificate is not for that host ({exc.verify_message.rstrip('.')})"
        return f"TLS: the peer's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE"):
            return f"TLS handshake failed ({reason}): does the peer speak DICOM TLS on that port?"
        if "ALERT" in reason:
            return f"TLS handshake refused by the peer ({reason}): does it want a (trusted) client certificate?"
        return f"TLS handshake failed ({reason})"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "TLS handshake failed: the peer closed the connection (does it speak DICOM TLS on that port?)"
    return f"TLS handshake failed ({exc})"
