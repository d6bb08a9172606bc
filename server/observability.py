"""Metrics (Prometheus, via prometheus_client) and request logs (one line per request, JSON or text)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

from core.errors import ServiceError

if TYPE_CHECKING:
    from sessions.tokens import TokenSigner

access_log = logging.getLogger("inference.access")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# Health probes (a load balancer's or an orchestrator's, every few seconds) are logged at debug: at
# info they would drown the requests people make.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})

_SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Label values come from fixed sets: a made-up method must not become a new time series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SESSION_COUNT_INTERVAL_SECONDS = 30.0


def share_metrics_across_processes(directory: Path) -> None:
    """Make every metric this process creates from now on write to `directory` (prometheus_client's
    multiprocess mode), so that a scrape of any serving process reports all of them. Called in each
    serving process right after fork, before its Metrics exist; the parent empties the folder first.
    prometheus_client reads the variable when it is imported, which here is before the fork: hence
    the value class is set too."""
    os.environ[_SHARED_DIR_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()


def forget_process_metrics(directory: Path, pid: int) -> None:
    """A serving process exited: drop its live gauges (its counters still count)."""
    multiprocess.mark_process_dead(pid, str(directory))


class SessionCounter(Protocol):
    async def count_sessions(self) -> int: ...


class Metrics:
    """The server's collectors, in a registry of its own (tests build several apps per process).

    Gauges say how to combine processes when metrics are shared (see above): queue depth and open
    connections are per process (a `pid` label), the session count is Redis's, read by whichever
    process was scraped last."""

    def __init__(self) -> None:
        self.shared_dir = os.environ.get(_SHARED_DIR_ENV)
        self.registry = CollectorRegistry()
        self.requests = Counter("inference_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("inference_http_request_duration_seconds", "Time to answer, by route.",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("inference_queue_depth", "Images admitted to the model runner, not yet answered.",
                                 multiprocess_mode="liveall", registry=self.registry)
        self.batch_size = Histogram("inference_batch_size", "Images per model forward.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.forward_seconds = Histogram("inference_model_forward_seconds", "Time of one model forward.",
                                         buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.preprocess_seconds = Histogram("inference_preprocess_seconds", "Decode and preprocess, per image.",
                                            buckets=(0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS), registry=self.registry)
        self.grpc_requests = Counter("inference_grpc_requests", "gRPC calls (Open Inference Protocol) by method "
                                     "and status.", ["method", "code"], registry=self.registry)
        self.grpc_latency = Histogram("inference_grpc_request_duration_seconds", "Time to answer a gRPC call, "
                                      "by method.", ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.predictions = Counter("inference_predictions", "Predictions answered (each image of a batch counts), "
                                   "by the model and version that made them: each version's traffic, a canary's "
                                   "share among them.", ["model", "version"], registry=self.registry)
        self.feedback = Counter("inference_feedback", "Feedback given on predictions (replacements count again), by "
                                "the model and version that predicted and whether the corrected label agrees "
                                "with its top-1.", ["model", "version", "agreement"], registry=self.registry)
        self.capture_skipped = Counter("inference_capture_skipped", "Images not captured although capture is on "
                                       "(the prediction is still recorded), by reason: low_disk (under "
                                       "capture.min_free_disk_bytes), disk_error, quota (past "
                                       "capture.max_session_bytes), queue_full (capture.max_queue) or "
                                       "malformed (the image's end not found).", ["reason"],
                                       registry=self.registry)
        self.capture_queue_wait = Histogram("inference_capture_queue_wait_seconds", "Time a capture job (a "
                                            "write, a read, a delete) waited for the capture thread.",
                                            buckets=(0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS), registry=self.registry)
        self.store_errors = Counter("inference_store_errors", "Requests that failed because Redis did.",
                                    registry=self.registry)
        self.open_connections = Gauge("inference_open_connections",
                                      "Open HTTP connections (WebSocket streams included), per process.",
                                      multiprocess_mode="liveall", registry=self.registry)
        self.active_sessions = Gauge("inference_active_sessions",
                                     "Sessions in Redis (approximate: counted in the background every "
                                     f"{SESSION_COUNT_INTERVAL_SECONDS:.0f} s).",
                                     multiprocess_mode="livemostrecent", registry=self.registry)

    # -- what the model runner reports (inference.runner.RunnerMetrics) --
    def observe_forward(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.forward_seconds.observe(seconds)

    def observe_preprocess(self, seconds: float) -> None:
        self.preprocess_seconds.observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def count_predictions(self, model: str, version: str, images: int) -> None:
        self.predictions.labels(model, version).inc(images)

    def observe_feedback(self, model: str, version: str, agrees: bool) -> None:
        self.feedback.labels(model, version, "true" if agrees else "false").inc()

    def count_capture_skipped(self, reason: str) -> None:
        self.capture_skipped.labels(reason).inc()

    def observe_capture_queue_wait(self, seconds: float) -> None:
        self.capture_queue_wait.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of every serving process when they share metrics."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=self.shared_dir)
        return generate_latest(combined)


async def count_sessions_forever(store: SessionCounter, gauge: Gauge,
                                 interval: float = SESSION_COUNT_INTERVAL_SECONDS) -> None:
    """Keep `gauge` at the store's session count. Counting scans the keyspace, so it runs here, once
    per interval, and never on the path of a scrape of the public /metrics."""
    while True:
        with contextlib.suppress(ServiceError):  # Redis down: the gauge keeps its last value
            gauge.set(await store.count_sessions())
        await asyncio.sleep(interval)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's structured fields."""

    FIELDS = ("request_id", "route", "method", "status", "duration_ms", "session", "error")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def access_logger(metrics: Metrics | None, signer: TokenSigner | None) -> Callable[[Any], None]:
    """Tornado's log_function: one access line and the request metrics for every answer."""

    def log_request(handler: Any) -> None:
        status = handler.get_status()
        request = handler.request
        route = getattr(handler, "route_name", type(handler).__name__)
        seconds = request.request_time()
        if metrics is not None:
            method = request.method if request.method in _METHODS else "OTHER"
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.latency.labels(route).observe(seconds)
            if getattr(handler, "error_code", None) == "store_unavailable":
                metrics.store_errors.inc()
        session = getattr(handler, "session", None)
        # The session's ref (sessions.tokens), not its id, which with a signature is a credential: the name
        # the export and an admin's purge use, which nobody without the server secret can link to the id.
        fields = {
            "request_id": getattr(handler, "request_id", "-"),
            "route": route,
            "method": request.method,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "session": signer.session_ref(session.id) if session is not None and signer is not None else None,
        }
        if getattr(handler, "error_code", None):
            fields["error"] = handler.error_code
        level = logging.INFO if status < 500 else logging.ERROR
        if level == logging.INFO and request.path in PROBE_PATHS:
            level = logging.DEBUG
        access_log.log(level,
                       "%d %s %s %.1fms request_id=%s", status, request.method, request.path,
                       fields["duration_ms"], fields["request_id"], extra=fields)

    return log_request
