"""Errors raised by the rollout client, fleet and weight sync; each names the server it concerns."""
from __future__ import annotations


class RolloutError(RuntimeError):
    """Base class for rollout-side failures."""


class ResponseFormatError(RolloutError):
    """A server answered 200 but the body is not what the SGLang native API promises."""

    def __init__(self, server: str, field: str, message: str):
        self.server = server
        self.field = field
        super().__init__(f"{server}: bad response field {field!r}: {message}")


class ServerHTTPError(RolloutError):
    """A server answered with a non-2xx status."""

    def __init__(self, server: str, endpoint: str, status: int, body: str):
        self.server = server
        self.endpoint = endpoint
        self.status = status
        self.body = body
        super().__init__(f"{server}{endpoint}: HTTP {status}: {body[:300]}")


class ServerUnavailableError(RolloutError):
    """No answer within the configured deadline (connection errors, timeouts, or repeated 5xx)."""

    def __init__(self, server: str, endpoint: str, attempts: int, elapsed_s: float, last_error: str):
        self.server = server
        self.endpoint = endpoint
        self.attempts = attempts
        super().__init__(
            f"{server}{endpoint}: unavailable after {attempts} attempt(s) in {elapsed_s:.1f}s; last error: {last_error}"
        )


class WeightSyncError(RolloutError):
    """A weight update failed; the named server may be half-updated and should be restarted."""
