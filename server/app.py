"""The HTTP application: its routes, its settings and its server; every dependency is passed in."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.web

from handlers.base import HttpSettings, NotFoundHandler
from handlers.feedback import FeedbackExportHandler, FeedbackPurgeHandler
from handlers.health import LivenessHandler, MetricsHandler, OpenAPIHandler, ReadinessHandler
from handlers.history import FeedbackHandler, HistoryHandler, HistoryImageHandler, HistoryItemHandler
from handlers.models import (
    ActivateHandler,
    LabelsHandler,
    ModelHandler,
    ModelsHandler,
    ModelVersionHandler,
    PinnableHandler,
)
from handlers.oip import (
    InferHandler,
    ModelMetadataHandler,
    ModelReadyHandler,
    ServerLiveHandler,
    ServerMetadataHandler,
    ServerReadyHandler,
)
from handlers.predict import PlainPredictHandler, PredictHandler
from handlers.preprocess import PreprocessHandler
from handlers.sessions import LoginHandler, OptionsHandler, SessionHandler
from handlers.stream import StreamHandler
from handlers.web import WebAssetHandler
from server.balance import BalancedHTTPServer, GuardedHTTPServer, SharedCounts
from server.config import Config
from server.observability import access_logger
from service.use_cases import UseCases

ROOT = Path(__file__).resolve().parent.parent
WEB_DIR = ROOT / "web"
JS_CLIENT_DIR = ROOT / "clients" / "js"


def swagger_ui_dir() -> Path:
    """Swagger UI's files, from the swagger-ui-py package (found, not imported: its __init__ loads its
    framework adapters), for the API docs at /docs."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the API docs need the package swagger-ui-py: pip install swagger-ui-py")
    return Path(next(iter(spec.submodule_search_locations))) / "static"

ROUTES: list[tuple[str, type[tornado.web.RequestHandler]]] = [
    (r"/v1/sessions", LoginHandler),
    (r"/v1/session", SessionHandler),
    (r"/v1/session/options", OptionsHandler),
    (r"/v1/predict", PredictHandler),
    (r"/v1/preprocess", PreprocessHandler),
    (r"/v1/stream", StreamHandler),
    (r"/v1/history", HistoryHandler),
    (r"/v1/history/([^/]+)", HistoryItemHandler),
    (r"/v1/history/([^/]+)/feedback", FeedbackHandler),
    (r"/v1/history/([^/]+)/image", HistoryImageHandler),
    (r"/v1/feedback/export", FeedbackExportHandler),
    (r"/v1/feedback", FeedbackPurgeHandler),
    (r"/predict", PlainPredictHandler),
    (r"/healthz", LivenessHandler),
    (r"/readyz", ReadinessHandler),
    (r"/openapi.json", OpenAPIHandler),
    (r"/metrics", MetricsHandler),
    (r"/v1/models", ModelsHandler),
    (r"/v1/models/(?P<name>[^/]+)", ModelHandler),
    (r"/v1/models/(?P<name>[^/]+)/labels", LabelsHandler),
    (r"/v1/models/(?P<name>[^/]+)/versions/(?P<version>[^/:]+)", ModelVersionHandler),
    (r"/v1/models/(?P<name>[^/]+)/versions/(?P<version>[^/:]+):activate", ActivateHandler),
    (r"/v1/models/(?P<name>[^/]+)/versions/(?P<version>[^/:]+)/pinnable", PinnableHandler),
    # The Open Inference Protocol (KServe V2 / Triton), beside /v1; gRPC in handlers/grpc.py.
    (r"/v2", ServerMetadataHandler),
    (r"/v2/health/live", ServerLiveHandler),
    (r"/v2/health/ready", ServerReadyHandler),
    (r"/v2/models/(?P<model>[^/]+)", ModelMetadataHandler),
    (r"/v2/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)", ModelMetadataHandler),
    (r"/v2/models/(?P<model>[^/]+)/ready", ModelReadyHandler),
    (r"/v2/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)/ready", ModelReadyHandler),
    (r"/v2/models/(?P<model>[^/]+)/infer", InferHandler),
    (r"/v2/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)/infer", InferHandler),
]


