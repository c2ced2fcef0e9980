"""Errors a backend raises to the HTTP layer; each maps to one HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. `status` is the HTTP status the server answers with."""

    status = 500


class QueueFull(EngineError):
    """The waiting queue is at its limit: retry later (429 + Retry-After)."""

    status = 429

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class NotAccepting(EngineError):
    """Not ready yet, or shutting down (503 + Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(EngineError):
    """The request can never fit (too many tokens for the model or the KV pool): 413."""

    status = 413


class RequestFailed(EngineError):
    """This request failed inside the engine; the batch it shared goes on (500 for it alone)."""

    status = 500
