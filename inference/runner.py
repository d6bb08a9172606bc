"""The model runner: the only code that knows threads and batches.

Callers hand it the model version to run (a ServedModel, which the model catalogue picks per request)
and plain data (image bytes, or an upload to read them from, and an Options value), and await a
Prediction. Reading the upload, decoding, preprocessing and the forward pass all run on the
runner's own thread pool, never on the IOLoop.
A bounded count of admitted requests keeps the backlog finite: beyond it callers get a fast 503.
With `max_batch_size > 1`, preprocessed images wait up to `max_batch_delay_ms` to share a forward
(useful on GPUs; on this CPU it measured no gain, so it is off by default).
A forward takes at most `max_forward_pixels` (images x crop x crop, one image at least; a model's
activations grow with it): larger batches run as several forwards, and a request carrying more than
`max_request_pixels` is refused (422) before anything is decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar, TypeVarTuple

import numpy as np

from core.errors import BadImage, InferenceFailed, ServiceBusy
from core.options import Options
from inference import imaging
from inference.batching import MicroBatcher
from inference.model import Backend, LoadedModel, softmax
from inference.pixels import PixelBatch
from inference.postprocess import ClassScore, top_k

log = logging.getLogger(__name__)
T = TypeVar("T")
Args = TypeVarTuple("Args")


class SiblingLoad(Protocol):
    """The other serving processes on this machine (server.balance), as far as the runner cares."""

    def publish(self, in_flight: int) -> None:
        """Tell them how many images this process has in flight."""

    def others(self) -> int:
        """Images in flight in the other processes."""


class ImageSource(Protocol):
    """An upload the runner reads into image bytes on its own threads, not on the IOLoop (a handler
    passes handlers.predict.ImageUpload: joining and splitting a large body is GIL-held copying)."""

    def image_bytes(self) -> bytes:
        """The image file's bytes; raises a ServiceError (400) for a malformed body."""


#: Defaults of the pixel bounds (server config: model.max_request_pixels, model.max_forward_pixels).
DEFAULT_MAX_REQUEST_PIXELS = 16 * 1024 * 1024
DEFAULT_MAX_FORWARD_PIXELS = 2 * 1024 * 1024


class RunnerMetrics(Protocol):
    """What the runner reports; the server hands in its Prometheus collectors (server.observability)."""

    def observe_forward(self, batch_size: int, seconds: float) -> None: ...

    def observe_preprocess(self, seconds: float) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


class NoMetrics:
    """Reports nothing: for runners built without a metrics registry (tests, benchmarks)."""

    def observe_forward(self, batch_size: int, seconds: float) -> None:
        pass

    def observe_preprocess(self, seconds: float) -> None:
        pass

    def set_queue_depth(self, depth: int) -> None:
        pass


class _NoSiblings:
    def publish(self, in_flight: int) -> None:
        pass

    def others(self) -> int:
        return 0


@dataclass(frozen=True)
class ServedModel:
    """A model version and the runtime that runs it; swapped as one reference, so a request that
    picked one at admission finishes on it whatever is activated meanwhile."""

    model: LoadedModel
    backend: Backend

    @property
    def info(self) -> dict[str, str]:
        return {"name": self.model.name, "version": self.model.version}


@dataclass(frozen=True)
class Prediction:
    top_k: list[ClassScore]
    timing_ms: dict[str, float]
    model: dict[str, str] | None = None  # name and version of the weights that produced it


@dataclass(frozen=True)
class BatchPrediction:
    """Class probabilities for a batch, one row (summing to 1) per image."""

    probabilities: np.ndarray  # float32 (N, classes)
    timing_ms: dict[str, float]
    served: ServedModel  # the model version that produced them (labels, name and version)