def make_app(config: Config, use_cases: UseCases) -> tornado.web.Application:
    """The Tornado application: the routes, the HTTP settings and the one use-case container the
    handlers read (built by the composition root, server/server.py)."""
    web_routes: list[Any] = [
        (r"/()", WebAssetHandler, {"path": str(WEB_DIR), "default_filename": "index.html"}),
        # The interactive API docs: web/docs.html runs Swagger UI (served here, no CDN) on /openapi.json.
        (r"/docs()", WebAssetHandler, {"path": str(WEB_DIR), "page": "docs.html"}),
        (r"/static/swagger-ui/(.*)", WebAssetHandler, {"path": str(swagger_ui_dir())}),
        (r"/static/client/(.*)", WebAssetHandler, {"path": str(JS_CLIENT_DIR)}),
        (r"/static/(.*)", WebAssetHandler, {"path": str(WEB_DIR)}),
    ]
    api_routes = [(pattern, handler, {"route_name": route_template(pattern)}) for pattern, handler in ROUTES]
    return tornado.web.Application(
        [*api_routes, *web_routes],
        http=http_settings(config),
        use_cases=use_cases,
        default_handler_class=NotFoundHandler,
        log_function=access_logger(use_cases.metrics, use_cases.auth.signer),
    )


def http_settings(config: Config) -> HttpSettings:
    """What the HTTP transports read of the configuration."""
    http = config.http
    return HttpSettings(
        cors_origins=tuple(http.cors_origins), max_body_bytes=http.max_body_bytes, legacy_predict=http.legacy_predict,
        stream_max_in_flight=http.stream_max_in_flight, stream_auth_timeout_seconds=http.stream_auth_timeout_seconds,
        stream_max_errors=http.stream_max_errors, stream_store_retry_seconds=http.stream_store_retry_seconds,
        stream_ping_interval_seconds=http.stream_ping_interval_seconds,
        stream_ping_timeout_seconds=http.stream_ping_timeout_seconds, max_upload_bytes=config.models.max_upload_bytes,
        upload_timeout_seconds=config.models.upload_timeout_seconds,
        # Tornado's own xheaders would believe any peer: handlers.base resolves the address instead.
        trusted_proxies=tuple(map(ipaddress.ip_network, http.trusted_proxies)) if http.xheaders else ())


def route_template(pattern: str) -> str:
    """`/v1/history/([^/]+)` -> `/v1/history/{id}`, `(?P<name>...)` -> `{name}`: the route as metrics,
    logs and OpenAPI name it."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("([^/]+)", "{id}")


# Socket reads of 256 KB instead of Tornado's 64 KB: a large photo costs the event loop less CPU (fewer
# reads, chunks and copies; measured in bench/RESULTS.md); small requests are unaffected.
READ_CHUNK_BYTES = 256 * 1024


def http_server(app: tornado.web.Application, config: Config, on_connections: Callable[[int], None],
                counts: SharedCounts | None = None, slot: int = 0) -> GuardedHTTPServer:
    """The HTTP server for `app`, with the limits of config.http (server.balance); with `counts` (one
    of several processes on a shared socket) it accepts so that connections spread evenly over the
    processes. `on_connections` is told the number of open connections (the metrics' gauge)."""
    http = config.http
    settings: dict[str, Any] = {
        # Upload routes stream their bodies and set their own limit; this bounds every other route.
        "max_body_size": http.max_body_bytes,
        "chunk_size": READ_CHUNK_BYTES,
        # Tornado waits for a request's headers in one read with one timeout: the keep-alive idle
        # time before a request and slow headers alike.
        "idle_connection_timeout": http.idle_timeout_seconds,
        "body_timeout": http.body_timeout_seconds,
        "max_connections": http.max_connections,
        "write_timeout": http.write_timeout_seconds,
        "on_connections": on_connections,
    }
    if counts is None:
        return GuardedHTTPServer(app, **settings)
    return BalancedHTTPServer(app, **settings, counts=counts, slot=slot)
