"""What a runtime is given for images: 8-bit pixels plus each image's normalization.

Decoding, resizing and cropping stay in uint8 (a quarter of the bytes of float32), and the cast, the
per-channel `x * scale + shift` (each session's own `mean`/`std`) and the HWC -> CHW transpose run
inside the model's graph, fused by the runtime, instead of as float32 arrays built with NumPy.

`pixel_graph` builds that graph once from the exported model: three inputs in front of the original
one, so the same file serves ONNX Runtime and OpenVINO, and images of different sessions (different
normalizations) share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.files import write_atomically

#: The graph's inputs: pixels uint8 (N, H, W, 3); scale and shift float32 (N, 3, 1, 1).
PIXELS, SCALE, SHIFT = "pixels", "scale", "shift"
# Bump when the wrapper changes: cached graphs are named after it.
PIXEL_GRAPH_VERSION = "u8nhwc-2"


@dataclass(frozen=True)
class PixelBatch:
    """N images of one size as uint8 HWC, with the normalization each one is to get."""

    pixels: np.ndarray  # uint8 (N, H, W, 3)
    scale: np.ndarray  # float32 (N, 3, 1, 1): 1 / (255 * std)
    shift: np.ndarray  # float32 (N, 3, 1, 1): -mean / std

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the NCHW tensor this batch stands for."""
        n, height, width, channels = self.pixels.shape
        return n, channels, height, width

    @staticmethod
    def concat(batches: Sequence[PixelBatch]) -> PixelBatch:
        if len(batches) == 1:
            return batches[0]
        return PixelBatch(np.concatenate([b.pixels for b in batches]), np.concatenate([b.scale for b in batches]),
                          np.concatenate([b.shift for b in batches]))

    def feeds(self) -> dict[str, np.ndarray]:
        """The graph's inputs by name."""
        return {PIXELS: self.pixels, SCALE: self.scale, SHIFT: self.shift}

    def to_tensor(self) -> np.ndarray:
        """The float32 NCHW tensor the model sees: what the graph computes first, done with NumPy (for
        runtimes that take tensors, and for /v1/preprocess)."""
        tensor = np.ascontiguousarray(self.pixels.transpose(0, 3, 1, 2), dtype=np.float32)
        tensor *= self.scale
        tensor += self.shift
        return tensor


def normalization(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), each float32 (1, 3, 1, 1), so that pixel * scale + shift = (pixel / 255 - mean) / std."""
    mean_array = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_array = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std_array), -mean_array / std_array
    scale.flags.writeable = shift.flags.writeable = False  # shared by every batch of a cached pipeline
    return scale, shift


def pixel_graph(onnx_path: Path) -> Path:
    """The exported model behind the pixel inputs, written once next to it (two processes starting
    together may both write it; each writes it whole)."""
    target = onnx_path.with_name(f"{onnx_path.stem}.{PIXEL_GRAPH_VERSION}.onnx")
    if target.is_file():
        return target
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    (tensor_input,) = [i for i in graph.input if i.name not in initializers]
    original = tensor_input.name
    inner = f"{original}__normalized"
    for node in graph.node:  # the original input becomes an internal value fed by the new nodes
        node.input[:] = [inner if name == original else name for name in node.input]
    graph.input.remove(tensor_input)
    graph.input.extend([
        helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, ["batch", "height", "width", 3]),
        helper.make_tensor_value_info(SCALE, TensorProto.FLOAT, ["batch", 3, 1, 1]),
        helper.make_tensor_value_info(SHIFT, TensorProto.FLOAT, ["batch", 3, 1, 1]),
    ])
    # The transpose runs on the uint8 pixels (a quarter of the bytes), and the arithmetic in NCHW, the
    # layout the first convolution reads: ordered so, the wrapper costs nothing measurable on ONNX
    # Runtime and OpenVINO, where arithmetic in NHWC then a float transpose cost ~13 % of a forward.
    prologue = [
        helper.make_node("Transpose", [PIXELS], ["pixels__nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["pixels__nchw"], ["pixels__float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels__float", SCALE], ["pixels__scaled"]),
        helper.make_node("Add", ["pixels__scaled", SHIFT], [inner]),
    ]
    nodes = prologue + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    write_atomically(target, model.SerializeToString())
    return target
