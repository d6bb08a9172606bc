"""Feedback on predictions: a session corrects one of its history items' labels.

The record kept for each piece of feedback is what the training export hands out (service.export),
so it carries everything a training job needs and nothing that identifies the session: the session
id appears only hashed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from sessions.errors import InvalidToken, ServiceError, quoted, quoted_names
from sessions.store import Session, iso, now_ms


class InvalidFeedback(ServiceError):
    status = 422
    code = "invalid_feedback"


class FeedbackRecords(Protocol):
    """What this module needs of sessions.feedback.FeedbackStore."""

    async def set(self, session_id: str, history_id: str, record: dict[str, Any], *, at_ms: int,
                  version: str, agrees: bool, keep_until_ms: int) -> bool: ...

    async def get_many(self, session_id: str, history_ids: list[str]) -> list[dict[str, Any] | None]: ...

    async def delete(self, session_id: str, history_id: str) -> bool: ...

    async def erase_session(self, session_id: str) -> int: ...

    async def stats(self) -> dict[str, tuple[int, int]]: ...

    async def page(self, since_ms: int | float, until_ms: int | float, *, after: tuple[float, int] | None,
                   limit: int) -> tuple[list[dict[str, Any]], tuple[float, int] | None]: ...


class HistoryReader(Protocol):
    async def history_item(self, session_id: str, history_id: str) -> dict[str, Any]: ...

    async def alive(self, session_id: str) -> bool: ...


def session_hash(session_id: str) -> str:
    """How the export names a session: 16 hex digits of the id's SHA-256 (the id is 128 random bits,
    so this cannot be turned back into it). The access log's `session` field is its first 12."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:16]


def resolve_label(label: Any, labels: list[str]) -> int:
    """A class index from `label`: an index, or a label name (case-insensitive). 422 otherwise."""
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise InvalidFeedback("label must be a class index or a label name, e.g. 670 or \"motor scooter\".")
    if isinstance(label, int):
        if not 0 <= label < len(labels):
            raise InvalidFeedback(f"Class index {label} is out of range: the model has classes 0 to {len(labels) - 1}.")
        return label
    wanted = label.strip().casefold()
    matches = [index for index, name in enumerate(labels) if name.casefold() == wanted]
    if not matches:
        raise InvalidFeedback(f"No class is labelled {quoted(label)}; send a class index or one of the model's labels.")
    if len(matches) > 1:
        raise InvalidFeedback(f"Several classes are labelled {quoted(label)} ({', '.join(map(str, matches))}); "
                              "send the class index instead.")
    return matches[0]


def feedback_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `feedback` of a history item: what the session said, from the stored record."""
    return None if record is None else record["feedback"]


class FeedbackService:
    def __init__(self, history: HistoryReader, records: FeedbackRecords, *, labels: Callable[[], list[str]],
                 max_comment_chars: int, on_feedback: Callable[[str, bool], None] | None = None):
        """`labels`: the served model's class names; `on_feedback(version, agrees)` is told of each
        feedback given (the metrics)."""
        self.history, self.records = history, records
        self.labels, self.max_comment_chars = labels, max_comment_chars
        self.on_feedback = on_feedback

    def parse(self, body: dict[str, Any]) -> tuple[int, str | None]:
        """The class index and comment of a feedback body `{"label": ..., "comment": ...}`."""
        unknown = set(body) - {"label", "comment"}
        if unknown:
            raise InvalidFeedback(f"Unknown field(s) {quoted_names(unknown)}; send label and optionally comment.")
        if "label" not in body:
            raise InvalidFeedback("Send the correct label: {\"label\": <class index or label name>}.")
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise InvalidFeedback("comment must be a string or null.")
        if comment is not None and len(comment) > self.max_comment_chars:
            raise InvalidFeedback(f"The comment has {len(comment)} characters; the limit is {self.max_comment_chars} "
                                  "(feedback.max_comment_chars).")
        return resolve_label(body["label"], self.labels()), comment or None

    async def give(self, session: Session, history_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Set (or replace) the feedback on one of the session's history items; the item, with it."""
        class_index, comment = self.parse(body)
        item = await self.history.history_item(session.id, history_id)  # 404 for another session's id
        created = now_ms()
        labels = self.labels()
        feedback = {"class_index": class_index, "label": labels[class_index], "comment": comment,
                    "created_at": iso(created)}
        agrees = class_index == item["predicted_class"]
        version = item["model"]["version"]
        record = {
            "session": session_hash(session.id),
            "history_id": history_id,
            "predicted_at": item["created_at"],
            "prediction": {"class_index": item["predicted_class"], "label": item["label"], "top_k": item["top_k"]},
            "feedback": feedback,
            "agrees": agrees,
            "model": item["model"],
            "options": item["options"],
            "image": item.get("image"),
        }
        await self.records.set(session.id, history_id, record, at_ms=created, version=version, agrees=agrees,
                               keep_until_ms=session.deadline_ms)
        if not await self.history.alive(session.id):
            # Erased (or logged out) while this request ran: its erase may have missed this record.
            await self.records.delete(session.id, history_id)
            raise InvalidToken("This session was logged out; log in again.", code="session_revoked")
        if self.on_feedback is not None:
            self.on_feedback(version, agrees)
        return {**with_defaults(item), "feedback": feedback}

    async def withdraw(self, session: Session, history_id: str) -> None:
        """Remove the feedback on one of the session's items (nothing to remove is fine)."""
        await self.history.history_item(session.id, history_id)  # 404 for another session's id
        await self.records.delete(session.id, history_id)

    async def attach(self, session_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """History items with their `feedback` (null where none was given), in one round trip."""
        records = await self.records.get_many(session_id, [item["id"] for item in items])
        return [{**with_defaults(item), "feedback": feedback_view(record)}
                for item, record in zip(items, records, strict=True)]

    async def erase(self, session_id: str) -> int:
        return await self.records.erase_session(session_id)

    async def quality(self) -> dict[str, dict[str, Any]]:
        """version -> {"count": n, "agreement": share agreeing with the prediction (null without feedback)}."""
        return {version: quality_view(count, agree) for version, (count, agree) in (await self.records.stats()).items()}


def quality_view(count: int, agree: int) -> dict[str, Any]:
    return {"count": count, "agreement": round(agree / count, 4) if count > 0 else None}


def with_defaults(item: dict[str, Any]) -> dict[str, Any]:
    """Fields every history item has, recorded before they existed: `image` (null: not captured)."""
    return item if "image" in item else {**item, "image": None}
