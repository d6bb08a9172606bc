"""Config: TOML, environment overrides, validation with clear messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.config import PRODUCTION_SHUTDOWN_DELAY_SECONDS, Config, ConfigError, load_config

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_repository_config_loads_with_defaults() -> None:
    config = load_config(env={})
    assert isinstance(config, Config)
    assert config.model.name == "efficientnet_lite0" and config.redis.url == "embedded"
    assert config.http.max_body_bytes == 10 * 1024 * 1024


def test_environment_overrides_every_kind_of_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    config = load_config(path, env={
        "INFERENCE_REDIS_URL": "redis://example:6379/1",
        "INFERENCE_SERVER_PORT": "9100",
        "INFERENCE_HTTP_LEGACY_PREDICT": "false",
        "INFERENCE_HTTP_CORS_ORIGINS": "https://a.example, https://b.example",
        "INFERENCE_HTTP_SHUTDOWN_GRACE_SECONDS": "2.5",
        "INFERENCE_FEEDBACK_DAILY_LIMIT": "50",
        "INFERENCE_AUTH_SECRET_KEYS": '["new-key-0123456789abc", "old-key-0123456789abc"]',
        "UNRELATED": "x",
    })
    assert config.redis.url == "redis://example:6379/1"
    assert config.server.port == 9100
    assert config.http.legacy_predict is False
    assert config.http.cors_origins == ["https://a.example", "https://b.example"]
    assert config.http.shutdown_grace_seconds == 2.5
    assert config.feedback.daily_limit == 50
    assert config.auth.secret_keys == ["new-key-0123456789abc", "old-key-0123456789abc"]


@pytest.mark.parametrize("text, env, fragment", [
    ("[server]\nport = 'eighty'\n", {}, "server.port must be an integer"),
    ("[server]\nprot = 80\n", {}, "Unknown setting server.prot"),
    ("[serve]\nport = 80\n", {}, "Unknown config section"),
    ("[model]\nworkers = 0\n", {}, "model.workers"),
    ("[model]\nruntime = 'tensorflow'\n", {}, "model.runtime"),
    ("[model]\nprecision = 'int8'\n", {}, "INT8 is not offered"),
    ("[model]\nruntime = 'onnxruntime'\nprecision = 'bf16'\n", {}, "needs model.runtime 'openvino'"),
    ("[model]\nruntime = 'openvino'\ndevice = 'cuda'\n", {}, "runs on the CPU"),
    ("[sessions]\nttl_seconds = 100\nmax_lifetime_seconds = 10\n", {}, "max_lifetime_seconds"),
    ("[auth]\napi_keys = ['plain-text-key']\n", {}, "hash-key"),
    ("[redis]\nurl = 'http://x'\n", {}, "redis.url"),
    ("[server]\nshutdown_delay_seconds = -2\n", {}, "server.shutdown_delay_seconds must be between 0 and 300"),
    ("", {"INFERENCE_SERVER_SHUTDOWN_DELAY_SECONDS": "301"}, "server.shutdown_delay_seconds must be between"),
    ("[server]\nmalloc_keep_mb = -1\n", {}, "server.malloc_keep_mb"),
    ("", {"INFERENCE_CAPTURE_MIN_FREE_DISK_BYTES": "-1"}, "capture.min_free_disk_bytes must not be negative"),
    ("[feedback]\nmax_comment_bytes = 0\n", {}, "feedback.max_comment_bytes must be between 1 and 100000"),
    ("[feedback]\nmax_comment_chars = 500\n", {}, "Unknown setting feedback.max_comment_chars"),
    ("", {"INFERENCE_FEEDBACK_DAILY_LIMIT": "-1"}, "feedback.daily_limit must not be negative"),
    ("", {"INFERENCE_FEEDBACK_RETENTION_DAYS": "0"}, "feedback.retention_days must be between 1 and 36500"),
    ("", {"INFERENCE_FEEDBACK_SWEEP_INTERVAL_SECONDS": "0"}, "feedback.sweep_interval_seconds must be positive"),
    ("", {"INFERENCE_CAPTURE_MAX_SESSION_BYTES": "-1"}, "capture.max_session_bytes must not be negative"),
    ("[capture]\nmax_queue = 0\n", {}, "capture.max_queue must be between 1 and 10000"),
    ("[http]\nstream_store_retry_seconds = -1\n", {}, "http.stream_store_retry_seconds must be between 0 and 300"),
    ("[models]\nmax_archive_members = 0\n", {}, "models.max_archive_members must be between 1 and 100000"),
    ("", {"INFERENCE_MODELS_MAX_ARCHIVE_BYTES": "100"}, "models.max_archive_bytes must be at least 1024"),
    ("", {"INFERENCE_MODEL_WORKERS": "two"}, "INFERENCE_MODEL_WORKERS must be an integer"),
    ("", {"INFERENCE_MODEL_COLOUR": "x"}, "Unknown setting"),
    ("", {"INFERENCE_SERVER_MODE": "production"}, "auth.secret_keys is empty"),
    ("", {"INFERENCE_SERVER_MODE": "production", "INFERENCE_AUTH_SECRET_KEYS": "0123456789abcdef0123"},
     "anonymous POST /predict is on"),
    ("not toml [", {}, "not valid TOML"),
])
def test_bad_settings_stop_with_a_sentence_naming_them(tmp_path: Path, text: str, env: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(write(tmp_path, text), env=env)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", env={})


def test_production_mode_starts_with_a_secret_and_no_anonymous_route(tmp_path: Path) -> None:
    env = {"INFERENCE_SERVER_MODE": "production", "INFERENCE_AUTH_SECRET_KEYS": "0123456789abcdef0123"}
    assert load_config(write(tmp_path, "[http]\nlegacy_predict = false\n"), env=env).server.mode == "production"
    allowed = load_config(write(tmp_path, "[http]\nallow_anonymous_in_production = true\n"), env=env)
    assert allowed.http.legacy_predict


def test_default_processes_are_one_per_core_on_the_cpu_runtimes_else_one() -> None:
    config = Config()
    assert config.server.processes == 0 and config.model.runtime == "auto"
    assert config.serving_processes == len(os.sched_getaffinity(0))
    config.model.runtime = "openvino"
    assert config.serving_processes == len(os.sched_getaffinity(0))
    config.model.runtime = "torch"  # a torch process is ~1 GB: threads in one process instead
    assert config.serving_processes == 1
    config.model.runtime, config.model.device = "onnxruntime", "cuda"  # one copy of the model on the GPU
    assert config.serving_processes == 1
    config.server.processes = 3
    assert config.serving_processes == 3


@pytest.mark.parametrize("text, env, fragment", [
    ("[http]\ntrusted_proxies = ['nginx.internal']\n", {}, "http.trusted_proxies entry 'nginx.internal'"),
    ("[http]\ntrusted_proxies = ['10.0.0.1/24']\n", {}, "no host bits set"),
    ("", {"INFERENCE_HTTP_XHEADERS": "true", "INFERENCE_HTTP_TRUSTED_PROXIES": "[]"},
     "http.xheaders is on but http.trusted_proxies is empty"),
])
def test_trusted_proxies_are_addresses_or_networks(tmp_path: Path, text: str, env: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(write(tmp_path, text), env=env)
    overridden = load_config(write(tmp_path, ""), env={"INFERENCE_HTTP_TRUSTED_PROXIES": "10.0.0.5, fd00::/64"})
    assert overridden.http.trusted_proxies == ["10.0.0.5", "fd00::/64"]


def test_the_rewrite_after_erase_interval_is_a_bounded_number_of_seconds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.embedded_erase_rewrite_seconds must be between 0 and 86400"):
        load_config(write(tmp_path, ""), env={"INFERENCE_REDIS_EMBEDDED_ERASE_REWRITE_SECONDS": "-1"})
    assert load_config(write(tmp_path, "[redis]\nembedded_erase_rewrite_seconds = 0\n"), env={}) \
        .redis.embedded_erase_rewrite_seconds == 0


def test_the_shutdown_delay_fits_kubernetes_in_production_and_keeps_ctrl_c_instant_in_development(
        tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path, env={}).shutdown_delay == 0
    production = load_config(path, env={"INFERENCE_SERVER_MODE": "production", "INFERENCE_HTTP_LEGACY_PREDICT": "false",
                                        "INFERENCE_AUTH_SECRET_KEYS": "0123456789abcdef0123"})
    assert production.shutdown_delay == PRODUCTION_SHUTDOWN_DELAY_SECONDS > 0
    assert load_config(path, env={"INFERENCE_SERVER_SHUTDOWN_DELAY_SECONDS": "2.5"}).shutdown_delay == 2.5
