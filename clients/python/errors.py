"""Typed errors for everything a call can meet, so callers can `except` the case they handle.

Each carries what the server said (`code`, `message`), the HTTP `status` and the `request_id` the
server logged the request under: that id is what to quote when asking about a failure.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error the client raises for a failed call."""

    def __init__(self, code: str, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
                f"status={self.status!r}, request_id={self.request_id!r})")


class AuthError(InferenceError):
    """401: no token, a bad or expired one, a revoked session, or a wrong API key; `code` says which."""


class ValidationError(InferenceError):
    """400 or 422: the request was understood but refused (bad option, bad image, bad parameter)."""


class NotFoundError(InferenceError):
    """404: an unknown history id, or a route this server does not have."""


class PayloadTooLarge(InferenceError):
    """413: the image is over the server's `http.max_body_bytes`."""


class UnsupportedMediaType(InferenceError):
    """415: the server does not take this kind of body."""


class RateLimited(InferenceError):
    """429: slow down; `retry_after` is the server's hint in seconds (None when it gave none)."""

    def __init__(self, code: str, message: str, *, status: int | None = None, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(code, message, status=status, request_id=request_id)
        self.retry_after = retry_after


class ServerError(InferenceError):
    """5xx: the server failed on this request; it is logged under `request_id`."""


class ServerBusy(ServerError):
    """503: the queue is full or the store is unreachable; `retry_after` is the server's hint in seconds."""

    def __init__(self, code: str, message: str, *, status: int | None = None, request_id: str | None = None,
                 retry_after: float | None = None):
        super().__init__(code, message, status=status, request_id=request_id)
        self.retry_after = retry_after


class ConnectionFailed(InferenceError):
    """No answer from the server (refused, reset, timed out) even after the retries."""


def error_class(status: int) -> type[InferenceError]:
    """The exception class for an HTTP error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else InferenceError


_BY_STATUS: dict[int, type[InferenceError]] = {
    400: ValidationError,
    401: AuthError,
    404: NotFoundError,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: RateLimited,
    503: ServerBusy,
}
