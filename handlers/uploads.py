"""Routes that stream their body (an image, a model's weights): the one place an upload is counted
against its limit and refused.

A refusal found in prepare() is answered once the body is drained (`defers_refusals`): Tornado drops a
connection answered mid-body, and the client would see a reset instead of the JSON error. A body past
the limit is drained unkept and refused with 413 at its end; one far past it (`can_drain` says no) is
refused at once, closing the connection.
"""

from __future__ import annotations

from typing import NoReturn

from tornado.http1connection import HTTP1Connection

from core.errors import PayloadTooLarge
from handlers.base import BaseHandler


class UploadHandler(BaseHandler):
    """A streamed body counted against `upload_limit`; subclasses say what they keep of each chunk."""

    defers_refusals = True
    #: The most bytes of a body kept; set in the subclass's initialize().
    upload_limit: int = 0
    _received: int = 0

    def initialize(self, route_name: str = "unmatched") -> None:
        super().initialize(route_name)
        self._received = 0  # data_received may run for any method, OPTIONS included

    def allow_body(self, max_bytes: int, timeout_seconds: float | None = None) -> None:
        """Let this request's body grow to `max_bytes` (and take `timeout_seconds`), past the server's
        http.max_body_bytes: Tornado's HTTP/1 connection carries both bounds, per request."""
        connection = self.request.connection
        assert isinstance(connection, HTTP1Connection), "uploads are served over HTTP/1"
        connection.set_max_body_size(max_bytes)
        if timeout_seconds is not None:
            connection.set_body_timeout(timeout_seconds)

    def oversized_message(self) -> str:
        """The sentence a 413 says: which limit the body passed."""
        return f"The body is larger than the limit of {self.upload_limit} bytes."

    def keeps(self, chunk: bytes) -> bool:
        """Count `chunk`; whether to keep it (not past the limit, nor with a refusal pending)."""
        self._received += len(chunk)
        return self.refusal is None and self._received <= self.upload_limit

    def refuse_oversized(self) -> NoReturn:
        self.set_header("Connection", "close")
        raise PayloadTooLarge(self.oversized_message())

    def raise_refusal(self) -> None:
        """At the end of the body: the refusal prepare() deferred, else 413 if the body passed the limit."""
        if self.refusal:
            raise self.refusal
        if self._received > self.upload_limit:
            self.refuse_oversized()
