"""Dynamic micro-batching, the runner's other strategy: preprocessed images wait up to a delay to
share one forward. It pays on a GPU (a forward costs about the same for 1 or 8 images); on a CPU it
measured no gain, so the runner goes straight through unless `max_batch_size > 1`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.pixels import PixelBatch

if TYPE_CHECKING:
    from inference.runner import ServedModel


@dataclass
class Pending:
    """A preprocessed image waiting for a batch slot."""

    tensor: PixelBatch  # one image
    served: ServedModel
    future: asyncio.Future[tuple[np.ndarray, int, float]]

    @property
    def pixels(self) -> int:
        return self.tensor.shape[-2] * self.tensor.shape[-1]


class MicroBatcher:
    """Collects up to `max_batch_size` images and `max_forward_pixels`, waiting at most `max_delay`
    seconds after the first and only while no worker is free, then runs them as one forward per
    tensor shape and model version."""

    def __init__(self, *, max_batch_size: int, max_delay: float, max_forward_pixels: int, workers: int,
                 run_forward: Callable[[PixelBatch, ServedModel], Any],
                 observe_forward: Callable[[int, float], None]):
        self.max_batch_size, self.max_delay, self.max_forward_pixels = max_batch_size, max_delay, max_forward_pixels
        self.workers = workers
        self._run_forward = run_forward  # awaitable: the forward on the runner's executor
        self._observe_forward = observe_forward
        self._queue: asyncio.Queue[Pending] | None = None  # created on first use, inside the running loop
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def forward(self, tensor: PixelBatch, served: ServedModel) -> tuple[np.ndarray, int, float]:
        """The image's row of logits, the size of the batch it ran in, and that forward's seconds."""
        pending = Pending(tensor, served, asyncio.get_running_loop().create_future())
        self._ensure_loop().put_nowait(pending)
        return await pending.future

    def close(self) -> None:
        if self._loop_task is not None and not self._loop_task.get_loop().is_closed():
            self._loop_task.get_loop().call_soon_threadsafe(self._loop_task.cancel)

    def _ensure_loop(self) -> asyncio.Queue[Pending]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._collect(self._queue))
        return self._queue

    async def _collect(self, queue: asyncio.Queue[Pending]) -> None:
        free_workers = asyncio.Semaphore(self.workers)
        loop = asyncio.get_running_loop()
        held: Pending | None = None  # taken from the queue but past the pixel bound: it opens the next batch
        while True:
            batch = [held or await queue.get()]
            held = None
            pixels = batch[0].pixels
            deadline = loop.time() + self.max_delay
            await free_workers.acquire()
            while len(batch) < self.max_batch_size and pixels < self.max_forward_pixels:
                timeout = deadline - loop.time()
                if timeout <= 0 and queue.empty():
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), max(timeout, 0))
                except TimeoutError:
                    break
                if pixels + item.pixels > self.max_forward_pixels:
                    held = item
                    break
                batch.append(item)
                pixels += item.pixels
            task = loop.create_task(self._run(batch, free_workers))
            self._running.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Pending], free_workers: asyncio.Semaphore) -> None:
        try:
            by_shape: dict[tuple[Any, ...], list[Pending]] = {}
            for item in batch:  # one forward per input shape and model version
                by_shape.setdefault((item.tensor.shape, id(item.served)), []).append(item)
            for group in by_shape.values():
                started = time.perf_counter()
                served = group[0].served
                try:
                    logits = await self._run_forward(PixelBatch.concat([item.tensor for item in group]), served)
                except Exception as exc:
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                elapsed = time.perf_counter() - started
                self._observe_forward(len(group), elapsed)
                for item, row in zip(group, logits, strict=True):
                    if not item.future.done():  # the caller may have gone
                        item.future.set_result((row, len(group), elapsed))
        finally:
            free_workers.release()
