"""Preprocessing alone: the tensor the model would see under a session's options, without running it.
It costs what a predict costs to decode, so the transport charges the session's rate limit for it."""

from __future__ import annotations

import numpy as np

from core.options import Options
from inference.runner import ImageSource, ModelRunner


class Preprocessor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    async def preprocess(self, image: bytes | ImageSource, options: Options) -> np.ndarray:
        """The (3, crop, crop) tensor as little-endian float32, whatever the host's byte order."""
        tensor = await self.runner.preprocess(image, options)
        return tensor.astype("<f4", copy=False)
