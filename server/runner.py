"""The model runner: the only code that knows threads (and, later, batches).

Callers hand it plain data (image bytes and an Options value) and await a Prediction. Decoding,
preprocessing and the forward pass all run on the runner's own thread pool, never on the IOLoop.
A bounded count of admitted requests keeps the backlog finite: beyond it callers get a fast 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import imaging
from server.model import Backend, LoadedModel, softmax
from sessions.errors import InferenceFailed, ServiceBusy
from sessions.options import Options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassScore:
    class_index: int
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"class_index": self.class_index, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class Prediction:
    top_k: list[ClassScore]
    timing_ms: dict[str, float]


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        backend: Backend,
        *,
        workers: int,
        max_queue: int,
        max_image_pixels: int,
    ):
        self.model = model
        self.backend = backend
        self.workers = workers
        self.max_queue = max_queue
        self.max_image_pixels = max_image_pixels
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="model")
        self._admitted = 0  # touched only on the event loop thread

    @property
    def model_info(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.version}

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet answered (queued plus running)."""
        return self._admitted

    async def predict(self, data: bytes, options: Options) -> Prediction:
        """Decode, preprocess and classify one image under `options`."""
        return await self._submit(self._predict_sync, data, options, time.perf_counter())

    async def _submit(self, fn: Any, *args: Any) -> Any:
        if self._admitted >= self.max_queue:
            raise ServiceBusy(f"The server is at its limit of {self.max_queue} queued images; retry shortly.",
                              retry_after=1)
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._admitted -= 1

    def _predict_sync(self, data: bytes, options: Options, submitted: float) -> Prediction:
        started = time.perf_counter()
        tensor = imaging.preprocess(data, options, max_pixels=self.max_image_pixels)
        preprocessed = time.perf_counter()
        try:
            logits = self.backend.forward(tensor[None])
        except Exception as exc:
            log.exception("model forward failed")
            raise InferenceFailed("The model failed on this image; the error was logged.") from exc
        finished = time.perf_counter()
        return Prediction(
            top_k=self._top_k(logits[0], options.top_k),
            timing_ms={
                "queue": _ms(started - submitted),
                "preprocess": _ms(preprocessed - started),
                "inference": _ms(finished - preprocessed),
            },
        )

    def _top_k(self, logits: np.ndarray, k: int) -> list[ClassScore]:
        probabilities = softmax(logits.astype(np.float32, copy=False))
        best = np.argpartition(probabilities, -k)[-k:]
        best = best[np.argsort(probabilities[best])[::-1]]
        return [ClassScore(int(i), self.model.labels[i], round(float(probabilities[i]), 6)) for i in best]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

