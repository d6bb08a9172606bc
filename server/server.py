"""The composition root: one `Server` per serving process builds the use cases, once, around a store
and a runner (and the configured model version, which the model catalogue serves until an activation),
hands them to each transport (server/transports/, listed once in TRANSPORTS), and owns
the process's life: the signals, the shutdown sequence (not ready, a delay, the drain of requests and
streams in flight), and the background tasks (model
versions followed from the other replicas, the retention sweeps, the session gauge)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.errors import ServiceError
from inference.loading import LoadedBackends
from inference.model import Backend, LoadedModel
from inference.repository import ModelSpec
from inference.runner import ModelRunner, ServedModel
from inference.selection import Candidate
from server.balance import SharedCounts
from server.config import Config, ConfigError
from server.embedded_redis import RewriteAfterErase
from server.observability import Metrics, count_sessions_forever
from server.runtime import build_backend, build_runner, build_served, build_store, prepare_models
from server.transports import Transport
from server.transports import grpc as grpc_transport
from server.transports import http as http_transport
from service.auth import Authenticator, AuthSettings
from service.capture import Captures
from service.catalogue import ModelCatalogue
from service.classify import Classifier
from service.dataplane import DataPlane
from service.export import FeedbackExport
from service.feedback import FeedbackLimits, FeedbackService
from service.history import History
from service.models import Models, Repository
from service.preprocess import Preprocessor
from service.retention import sweep_forever
from service.sessions import SessionService
from service.use_cases import InFlight, UseCases
from sessions.captures import CaptureRefs
from sessions.feedback import FeedbackStore
from sessions.model_registry import ModelRegistry
from sessions.store import SessionStore
from sessions.tokens import TokenSigner

log = logging.getLogger("inference.server")

#: The transports each serving process runs, in start order, each built from the server (None where the
#: config turns it off). A new transport is a module in server/transports/ and a line here.
TRANSPORTS: tuple[Callable[[Server], Transport | None], ...] = (
    http_transport.for_server,
    grpc_transport.for_server,
)

#: Wraps the session store a serving process builds (the benchmark's experiments; None in production).
StoreWrapper = Callable[[SessionStore], SessionStore]


class Server:
    """One serving process: the use cases built once, the transports, the background tasks."""

    def __init__(self, config: Config, store: SessionStore, runner: ModelRunner, served: ServedModel | None,
                 sockets: list[socket.socket], *, counts: SharedCounts | None = None, slot: int = 0,
                 models: Models | None = None):
        """`served`: `[model]`'s weights on their runtime, or None to build them (server.runtime); `sockets`: the
        listening HTTP sockets; `counts` and `slot`: this is process `slot` of several sharing them (see
        server.balance)."""
        self.config, self.store, self.runner, self.sockets = config, store, runner, sockets
        self.counts, self.slot = counts, slot
        self.rewrite_after_erase = make_rewrite_after_erase(config, store)
        self.use_cases = build_use_cases(config, store, runner, served, models,
                                         on_erased=self.rewrite_after_erase.erased if self.rewrite_after_erase
                                         else None)
        self.transports: list[Transport] = [t for make in TRANSPORTS if (t := make(self)) is not None]
        self._started: list[Transport] = []
        self._tasks: list[asyncio.Future[None]] = []
        self._following = False

    @property
    def http(self) -> http_transport.HttpTransport:
        """The HTTP transport (always first)."""
        transport = self.transports[0]
        assert isinstance(transport, http_transport.HttpTransport)
        return transport

    async def start(self, *, background: bool = True) -> list[str]:
        """Start the transports and return where each listens. With `background` (what a serving process
        does; tests leave it off), first serve the active model version and follow activations, and in
        process 0 run the sweeps and the session gauge. A port that cannot be bound is a ConfigError."""
        if background:
            await self.use_cases.models.start()  # serve each model's active version, follow activations
            self._following = True
            if self.slot == 0:
                self._start_background_tasks()
        addresses = []
        for transport in self.transports:
            try:
                addresses.append(await transport.start())
            except OSError as exc:  # the port is taken: one sentence, like any bad setting
                await self.stop(0)
                raise ConfigError(str(exc)) from None
            self._started.append(transport)
        return addresses

    def _start_background_tasks(self) -> None:
        config, use_cases = self.config, self.use_cases
        self._tasks = [
            # One process counts the sessions for the gauge (a keyspace scan), in the background.
            asyncio.ensure_future(count_sessions_forever(self.store, metrics_of(self.runner).active_sessions)),
            # One process enforces the capture retention (the others read it on every image read) ...
            asyncio.ensure_future(sweep_forever(use_cases.captures.sweep, config.capture.sweep_interval_seconds,
                                                "captured images", errors=(ServiceError, OSError))),
            # ... and the feedback retention.
            asyncio.ensure_future(sweep_forever(use_cases.feedback.sweep, config.feedback.sweep_interval_seconds,
                                                "feedback records")),
        ]

    async def stop(self, grace: float) -> None:
        """Stop every transport at once (each drains what it has in flight within `grace`), then the
        background tasks; the store and the runner stay open for whoever made them."""
        started, self._started = self._started, []
        await asyncio.gather(*(transport.stop(grace) for transport in started))
        await _cancel(self._tasks)
        self._tasks = []
        self.use_cases.captures.close()
        if self.rewrite_after_erase is not None:  # an erase's rewrite still waiting: now, not never
            await self.rewrite_after_erase.flush()
        if self._following:
            self._following = False
            await self.use_cases.models.close()

    async def shut_down(self, delay: float, grace: float, *, cut_short: asyncio.Event | None = None) -> None:
        """The rollout sequence (docs/operations.md, "Graceful shutdown"): say not ready at once (/readyz,
        OIP and gRPC readiness) while still serving everything for `delay` seconds (or until `cut_short`
        is set: a second signal), so that load balancers stop routing here first; then stop as `stop`
        does: no new connections, requests in flight finished within `grace`, streams closed with 1001."""
        self.use_cases.dataplane.begin_shutdown()
        if delay > 0:
            log.info("shutting down: not ready from now on, still serving for %gs (server.shutdown_delay_seconds)",
                     delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((cut_short or asyncio.Event()).wait(), delay)
        log.info("shutting down: no new connections, finishing requests in flight")
        await self.stop(grace)

    async def drain(self, grace: float) -> None:
        """Close the streams, each after answering its images in flight, and wait until no request has
        been in flight for a moment (connections just taken from the backlog need a few milliseconds to
        have their requests read), or the grace runs out."""
        in_flight = self.use_cases.in_flight
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await in_flight.close_streams(grace)
        quiet_since = None
        while loop.time() < deadline:
            if in_flight.count > 0:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= 0.2:
                break
            await asyncio.sleep(0.02)
        if in_flight.count:
            log.warning("%d requests still in flight after %.0fs; closing them", in_flight.count, grace)


async def _cancel(tasks: list[asyncio.Future[None]], attempts: int = 50) -> None:
    """Cancel `tasks` and wait for them to end, so that nothing they use is closed under them. redis-py can
    turn a cancellation into a connection error, which a sweep's retry takes for Redis trouble: such a
    task is cancelled again (and the wait is bounded either way, so a shutdown never hangs here)."""
    pending = set(tasks)
    for _ in range(attempts):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


async def serve(config: Config, sockets: list[socket.socket], redis_url: str, store_text: str,
                counts: SharedCounts | None = None, slot: int = 0, wrap_store: StoreWrapper | None = None,
                on_ready: Callable[[str], None] | None = None) -> int:
    """One serving process: load the model, serve until SIGTERM/SIGINT, then drain and close.
    `counts` and `slot`: this is process `slot` of several sharing the sockets (see server.balance).
    `on_ready`: told the ready line's text instead of logging it (the supervisor logs one line for all)."""
    counts = counts or SharedCounts(1)
    runner = build_runner(config, siblings=counts.siblings(slot))
    store = build_store(config, redis_url)
    if wrap_store is not None:
        store = wrap_store(store)
    server = Server(config, store, runner, None, sockets, counts=counts, slot=slot)
    try:
        addresses = await server.start()
    except ConfigError:
        runner.close()
        await store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # "ready" means ready: not said until the store answers (server.startup has said once if it did not).
    if not await _store_answers(store, stop):
        return await _shut_down(server, runner, store, config)
    served = server.use_cases.models.catalogue(None).active  # the default model's
    details = (f"model={served.model.name} version={served.model.version} runtime={served.backend.name} "
               f"precision={served.backend.precision} device={config.model.device} workers={config.model.workers} "
               f"store={store_text}")
    browser = browser_url(config.server.host, server.http.port)
    ready = f"ready on {' '.join(addresses)} (open {browser} in a browser) {details}"
    if on_ready is None:
        log.info("%s pid=%d", ready, os.getpid())
    else:
        log.debug("serving process %d (slot %d): %s", os.getpid(), slot, ready)
        on_ready(ready)
    await stop.wait()
    stop.clear()  # a second signal cuts the delay short
    return await _shut_down(server, runner, store, config, delay=config.shutdown_delay, cut_short=stop)


