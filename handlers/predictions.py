"""The prediction service shared by every route that classifies: run the model, then record.

A 200 means recorded: the history write happens before the answer is built, and if it fails the
caller gets the store's error rather than an unrecorded result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sessions.options import Options
from sessions.store import Session, SessionStore, iso, now_ms

if TYPE_CHECKING:
    from server.runner import ModelRunner


async def predict_and_record(
    store: SessionStore, runner: ModelRunner, session: Session, image: bytes, options: Options
) -> dict[str, Any]:
    """Classify `image` under `options`, append it to the session's history, return the response."""
    prediction = await runner.predict(image, options)
    best = prediction.top_k[0]
    entry = {
        "created_at": iso(now_ms()),
        "predicted_class": best.class_index,
        "label": best.label,
        "top_k": [score.to_dict() for score in prediction.top_k],
        "options": options.to_dict(),
        "model": runner.model_info,
    }
    history_id = await store.record(session, entry)
    return {"id": history_id, **entry, "timing_ms": prediction.timing_ms}
