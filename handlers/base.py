"""The base handler: everything cross-cutting lives here, so route handlers stay short.

- dependencies (config, store, runner, signer) come from the application settings;
- authentication runs in an async `prepare()`, unless the route class says `public = True`; a class
  saying `optional_auth = True` takes a token when one is sent and is anonymous otherwise, where
  `anonymous_inference_allowed` says so (the one place that rule lives);
- every error leaves as JSON `{"error": {"code", "message"}}` (under /v2, the Open Inference
  Protocol's `{"error": "<message>"}`); tracebacks go only to the log;
- every response carries an `X-Request-ID`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import tornado.web

from sessions.errors import BadRequest, Forbidden, InvalidToken, NotFound, ServiceError, UnsupportedMediaType
from sessions.store import IDEMPOTENCY_KEY, Session, SessionStore
from sessions.tokens import TokenSigner

if TYPE_CHECKING:
    from inference.runner import ModelRunner
    from server.config import Config
    from server.weights import ModelVersions

log = logging.getLogger("inference.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


# Inference-Header-Content-Length: the Open Inference Protocol's binary form, both ways.
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "X-Request-ID", "Idempotency-Key",
                        "Inference-Header-Content-Length")
CORS_EXPOSED_HEADERS = ("X-Request-ID", "Retry-After", "Content-Type", "Idempotent-Replayed",
                        "Inference-Header-Content-Length")


def parse_json(data: bytes | str, what: str = "The body") -> Any:
    """`data` parsed as JSON, or 400 `malformed_json` saying why. Nesting deep enough to exhaust
    the parser's recursion (`[` repeated 100,000 times) is malformed input too, not a server error."""
    try:
        return json.loads(data)
    except RecursionError:
        raise BadRequest(f"{what} nests JSON arrays or objects too deeply.", code="malformed_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc}).", code="malformed_json") from None


def set_cors_headers(handler: tornado.web.RequestHandler, allowed_origins: list[str]) -> None:
    """Let listed browser origins read the response (and the headers the clients need)."""
    handler.set_header("Vary", "Origin")
    origin = handler.request.headers.get("Origin", "")
    if origin and origin in allowed_origins:
        handler.set_header("Access-Control-Allow-Origin", origin)
        handler.set_header("Access-Control-Expose-Headers", ", ".join(CORS_EXPOSED_HEADERS))


def anonymous_inference_allowed(config: Config) -> bool:
    """Whether inference without a session is allowed: the plain `POST /predict` and tokenless Open
    Inference Protocol calls. Production mode needs `http.allow_anonymous_in_production` on top."""
    return config.http.legacy_predict and (
        config.server.mode != "production" or config.http.allow_anonymous_in_production
    )


async def authenticate_bearer(
    header: str,
    signer: TokenSigner,
    store: SessionStore,
    *,
    cost: int | Callable[[], int] = 0,
    idempotency_key: str | None = None,
) -> Session:
    """`Bearer <token>` -> signature and age check -> live session in the store (sliding expiry).

    Shared by the HTTP handlers and the gRPC service, so a token means the same thing on both.
    `cost` (rate limit) may be a function: it is called after the signature check, so a request
    with a forged token is refused as such before its body is looked at."""
    if not header:
        raise InvalidToken("This route needs an 'Authorization: Bearer <token>' header; "
                           "log in with POST /v1/sessions.", code="missing_token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("The Authorization header must be 'Bearer <token>'.", code="malformed_token")
    verified = signer.verify(token.strip())
    return await store.touch(verified, cost=cost() if callable(cost) else cost, idempotency_key=idempotency_key)


async def optional_session(
    header: str, config: Config, signer: TokenSigner, store: SessionStore, *, cost: int | Callable[[], int] = 0
) -> Session | None:
    """A token, when sent, must be good; without one the call is anonymous (None) if allowed."""
    if header:
        return await authenticate_bearer(header, signer, store, cost=cost)
    if not anonymous_inference_allowed(config):
        raise InvalidToken("This server allows no anonymous inference; send 'Authorization: Bearer <token>' "
                           "(log in with POST /v1/sessions).", code="missing_token")
    return None


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
    #: Routes where a token is optional: with one the session applies, without one the call is
    #: anonymous, allowed only where `anonymous_inference_allowed(config)`.
    optional_auth: bool = False
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

    async def options(self, *args: str, **kwargs: str) -> None:
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
        if self.public or self.request.method == "OPTIONS":
            return
        if self.optional_auth:
            # The cost is read after the token's signature is checked (it may need the parsed body).
            self.session = await optional_session(self.request.headers.get("Authorization", ""), self.config,
                                                  self.signer, self.store, cost=lambda: self.rate_limit_cost)
        else:
            self.session = await self.authenticate()

    def on_finish(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.in_flight.leave()

    async def authenticate(self) -> Session:
        """Bearer token -> signature and age check -> live session in the store (sliding expiry)."""
        return await authenticate_bearer(self.request.headers.get("Authorization", ""), self.signer, self.store,
                                         cost=self.rate_limit_cost, idempotency_key=self.idempotency_key)

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
        return parse_json(body)

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
        self.clear_header("Inference-Header-Content-Length")
        self.finish(json.dumps(self.error_body(code, message)))

    def error_body(self, code: str, message: str) -> dict[str, Any]:
        # The Open Inference Protocol's clients (tritonclient) read `{"error": "<message>"}`.
        if self.request.path == "/v2" or self.request.path.startswith("/v2/"):
            return {"error": message}
        return {"error": {"code": code, "message": message}}

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
