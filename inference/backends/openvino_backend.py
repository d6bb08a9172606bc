"""OpenVINO on the CPU: the same exported graph, compiled for this CPU, in FP32 or BF16.

BF16 runs on the CPU's matrix units (AMX on Xeons since Sapphire Rapids, AVX512-BF16 elsewhere);
whether it is faster here and agrees with FP32 is for `inference.selection` to measure. Torch-free,
like ONNX Runtime: it reads the ONNX file, never the torch model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.model import Lazy, ModelLoadError
from inference.pixels import PixelBatch, pixel_graph

if TYPE_CHECKING:
    from inference.backends import Layout

#: model.precision -> OpenVINO's inference precision hint.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, path: Path, *, precision: str = "fp32", workers: int = 1, intra_op_threads: int = 1,
                 idle_intra_op_threads: int = 0):
        """`workers` forwards run at once (one stream each, `intra_op_threads` threads per stream); a
        forward alone in the server runs on a second compilation with `idle_intra_op_threads`."""
        import openvino

        if precision not in PRECISION_HINTS:
            raise ModelLoadError(f"OpenVINO runs in {' or '.join(PRECISION_HINTS)}, not {precision!r}.")
        self.path, self.precision = path, precision
        core = openvino.Core()

        def compile_graph(graph: Path, streams: int, threads: int) -> Any:
            return core.compile_model(str(graph), "CPU", {
                "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
                "NUM_STREAMS": str(streams),
                "INFERENCE_NUM_THREADS": str(streams * threads),
                # Several serving processes share the cores (--processes): pinning would stack them.
                "ENABLE_CPU_PINNING": "NO",
            })

        pixels = pixel_graph(path)
        self.compiled = compile_graph(pixels, max(1, workers), max(1, intra_op_threads))
        wide = idle_intra_op_threads > intra_op_threads
        self.idle_compiled = compile_graph(pixels, 1, idle_intra_op_threads) if wide else self.compiled
        # The original graph, for float tensors: compiled on the first one, since most servers never see any.
        self._tensor_compiled = Lazy(lambda: compile_graph(path, max(1, workers), max(1, intra_op_threads)))
        self._requests = threading.local()  # an infer request per thread and compilation: they are not shared

    def forward(self, batch: np.ndarray | PixelBatch, *, alone: bool = False) -> np.ndarray:
        if isinstance(batch, PixelBatch):
            request = self._request(self.idle_compiled if alone else self.compiled)
            # infer() copies the inputs in and the output out (shares neither), and releases the GIL.
            logits: np.ndarray = request.infer(batch.feeds())[0]
            return logits
        request = self._request(self._tensor_compiled.get())
        tensor_logits: np.ndarray = request.infer([batch])[0]
        return tensor_logits

    def _request(self, compiled: Any) -> Any:
        requests: dict[int, Any] = self._requests.__dict__.setdefault("by_compilation", {})
        request = requests.get(id(compiled))
        if request is None:
            request = requests[id(compiled)] = compiled.create_infer_request()
        return request


def make(graph: Path, precision: str, layout: Layout) -> OpenVinoBackend:
    """The registry's factory (inference.backends)."""
    return OpenVinoBackend(graph, precision=precision, workers=layout.workers,
                           intra_op_threads=layout.intra_op_threads,
                           idle_intra_op_threads=layout.idle_intra_op_threads)
