"""The one exit-code table of kaapcli, and the errors that carry a code.

Codes follow BSD sysexits(3) where one fits.  README and the man page copy
``EXIT_CODES``; a test fails when they drift.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ITEMS_FAILED = 1
    USAGE = 2
    DATAERR = 65
    NOINPUT = 66
    UNAVAILABLE = 69
    SOFTWARE = 70
    CANTCREAT = 73
    TEMPFAIL = 75
    CONFIG = 78
    INTERRUPTED = 130


EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "all items ok (outputs already up to date count as ok)",
    ExitCode.ITEMS_FAILED: "finished, but some items failed",
    ExitCode.USAGE: "usage error: bad option, argument or query syntax",
    ExitCode.DATAERR: "bad input data (every item failed on bad data)",
    ExitCode.NOINPUT: "no input: an input does not exist or cannot be read, or none was found",
    ExitCode.UNAVAILABLE: "service unavailable: PACS, index or object store unreachable or refusing",
    ExitCode.SOFTWARE: "internal error (a bug: please report it, rerun with --debug)",
    ExitCode.CANTCREAT: "cannot create or write an output",
    ExitCode.TEMPFAIL: "temporary failure, retry later",
    ExitCode.CONFIG: "configuration error",
    ExitCode.INTERRUPTED: "interrupted (SIGINT/SIGTERM)",
}


class KaapcliError(Exception):
    """An error with a one-line message, an exit code and an optional hint."""

    code: ExitCode = ExitCode.SOFTWARE

    def __init__(self, message: str, *, hint: str = "", code: ExitCode | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class UsageError(KaapcliError):
    code = ExitCode.USAGE


class DataError(KaapcliError):
    code = ExitCode.DATAERR


class NoInputError(KaapcliError):
    code = ExitCode.NOINPUT


class UnavailableError(KaapcliError):
    code = ExitCode.UNAVAILABLE


class CantCreateError(KaapcliError):
    code = ExitCode.CANTCREAT


class TempFailError(KaapcliError):
    code = ExitCode.TEMPFAIL


class ConfigError(KaapcliError):
    code = ExitCode.CONFIG