async def _store_answers(store: SessionStore, stop: asyncio.Event, retry_seconds: float = 0.5) -> bool:
    """Wait until the session store answers a ping (True), or until a stop is asked for (False). The
    transports serve meanwhile: /readyz answers 503 until then."""
    while not stop.is_set():
        try:
            await store.redis.ping()
            return True
        except (RedisError, OSError) as exc:
            log.debug("waiting for Redis: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), retry_seconds)
    return False


async def _shut_down(server: Server, runner: ModelRunner, store: SessionStore, config: Config, *, delay: float = 0,
                     cut_short: asyncio.Event | None = None) -> int:
    """`delay`: 0 for a process that never said it was ready (no load balancer routes to it)."""
    await server.shut_down(delay, config.http.shutdown_grace_seconds, cut_short=cut_short)
    runner.close()
    await store.close()
    log.info("stopped")
    return 0


def browser_url(host: str, port: int) -> str:
    """The page's address for `host` as configured: a wildcard address is this machine's loopback."""
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def auth_settings(config: Config) -> AuthSettings:
    # Anonymous inference (POST /predict, tokenless OIP): production mode needs
    # http.allow_anonymous_in_production on top of http.legacy_predict.
    anonymous = config.http.legacy_predict and (
        config.server.mode != "production" or config.http.allow_anonymous_in_production)
    return AuthSettings(api_keys=tuple(config.auth.api_keys), admin_api_keys=tuple(config.auth.admin_api_keys),
                        anonymous_inference=anonymous,
                        login_rate_limit_per_minute=config.sessions.login_rate_limit_per_minute)


def make_models(config: Config, store: SessionStore, served: ServedModel | None = None,
                feedback: FeedbackService | None = None) -> Models:
    """Every served model with its catalogue of versions, each model's own weights read from its export here
    and put on their runtime on first use; at most models.max_loaded versions per process stay on theirs.
    `served`: `[model]`'s weights on their runtime already (tests share one between servers)."""
    store_dir = config.folder(config.models.store_dir, "models")
    registry = ModelRegistry(store.redis)
    loaded = LoadedBackends(config.models.max_loaded)

    def catalogue(spec: ModelSpec, own: ServedModel | None = None) -> ModelCatalogue:
        own = own or build_served(config, spec, loaded)
        return ModelCatalogue(registry, spec, own, store_dir=store_dir, feedback=feedback,
                              backend_for=_versions_backend(config, spec, own, loaded))

    catalogues = {name: catalogue(spec, served if name == config.model.name else None)
                  for name, spec in config.model_specs().items()}
    # Models added over HTTP (PUT /v1/models/<name>) are exported and guarded as at start (prepare_models).
    repository = Repository(folder=config.repository_path.resolve(), registry=registry, configured=config.model.name,
                            max_archive_members=config.models.max_archive_members,
                            max_archive_bytes=config.models.max_archive_bytes,
                            prepare=lambda spec: prepare_models(config, {spec.name: spec}), serve=catalogue)
    return Models(catalogues, config.default_model, repository=repository)


def _versions_backend(config: Config, spec: ModelSpec, own: ServedModel,
                      loaded: LoadedBackends) -> Callable[[LoadedModel], Backend]:
    """How a published version of `spec`'s model gets its runtime: the one the model's own weights run on."""
    same_runtime = Candidate(own.backend.name, own.backend.precision)
    return lambda model: build_backend(config, spec, model, same_runtime, loaded=loaded)


def metrics_of(runner: ModelRunner) -> Metrics:
    """The server's metrics registry, which the runner reports into too (server.runtime.build_runner
    gives every runner one), so that /metrics shows both."""
    metrics = runner.metrics
    if not isinstance(metrics, Metrics):
        raise TypeError("the runner was built without the server's Metrics; build it with server.runtime.build_runner")
    return metrics


def make_feedback(config: Config, store: SessionStore, runner: ModelRunner, signer: TokenSigner, model_name: str,
                  labels: Callable[[str], list[str]]) -> FeedbackService:
    """`labels(model)`: those of a model's version serving everyone (what feedback's class indexes name);
    `model_name`: the model the records' keys are named after (`[model]`'s)."""
    metrics, settings = metrics_of(runner), config.feedback
    limits = FeedbackLimits(max_comment_bytes=settings.max_comment_bytes, max_per_session=config.history.max_entries,
                            daily_limit=settings.daily_limit, retention_days=settings.retention_days)
    return FeedbackService(store, FeedbackStore(store.redis, model_name), labels=labels,
                           signer=signer, limits=limits,
                           on_feedback=metrics.observe_feedback)


def make_captures(config: Config, store: SessionStore, runner: ModelRunner, signer: TokenSigner) -> Captures:
    capture, metrics = config.capture, metrics_of(runner)
    store_dir = config.folder(capture.store_dir, "captures")
    return Captures(CaptureRefs(store.redis), names=signer, store_dir=store_dir, enabled=capture.enabled,
                    retention_days=capture.retention_days, min_free_disk_bytes=capture.min_free_disk_bytes,
                    max_session_bytes=capture.max_session_bytes, max_queue=capture.max_queue,
                    on_skipped=metrics.count_capture_skipped, on_queue_wait=metrics.observe_capture_queue_wait)


def make_rewrite_after_erase(config: Config, store: SessionStore) -> RewriteAfterErase | None:
    """The embedded Redis' files rewritten after erases (redis.embedded_erase_rewrite_seconds); None for
    an external Redis, whose persistence is its operator's (docs/operations.md)."""
    interval = config.redis.embedded_erase_rewrite_seconds
    if config.redis.url != "embedded" or interval <= 0:
        return None
    client = store.redis
    assert isinstance(client, aioredis.Redis), "the embedded Redis is one server, never a cluster"
    return RewriteAfterErase(client, interval)


def build_use_cases(config: Config, store: SessionStore, runner: ModelRunner, served: ServedModel | None,
                    models: Models | None = None, on_erased: Callable[[], None] | None = None) -> UseCases:
    """The service layer for one process, shared by every transport. The models (`[model]`'s serving
    `served` until an activation) use the store's Redis unless given; `on_erased`: told after an erase (the
    embedded Redis' rewrite)."""
    signer = make_signer(config)
    # The models are built after feedback (they report each version's quality); feedback reads the
    # labels of whatever they serve by then.
    feedback = make_feedback(config, store, runner, signer, config.model.name,
                             labels=lambda name: versions.labels(name))
    captures = make_captures(config, store, runner, signer)
    versions = models or make_models(config, store, served, feedback)
    classifier = Classifier(store, runner, versions, feedback, captures,
                            on_predicted=metrics_of(runner).count_predictions)
    return UseCases(
        auth=Authenticator(signer, store, auth_settings(config)),
        classifier=classifier,
        sessions=SessionService(store, signer, versions, feedback=feedback, captures=captures, on_erased=on_erased),
        history=History(store, feedback, captures),
        preprocessor=Preprocessor(runner),
        dataplane=DataPlane(classifier, versions, store),
        feedback=feedback,
        feedback_export=FeedbackExport(feedback.records, captures, page_size=config.feedback.export_page_size),
        captures=captures,
        models=versions,
        in_flight=InFlight(),
        metrics=metrics_of(runner),
    )


def make_signer(config: Config) -> TokenSigner:
    """The token signer for config's keys: the HTTP app and the gRPC service each get one."""
    if not config.auth.secret_keys:
        raise ValueError("config.auth.secret_keys is empty; the CLI fills it in development mode")
    return TokenSigner(config.auth.secret_keys, max_age_seconds=config.sessions.max_lifetime_seconds)
