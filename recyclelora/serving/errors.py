"""The one error type a request can cause: an HTTP status and a sentence saying what to fix."""

from __future__ import annotations


class RequestError(ValueError):
    """A client mistake, answered ``{"error": message}`` with ``status`` (4xx) or, for 503, a
    temporary condition the client should retry."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
