"""Assembling the model runtime from config: model, backend (runtime) and runner."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from server.config import Config
from server.model import Backend, LoadedModel, OnnxBackend, TorchBackend, load_model
from server.runner import ModelRunner
from sessions.store import SessionStore, connect

log = logging.getLogger(__name__)


def build_backend(config: Config, model: LoadedModel) -> Backend:
    if config.model.runtime == "onnxruntime":
        cache_dir = Path(config.model.cache_dir) if config.model.cache_dir else config.data_path / "model-cache"
        return OnnxBackend(model, cache_dir, intra_op_threads=config.model.intra_op_threads,
                           idle_intra_op_threads=config.model.idle_intra_op_threads, device=config.model.device)
    torch.set_num_threads(config.model.intra_op_threads)
    return TorchBackend(model.module, config.model.device)


def build_runner(config: Config, model: LoadedModel | None = None) -> ModelRunner:
    """Load the model (unless given) and wrap it in a runner; raises ModelLoadError."""
    model = model or load_model(config.model.name, config.model.weights)
    return ModelRunner(
        model,
        build_backend(config, model),
        workers=config.model.workers,
        max_queue=config.model.max_queue,
        max_image_pixels=config.model.max_image_pixels,
        max_batch_size=config.model.max_batch_size,
        max_batch_delay_ms=config.model.max_batch_delay_ms,
    )


def build_store(config: Config, redis_url: str) -> SessionStore:
    """A session store on `redis_url` (the resolved URL: the embedded server's socket or config's)."""
    client = connect(redis_url, config.redis.connect_timeout_seconds, config.redis.command_timeout_seconds)
    return SessionStore(
        client,
        ttl_seconds=config.sessions.ttl_seconds,
        max_lifetime_seconds=config.sessions.max_lifetime_seconds,
        history_max_entries=config.history.max_entries,
        rate_limit_per_minute=config.sessions.rate_limit_per_minute,
    )
