"""Classify and record: the one place a prediction is made and recorded, for every transport.

The order is always: pick the session's model version (service.models' served_for: of the session's model,
its pin, else a canary's, else the active one; loaded in this process if it is not yet) -> run the model -> capture
the image (where capture is on) -> record in the session's history. A 200 means recorded: the history
write happens before the answer is built, and if it fails the caller gets the store's error rather than
an unrecorded result; a captured image is on disk before the entry that names it is written. Anonymous
calls (no session) run the model and record nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from core.clock import iso, now_ms
from core.errors import Conflict, NotFound, StoreUnavailable
from core.options import Options
from core.session import Session
from inference.postprocess import ClassScore, top_k
from inference.runner import BatchPrediction, ImageSource, ModelRunner, Prediction, ServedModel
from service.capture import Captured, KeptImage
from service.feedback import with_defaults
from sessions.store import SessionStore

T = TypeVar("T")

if TYPE_CHECKING:
    from service.capture import Captures
    from service.feedback import FeedbackService
    from service.models import Models


async def while_store_unavailable(attempt: Callable[[], Awaitable[T]], *, within: float) -> T:
    """`attempt()`, tried again with a growing pause while the session store is unavailable (503
    `store_unavailable`: a Redis failover or restart), for up to `within` seconds; then its error. Only for an
    attempt that is safe to repeat: one whose record carries an idempotency key, so that it is recorded once."""
    loop = asyncio.get_running_loop()
    deadline, pause = loop.time() + within, 0.1
    while True:
        try:
            return await attempt()
        except StoreUnavailable:
            if loop.time() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


@dataclass(frozen=True)
class BatchResult:
    """A batch classified (and, with a session, recorded image by image, in order)."""

    probabilities: np.ndarray  # float32 (N, classes)
    model_name: str
    model_version: str  # the version that produced them
    labels: list[str]


class Classifier:
    def __init__(self, store: SessionStore, runner: ModelRunner, versions: Models,
                 feedback: FeedbackService | None = None, captures: Captures | None = None,
                 on_predicted: Callable[[str, str, int], None] | None = None):
        """`on_predicted(model, version, images)` is told of each answer (the metrics: each version's traffic)."""
        self.store, self.runner, self.versions, self.feedback = store, runner, versions, feedback
        self.captures = captures
        self.on_predicted = on_predicted

    async def classify(self, session: Session, image: bytes | ImageSource, options: Options,
                       idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Classify one image under `options` and append it to the session's history. Returns the
        answer and whether it is a replay: a request repeating an idempotency key already answered
        gets the first answer and records nothing."""
        if session.replay_of:
            return await self._replay(session, session.replay_of), True
        served = await self.versions.served_for(session, options)  # chosen at admission: a swap cannot change it
        if self._capturing and not isinstance(image, bytes):
            image = KeptImage(image)  # the runner reads the upload's bytes on its thread; capture reuses them
        prediction = await self.runner.predict(served, image, options)
        kept = await self._capture(session, image) if self._capturing else None
        answer = await self._record(session, prediction.top_k, options, idempotency_key,
                                    timing_ms=prediction.timing_ms, model=served.info, kept=kept)
        self._predicted(served, 1)
        return answer

    async def classify_anonymous(self, image: bytes | ImageSource, *, top_k: int) -> Prediction:
        """Classify with the default model's active version and its default options, without a session:
        nothing is recorded."""
        options = self.versions.anonymous_options(top_k)
        served = self.versions.held(options)
        prediction = await self.runner.predict(served, image, options)
        self._predicted(served, 1)
        return prediction

    async def classify_batch(self, session: Session | None, options: Options, *,
                             images: Sequence[bytes] | None = None, tensor: np.ndarray | None = None) -> BatchResult:
        """Classify encoded `images` (preprocessed under `options`) or a preprocessed NCHW `tensor`
        with the session's model version, and record each image in the session's history, in order."""
        served = await self.versions.served_for(session, options)
        result: BatchPrediction
        if images is not None:
            result = await self.runner.classify_images(served, images, options)
        else:
            assert tensor is not None
            # Preprocessing options do not apply to a tensor, but the session's version does.
            result = await self.runner.classify_tensor(served, tensor)
        labels = result.served.model.labels
        if session is not None:
            for index, row in enumerate(result.probabilities):  # one Redis round trip each, in the order sent
                kept = await self._capture(session, images[index]) if images is not None and self._capturing else None
                await self._record(session, top_k(row, options.top_k, labels), options,
                                   model=result.served.info, kept=kept)
        self._predicted(result.served, len(result.probabilities))
        return BatchResult(result.probabilities, result.served.model.name, result.served.model.version, labels)

    def _predicted(self, served: ServedModel, images: int) -> None:
        if self.on_predicted is not None:
            self.on_predicted(served.model.name, served.model.version, images)

    @property
    def _capturing(self) -> bool:
        return self.captures is not None and self.captures.enabled

    async def _capture(self, session: Session, image: bytes | ImageSource) -> tuple[Captured, bool] | None:
        assert self.captures is not None
        return await self.captures.keep(session, image if isinstance(image, bytes) else image.image_bytes())

    async def _record(self, session: Session, top_k: list[ClassScore], options: Options,
                      idempotency_key: str | None = None, *, timing_ms: dict[str, float] | None = None,
                      model: dict[str, str],
                      kept: tuple[Captured, bool] | None = None) -> tuple[dict[str, Any], bool]:
        """Append one classified image to the session's history: the one shape every route records."""
        best = top_k[0]
        entry = {
            "created_at": iso(now_ms()),
            "predicted_class": best.class_index,
            "label": best.label,
            "top_k": [score.to_dict() for score in top_k],
            "options": options.to_dict(),
            "model": model,  # the version that ran, even across a swap
            "image": kept[0].to_dict() if kept else None,  # the captured image, where capture is on
        }
        try:
            history_id, replayed = await self.store.record(session, entry, idempotency_key)
        except Exception:
            if self.captures is not None:
                await self.captures.undo(session, kept)
            raise
        if replayed:  # a retry overtook the first attempt; the first one's answer stands
            return await self._replay(session, history_id), True
        return {"id": history_id, **entry, "feedback": None, "timing_ms": timing_ms or {}}, False

    async def _replay(self, session: Session, history_id: str) -> dict[str, Any]:
        try:
            item = await self.store.history_item(session.id, history_id)
        except NotFound:
            raise Conflict("This Idempotency-Key was answered before, but that history entry is gone; "
                           "use a new key.", code="idempotent_result_gone") from None
        if self.feedback is not None:
            item = (await self.feedback.attach(session.id, [item]))[0]
        else:
            item = {**with_defaults(item), "feedback": None}
        return {**item, "timing_ms": {}}
