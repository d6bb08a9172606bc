"""The pipelines the benchmark compares, shared by the in-process limit and the peer servers.

A pipeline is a decoder (bytes -> what a runtime takes) and a runtime (that -> logits).

Decoders:
* seed: PIL full decode + torchvision transforms (Resize(256), CenterCrop(224), ToTensor, Normalize)
  -> float32 CHW, as in the simple Flask example the project started from;
* pillow-float: the server's previous path: Pillow's own JPEG draft decode (DCT scale), uint8
  resize/crop, then NumPy float32 normalization -> float32 CHW;
* server: the server's `imaging.prepare` (libjpeg-turbo decode at a DCT scale, uint8 resize/crop)
  -> uint8 pixels whose normalization and HWC -> CHW run inside the graph (`PixelBatch`).

Runtimes: torch eager FP32 (the repo's `load_model`), and on the server's own export
(`inference.model.load_exported`) ONNX Runtime FP32 and OpenVINO FP32 / BF16, built as the server
builds them. Heavy imports (torch, onnxruntime, openvino) happen inside the functions so that the
harness stays light.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "efficientnet_lite0"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SEED_RESIZE = 256

Forward = Callable[[Any], np.ndarray]  # a float32 NCHW array or a PixelBatch -> logits


@dataclass(frozen=True)
class Runtime:
    """One runtime x precision the benchmark measures."""

    key: str  # e.g. "openvino-bf16": the row names use it
    runtime: str  # torch | onnxruntime | openvino
    precision: str  # fp32 | bf16
    label: str

    @property
    def takes_pixels(self) -> bool:
        """Runs the server's uint8 input (the torch eager row is the seed's float runtime)."""
        return self.runtime != "torch"


TORCH = Runtime("torch-fp32", "torch", "fp32", "torch eager FP32")
ONNXRUNTIME = Runtime("onnxruntime-fp32", "onnxruntime", "fp32", "ONNX Runtime FP32")
OPENVINO_FP32 = Runtime("openvino-fp32", "openvino", "fp32", "OpenVINO FP32")
OPENVINO_BF16 = Runtime("openvino-bf16", "openvino", "bf16", "OpenVINO BF16")

DECODERS = {
    "seed": "PIL full decode + torchvision (float)",
    "pillow-float": "Pillow draft decode + NumPy float normalize (the previous server path)",
    "server": "server: libjpeg-turbo at DCT scale + uint8 resize/crop, normalization in the graph",
}


def runtimes_here() -> list[Runtime]:
    """Every runtime x precision worth measuring on this CPU: BF16 only where it has BF16 units."""
    from inference.selection import cpu_model, has_bf16

    found = [TORCH, ONNXRUNTIME, OPENVINO_FP32]
    if has_bf16(cpu_model()[1]):
        found.append(OPENVINO_BF16)
    return found


def runtime_by_key(key: str) -> Runtime:
    for runtime in (TORCH, ONNXRUNTIME, OPENVINO_FP32, OPENVINO_BF16):
        if runtime.key == key:
            return runtime
    raise KeyError(key)


def combinations(runtimes: list[Runtime]) -> list[tuple[str, Runtime]]:
    """(decoder, runtime) pairs measured end to end; not every product, to keep the run short: the seed
    decoder with torch (the seed app), the server's decoder with every runtime that takes its pixels,
    and the previous path (pillow-float) with ONNX Runtime, the server's runtime before."""
    pairs = [("seed", TORCH)] if TORCH in runtimes else []
    if ONNXRUNTIME in runtimes:
        pairs.append(("pillow-float", ONNXRUNTIME))
    pairs += [("server", runtime) for runtime in runtimes if runtime.takes_pixels]
    return pairs


