"""The pipelines the benchmark compares, shared by the in-process limit and the peer servers.

* seed pipeline: PIL full decode + torchvision transforms (Resize(256), CenterCrop(224), ToTensor,
  Normalize), as in the simple Flask example the project started from.
* fast pipeline: the server's own `preprocess(..., draft=True)` (JPEG draft decode + NumPy).

Runtimes: torch eager (the repo's `load_model`) or ONNX Runtime on a model exported here.
Heavy imports (torch, onnxruntime) happen inside the functions so that the harness stays light.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "efficientnet_lite0"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

Forward = Callable[[np.ndarray], np.ndarray]


def seed_transform() -> Any:
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def seed_preprocess(data: bytes, transform: Any) -> np.ndarray:
    """PIL full decode + torchvision transforms -> float32 (3, 224, 224)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    return transform(image).numpy()


def fast_preprocess(data: bytes) -> np.ndarray:
    """The server's decode + preprocess with JPEG draft mode -> float32 (3, 224, 224)."""
    from inference.imaging import preprocess
    from sessions.options import Options

    return preprocess(data, Options(), max_pixels=10**9, draft=True)


def load_torch_module() -> Any:
    from inference.torch_model import load_model

    return load_model(MODEL_NAME, "default").module


def torch_forward(module: Any) -> Forward:
    import torch

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return forward


def export_onnx(path: Path) -> Path:
    """Export EfficientNet-Lite0 to ONNX (opset 17, TorchScript exporter, dynamic batch) once."""
    if path.exists():
        return path
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    module = load_torch_module()
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(module, (torch.zeros(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp.replace(path)
    return path


def onnx_forward(path: Path, intra_op_threads: int) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0]

    return forward
