"""The prediction service shared by every route that classifies: run the model, then record.

A 200 means recorded: the history write happens before the answer is built, and if it fails the
caller gets the store's error rather than an unrecorded result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sessions.errors import Conflict, NotFound
from sessions.options import Options
from sessions.store import Session, SessionStore, iso, now_ms

if TYPE_CHECKING:
    from handlers.predict import ImageUpload
    from inference.runner import ClassScore, ModelRunner
    from server.weights import ModelVersions


async def predict_and_record(
    store: SessionStore,
    runner: ModelRunner,
    session: Session,
    image: bytes | ImageUpload,
    options: Options,
    idempotency_key: str | None = None,
    versions: ModelVersions | None = None,
) -> tuple[dict[str, Any], bool]:
    """Classify `image` under `options`, append it to the session's history, return the response
    and whether it is a replay: a request repeating an idempotency key gets the first answer and
    records nothing."""
    if session.replay_of:
        return await _replay(store, session, session.replay_of), True
    await ensure_pinned_version(versions, options)
    prediction = await runner.predict(image, options)
    return await record_prediction(store, runner, session, prediction.top_k, options, idempotency_key,
                                   timing_ms=prediction.timing_ms, model=prediction.model)


async def ensure_pinned_version(versions: ModelVersions | None, options: Options) -> None:
    """Load the model version `options` pins into this process before the runner looks for it; 409
    `model_version_removed` when it was removed. Every route that classifies calls this (/v1, the
    stream, the Open Inference Protocol over REST and gRPC): a process loads a pinned version on first
    use, so whichever serving process or transport takes a request, the session gets the same answer."""
    if versions is not None and options.model_version:
        await versions.ensure(options.model_version)


async def record_prediction(
    store: SessionStore,
    runner: ModelRunner,
    session: Session,
    top_k: list[ClassScore],
    options: Options,
    idempotency_key: str | None = None,
    *,
    timing_ms: dict[str, float] | None = None,
    model: dict[str, str] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Append one classified image to the session's history: the one shape every route records."""
    best = top_k[0]
    entry = {
        "created_at": iso(now_ms()),
        "predicted_class": best.class_index,
        "label": best.label,
        "top_k": [score.to_dict() for score in top_k],
        "options": options.to_dict(),
        "model": model or runner.model_info,  # the version that ran, even across a swap
    }
    history_id, replayed = await store.record(session, entry, idempotency_key)
    if replayed:  # a retry overtook the first attempt; the first one's answer stands
        return await _replay(store, session, history_id), True
    return {"id": history_id, **entry, "timing_ms": timing_ms or {}}, False


async def _replay(store: SessionStore, session: Session, history_id: str) -> dict[str, Any]:
    try:
        item = await store.history_item(session.id, history_id)
    except NotFound:
        raise Conflict("This Idempotency-Key was answered before, but that history entry is gone; "
                       "use a new key.", code="idempotent_result_gone") from None
    return {**item, "timing_ms": {}}
