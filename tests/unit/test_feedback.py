"""service.feedback: labels by index or name, the refusals, replacing and withdrawing, the counters per
version, and erasing a session's feedback, on in-memory fakes."""

from __future__ import annotations

import asyncio

import pytest

from service.feedback import FeedbackService, InvalidFeedback, resolve_label, session_hash
from sessions.errors import QUOTE_CHARS, InvalidToken, NotFound, quoted, quoted_names
from sessions.options import Options
from sessions.store import Session
from tests.unit.fakes import LABELS, FakeFeedbackRecords, FakeStore

pytestmark = pytest.mark.unit


def entry(predicted: int, version: str = "v1") -> dict:
    return {"created_at": "2026-01-01T00:00:00.000Z", "predicted_class": predicted, "label": LABELS[predicted],
            "top_k": [{"class_index": predicted, "label": LABELS[predicted], "score": 1.0}],
            "options": Options().to_dict(), "model": {"name": "fake-net", "version": version}, "image": None}


def service(store: FakeStore, records: FakeFeedbackRecords, seen: list | None = None) -> FeedbackService:
    return FeedbackService(store, records, labels=lambda: LABELS, max_comment_chars=10,
                           on_feedback=(lambda version, agrees: seen.append((version, agrees))) if seen is not None
                           else None)


def recorded(store: FakeStore, *predictions: tuple[int, str]) -> tuple[Session, list[str]]:
    session = asyncio.run(store.create(Options()))
    return session, [asyncio.run(store.record(session, entry(p, v)))[0] for p, v in predictions]


def test_labels_resolve_by_index_or_case_insensitive_name() -> None:
    labels = ["tabby cat", "Motor Scooter", "crane", "crane"]
    assert resolve_label(1, labels) == 1 and resolve_label(" motor SCOOTER", labels) == 1
    for bad in (4, -1, True, 1.0, None, "dog", "crane", ["tabby cat"]):
        with pytest.raises(InvalidFeedback):
            resolve_label(bad, labels)


def test_an_error_quotes_a_label_by_a_short_prefix_and_its_length(store: FakeStore) -> None:
    assert quoted("tabby") == "'tabby'" and quoted(7) == "7"
    assert quoted("x" * 2_000_000) == f"{'x' * QUOTE_CHARS!r}… (2000000 characters)"
    assert quoted_names(["b", "a", "c" * 1000, *"defg"]) == f"'a', 'b', {quoted('c' * 1000)}, 'd', 'e' and 2 more"
    session, (history_id,) = recorded(store, (1, "v1"))
    with pytest.raises(InvalidFeedback) as refused:
        asyncio.run(service(store, FakeFeedbackRecords()).give(session, history_id, {"label": "z" * 2_000_000}))
    assert len(refused.value.message) < 200 and "(2000000 characters)" in refused.value.message


def test_feedback_is_recorded_replaced_counted_and_withdrawn(store: FakeStore) -> None:
    records, seen = FakeFeedbackRecords(), []
    feedback = service(store, records, seen)
    session, (first, second) = recorded(store, (3, "v1"), (3, "v2"))
    item = asyncio.run(feedback.give(session, first, {"label": 3, "comment": "right"}))
    assert item["feedback"]["class_index"] == 3 and item["feedback"]["comment"] == "right"
    asyncio.run(feedback.give(session, second, {"label": "CLASS-4"}))
    assert asyncio.run(feedback.quality()) == {"v1": {"count": 1, "agreement": 1.0},
                                               "v2": {"count": 1, "agreement": 0.0}}
    asyncio.run(feedback.give(session, first, {"label": 5}))  # replaces: v1 now disagrees
    assert asyncio.run(feedback.quality())["v1"] == {"count": 1, "agreement": 0.0}
    assert seen == [("v1", True), ("v2", False), ("v1", False)]
    stored = asyncio.run(records.get_many(session.id, [first]))[0]
    assert stored["session"] == session_hash(session.id) and session.id not in str(stored)
    asyncio.run(feedback.withdraw(session, first))
    assert asyncio.run(feedback.quality())["v1"] == {"count": 0, "agreement": None}
    assert asyncio.run(feedback.erase(session.id)) == 1
    assert asyncio.run(feedback.quality())["v2"] == {"count": 0, "agreement": None}


def test_refusals_come_before_anything_is_written(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    feedback = service(store, records)
    session, (history_id,) = recorded(store, (1, "v1"))
    for body in ({"label": 99}, {"label": 1, "comment": "x" * 11}, {}, {"label": 1, "note": ""}):
        with pytest.raises(InvalidFeedback):
            asyncio.run(feedback.give(session, history_id, body))
    other, _ = recorded(store)
    with pytest.raises(NotFound):  # another session's item
        asyncio.run(feedback.give(other, history_id, {"label": 1}))
    assert records.records == {}


def test_feedback_that_races_an_erase_is_undone(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    feedback = service(store, records)
    session, (history_id,) = recorded(store, (1, "v1"))

    async def erased_meanwhile(session_id: str) -> bool:
        return False

    store.alive = erased_meanwhile  # type: ignore[method-assign]
    with pytest.raises(InvalidToken):
        asyncio.run(feedback.give(session, history_id, {"label": 1}))
    assert records.records == {} and asyncio.run(feedback.quality()) == {"v1": {"count": 0, "agreement": None}}
