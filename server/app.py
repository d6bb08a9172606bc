"""The application factory: every dependency is passed in, nothing is global."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.netutil
import tornado.web

from handlers.base import HttpSettings, InFlight, NotFoundHandler
from handlers.feedback import FeedbackExportHandler, FeedbackPurgeHandler
from handlers.health import LivenessHandler, MetricsHandler, OpenAPIHandler, ReadinessHandler
from handlers.history import FeedbackHandler, HistoryHandler, HistoryImageHandler, HistoryItemHandler
from handlers.models import ActivateHandler, LabelsHandler, ModelsHandler, ModelVersionHandler, PinnableHandler
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
from inference.runner import ModelRunner
from inference.selection import Candidate
from server.balance import BalancedHTTPServer, GuardedHTTPServer, SharedCounts
from server.config import Config
from server.embedded_redis import RewriteAfterErase
from server.observability import Metrics, log_request
from server.runtime import build_backend
from service.auth import Authenticator, AuthSettings
from service.capture import Captures
from service.catalogue import ModelCatalogue
from service.classify import Classifier
from service.export import FeedbackExport
from service.feedback import FeedbackLimits, FeedbackService
from service.sessions import SessionService
from sessions.captures import CaptureRefs
from sessions.feedback import FeedbackStore
from sessions.model_registry import ModelRegistry
from sessions.store import SessionStore
from sessions.tokens import TokenSigner

ROOT = Path(__file__).resolve().parent.parent
WEB_DIR = ROOT / "web"
JS_CLIENT_DIR = ROOT / "clients" / "js"

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


def make_app(
    config: Config, store: SessionStore, runner: ModelRunner, model_versions: ModelCatalogue | None = None
) -> tornado.web.Application:
    """Build the Tornado application around a session store and a model runner (whose metrics
    registry the app shares, so /metrics shows both). Model versions use the store's Redis unless
    given; the caller starts them following other replicas (`await model_versions.start()`)."""
    signer = make_signer(config)
    feedback, captures = make_feedback(config, store, runner, signer), make_captures(config, store, runner, signer)
    versions = model_versions or make_model_versions(config, store, runner, feedback)
    rewrites = make_rewrite_after_erase(config, store)
    auth, classifier, sessions = use_cases(config, store, runner, signer, versions, feedback, captures,
                                           on_erased=rewrites.erased if rewrites else None)
    web_routes: list[Any] = [
        (r"/()", WebAssetHandler, {"path": str(WEB_DIR), "default_filename": "index.html"}),
        (r"/static/client/(.*)", WebAssetHandler, {"path": str(JS_CLIENT_DIR)}),
        (r"/static/(.*)", WebAssetHandler, {"path": str(WEB_DIR)}),
    ]
    api_routes = [(pattern, handler, {"route_name": route_template(pattern)}) for pattern, handler in ROUTES]
    return tornado.web.Application(
        [*api_routes, *web_routes],
        http=http_settings(config),
        auth=auth,
        classifier=classifier,
        sessions=sessions,
        feedback=feedback,
        captures=captures,
        feedback_export=FeedbackExport(feedback.records, captures, page_size=config.feedback.export_page_size),
        store=store,
        runner=runner,
        model_versions=versions,
        rewrite_after_erase=rewrites,
        signer=signer,
        in_flight=InFlight(),
        metrics=runner.metrics,
        default_handler_class=NotFoundHandler,
        log_function=log_request,
    )


def http_settings(config: Config) -> HttpSettings:
    """What the HTTP transports read of the configuration."""
    http = config.http
    return HttpSettings(
        cors_origins=tuple(http.cors_origins), max_body_bytes=http.max_body_bytes, legacy_predict=http.legacy_predict,
        stream_max_in_flight=http.stream_max_in_flight, stream_auth_timeout_seconds=http.stream_auth_timeout_seconds,
        stream_max_errors=http.stream_max_errors, stream_ping_interval_seconds=http.stream_ping_interval_seconds,
        stream_ping_timeout_seconds=http.stream_ping_timeout_seconds, max_upload_bytes=config.models.max_upload_bytes,
        upload_timeout_seconds=config.models.upload_timeout_seconds,
        # Tornado's own xheaders would believe any peer: handlers.base resolves the address instead.
        trusted_proxies=tuple(map(ipaddress.ip_network, http.trusted_proxies)) if http.xheaders else ())


def auth_settings(config: Config) -> AuthSettings:
    # Anonymous inference (POST /predict, tokenless OIP): production mode needs
    # http.allow_anonymous_in_production on top of http.legacy_predict.
    anonymous = config.http.legacy_predict and (
        config.server.mode != "production" or config.http.allow_anonymous_in_production)
    return AuthSettings(api_keys=tuple(config.auth.api_keys), admin_api_keys=tuple(config.auth.admin_api_keys),
                        anonymous_inference=anonymous,
                        login_rate_limit_per_minute=config.sessions.login_rate_limit_per_minute)


def make_model_versions(config: Config, store: SessionStore, runner: ModelRunner,
                        feedback: FeedbackService | None = None) -> ModelCatalogue:
    store_dir = config.folder(config.models.store_dir, "models")
    same_runtime = Candidate(runner.backend.name, runner.backend.precision)  # what the configured weights run on
    return ModelCatalogue(ModelRegistry(store.redis), runner, store_dir=store_dir,
                         backend_for=lambda model: build_backend(config, model, same_runtime), feedback=feedback)


def make_feedback(config: Config, store: SessionStore, runner: ModelRunner, signer: TokenSigner) -> FeedbackService:
    metrics, settings = runner.metrics, config.feedback
    limits = FeedbackLimits(max_comment_bytes=settings.max_comment_bytes, max_per_session=config.history.max_entries,
                            daily_limit=settings.daily_limit, retention_days=settings.retention_days)
    return FeedbackService(store, FeedbackStore(store.redis, runner.model.name), labels=lambda: runner.model.labels,
                           signer=signer, limits=limits,
                           on_feedback=metrics.observe_feedback if isinstance(metrics, Metrics) else None)


def make_captures(config: Config, store: SessionStore, runner: ModelRunner, signer: TokenSigner) -> Captures:
    capture, metrics = config.capture, runner.metrics
    store_dir = config.folder(capture.store_dir, "captures")
    observed = isinstance(metrics, Metrics)
    return Captures(CaptureRefs(store.redis), names=signer, store_dir=store_dir, enabled=capture.enabled,
                    retention_days=capture.retention_days, min_free_disk_bytes=capture.min_free_disk_bytes,
                    max_session_bytes=capture.max_session_bytes, max_queue=capture.max_queue,
                    on_skipped=metrics.count_capture_skipped if observed else None,
                    on_queue_wait=metrics.observe_capture_queue_wait if observed else None)


def make_rewrite_after_erase(config: Config, store: SessionStore) -> RewriteAfterErase | None:
    """The embedded Redis' files rewritten after erases (redis.embedded_erase_rewrite_seconds); None for
    an external Redis, whose persistence is its operator's (docs/operations.md)."""
    interval = config.redis.embedded_erase_rewrite_seconds
    return RewriteAfterErase(store.redis, interval) if config.redis.url == "embedded" and interval > 0 else None


