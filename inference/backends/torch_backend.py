"""torch eager on the loaded model itself (no export): its own accuracy reference, on the CPU or a CUDA GPU.

torch is imported when a TorchBackend is built, not when this module is: the registry
(inference.backends) lists this row in every process, and a serving process on an exported runtime
stays torch-free (see inference.model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from inference.model import ModelLoadError
from inference.pixels import PixelBatch

if TYPE_CHECKING:
    import torch

    from inference.backends import Layout


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, module: torch.nn.Module, device: str = "cpu", *, intra_op_threads: int | None = None):
        import torch

        if intra_op_threads is not None:
            torch.set_num_threads(intra_op_threads)  # process-wide: one torch runtime per process
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("model.device is 'cuda' but no CUDA GPU is visible; set model.device = 'cpu'.")
        self.module = module.to(self.device).eval()

    def forward(self, batch: np.ndarray | PixelBatch, *, alone: bool = False) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if isinstance(batch, PixelBatch):  # uint8 to the device (a quarter of the bytes), normalized there
                pixels = torch.tensor(batch.pixels).to(self.device, non_blocking=True)  # a copy: the array is read-only
                scale, shift = (torch.tensor(array, device=self.device) for array in (batch.scale, batch.shift))
                inputs = pixels.permute(0, 3, 1, 2).float() * scale + shift
            else:
                inputs = torch.from_numpy(batch).to(self.device, non_blocking=True)
            logits: np.ndarray = self.module(inputs).float().cpu().numpy()
            return logits


def make(module: torch.nn.Module, precision: str, layout: Layout) -> TorchBackend:
    """The registry's factory (inference.backends): runs the torch module in FP32."""
    return TorchBackend(module, layout.device, intra_op_threads=layout.intra_op_threads)
