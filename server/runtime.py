"""Assembling the model runtime from config: model, backend (runtime) and runner."""

from __future__ import annotations

import logging

import torch

from server.config import Config
from server.model import Backend, LoadedModel, TorchBackend, load_model
from server.runner import ModelRunner
from sessions.store import SessionStore, connect

log = logging.getLogger(__name__)


def build_backend(config: Config, model: LoadedModel) -> Backend:
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
    )


def build_store(config: Config, redis_url: str) -> SessionStore:
    """A session store on `redis_url` (the resolved URL: the embedded server's socket or config's)."""
    client = connect(redis_url, config.redis.connect_timeout_seconds, config.redis.command_timeout_seconds)
    return SessionStore(
        client,
        ttl_seconds=config.sessions.ttl_seconds,
        max_lifetime_seconds=config.sessions.max_lifetime_seconds,
        history_max_entries=config.history.max_entries,
    )
