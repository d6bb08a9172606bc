"""ONNX Runtime on the exported graph: the default runtime, on the CPU or a CUDA GPU. Torch-free: it reads
the ONNX file (inference.model.load_exported), never the torch model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.model import Lazy, ModelLoadError
from inference.pixels import PixelBatch, pixel_graph

if TYPE_CHECKING:
    from inference.backends import Layout


class OnnxBackend:
    """ONNX Runtime on a graph exported from the torch model, behind the pixel inputs (inference.pixels).

    Faster than torch eager on a CPU (figures in bench/RESULTS.md).
    """

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: Path, *, intra_op_threads: int = 1, idle_intra_op_threads: int = 0,
                 device: str = "cpu"):
        import onnxruntime

        self.path = path
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ModelLoadError(
                    "model.device is 'cuda' but this onnxruntime has no CUDA provider; "
                    "install onnxruntime-gpu or set model.runtime = 'torch'."
                )
            providers.insert(0, "CUDAExecutionProvider")

        def session(graph: Path, threads: int) -> onnxruntime.InferenceSession:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            return onnxruntime.InferenceSession(str(graph), options, providers=providers)

        pixels = pixel_graph(path)
        self.session = session(pixels, intra_op_threads)
        # A second session whose forward spreads over more threads, used when a request is alone:
        # on 2 cores it roughly halves single-request latency (see bench/), and costs a copy of
        # the weights (~20 MB for the default model).
        wide = idle_intra_op_threads > intra_op_threads and not device.startswith("cuda")
        self.idle_session = session(pixels, idle_intra_op_threads) if wide else self.session
        # The original graph, for float tensors: loaded on the first one, since most servers never see any.
        self._tensor_session = Lazy(lambda: session(path, intra_op_threads))

    def forward(self, batch: np.ndarray | PixelBatch, *, alone: bool = False) -> np.ndarray:
        # InferenceSession.run is thread-safe and releases the GIL.
        if isinstance(batch, PixelBatch):
            logits: np.ndarray = (self.idle_session if alone else self.session).run(None, batch.feeds())[0]
            return logits
        tensor_session = self._tensor_session.get()
        tensor_logits: np.ndarray = tensor_session.run(None, {tensor_session.get_inputs()[0].name: batch})[0]
        return tensor_logits


def make(graph: Path, precision: str, layout: Layout) -> OnnxBackend:
    """The registry's factory (inference.backends): ONNX Runtime computes in FP32 only."""
    return OnnxBackend(graph, intra_op_threads=layout.intra_op_threads,
                       idle_intra_op_threads=layout.idle_intra_op_threads, device=layout.device)
