"""Errors a user can cause or fix.

Each carries the one line the CLI prints and the exit status it uses, so the CLI
never has to know which layer raised it. Anything that is not a FailfirstError is
a bug and keeps its traceback.
"""

from __future__ import annotations


class FailfirstError(Exception):
    """An expected failure: printed as one line on stderr, never a traceback."""

    exit_code = 1


class UsageError(FailfirstError):
    """The request itself is wrong (bad flag, unknown SKU, key reused)."""

    exit_code = 2


class ConfigError(UsageError):
    """An environment variable or scenario value is malformed."""


class ValidationError(UsageError):
    """An order request failed validation."""


class IdempotencyConflict(UsageError):
    """The key was first used with a different request body."""


class RequestInProgress(FailfirstError):
    """The key's first request is still being handled; retry later."""

    exit_code = 3


class RateLimited(FailfirstError):
    """The customer's token bucket is empty."""

    exit_code = 4

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RedisUnavailable(FailfirstError):
    """Redis cannot be used: down, refusing our credentials, or named by a malformed URL.

    `state` is the short form `failfirst status` heads its Redis line with, so a
    wrong password does not read as a server that is down.
    """

    exit_code = 5

    def __init__(self, message: str, state: str = "unreachable") -> None:
        super().__init__(message)
        self.state = state


class StoreError(FailfirstError):
    """The database is missing, locked, corrupt or of another schema version."""

    exit_code = 6


class NotFound(FailfirstError):
    """An order, SKU or DLQ entry that does not exist."""

    exit_code = 7
