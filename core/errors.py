"""Domain errors. Each carries the HTTP status and the snake_case code that clients see.

They live at the bottom of the dependency chain so that every layer can raise them and the
base handler maps them to the JSON error shape in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

#: The most characters of a client's input an error message quotes.
QUOTE_CHARS = 40
#: The most names (unknown fields, say) an error message lists.
QUOTE_NAMES = 5


def quoted(value: Any) -> str:
    """A client's input as an error message quotes it: its repr, cut to QUOTE_CHARS characters with its
    full length said, so that an error never echoes a large input back whole."""
    if isinstance(value, str):
        return repr(value) if len(value) <= QUOTE_CHARS else f"{value[:QUOTE_CHARS]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}… ({len(text)} characters)"


def quoted_names(names: Iterable[Any]) -> str:
    """Names a client sent (unknown fields, say), sorted, each quoted, at most QUOTE_NAMES of them."""
    ordered = sorted(map(str, names))
    listed = ", ".join(quoted(name) for name in ordered[:QUOTE_NAMES])
    return listed if len(ordered) <= QUOTE_NAMES else f"{listed} and {len(ordered) - QUOTE_NAMES} more"


def error_document(code: str, message: str, *, oip: bool = False) -> dict[str, Any]:
    """The body every error is answered with: `{"error": {"code", "message"}}`, or with `oip` the Open
    Inference Protocol's `{"error": "<message>"}` (its clients, tritonclient, read that form)."""
    if oip:
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def error_json(code: str, message: str, *, oip: bool = False) -> str:
    """`error_document` serialised, as every HTTP answer of an error carries it."""
    return json.dumps(error_document(code, message, oip=oip))


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if headers:
            self.headers = headers


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


# What a 401 tells the client to do: each InvalidToken message for a session's token ends with one.
LOG_IN_AGAIN = "log in again: POST /v1/sessions"
SEND_TOKEN = "send 'Authorization: Bearer <token>' with the token from POST /v1/sessions"
SESSION_REVOKED = f"This session was logged out; {LOG_IN_AGAIN}."
SESSION_NOT_FOUND = f"This session has expired or no longer exists; {LOG_IN_AGAIN}."


class InvalidToken(ServiceError):
    """Missing, malformed, forged, expired or revoked credentials; `code` says which, and the message
    what to do (log in again, send a token, or which key setting lets a key in)."""

    status = 401
    code = "invalid_token"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class BadOptions(ServiceError):
    """An option is unknown or out of range; `field` names it."""

    status = 422
    code = "invalid_options"

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class BadWeights(ServiceError):
    status = 422
    code = "invalid_weights"


class BadImage(ServiceError):
    status = 422
    code = "invalid_image"


class ServiceBusy(ServiceError):
    status = 503
    code = "server_busy"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1):
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class RateLimited(ServiceBusy):
    status = 429
    code = "rate_limited"


class StoreUnavailable(ServiceBusy):
    code = "store_unavailable"


class InferenceFailed(ServiceError):
    status = 500
    code = "inference_failed"
