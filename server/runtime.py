"""Assembling the model runtime from config: model, backend (runtime), the served model and the runner."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from inference import backends, selection
from inference.model import Backend, LoadedModel, load_exported
from inference.runner import ModelRunner, ServedModel, SiblingLoad
from inference.selection import Candidate
from server.config import Config
from server.observability import Metrics
from sessions.store import SessionStore, connect

log = logging.getLogger(__name__)


def onnx_cache_dir(config: Config) -> Path:
    return config.folder(config.model.cache_dir, "model-cache")


def make_backend(config: Config, candidate: Candidate, path: Path) -> Backend:
    """`candidate`'s runtime on the exported graph at `path`, with the configured thread layout."""
    model = config.model
    return selection.make_backend(candidate, path, workers=model.workers, intra_op_threads=model.intra_op_threads,
                                  idle_intra_op_threads=model.idle_intra_op_threads, device=model.device)


def runtime_choice(config: Config, path: Path) -> Candidate:
    """The runtime and precision to serve the exported graph at `path` with: the configured one, or with
    `auto` the one measured for this CPU (cached; measured now on the first start)."""
    choice = _choose(config, path)
    return Candidate(choice.runtime, choice.precision) if choice else _on_device(config)


def _on_device(config: Config) -> Candidate:
    """What a GPU runs the export on: the configured runtime, else the first that runs there."""
    model = config.model
    spec = backends.SPECS.get(model.runtime) or backends.first_exported_on(model.device)
    return Candidate(spec.name, model.precision if model.precision in spec.precisions else spec.precisions[0])


def _guarded_backend(config: Config, path: Path) -> Backend:
    """The runtime that serves the exported graph at `path`, held to the accuracy guard: on the CPU by the
    choice (in the child that measures, with this thread layout), on a GPU here, where it runs."""
    choice = _choose(config, path)
    if choice is not None:
        return make_backend(config, Candidate(choice.runtime, choice.precision), path)
    candidate = _on_device(config)
    backend = make_backend(config, candidate, path)
    selection.check(backend, path, f"{candidate} on {config.model.device}")
    return backend


def _choose(config: Config, path: Path) -> selection.Choice | None:
    model = config.model
    if model.device != "cpu":  # a GPU runs one runtime (_on_device); there is nothing to time
        return None
    return selection.choose(path, runtime=model.runtime, precision=model.precision, workers=model.workers,
                            intra_op_threads=model.intra_op_threads, idle_intra_op_threads=model.idle_intra_op_threads,
                            trial_seconds=model.runtime_trial_seconds)


def build_backend(config: Config, model: LoadedModel, candidate: Candidate | None = None) -> Backend:
    """The configured runtime for a model loaded with torch: exported first, then run on `candidate` (a
    published version runs on what the configured weights run on), else on what `auto` chooses for it.

    A `candidate` given for these weights was chosen on others', so it is held here to the accuracy guard
    against these weights' own torch FP32 reference (raises AccuracyGuardFailed). The torch runtime is
    its own reference."""
    from inference import torch_model  # imported here: the torch-free path never needs it

    if not backends.runs_exported(config.model.runtime):  # the runtime runs the torch module itself
        spec, settings = backends.spec(config.model.runtime), config.model
        precision = settings.precision if settings.precision in spec.precisions else spec.precisions[0]
        return spec.factory(model.module, precision, backends.Layout(
            settings.workers, settings.intra_op_threads, settings.idle_intra_op_threads, settings.device))
    path = torch_model.export_onnx(model, onnx_cache_dir(config))
    if candidate is None:
        return _guarded_backend(config, path)
    backend = make_backend(config, candidate, path)
    selection.check(backend, path, f"{candidate} on version {model.version}")
    return backend


def prepare_model(config: Config) -> None:
    """Export the configured model and choose its runtime unless both are cached, and log the choice with
    the figures behind it (the server does this once, before its serving processes load the model);
    raises ModelLoadError. Nothing to prepare for a runtime that runs the torch module itself."""
    if backends.runs_exported(config.model.runtime):
        _, path = load_exported(config.model.name, config.model.weights, onnx_cache_dir(config))
        choice = _choose(config, path)
        if choice is not None:
            log.info("runtime: %s", choice.summary())


def build_served(config: Config, model: LoadedModel | None = None) -> ServedModel:
    """The configured weights (unless `model` is given) on the configured runtime: what the model
    catalogue serves until an activation; raises ModelLoadError.

    Unless the runtime runs the torch module or a model is given, this process loads the cached export
    only and never imports torch (see inference.model)."""
    if model is None and backends.runs_exported(config.model.runtime):
        model, path = load_exported(config.model.name, config.model.weights, onnx_cache_dir(config))
        return ServedModel(model, _guarded_backend(config, path))
    if model is None:
        from inference.torch_model import load_model

        model = load_model(config.model.name, config.model.weights)
    return ServedModel(model, build_backend(config, model))


def build_runner(config: Config, siblings: SiblingLoad | None = None, metrics: Metrics | None = None) -> ModelRunner:
    """The runner with the configured threads, queue and image bounds; it runs whichever ServedModel a
    request hands it (build_served makes the configured one)."""
    # Pillow's own decompression-bomb check is process-wide and also runs on images it opens by itself
    # (nested in a container) before any size reaches imaging.open_image; at its default (~89 MP,
    # refused at twice that) it would let far more through than the configured limit.
    Image.MAX_IMAGE_PIXELS = config.model.max_image_pixels
    return ModelRunner(
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
