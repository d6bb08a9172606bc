"""Assembling the model runtime from config: model, backend (runtime), the served model and the runner."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from inference import backends, selection
from inference.loading import LazyBackend, LoadedBackends
from inference.model import Backend, LoadedModel, ModelLoadError, load_exported
from inference.repository import ModelSpec, configured_spec
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


def configured(config: Config) -> ModelSpec:
    """The model `[model]` names, as a spec."""
    return configured_spec(config.model.name, config.model.weights)


def build_backend(config: Config, spec: ModelSpec, model: LoadedModel, candidate: Candidate | None = None, *,
                  loaded: LoadedBackends | None = None) -> Backend:
    """The configured runtime for `model`, a version of `spec`'s model loaded with its checks
    (inference.torch_model.load_checked): exported first, then run on `candidate` (a published version runs
    on what the model's own file runs on), else on what `auto` chooses for it. With `loaded`, it counts
    there (released past models.max_loaded, rebuilt on a later forward).

    A `candidate` given for these weights was chosen on others', so it is held here to the accuracy guard
    against these weights' own FP32 reference (raises AccuracyGuardFailed). The torch runtime is
    its own reference."""
    if not backends.runs_exported(config.model.runtime):  # the runtime runs the torch module itself
        backend = _torch_runtime(config, spec, model)
        return backend if loaded is None else LazyBackend(
            backend.name, backend.precision, lambda: _torch_runtime(config, spec, model), loaded,
            label=f"{spec.name} {model.version}", built=backend)
    path = _export(config, spec, model)
    if candidate is None:
        backend = _guarded_backend(config, path)
        candidate = Candidate(backend.name, backend.precision)
    else:
        backend = make_backend(config, candidate, path)
        selection.check(backend, path, f"{candidate} on version {model.version}")
    if loaded is None:
        return backend
    chosen = candidate
    return LazyBackend(backend.name, backend.precision, lambda: make_backend(config, chosen, path), loaded,
                       label=f"{spec.name} {model.version}", built=backend)


def _export(config: Config, spec: ModelSpec, model: LoadedModel) -> Path:
    """`model`'s graph in the model cache (exported now unless it is there), with its reference beside it."""
    if spec.format == "onnx":
        from inference import onnx_model

        return onnx_model.export(spec, Path(model.module), onnx_cache_dir(config))[1]
    from inference import torch_model  # imported here: the torch-free path never needs it

    return torch_model.export_onnx(model, onnx_cache_dir(config), spec)


def _torch_runtime(config: Config, spec: ModelSpec, model: LoadedModel) -> Backend:
    if spec.format == "onnx":
        raise ModelLoadError(f"Model {spec.name!r} is an ONNX file, which the torch runtime does not run; set "
                             "model.runtime = 'auto'.")
    row, settings = backends.spec(config.model.runtime), config.model
    precision = settings.precision if settings.precision in row.precisions else row.precisions[0]
    return row.factory(model.module, precision, backends.Layout(
        settings.workers, settings.intra_op_threads, settings.idle_intra_op_threads, settings.device))


def prepare_models(config: Config, specs: dict[str, ModelSpec]) -> None:
    """Export each model and choose its runtime unless both are cached, and log each choice with the figures
    behind it (the server does this once, before its serving processes load the models); raises
    ModelLoadError whose message names the model. Nothing to prepare for the torch runtime."""
    for name, spec in specs.items():
        try:
            _prepare(config, spec)
        except ModelLoadError as exc:
            raise type(exc)(f"Model {name!r}: {exc}") from None


def _prepare(config: Config, spec: ModelSpec) -> None:
    if not backends.runs_exported(config.model.runtime):
        if spec.format == "onnx":
            raise ModelLoadError("An ONNX model runs on an exported runtime; set model.runtime = 'auto'.")
        return
    _, path = load_exported(spec, onnx_cache_dir(config))
    choice = _choose(config, path)
    if choice is not None:
        log.info("runtime of %s: %s", spec.name, choice.summary())


def build_served(config: Config, spec: ModelSpec, loaded: LoadedBackends) -> ServedModel:
    """`spec`'s model, its own file, on its runtime, WITHOUT building the runtime yet: built on the first
    forward and counted in `loaded` (released past models.max_loaded, rebuilt on a later forward). The
    model (name, version, labels) comes from the export's manifest (prepare_models made it); raises
    ModelLoadError.

    Unless the runtime runs the torch module, this process loads the cached export only and never
    imports torch (see inference.model)."""
    label = spec.name
    if not backends.runs_exported(config.model.runtime):
        from inference.torch_model import load_spec

        model = load_spec(spec)
        row = backends.spec(config.model.runtime)
        precision = config.model.precision if config.model.precision in row.precisions else row.precisions[0]
        return ServedModel(model, LazyBackend(row.name, precision, lambda: _torch_runtime(config, spec, model),
                                              loaded, label=label))
    model, path = load_exported(spec, onnx_cache_dir(config))
    choice = _choose(config, path)
    candidate = Candidate(choice.runtime, choice.precision) if choice else _on_device(config)

    def build() -> Backend:
        backend = make_backend(config, candidate, path)
        if choice is None:  # on a GPU, guarded here where it runs (the CPU's choice was guarded in its trial)
            selection.check(backend, path, f"{candidate} on {config.model.device}")
        return backend

    return ServedModel(model, LazyBackend(candidate.runtime, candidate.precision, build, loaded, label=label))


def serve_loaded(config: Config, model: LoadedModel, spec: ModelSpec | None = None) -> ServedModel:
    """`model`, already loaded with torch (a test's, a benchmark's), on the configured runtime, built now."""
    return ServedModel(model, build_backend(config, spec or configured_spec(model.name, "default"), model))


def build_runner(config: Config, siblings: SiblingLoad | None = None, metrics: Metrics | None = None) -> ModelRunner:
    """The runner with the configured threads, queue and image bounds; it runs whichever ServedModel a
    request hands it (build_served makes one per model)."""
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