# -- decoders -------------------------------------------------------------------------------------
def seed_transform() -> Any:
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(SEED_RESIZE),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def seed_preprocess(data: bytes, transform: Any) -> np.ndarray:
    """PIL full decode + torchvision transforms -> float32 (3, 224, 224)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    return transform(image).numpy()


def pillow_float_preprocess(data: bytes) -> np.ndarray:
    """The server's previous path -> float32 (3, 224, 224): Pillow's own libjpeg decode at the DCT scale
    (draft) that still covers resize, the server's uint8 resize/crop, and normalization as a NumPy
    float32 array (no libjpeg-turbo-direct decode, nothing inside the graph)."""
    from PIL import Image

    from core.options import Options
    from inference.imaging import pipeline_for

    options = Options()
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    scale = options.resize / min(width, height)
    if image.format == "JPEG" and scale < 1:
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return pipeline_for(options)(image.convert("RGB"))


def server_prepare(data: bytes) -> Any:
    """The server's own decode -> a PixelBatch of one (uint8 NHWC + its normalization)."""
    from core.options import Options
    from inference.imaging import prepare

    return prepare(data, Options(), max_pixels=10**9)


def zero_pixels() -> Any:
    """A 224x224 PixelBatch of one (forward-only rows of the runtimes that take pixels)."""
    from core.options import Options
    from inference.imaging import pipeline_for
    from inference.pixels import PixelBatch

    pipeline = pipeline_for(Options())
    return PixelBatch(np.zeros((1, 224, 224, 3), dtype=np.uint8), pipeline.scale, pipeline.shift)


# -- runtimes -------------------------------------------------------------------------------------
def exported_model(cache_dir: Path) -> Path:
    """The server's exported graph of the default model (exported once into `cache_dir`)."""
    from inference.model import load_exported

    return load_exported(MODEL_NAME, "default", cache_dir)[1]


def load_torch_module() -> Any:
    from inference.torch_model import load_model

    return load_model(MODEL_NAME, "default").module


def make_backend(runtime: Runtime, onnx_path: Path | None, *, threads: int, intra: int) -> Any:
    """A backend with `.forward(batch)`, as the server builds it for `threads` concurrent forwards of
    `intra` threads each (torch: process-wide thread count)."""
    if runtime.runtime == "torch":
        from inference.backends.torch_backend import TorchBackend

        return TorchBackend(load_torch_module(), intra_op_threads=intra)
    assert onnx_path is not None
    if runtime.runtime == "onnxruntime":
        from inference.backends.onnxruntime_backend import OnnxBackend

        return OnnxBackend(onnx_path, intra_op_threads=intra)
    from inference.backends.openvino_backend import OpenVinoBackend

    return OpenVinoBackend(onnx_path, precision=runtime.precision, workers=threads, intra_op_threads=intra)


def served_runtime(cache_dir: Path, runtime: str, precision: str = "auto") -> str:
    """What our server with `model.runtime = runtime` and the export cache `cache_dir` runs on, e.g.
    "openvino fp32": with auto, the choice it cached for this CPU at its first start (read, not measured
    again, once a server has started on this cache)."""
    if runtime == "torch":
        return "torch fp32"
    from server.config import load_config
    from server.runtime import runtime_choice

    config = load_config()
    config.model.runtime, config.model.precision, config.model.cache_dir = runtime, precision, str(cache_dir)
    return str(runtime_choice(config, exported_model(cache_dir)))


# The parts of inference.selection that decide whether a runtime passes the accuracy guard.
_GUARD_FUNCTIONS = ("guard_cases", "reference_probabilities", "compare", "guard")


def guard_identity() -> dict[str, Any]:
    """What the accuracy guard was when a result was measured: its version, tolerances, option sets, the
    digests of its photos and of its code. bench.report compares a result's with today's, so that a
    result measured under an older guard says so."""
    import hashlib
    import inspect

    from inference import selection

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    code = "\n".join(inspect.getsource(getattr(selection, name)) if hasattr(selection, name) else f"{name}: none"
                     for name in _GUARD_FUNCTIONS)
    return {"selection_version": getattr(selection, "SELECTION_VERSION", None),
            "tolerance": dict(selection.GUARD_TOLERANCE), "top5_overlap": selection.GUARD_TOP5_OVERLAP,
            "options": sorted(selection.GUARD_OPTIONS),
            "photos": {photo.name: digest(photo.read_bytes()) for photo in sorted(selection.GUARD_DIR.glob("*.jpg"))},
            "code": digest(code.encode())}