def use_cases(config: Config, store: SessionStore, runner: ModelRunner, signer: TokenSigner,
              versions: ModelCatalogue | None, feedback: FeedbackService | None = None,
              captures: Captures | None = None, on_erased: Callable[[], None] | None = None,
              ) -> tuple[Authenticator, Classifier, SessionService]:
    """The service layer for one process, shared by every transport."""
    return (Authenticator(signer, store, auth_settings(config)),
            Classifier(store, runner, versions, feedback, captures),
            SessionService(store, signer, versions, feedback=feedback, captures=captures, on_erased=on_erased))


def make_signer(config: Config) -> TokenSigner:
    """The token signer for config's keys: the HTTP app and the gRPC service each get one."""
    if not config.auth.secret_keys:
        raise ValueError("config.auth.secret_keys is empty; the CLI fills it in development mode")
    return TokenSigner(config.auth.secret_keys, max_age_seconds=config.sessions.max_lifetime_seconds)


def route_template(pattern: str) -> str:
    """`/v1/history/([^/]+)` -> `/v1/history/{id}`, `(?P<name>...)` -> `{name}`: the route as metrics,
    logs and OpenAPI name it."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("([^/]+)", "{id}")


# Socket reads of 256 KB instead of Tornado's 64 KB: a large photo costs the event loop less CPU (fewer
# reads, chunks and copies; measured in bench/RESULTS.md); small requests are unaffected.
READ_CHUNK_BYTES = 256 * 1024


def http_server(app: tornado.web.Application, config: Config, counts: SharedCounts | None = None,
                slot: int = 0) -> GuardedHTTPServer:
    """The HTTP server for `app`, with the limits of config.http (server.balance); with `counts` (one
    of several processes on a shared socket) it accepts so that connections spread evenly over the
    processes."""
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
        "on_connections": app.settings["metrics"].open_connections.set,
    }
    if counts is None:
        return GuardedHTTPServer(app, **settings)
    return BalancedHTTPServer(app, **settings, counts=counts, slot=slot)


def listen(
    app: tornado.web.Application, config: Config, host: str, port: int
) -> tuple[GuardedHTTPServer, int]:
    """Serve `app` on host:port (0 picks a free port); return the server and the bound port."""
    server = http_server(app, config)
    sockets = tornado.netutil.bind_sockets(port, host)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]
