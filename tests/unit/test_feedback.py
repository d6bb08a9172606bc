"""service.feedback: labels by index or name, the refusals, replacing and withdrawing, the counters per
version, and erasing a session's feedback, on in-memory fakes."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import QUOTE_CHARS, BadRequest, Conflict, InvalidToken, NotFound, RateLimited, quoted, quoted_names
from core.options import Options
from core.session import Session
from service.feedback import FeedbackLimits, FeedbackService, InvalidFeedback, parse_purge, resolve_label
from sessions.tokens import TokenSigner
from tests.unit.conftest import SECRET
from tests.unit.fakes import LABELS, FakeFeedbackRecords, FakeStore

pytestmark = pytest.mark.unit


def entry(predicted: int, version: str = "v1") -> dict:
    return {"created_at": "2026-01-01T00:00:00.000Z", "predicted_class": predicted, "label": LABELS[predicted],
            "top_k": [{"class_index": predicted, "label": LABELS[predicted], "score": 1.0}],
            "options": Options().to_dict(), "model": {"name": "fake-net", "version": version}, "image": None}


SIGNER = TokenSigner([SECRET], max_age_seconds=3600)


def service(store: FakeStore, records: FakeFeedbackRecords, seen: list | None = None, *,
            signer: TokenSigner = SIGNER, **limits: int) -> FeedbackService:
    return FeedbackService(store, records, labels=lambda model: LABELS, signer=signer,
                           limits=FeedbackLimits(**{"max_comment_bytes": 10, **limits}),
                           on_feedback=(lambda model, version, agrees: seen.append((version, agrees)))
                           if seen is not None else None)


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
    assert asyncio.run(feedback.quality("fake-net")) == {"v1": {"count": 1, "agreement": 1.0},
                                               "v2": {"count": 1, "agreement": 0.0}}
    asyncio.run(feedback.give(session, first, {"label": 5}))  # replaces: v1 now disagrees
    assert asyncio.run(feedback.quality("fake-net"))["v1"] == {"count": 1, "agreement": 0.0}
    assert seen == [("v1", True), ("v2", False), ("v1", False)]
    stored = asyncio.run(records.get_many([SIGNER.session_ref(session.id)], [first]))[0]
    assert stored["session"] == SIGNER.session_ref(session.id) and session.id not in str(stored)
    asyncio.run(feedback.withdraw(session, first))
    assert asyncio.run(feedback.quality("fake-net"))["v1"] == {"count": 0, "agreement": None}
    assert asyncio.run(feedback.erase(session.id)) == 1
    assert asyncio.run(feedback.quality("fake-net"))["v2"] == {"count": 0, "agreement": None}


def test_refusals_come_before_anything_is_written(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    feedback = service(store, records)
    session, (history_id,) = recorded(store, (1, "v1"))
    for body in ({"label": 99}, {"label": 1, "comment": "x" * 11}, {"label": 1, "comment": "é" * 6},  # 12 bytes
                 {"label": 1, "comment": "\ud800"}, {}, {"label": 1, "note": ""}):
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
    assert records.records == {}
    assert asyncio.run(feedback.quality("fake-net")) == {"v1": {"count": 0, "agreement": None}}


def test_a_comment_is_bounded_in_utf8_bytes_not_characters(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    session, (history_id,) = recorded(store, (1, "v1"))
    assert asyncio.run(service(store, records).give(session, history_id, {"label": 1, "comment": "😀😀"}))  # 8 bytes
    with pytest.raises(InvalidFeedback, match="12 bytes in UTF-8; the limit is 10"):
        asyncio.run(service(store, records).give(session, history_id, {"label": 1, "comment": "😀😀😀"}))


def test_a_session_gives_at_most_its_history_bound_and_an_owner_its_daily_limit(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    session, ids = recorded(store, *[(1, "v1")] * 4)
    bounded = service(store, records, max_per_session=2, daily_limit=3)
    for history_id in ids[:2]:
        asyncio.run(bounded.give(session, history_id, {"label": 1}))
    asyncio.run(bounded.give(session, ids[0], {"label": 2}))  # replacing is not more feedback
    with pytest.raises(Conflict) as refused:
        asyncio.run(bounded.give(session, ids[2], {"label": 1}))
    assert refused.value.code == "feedback_limit_reached" and refused.value.status == 409
    asyncio.run(bounded.withdraw(session, ids[0]))
    with pytest.raises(RateLimited) as limited:  # 3 given today by this session's owner
        asyncio.run(bounded.give(session, ids[2], {"label": 1}))
    assert limited.value.code == "feedback_rate_limited" and limited.value.status == 429


def test_sessions_of_one_owner_share_the_daily_limit(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    daily = service(store, records, daily_limit=2)
    sessions = [asyncio.run(store.create(Options(), owner="address:10.0.0.1")) for _ in range(3)]
    elsewhere = asyncio.run(store.create(Options(), owner="address:10.0.0.2"))
    for n, session in enumerate([*sessions, elsewhere]):
        history_id = asyncio.run(store.record(session, entry(1)))[0]
        if n == 2:
            with pytest.raises(RateLimited):
                asyncio.run(daily.give(session, history_id, {"label": 1}))
        else:
            asyncio.run(daily.give(session, history_id, {"label": 1}))


def test_a_sessions_feedback_is_found_and_erased_under_its_name_for_an_older_secret(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    session, (first, second) = recorded(store, (1, "v1"), (1, "v1"))
    asyncio.run(service(store, records).give(session, first, {"label": 1}))
    rotated = TokenSigner(["a-newer-secret-0123456789", SECRET], max_age_seconds=3600)
    after = service(store, records, signer=rotated)
    assert asyncio.run(after.attach(session.id, [{"id": first}]))[0]["feedback"]["class_index"] == 1
    asyncio.run(after.give(session, second, {"label": 2}))
    asyncio.run(after.give(session, first, {"label": 3}))  # replaces the record named with the old secret
    assert {ref for ref, _ in records.records} == {rotated.session_ref(session.id)}
    assert asyncio.run(after.erase(session.id)) == 2 and records.records == {}


def test_retention_and_the_admins_purge(store: FakeStore) -> None:
    records = FakeFeedbackRecords()
    feedback = service(store, records, retention_days=1)
    keeper, (kept,) = recorded(store, (1, "v1"))
    purged, (gone,) = recorded(store, (1, "v1"))
    asyncio.run(feedback.give(keeper, kept, {"label": 1}))
    asyncio.run(feedback.give(purged, gone, {"label": 1}))
    assert asyncio.run(feedback.sweep()) == 0
    assert asyncio.run(feedback.purge(parse_purge({"session": SIGNER.session_ref(purged.id)}))) == 1
    assert [ref for ref, _ in records.records] == [SIGNER.session_ref(keeper.id)]
    given_at = int(records.records[(SIGNER.session_ref(keeper.id), kept)][0])
    assert asyncio.run(feedback.sweep(now=given_at + 86_400_000)) == 0  # kept for a whole day ...
    assert asyncio.run(feedback.sweep(now=given_at + 86_400_001)) == 1  # ... and no longer
    for bad in ({}, {"session": "not-a-ref"}, {"since": "2000", "until": "1000"}, {"what": "x"}):
        with pytest.raises(BadRequest):
            parse_purge(bad)
