"""The base handler: everything cross-cutting lives here, so route handlers stay short.

- dependencies (config, store, runner, signer) come from the application settings;
- authentication runs in an async `prepare()`, unless the route class says `public = True`;
- every error leaves as JSON `{"error": {"code", "message"}}`; tracebacks go only to the log;
- every response carries an `X-Request-ID`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import tornado.web

from sessions.errors import BadRequest, Forbidden, InvalidToken, NotFound, ServiceError, UnsupportedMediaType
from sessions.store import IDEMPOTENCY_KEY, Session, SessionStore
from sessions.tokens import TokenSigner

if TYPE_CHECKING:
    from server.config import Config
    from server.runner import ModelRunner
    from server.weights import ModelVersions

log = logging.getLogger("inference.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "X-Request-ID", "Idempotency-Key")
CORS_EXPOSED_HEADERS = ("X-Request-ID", "Retry-After", "Content-Type", "Idempotent-Replayed")


def set_cors_headers(handler: tornado.web.RequestHandler, allowed_origins: list[str]) -> None:
    """Let listed browser origins read the response (and the headers the clients need)."""
    handler.set_header("Vary", "Origin")
    origin = handler.request.headers.get("Origin", "")
    if origin and origin in allowed_origins:
        handler.set_header("Access-Control-Allow-Origin", origin)
        handler.set_header("Access-Control-Expose-Headers", ", ".join(CORS_EXPOSED_HEADERS))


class InFlight:
    """Counts requests between `prepare()` and `finish()`, so shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1


class BaseHandler(tornado.web.RequestHandler):
    #: Routes that need no session token say so explicitly; everything else is authenticated.
    public: bool = False
    #: What a request takes from the session's rate limit (predictions cost one; reads are free).
    rate_limit_cost: int = 0
    #: Whether an `Idempotency-Key` header makes retries of this route exactly-once.
    accepts_idempotency_key: bool = False

    session: Session | None = None
    request_id: str = ""
    route_name: str = "unmatched"
    error_code: str | None = None  # the code of the error answered, for the access log and metrics

    def initialize(self, route_name: str = "unmatched") -> None:
        self.route_name = route_name

    # -- dependencies -------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.settings["config"]

    @property
    def store(self) -> SessionStore:
        return self.settings["store"]

    @property
    def runner(self) -> ModelRunner:
        return self.settings["runner"]

    @property
    def model_versions(self) -> ModelVersions:
        return self.settings["model_versions"]

    @property
    def signer(self) -> TokenSigner:
        return self.settings["signer"]

    @property
    def in_flight(self) -> InFlight:
        return self.settings["in_flight"]

    # -- request life cycle -------------------------------------------------------------------
    def set_default_headers(self) -> None:
        incoming = self.request.headers.get("X-Request-ID", "")
        self.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        set_cors_headers(self, self.config.http.cors_origins)

    async def options(self, *args: str) -> None:
        """CORS preflight: answered for the origins in http.cors_origins, refused for others."""
        origin = self.request.headers.get("Origin", "")
        if origin not in self.config.http.cors_origins:
            raise Forbidden(f"Origin {origin!r} is not allowed; list it in http.cors_origins.",
                            code="cors_origin_not_allowed")
        allowed = [m.upper() for m in ("get", "post", "put", "patch", "delete")
                   if getattr(type(self), m) is not getattr(tornado.web.RequestHandler, m)]
        self.set_header("Access-Control-Allow-Methods", ", ".join(allowed))
        self.set_header("Access-Control-Allow-Headers", ", ".join(CORS_REQUEST_HEADERS))
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    async def prepare(self) -> None:
        self.in_flight.enter()
        self._counted = True
        if not self.public and self.request.method != "OPTIONS":
            self.session = await self.authenticate()

    def on_finish(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.in_flight.leave()

    async def authenticate(self) -> Session:
        """Bearer token -> signature and age check -> live session in the store (sliding expiry)."""
        header = self.request.headers.get("Authorization", "")
        if not header:
            raise InvalidToken("This route needs an 'Authorization: Bearer <token>' header; "
                               "log in with POST /v1/sessions.", code="missing_token")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("The Authorization header must be 'Bearer <token>'.", code="malformed_token")
        verified = self.signer.verify(token.strip())
        return await self.store.touch(verified, cost=self.rate_limit_cost, idempotency_key=self.idempotency_key)

    @property
    def idempotency_key(self) -> str | None:
        key = self.request.headers.get("Idempotency-Key") if self.accepts_idempotency_key else None
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise BadRequest("Idempotency-Key must be 1 to 128 letters, digits or . _ : -",
                             code="invalid_idempotency_key")
        return key

    @property
    def current_session(self) -> Session:
        assert self.session is not None, "authenticated routes only"
        return self.session

    # -- bodies ---------------------------------------------------------------------------------
    def json_body(self, *, required: bool = True) -> Any:
        """The request body parsed as JSON; an empty body is None when not required."""
        body = self.request.body
        if not body.strip():
            if required:
                raise BadRequest("This route needs a JSON body.", code="missing_body")
            return None
        content_type = self.request.headers.get("Content-Type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("Send the body as application/json.")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"The body is not valid JSON ({exc}).", code="malformed_json") from None

    def json_object(self, *, required: bool = True) -> dict[str, Any]:
        body = self.json_body(required=required)
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise BadRequest("The JSON body must be an object.", code="invalid_json_type")
        return body

    def write_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload, separators=(",", ":")))

    # -- errors ---------------------------------------------------------------------------------
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ServiceError):
            status_code, code, message = exc.status, exc.code, exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError):
            code = _HTTP_CODES.get(status_code, "http_error")
            message = exc.log_message % exc.args if exc.log_message and exc.args else exc.log_message
            message = message or _reason(status_code)
        else:
            code, message = ("internal_error", "The server failed on this request; it was logged.") \
                if status_code >= 500 else (_HTTP_CODES.get(status_code, "http_error"), _reason(status_code))
        self.error_code = code
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"error": {"code": code, "message": message}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Expected domain errors are part of the API, not failures: one line, no traceback.
        if isinstance(value, ServiceError) and value.status < 500:
            log.info("%s %s -> %d %s (request %s)", self.request.method, self.request.path,
                     value.status, value.code, self.request_id)
        elif isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            log.info("%s %s -> %d (request %s)", self.request.method, self.request.path,
                     value.status_code, self.request_id)
        else:
            log.error("request %s failed: %s %s", self.request_id, self.request.method, self.request.path,
                      exc_info=(typ, value, tb))


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "rate_limited",
    503: "service_unavailable",
}


def _reason(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase + "."
    except ValueError:
        return "HTTP error."


class NotFoundHandler(BaseHandler):
    """Unknown routes: a JSON 404 (Tornado's default is an HTML page)."""

    public = True

    async def prepare(self) -> None:
        raise NotFound(f"No route {self.request.path!r}; see /openapi.json.", code="not_found")