class ModelRunner:
    """Runs requests on the model version each caller hands in (a ServedModel, chosen at admission by the
    model catalogue): the runner itself holds no versions."""

    def __init__(
        self,
        *,
        workers: int,
        max_queue: int,
        max_image_pixels: int,
        max_batch_size: int = 1,
        max_batch_delay_ms: float = 0.0,
        max_aspect_ratio: float = imaging.DEFAULT_MAX_ASPECT_RATIO,
        max_upscale: float = imaging.DEFAULT_MAX_UPSCALE,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        max_forward_pixels: int = DEFAULT_MAX_FORWARD_PIXELS,
        metrics: RunnerMetrics | None = None,
        siblings: SiblingLoad | None = None,
    ):
        self.max_queue = max_queue
        self.max_image_pixels = max_image_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.max_upscale = max_upscale
        self.max_request_pixels = max_request_pixels
        self.max_forward_pixels = max_forward_pixels
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="model")
        self._admitted = 0  # touched only on the event loop thread
        self._siblings = siblings or _NoSiblings()
        self.metrics: RunnerMetrics = metrics or NoMetrics()
        # The batching strategy: straight through (one executor hop per image), or micro-batches.
        self._batcher = MicroBatcher(
            max_batch_size=max_batch_size, max_delay=max_batch_delay_ms / 1000.0, max_forward_pixels=max_forward_pixels,
            workers=workers, run_forward=self._forward_on_executor,
            observe_forward=self.metrics.observe_forward) if max_batch_size > 1 else None

    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet answered (queued plus running)."""
        return self._admitted

    # -- the requests: each runs the one pipeline below -------------------------------------------
    async def predict(self, served: ServedModel, data: bytes | ImageSource, options: Options) -> Prediction:
        """Decode, preprocess and classify one image under `options` with `served`."""
        probabilities, timing_ms = await self._run(served, [data], options)
        return Prediction(top_k(probabilities[0], options.top_k, served.model.labels), timing_ms, served.info)

    async def classify_images(self, served: ServedModel, images: Sequence[bytes], options: Options) -> BatchPrediction:
        """Decode and preprocess each image under `options`, then classify them together with `served` (the
        Open Inference Protocol's batches, with full probabilities). Refused (422) before any decoding past
        max_request_pixels."""
        self.check_request(len(images), options.crop, options.crop)
        probabilities, timing_ms = await self._run(served, list(images), options)
        return BatchPrediction(probabilities, timing_ms, served)

    async def classify_tensor(self, served: ServedModel, batch: np.ndarray) -> BatchPrediction:
        """Classify an already preprocessed float32 NCHW batch with `served` (the pipeline from its forward
        on: one admitted hop, forwards of at most max_forward_pixels each); refused (422) past
        max_request_pixels."""
        self.check_request(len(batch), batch.shape[-2], batch.shape[-1])
        logits, timing_ms = await self._submit(self._forward, served, batch, time.perf_counter())
        return BatchPrediction(softmax(logits), timing_ms, served)

    async def preprocess(self, data: bytes | ImageSource, options: Options) -> np.ndarray:
        """The (3, crop, crop) float32 tensor the model would see under `options`; admitted like a
        predict, since decoding a large image costs about as much as a forward."""
        return await self._submit(self._preprocess_tensor, data, options)

    def check_request(self, images: int, height: int, width: int) -> None:
        """Refuse (422) a request that gives the model more than max_request_pixels in all."""
        pixels = images * height * width
        if pixels > self.max_request_pixels:
            raise BadImage(f"The request gives the model {images} images of {width}x{height}, {pixels} pixels; "
                           f"the limit is {self.max_request_pixels} pixels per request (model.max_request_pixels). "
                           "Send fewer images per request or use a smaller crop.", code="request_too_large")

    def forward_batches(self, images: int, height: int, width: int) -> list[range]:
        """The images each forward takes: as many as fit in max_forward_pixels, at least one."""
        step = max(1, self.max_forward_pixels // (height * width))
        return [range(start, min(start + step, images)) for start in range(0, images, step)]

    # -- the pipeline: admission, then decode and preprocess, forward, postprocess ------------------
    async def _run(self, served: ServedModel, images: list[bytes | ImageSource],
                   options: Options) -> tuple[np.ndarray, dict[str, float]]:
        """Class probabilities (N, classes) for `images` under `options`, and the stages' times.

        One image is admitted once for the whole pipeline. Several are preprocessed in parallel (one
        admitted hop each), then share one admitted hop of forwards: a protocol request carries its
        own batch, so it is not micro-batched with others."""
        if len(images) == 1:
            return await self._admitted_call(self._run_one(served, images[0], options))
        submitted = time.perf_counter()
        prepared = await asyncio.gather(*(self._submit(self._preprocess, data, options) for data in images))
        preprocessed = time.perf_counter()
        logits, timing_ms = await self._submit(self._forward, served, list(prepared), preprocessed)
        return softmax(logits), {"preprocess": _ms(preprocessed - submitted), **timing_ms}

    async def _run_one(self, served: ServedModel, data: bytes | ImageSource,
                       options: Options) -> tuple[np.ndarray, dict[str, float]]:
        submitted = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self._batcher is None:
            # One executor hop does every stage: the lowest latency, and on CPUs batching does not pay.
            logits, timing_ms = await loop.run_in_executor(self._executor, self._preprocess_and_forward, served,
                                                           data, options, submitted)
            return softmax(logits), timing_ms
        # Micro-batching wraps the forward alone: the image waits for others to share it.
        prepared = await loop.run_in_executor(self._executor, self._preprocess, data, options)
        preprocessed = time.perf_counter()
        row, batch_size, inference = await self._batcher.forward(prepared, served)
        return softmax(row[None].astype(np.float32, copy=False)), {
            "preprocess": _ms(preprocessed - submitted),
            "inference": _ms(inference),
            "batch_wait": _ms(time.perf_counter() - preprocessed - inference),
            "batch_size": batch_size,
        }

    def _preprocess_and_forward(self, served: ServedModel, data: bytes | ImageSource, options: Options,
                                submitted: float) -> tuple[np.ndarray, dict[str, float]]:
        started = time.perf_counter()
        prepared = self._preprocess(data, options)
        preprocessed = time.perf_counter()
        logits, timing_ms = self._forward(served, [prepared], preprocessed)
        return logits, {"queue": _ms(started - submitted), "preprocess": _ms(preprocessed - started),
                        "inference": timing_ms["inference"]}

    # -- the stages ---------------------------------------------------------------------------------
    def _decode(self, data: bytes | ImageSource, options: Options) -> PixelBatch:
        if not isinstance(data, bytes):
            data = data.image_bytes()
        return imaging.prepare(data, options, max_pixels=self.max_image_pixels,
                               max_aspect_ratio=self.max_aspect_ratio, max_upscale=self.max_upscale)

    def _preprocess(self, data: bytes | ImageSource, options: Options) -> PixelBatch:
        """Decode and preprocess one image (the stage the preprocess metric times)."""
        started = time.perf_counter()
        prepared = self._decode(data, options)
        self.metrics.observe_preprocess(time.perf_counter() - started)
        return prepared

    def _preprocess_tensor(self, data: bytes | ImageSource, options: Options) -> np.ndarray:
        tensor: np.ndarray = self._decode(data, options).to_tensor()[0]
        return tensor

    def _forward(self, served: ServedModel, batch: np.ndarray | list[PixelBatch],
                 submitted: float) -> tuple[np.ndarray, dict[str, float]]:
        """Logits (N, classes) of `batch`: a float32 NCHW array, or one PixelBatch per image (joined a
        forward at a time, never copied into one large array), in forwards of at most max_forward_pixels."""
        started = time.perf_counter()
        alone = self._alone()
        height, width = batch[0].shape[-2:]
        logits = []
        for part in self.forward_batches(len(batch), height, width):
            began = time.perf_counter()
            chunk = batch[part.start:part.stop]
            if isinstance(chunk, list):
                inputs: np.ndarray | PixelBatch = PixelBatch.concat(chunk)
            else:
                inputs = np.ascontiguousarray(chunk, dtype=np.float32)
            logits.append(self._backend_forward(served.backend, inputs, alone).astype(np.float32, copy=False))
            self.metrics.observe_forward(len(part), time.perf_counter() - began)
        finished = time.perf_counter()
        return (logits[0] if len(logits) == 1 else np.concatenate(logits),
                {"queue": _ms(started - submitted), "inference": _ms(finished - started)})

    async def _forward_on_executor(self, batch: PixelBatch, served: ServedModel) -> np.ndarray:
        """The micro-batcher's forward: one, on the runner's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._backend_forward,
                                                                served.backend, batch, False)

    @staticmethod
    def _backend_forward(backend: Backend, batch: np.ndarray | PixelBatch, alone: bool) -> np.ndarray:
        try:
            return backend.forward(batch, alone=alone)
        except Exception as exc:
            log.exception("model forward failed")
            raise InferenceFailed("The model failed on this image; the error was logged.") from exc

    # -- admission ----------------------------------------------------------------------------------
    async def _submit(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        return await self._admitted_call(asyncio.get_running_loop().run_in_executor(self._executor, fn, *args))

    async def _admitted_call(self, work: Awaitable[T]) -> T:
        """Run `work` if the queue has room, else refuse at once (a fast 503, not a backlog)."""
        if self._admitted >= self.max_queue:
            if asyncio.iscoroutine(work):
                work.close()
            raise ServiceBusy(f"The server is at its limit of {self.max_queue} queued images; retry shortly.",
                              retry_after=1)
        self._admitted += 1
        self._admission_changed()
        try:
            return await work
        finally:
            self._admitted -= 1
            self._admission_changed()

    def _admission_changed(self) -> None:
        self._siblings.publish(self._admitted)
        self.metrics.set_queue_depth(self._admitted)

    def _alone(self) -> bool:
        """No other image in flight on this machine: a forward may use every core. Read without a
        lock: a stale count only picks the other thread layout for one forward."""
        return self._admitted <= 1 and self._siblings.others() == 0

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

