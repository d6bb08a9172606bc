"""The base handler: everything cross-cutting lives here, so route handlers stay short.

- dependencies come from the application settings, which the composition root (server/) fills: the
  HTTP settings and ONE use-case container (service.use_cases.UseCases), read nowhere else;
- authentication: each route class declares its `auth_policy` (service.auth.Policy), and the one
  `prepare()` here resolves it through service.auth before any handler method runs. Subclasses do
  not override `prepare()` (a class that tries is refused at import); they use the hooks
  `before_auth` and `after_auth`, and upload routes set `defers_refusals` so that a refusal is
  answered once the body is drained instead of resetting the connection (at once, closing it, when
  `can_drain` says the declared body is too large to read);
- the in-flight count for the graceful drain, in the same `prepare()` and `on_finish()`;
- every error leaves as JSON `{"error": {"code", "message"}}` (under /v2, the Open Inference
  Protocol's `{"error": "<message>"}`): the one place domain errors meet HTTP; tracebacks go only to
  the log;
- every response carries an `X-Request-ID`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import tornado.web

from core.errors import BadRequest, Forbidden, NotFound, ServiceError, UnsupportedMediaType, error_json, quoted
from core.session import IDEMPOTENCY_KEY, Session
from service.auth import Authenticator, Policy, Principal
from service.capture import Captures
from service.classify import Classifier
from service.client_address import Network, resolve
from service.dataplane import DataPlane
from service.export import FeedbackExport
from service.feedback import FeedbackService
from service.history import History
from service.models import Models
from service.preprocess import Preprocessor
from service.sessions import SessionService
from service.use_cases import InFlight, UseCases

log = logging.getLogger("inference.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


@dataclass(frozen=True)
class HttpSettings:
    """What the HTTP transports read of the configuration (the app factory maps config.toml onto it)."""

    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 10 * 1024 * 1024
    legacy_predict: bool = True  # the session-less POST /predict is routed
    stream_max_in_flight: int = 8
    stream_auth_timeout_seconds: float = 10.0
    stream_max_errors: int = 10
    stream_store_retry_seconds: float = 10.0
    stream_ping_interval_seconds: float = 30.0
    stream_ping_timeout_seconds: float = 30.0
    max_upload_bytes: int = 512 * 1024 * 1024
    upload_timeout_seconds: float = 600.0
    # The peers whose forwarded headers name the client (http.trusted_proxies, where http.xheaders is on);
    # empty: every request's client is its socket's peer.
    trusted_proxies: tuple[Network, ...] = ()


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


def set_cors_headers(handler: tornado.web.RequestHandler, allowed_origins: tuple[str, ...]) -> None:
    """Let listed browser origins read the response (and the headers the clients need)."""
    handler.set_header("Vary", "Origin")
    origin = handler.request.headers.get("Origin", "")
    if origin and origin in allowed_origins:
        handler.set_header("Access-Control-Allow-Origin", origin)
        handler.set_header("Access-Control-Expose-Headers", ", ".join(CORS_EXPOSED_HEADERS))


class BaseHandler(tornado.web.RequestHandler):
    #: Who may call this route (service.auth.Policy); every route is authenticated unless it says so.
    auth_policy: Policy = Policy.SESSION
    #: What a request takes from the session's rate limit (predictions cost one; reads are free).
    rate_limit_cost: int = 0
    #: Whether an `Idempotency-Key` header makes retries of this route exactly-once.
    accepts_idempotency_key: bool = False
    #: Upload routes: a refusal in prepare() is kept in `refusal` and answered once the body is drained
    #: (Tornado drops a connection answered mid-body, and the client would see a reset), unless the
    #: body is too large to drain (`can_drain`).
    defers_refusals: bool = False

    principal: Principal = Principal()  # who is calling, once prepare() resolved the policy
    refusal: ServiceError | None = None
    request_id: str = ""
    route_name: str = "unmatched"
    error_code: str | None = None  # the code of the error answered, for the access log and metrics

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "prepare" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides prepare(); declare auth_policy and use before_auth or "
                            "after_auth, so that authentication and the in-flight count stay in one place")

    def initialize(self, route_name: str = "unmatched") -> None:
        self.route_name = route_name

    # -- dependencies -------------------------------------------------------------------------
    @property
    def http_settings(self) -> HttpSettings:
        return self.settings["http"]

    @property
    def use_cases(self) -> UseCases:
        return self.settings["use_cases"]

    @property
    def auth(self) -> Authenticator:
        return self.use_cases.auth

    @property
    def classifier(self) -> Classifier:
        return self.use_cases.classifier

    @property
    def sessions(self) -> SessionService:
        return self.use_cases.sessions

    @property
    def history(self) -> History:
        return self.use_cases.history

    @property
    def preprocessor(self) -> Preprocessor:
        return self.use_cases.preprocessor

    @property
    def dataplane(self) -> DataPlane:
        return self.use_cases.dataplane

    @property
    def captures(self) -> Captures:
        return self.use_cases.captures

    @property
    def feedback(self) -> FeedbackService:
        return self.use_cases.feedback

    @property
    def feedback_export(self) -> FeedbackExport:
        return self.use_cases.feedback_export

    @property
    def models(self) -> Models:
        return self.use_cases.models

    @property
    def in_flight(self) -> InFlight:
        return self.use_cases.in_flight

    # -- request life cycle -------------------------------------------------------------------
    def set_default_headers(self) -> None:
        incoming = self.request.headers.get("X-Request-ID", "")
        self.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        set_cors_headers(self, self.http_settings.cors_origins)

    async def options(self, *args: str, **kwargs: str) -> None:
        """CORS preflight: answered for the origins in http.cors_origins, refused for others."""
        origin = self.request.headers.get("Origin", "")
        if origin not in self.http_settings.cors_origins:
            raise Forbidden(f"Origin {quoted(origin)} is not allowed; list it in http.cors_origins.",
                            code="cors_origin_not_allowed")
        self.set_header("Access-Control-Allow-Methods", ", ".join(implemented_methods(type(self))))
        self.set_header("Access-Control-Allow-Headers", ", ".join(CORS_REQUEST_HEADERS))
        self.set_header("Access-Control-Max-Age", "600")
        self.no_content()

    def no_content(self) -> None:
        """Answer 204: no body, so no Content-Type either."""
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    async def prepare(self) -> None:
        """The one place a request is counted in flight and its route's auth_policy resolved."""
        self.in_flight.enter()
        self._counted = True
        if self.request.method == "OPTIONS":
            return
        self.check_method()
        try:
            await self.before_auth()
            principal = await self.auth.authenticate(
                self.auth_policy, self.request.headers.get("Authorization", ""),
                cost=lambda: self.rate_limit_cost, idempotency_key=self.idempotency_key)
            self.principal = principal
            await self.after_auth()
        except ServiceError as exc:
            if not self.defers_refusals:
                raise
            if not self.can_drain():
                self.set_header("Connection", "close")  # answered now: the unread body ends the connection
                raise
            self.refusal = exc

    def check_method(self) -> None:
        """A method this route does not implement is answered 405 before anything else (its credential
        included): write_error names the allowed ones."""
        if self.request.method not in implemented_methods(type(self)):
            raise tornado.web.HTTPError(405)

    async def before_auth(self) -> None:
        """Checks made before the credential is looked at (none by default)."""

    async def after_auth(self) -> None:
        """Checks and set-up once the caller is known (none by default)."""

    def can_drain(self) -> bool:
        """Whether the body may be read to its end before a refusal is answered (routes that defer)."""
        return True

    def declared_length(self) -> int:
        """The request's Content-Length; 0 without one (Tornado refuses a malformed one itself)."""
        declared = self.request.headers.get("Content-Length", "")
        return int(declared) if declared.isdigit() else 0

    @property
    def session(self) -> Session | None:
        return self.principal.session

    def on_finish(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.in_flight.leave()

    @property
    def idempotency_key(self) -> str | None:
        key = self.request.headers.get("Idempotency-Key") if self.accepts_idempotency_key else None
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            raise BadRequest("Idempotency-Key must be 1 to 128 letters, digits or . _ : -",
                             code="invalid_idempotency_key")
        return key

    @property
    def client_address(self) -> str:
        """Who sent this request, normalised: the socket's peer, or behind a trusted proxy the address it
        forwarded (service.client_address). Every use of the client's address reads this one."""
        headers = self.request.headers
        return resolve(self.request.remote_ip or "", headers.get_list("X-Forwarded-For"), headers.get("X-Real-Ip"),
                       self.http_settings.trusted_proxies)

    @property
    def current_session(self) -> Session:
        assert self.session is not None, "routes with a session policy only"
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
        elif isinstance(exc, tornado.web.HTTPError) and status_code == 405:
            # Raised by check_method, or by Tornado itself for a method it does not know.
            allowed = [*implemented_methods(type(self)), "OPTIONS"]
            self.set_header("Allow", ", ".join(allowed))
            code = _HTTP_CODES[405]
            message = (f"{quoted(self.request.method)} is not allowed on {quoted(self.request.path)}; "
                       f"it allows {', '.join(allowed)}.")
        elif isinstance(exc, tornado.web.HTTPError):
            code = _HTTP_CODES.get(status_code, "http_error")
            logged = exc.log_message % exc.args if exc.log_message and exc.args else exc.log_message
            message = logged or _reason(status_code)
        else:
            code, message = ("internal_error", "The server failed on this request; it was logged.") \
                if status_code >= 500 else (_HTTP_CODES.get(status_code, "http_error"), _reason(status_code))
        self.error_code = code
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.clear_header("Inference-Header-Content-Length")
        # Under /v2 the Open Inference Protocol's form (its clients read `{"error": "<message>"}`).
        oip = self.request.path == "/v2" or self.request.path.startswith("/v2/")
        self.finish(error_json(code, message, oip=oip))

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


def implemented_methods(handler_class: type[tornado.web.RequestHandler]) -> list[str]:
    """The methods a route answers (besides OPTIONS): those its handler class implements. CORS
    preflights list them, and a 405 names them in `Allow`."""
    return [method.upper() for method in ("get", "head", "post", "put", "patch", "delete")
            if getattr(handler_class, method) is not getattr(tornado.web.RequestHandler, method)]


def _reason(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase + "."
    except ValueError:
        return "HTTP error."


class NotFoundHandler(BaseHandler):
    """Unknown routes: a JSON 404 (Tornado's default is an HTML page)."""

    auth_policy = Policy.PUBLIC

    def check_method(self) -> None:  # no route: 404 whatever the method
        raise NotFound(f"No route {quoted(self.request.path)}; see /openapi.json.", code="not_found")
