"""Assembling the model runtime from config: model, backend (runtime) and runner."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from inference.model import Backend, LoadedModel, OnnxBackend, load_exported
from inference.runner import ModelRunner, SiblingLoad
from server.config import Config
from server.observability import Metrics
from sessions.store import SessionStore, connect

log = logging.getLogger(__name__)


def onnx_cache_dir(config: Config) -> Path:
    return Path(config.model.cache_dir) if config.model.cache_dir else config.data_path / "model-cache"


def onnx_backend(config: Config, path: Path) -> OnnxBackend:
    return OnnxBackend(path, intra_op_threads=config.model.intra_op_threads,
                       idle_intra_op_threads=config.model.idle_intra_op_threads, device=config.model.device)


def build_backend(config: Config, model: LoadedModel) -> Backend:
    """The configured runtime for a model loaded with torch (exported first for ONNX Runtime)."""
    from inference import torch_model  # imported here: the torch-free ONNX path never needs it

    if config.model.runtime == "onnxruntime":
        return onnx_backend(config, torch_model.export_onnx(model, onnx_cache_dir(config)))
    return torch_model.TorchBackend(model.module, config.model.device, intra_op_threads=config.model.intra_op_threads)


def prepare_model(config: Config) -> None:
    """Export the configured model for ONNX Runtime unless it is cached (a parent does this before
    forking its serving processes); raises ModelLoadError. Nothing to prepare for torch."""
    if config.model.runtime == "onnxruntime":
        load_exported(config.model.name, config.model.weights, onnx_cache_dir(config))


def build_runner(config: Config, model: LoadedModel | None = None, siblings: SiblingLoad | None = None,
                 metrics: Metrics | None = None) -> ModelRunner:
    """Load the model (unless given) and wrap it in a runner; raises ModelLoadError.

    With ONNX Runtime and no model given, this process loads the cached export only and never
    imports torch (see inference.model)."""
    if model is None and config.model.runtime == "onnxruntime":
        model, path = load_exported(config.model.name, config.model.weights, onnx_cache_dir(config))
        backend = onnx_backend(config, path)
    else:
        if model is None:
            from inference.torch_model import load_model

            model = load_model(config.model.name, config.model.weights)
        backend = build_backend(config, model)
    # Pillow's own decompression-bomb check is process-wide and also runs on images it opens by itself
    # (nested in a container) before any size reaches imaging.open_image; at its default (~89 MP,
    # refused at twice that) it would let far more through than the configured limit.
    Image.MAX_IMAGE_PIXELS = config.model.max_image_pixels
    return ModelRunner(
        model,
        backend,
        workers=config.model.workers,
        max_queue=config.model.max_queue,
        max_image_pixels=config.model.max_image_pixels,
        max_batch_size=config.model.max_batch_size,
        max_batch_delay_ms=config.model.max_batch_delay_ms,
        max_aspect_ratio=config.model.max_aspect_ratio,
        max_upscale=config.model.max_upscale,
        max_request_pixels=config.model.max_request_pixels,
        max_forward_pixels=config.model.max_forward_pixels,
        siblings=siblings,
        metrics=metrics or Metrics(),  # the app's registry too: make_app serves it on /metrics
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
