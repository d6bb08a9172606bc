"""Feedback on predictions: a session corrects one of its history items' labels.

The record kept for each piece of feedback is what the training export hands out (service.export),
so it carries everything a training job needs and nothing that identifies the session: the session
appears only by its ref (an HMAC of its id under the server secret, sessions.tokens), the name the
access log and an admin's purge use too.

Feedback is bounded (docs/limits.md): at most one record per history item, as many per session as the
history holds, `feedback.daily_limit` a day per API key or client address, comments of at most
`feedback.max_comment_bytes` in UTF-8, and each record is deleted `feedback.retention_days` after it was
given (the sweep, in one serving process). Giving feedback costs one from the session's rate limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from core.clock import iso, now_ms
from core.errors import SESSION_REVOKED, BadRequest, InvalidToken, ServiceError, quoted, quoted_names
from core.session import Session
from service.export import parse_time
from sessions.tokens import TokenSigner

DAY_MS = 24 * 3600 * 1000
SESSION_REF = re.compile(r"[0-9a-f]{16}")
PURGE_PARAMETERS = ("since", "until", "session")


class InvalidFeedback(ServiceError):
    status = 422
    code = "invalid_feedback"


class FeedbackRecords(Protocol):
    """What this module needs of sessions.feedback.FeedbackStore. A session is named by its refs,
    newest first (TokenSigner.session_refs)."""

    async def set(self, refs: list[str], history_id: str, record: dict[str, Any], *, at_ms: int, model: str,
                  version: str, agrees: bool, keep_until_ms: int, owner: str, max_per_session: int, daily_limit: int,
                  pinned: bool = False) -> bool: ...

    async def get_many(self, refs: list[str], history_ids: list[str]) -> list[dict[str, Any] | None]: ...

    async def delete(self, refs: list[str], history_id: str) -> bool: ...

    async def erase_session(self, refs: list[str]) -> int: ...

    async def purge_session(self, refs: list[str], since_ms: int | float = float("-inf"),
                            until_ms: int | float = float("inf")) -> int: ...

    async def purge(self, since_ms: int | float, until_ms: int | float) -> int: ...

    async def stats(self, model: str, *, pinned: bool = False) -> dict[str, tuple[int, int]]: ...

    async def page(self, since_ms: int | float, until_ms: int | float, *, after: float | None,
                   limit: int) -> tuple[list[dict[str, Any]], float | None]: ...


@dataclass(frozen=True)
class FeedbackLimits:
    """The bounds of config [feedback] (and history.max_entries), as the service enforces them."""

    max_comment_bytes: int = 2000
    max_per_session: int = 1000  # history.max_entries: one feedback per history item the session can hold
    daily_limit: int = 0  # per API key or client address; 0: none
    retention_days: int = 365


@dataclass(frozen=True)
class PurgeQuery:
    since_ms: float = float("-inf")
    until_ms: float = float("inf")
    session: str | None = None  # a session ref, as the export names it


class HistoryReader(Protocol):
    async def history_item(self, session_id: str, history_id: str) -> dict[str, Any]: ...

    async def alive(self, session_id: str) -> bool: ...


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


def parse_purge(arguments: Mapping[str, str]) -> PurgeQuery:
    """The purge's query parameters, checked (400 `invalid_parameter`): a time range, a session, or both;
    never neither (a purge of everything is refused rather than guessed)."""
    unknown = set(arguments) - set(PURGE_PARAMETERS)
    if unknown:
        raise BadRequest(f"Unknown parameter(s) {quoted_names(unknown)}; the purge takes "
                         f"{', '.join(PURGE_PARAMETERS)}.", code="invalid_parameter")
    since = parse_time(arguments["since"], "since") if arguments.get("since") else float("-inf")
    until = parse_time(arguments["until"], "until") if arguments.get("until") else float("inf")
    session = arguments.get("session") or None
    if since >= until:
        raise BadRequest("since must be before until.", code="invalid_parameter")
    if session is not None and not SESSION_REF.fullmatch(session):
        raise BadRequest(f"session must be a session's name as the export gives it (16 hex digits), got "
                         f"{quoted(session)}.", code="invalid_parameter")
    if session is None and since == float("-inf") and until == float("inf"):
        raise BadRequest("Name what to purge: since and/or until, and/or session.", code="invalid_parameter")
    return PurgeQuery(since, until, session)


class FeedbackService:
    def __init__(self, history: HistoryReader, records: FeedbackRecords, *, labels: Callable[[str], list[str]],
                 signer: TokenSigner, limits: FeedbackLimits = FeedbackLimits(),
                 on_feedback: Callable[[str, str, bool], None] | None = None):
        """`labels(model)`: the class names of a served model; `signer` names sessions (session_refs);
        `on_feedback(model, version, agrees)` is told of each feedback given (the metrics)."""
        self.history, self.records = history, records
        self.labels, self.signer, self.limits = labels, signer, limits
        self.retention_ms = limits.retention_days * DAY_MS
        self.on_feedback = on_feedback

    def parse(self, body: dict[str, Any], labels: list[str]) -> tuple[int, str | None]:
        """The class index (among `labels`) and comment of a feedback body `{"label": ..., "comment": ...}`."""
        unknown = set(body) - {"label", "comment"}
        if unknown:
            raise InvalidFeedback(f"Unknown field(s) {quoted_names(unknown)}; send label and optionally comment.")
        if "label" not in body:
            raise InvalidFeedback("Send the correct label: {\"label\": <class index or label name>}.")
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise InvalidFeedback("comment must be a string or null.")
        if comment is not None:
            try:
                size = len(comment.encode("utf-8"))
            except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"); UTF-8 cannot hold one
                raise InvalidFeedback("comment must be Unicode text (it holds a lone surrogate).") from None
            if size > self.limits.max_comment_bytes:
                raise InvalidFeedback(f"The comment is {size} bytes in UTF-8; the limit is "
                                      f"{self.limits.max_comment_bytes} (feedback.max_comment_bytes).")
        return resolve_label(body["label"], labels), comment or None

    async def give(self, session: Session, history_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Set (or replace) the feedback on one of the session's history items; the item, with it."""
        item = await self.history.history_item(session.id, history_id)  # 404 for another session's id
        model = item["model"]["name"]
        labels = self.labels(model)  # the labels of the model that made the prediction
        class_index, comment = self.parse(body, labels)
        created = now_ms()
        feedback = {"class_index": class_index, "label": labels[class_index], "comment": comment,
                    "created_at": iso(created)}
        agrees = class_index == item["predicted_class"]
        version = item["model"]["version"]
        # The recorded options hold model_version only where the session (or the request) pinned one:
        # its feedback is counted apart from the sessions the version was assigned to.
        pinned = "model_version" in item["options"]
        refs = self.signer.session_refs(session.id)
        record = {
            "session": refs[0],
            "history_id": history_id,
            "predicted_at": item["created_at"],
            "prediction": {"class_index": item["predicted_class"], "label": item["label"], "top_k": item["top_k"]},
            "feedback": feedback,
            "agrees": agrees,
            "pinned": pinned,
            "model": item["model"],
            "options": item["options"],
            "image": item.get("image"),
        }
        # Sessions from before owners were kept count on their own.
        owner = session.owner or f"session-{refs[0]}"
        await self.records.set(refs, history_id, record, at_ms=created, model=model, version=version, agrees=agrees,
                               keep_until_ms=created + self.retention_ms, owner=owner,
                               max_per_session=self.limits.max_per_session, daily_limit=self.limits.daily_limit,
                               pinned=pinned)
        if not await self.history.alive(session.id):
            # Erased (or logged out) while this request ran: its erase may have missed this record.
            await self.records.delete(refs, history_id)
            raise InvalidToken(SESSION_REVOKED, code="session_revoked")
        if self.on_feedback is not None:
            self.on_feedback(model, version, agrees)
        return {**with_defaults(item), "feedback": feedback}

    async def withdraw(self, session: Session, history_id: str) -> None:
        """Remove the feedback on one of the session's items (nothing to remove is fine)."""
        await self.history.history_item(session.id, history_id)  # 404 for another session's id
        await self.records.delete(self.signer.session_refs(session.id), history_id)

    async def attach(self, session_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """History items with their `feedback` (null where none was given), in one round trip."""
        records = await self.records.get_many(self.signer.session_refs(session_id), [item["id"] for item in items])
        return [{**with_defaults(item), "feedback": feedback_view(record)}
                for item, record in zip(items, records, strict=True)]

    async def erase(self, session_id: str) -> int:
        """Remove every record the session gave, under its name for every secret key (a record given before
        a key rotation is named with the older key), and under its raw id (how records were named before
        refs); how many. Safe to repeat."""
        return await self.records.erase_session([*self.signer.session_refs(session_id), session_id])

    async def purge(self, query: PurgeQuery) -> int:
        """An admin's purge: the records given in the query's time range, of one session where it names one;
        how many were removed."""
        if query.session is not None:
            return await self.records.purge_session([query.session], query.since_ms, query.until_ms)
        return await self.records.purge(query.since_ms, query.until_ms)

    async def sweep(self, now: int | None = None) -> int:
        """Retention: remove the records given more than feedback.retention_days ago; how many."""
        return await self.records.purge(float("-inf"), (now_ms() if now is None else now) - self.retention_ms)

    async def quality(self, model: str, *, pinned: bool = False) -> dict[str, dict[str, Any]]:
        """version of `model` -> {"count": n, "agreement": share agreeing with the prediction (null without
        feedback)}, from the sessions the version was assigned to (the active one's or a canary's), or with
        `pinned` from those that pinned it themselves."""
        stats = await self.records.stats(model, pinned=pinned)
        return {version: quality_view(count, agree) for version, (count, agree) in stats.items()}


def quality_view(count: int, agree: int) -> dict[str, Any]:
    return {"count": count, "agreement": round(agree / count, 4) if count > 0 else None}


def with_defaults(item: dict[str, Any]) -> dict[str, Any]:
    """Fields every history item has, recorded before they existed: `image` (null: not captured)."""
    return item if "image" in item else {**item, "image": None}
