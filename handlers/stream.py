"""`GET /v1/stream`: many predictions over one WebSocket (Tornado's own).

Frames (JSON frames are text, images are binary):

    client -> {"token": "<token>"}                   first frame, unless the upgrade carried
                                                     `Authorization: Bearer <token>` (never the URL)
    server -> {"type": "ready", "session_id": "...", "max_in_flight": N}
    client -> {"ref": "a1", "options": {"top_k": 3}}  optional, describes the next image only
    client -> <binary frame: the image bytes>
    server -> {"type": "result", "ref": "a1", "seq": 0, "result": {...as POST /v1/predict...}}
           or {"type": "error", "ref": "a1", "seq": 0, "status": 422, "error": {"code", "message"}}

Results come in completion order; `seq` counts the stream's images from 0 and `ref` echoes the
client's. Each image goes through the same steps as `POST /v1/predict`: the session is read (so a
logout or an options change made elsewhere applies to the next image), the rate limit is charged,
the model runs and the result is recorded in the history before it is sent. Per-image failures
are error frames and the stream stays open; a missing, bad or revoked token closes it with 1008
(policy violation) and the error's code as the reason.

Limits, so that one client cannot make the server hold without bound:
- back-pressure: at most `http.stream_max_in_flight` images per connection are being classified; at
  that limit the handler stops reading frames (Tornado delivers no further message while
  `on_message` is pending), so TCP flow control holds the client back;
- the same holds for answers: while frames written to the client are still waiting for it to read
  them, no further frame is read, so for a client that sends and never reads, the server holds
  beyond the socket buffers at most one frame's answers and the results of its images in flight
  (and drops it after `http.write_timeout_seconds`, server.balance);
- protocol errors (a frame that is not JSON, not a header, or a header after a header) are error
  frames; the `http.stream_max_errors`-th is followed by a `too_many_errors` error frame and a 1008
  close with that reason. Per-image errors (a bad image, bad options) are not counted;
- a stream is pinged every `http.stream_ping_interval_seconds` (0: never); one that does not answer
  within `http.stream_ping_timeout_seconds` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import tornado.websocket

from core.errors import BadRequest, InvalidToken, ServiceError, error_document, quoted_names
from handlers.base import BaseHandler, parse_json
from service.auth import Policy
from service.classify import while_store_unavailable
from sessions.tokens import VerifiedToken

log = logging.getLogger("inference.stream")

POLICY_VIOLATION = 1008
GOING_AWAY = 1001  # the server shuts down: the client resumes on a new connection
_MAX_REF_LENGTH = 128
_FIRST_FRAME = ("The first frame must be {\"token\": \"<token>\"} (or send 'Authorization: Bearer <token>' with "
                "the upgrade), the token from POST /v1/sessions.")
_HEADER_KEYS = frozenset({"ref", "options"})


class StreamHandler(BaseHandler, tornado.websocket.WebSocketHandler):
    """The WebSocket predict stream; authenticated by its first frame or the upgrade's header."""

    auth_policy = Policy.STREAM
    defers_refusals = True  # a bad token with the upgrade is told after it, as a policy-violation close
    _verified: VerifiedToken | None = None

    # -- upgrade --------------------------------------------------------------------------------
    async def before_auth(self) -> None:
        # Counted in flight (BaseHandler.prepare) until the upgrade is answered (Tornado finishes the
        # request then); each image is counted again while it is classified, so shutdown waits for those.
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_header: dict[str, Any] | None = None
        self._seq = 0
        self._errors = 0
        self._last_write: asyncio.Future[None] | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._going_away = False
        # Each image's record carries "<stream>-<seq>" as its idempotency key, so that trying it again while the
        # store is unavailable (http.stream_store_retry_seconds) records it once.
        self._stream_key = uuid.uuid4().hex

    def check_origin(self, origin: str) -> bool:
        # Browsers on the listed origins may stream too (the token still has to be presented).
        return origin in self.http_settings.cors_origins or super().check_origin(origin)

    @property
    def max_message_size(self) -> int:
        return self.http_settings.max_body_bytes

    @property
    def max_in_flight(self) -> int:
        return self.http_settings.stream_max_in_flight

    @property
    def ping_interval(self) -> float | None:
        return self.http_settings.stream_ping_interval_seconds or None

    @property
    def ping_timeout(self) -> float | None:
        # Tornado caps the timeout at the interval (and warns); capped here, it stays quiet.
        interval = self.http_settings.stream_ping_interval_seconds
        return min(self.http_settings.stream_ping_timeout_seconds, interval) if interval else None

    # -- life cycle -----------------------------------------------------------------------------
    async def open(self, *args: str) -> None:
        if self.refusal is not None:
            self._refuse(self.refusal)
        elif self.principal.token is not None:
            await self._start_session(self.principal.token)
        else:
            timeout = self.http_settings.stream_auth_timeout_seconds
            self._auth_timer = asyncio.get_running_loop().call_later(timeout, self._auth_timed_out)

    def _auth_timed_out(self) -> None:
        if self._verified is None:
            self._refuse(InvalidToken(_FIRST_FRAME, code="missing_token"))

    async def _start_session(self, verified: VerifiedToken) -> None:
        try:
            session = await self.auth.resume(verified)
        except InvalidToken as exc:
            self._refuse(exc)
            return
        except ServiceError as exc:
            self._send(self._error_frame(exc, None, None))
            self.close(1011, exc.code)  # server error: the client may reconnect later
            return
        self._verified = verified
        self._send({"type": "ready", "session_id": session.id, "max_in_flight": self.max_in_flight})
        self.in_flight.streams.add(self)
        if self.in_flight.closing:  # opened from the accept backlog while the server drains
            await self.go_away(0)

    async def go_away(self, grace: float) -> None:
        """The server shuts down: read no more images (those the client sends from now on are left
        unanswered, so it sends them again on its next connection), answer those in flight within
        `grace`, then close with 1001 "going away"."""
        self._going_away = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._tasks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        if self._last_write is not None and (left := deadline - loop.time()) > 0:
            await asyncio.wait({self._last_write}, timeout=left)  # the answers out before the close
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            log.info("stream %s: going away (server shutting down)", self.request_id)
            self.close(GOING_AWAY, "going away")

    def on_close(self) -> None:
        self.in_flight.streams.discard(self)
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        # Images already read keep running and are recorded, like a POST whose client went away.

    # -- frames ---------------------------------------------------------------------------------
    async def on_message(self, message: str | bytes) -> None:
        if self.ws_connection is None or self.ws_connection.is_closing() or self._going_away:
            return  # frames the client sent before it saw our close: nothing more is done for them
        await self._handle_frame(message)
        # Not reading the next frame while the client has not read ours bounds what is buffered for
        # it. Frames go out in order, so the last one written being out means all of them are.
        if self._last_write is not None and not self._last_write.done():
            with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                await self._last_write

    async def _handle_frame(self, message: str | bytes) -> None:
        if self._verified is None:
            await self._authenticate_frame(message)
            return
        if isinstance(message, str):
            self._read_header(message)
            return
        header, self._pending_header = self._pending_header or {}, None
        if len(self._tasks) >= self.max_in_flight:
            # At the limit: returning only when a slot frees keeps Tornado from reading more frames.
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
            if self._going_away:  # unanswered, so the client sends it again on its next connection
                return
        seq, self._seq = self._seq, self._seq + 1
        task = asyncio.get_running_loop().create_task(
            self._classify(seq, header.get("ref"), header.get("options") or {}, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _authenticate_frame(self, message: str | bytes) -> None:
        token = None
        if isinstance(message, str):
            try:
                frame = parse_json(message, "The first frame")
            except BadRequest:
                frame = None
            if isinstance(frame, dict) and isinstance(frame.get("token"), str):
                token = frame["token"].strip()
        if not token:
            self._refuse(InvalidToken(_FIRST_FRAME, code="missing_token"))
            return
        try:
            verified = self.auth.verify(f"Bearer {token}")
        except InvalidToken as exc:
            self._refuse(exc)
            return
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        await self._start_session(verified)

    def _read_header(self, message: str) -> None:
        try:
            header = parse_json(message, "A text frame")
        except BadRequest as exc:
            self._protocol_error(exc)
            return
        problem = _header_problem(header)
        if problem:
            self._protocol_error(BadRequest(problem, code="invalid_frame"))
            return
        if self._pending_header is not None:
            ref = self._pending_header.get("ref")
            self._pending_header = None
            self._protocol_error(BadRequest("Two JSON frames in a row: the first one's image never came.",
                                            code="missing_image"), ref)
            if self.ws_connection is None:  # that was one error too many: closed
                return
        self._pending_header = header

    def _protocol_error(self, exc: BadRequest, ref: Any = None) -> None:
        """An error frame about the stream rather than an image; too many of them close it."""
        self._send(self._error_frame(exc, ref, None))
        self._errors += 1
        if self._errors >= self.http_settings.stream_max_errors:
            log.info("stream %s closed after %d protocol errors", self.request_id, self._errors)
            self._send(self._error_frame(BadRequest(
                f"{self._errors} protocol errors on this stream, the limit (http.stream_max_errors); closing.",
                code="too_many_errors"), None, None))
            self.close(POLICY_VIOLATION, "too_many_errors")

    async def _classify(self, seq: int, ref: Any, overrides: dict[str, Any], image: bytes) -> None:
        self.in_flight.enter()
        try:
            verified = self._verified
            assert verified is not None
            key = f"stream-{self._stream_key}-{seq}"

            async def attempt() -> dict[str, Any]:
                session = await self.auth.resume(verified, cost=1)  # revocation and rate limit, per image
                options = self.models.options_for(session.options, overrides) if overrides else session.options
                return (await self.classifier.classify(session, image, options, idempotency_key=key))[0]

            result = await while_store_unavailable(attempt, within=self.http_settings.stream_store_retry_seconds)
            self._send({"type": "result", "ref": ref, "seq": seq, "result": result})
        except InvalidToken as exc:  # logged out or expired since the last image
            self._refuse(exc, ref, seq)
        except ServiceError as exc:
            self._send(self._error_frame(exc, ref, seq))
        except Exception:
            log.exception("stream %s: image %d failed", self.request_id, seq)
            failed = ServiceError("The server failed on this image; it was logged.", code="internal_error")
            self._send(self._error_frame(failed, ref, seq))
        finally:
            self.in_flight.leave()

    # -- replies --------------------------------------------------------------------------------
    @staticmethod
    def _error_frame(exc: ServiceError, ref: Any, seq: int | None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error", "ref": ref, "seq": seq, "status": exc.status,
                                 **error_document(exc.code, exc.message)}
        if "Retry-After" in exc.headers:
            frame["retry_after"] = int(exc.headers["Retry-After"])
        return frame

    def _send(self, frame: dict[str, Any]) -> None:
        # If the client went away, a result it never reads is still in its history.
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self._last_write = self.write_message(json.dumps(frame, separators=(",", ":")))
            # Fails with WebSocketClosedError if the stream closes first; nobody need hear of it.
            self._last_write.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _refuse(self, exc: ServiceError, ref: Any = None, seq: int | None = None) -> None:
        """An error frame with the full message, then a policy-violation close whose reason is the
        error's code (a close reason holds at most 123 bytes)."""
        log.info("stream %s refused: %s", self.request_id, exc.code)
        self._send(self._error_frame(exc, ref, seq))
        self.close(POLICY_VIOLATION, exc.code)


def _header_problem(header: Any) -> str | None:
    """Why a JSON frame is not a valid image header, or None."""
    if not isinstance(header, dict):
        return "A JSON frame must be an object: {\"ref\": ..., \"options\": {...}}."
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        return f"Unknown field(s) {quoted_names(unknown)} in a JSON frame; known: ref, options."
    ref = header.get("ref")
    if ref is not None and not (isinstance(ref, str | int) and not isinstance(ref, bool)):
        return "ref must be a string or an integer."
    if isinstance(ref, str) and len(ref) > _MAX_REF_LENGTH:
        return f"ref must be at most {_MAX_REF_LENGTH} characters."
    if header.get("options") is not None and not isinstance(header["options"], dict):
        return "options must be an object."
    return None
