"""The session store's contract, as the use cases rely on it: every test runs on the fake
(tests/unit/fakes.py FakeStore, in the unit tier) and on the real SessionStore over the suite's
redis-server (marked `redis`, outside the tier), so the fake cannot drift from what it stands for."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from core.errors import BadOptions, BadRequest, InvalidToken, NotFound, RateLimited, ServiceError
from core.options import Options
from core.session import Session
from sessions.store import SessionStore, connect, owner_name
from sessions.tokens import TokenSigner, VerifiedToken
from tests.unit.fakes import FakeStore

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
Store = FakeStore | SessionStore

SIGNER = TokenSigner(["contract-test-key-0123456789"], max_age_seconds=3600)
LIFETIME_SECONDS = 3600
HISTORY_MAX_ENTRIES = 5


@pytest.fixture
def run() -> Iterator[Run[Any]]:
    """Runs a coroutine on one event loop for the whole test (the real store's connections live on it)."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(params=[pytest.param("fake", marks=pytest.mark.unit),
                        pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, run: Run[Any]) -> Iterator[Store]:
    if request.param == "fake":
        yield FakeStore(history_max_entries=HISTORY_MAX_ENTRIES, max_lifetime_seconds=LIFETIME_SECONDS)
        return
    redis_server = request.getfixturevalue("redis_server")
    real = SessionStore(connect(redis_server.url, 1, 1), ttl_seconds=60, max_lifetime_seconds=LIFETIME_SECONDS,
                        history_max_entries=HISTORY_MAX_ENTRIES)
    yield real
    run(real.close())


def token(session: Session) -> VerifiedToken:
    return SIGNER.verify(SIGNER.issue(session.id))


def entry(n: int) -> dict[str, Any]:
    return {"created_at": "2026-01-01T00:00:00.000Z", "predicted_class": n, "label": str(n), "top_k": [],
            "options": {}, "model": {"name": "m", "version": "v"}}


def code_of(run: Run[Any], call: Coroutine[Any, Any, Any], error: type[ServiceError] = InvalidToken) -> str:
    with pytest.raises(error) as caught:
        run(call)
    return caught.value.code


def test_create_then_touch_read_the_same_session(store: Store, run: Run[Any]) -> None:
    created = run(store.create(Options(top_k=2), owner="api-key-1"))
    assert created.predictions == 0 and created.options.top_k == 2 and created.replay_of is None
    assert created.owner == owner_name("api-key-1")
    assert created.deadline_ms == created.created_at_ms + LIFETIME_SECONDS * 1000
    assert created.canary_slot is not None and 0 <= created.canary_slot < 100
    touched = run(store.touch(token(created)))
    assert (touched.id, touched.created_at_ms, touched.deadline_ms, touched.options, touched.canary_slot,
            touched.owner) == (created.id, created.created_at_ms, created.deadline_ms, created.options,
                               created.canary_slot, created.owner)
    assert run(store.create(Options())).owner is None


def test_consecutive_sessions_are_dealt_canary_slots_37_apart(store: Store, run: Run[Any]) -> None:
    first, second = run(store.create(Options())), run(store.create(Options()))
    assert first.canary_slot is not None and second.canary_slot is not None
    assert (second.canary_slot - first.canary_slot) % 100 == 37


def test_a_session_never_created_is_not_found(store: Store, run: Run[Any]) -> None:
    unknown = SIGNER.verify(SIGNER.issue(secrets.token_hex(16)))
    assert code_of(run, store.touch(unknown)) == "session_not_found"
    assert code_of(run, store.update_options(unknown.session_id, {"top_k": 3})) == "session_not_found"
    assert run(store.alive(unknown.session_id)) is False
    assert run(store.history(unknown.session_id, limit=10)) == ([], None)


def test_the_rate_limit_charges_costs_and_reads_are_free(store: Store, run: Run[Any]) -> None:
    store.rate_limit_per_minute = 3
    session = run(store.create(Options()))
    for _ in range(3):
        run(store.touch(token(session), cost=1))
    run(store.touch(token(session)))  # reads are free
    with pytest.raises(RateLimited) as caught:
        run(store.touch(token(session), cost=1))
    assert caught.value.status == 429 and 1 <= int(caught.value.headers["Retry-After"]) <= 20
    run(store.touch(token(run(store.create(Options()))), cost=1))  # per session
    store.rate_limit_per_minute = 0  # unlimited
    for _ in range(5):
        run(store.touch(token(session), cost=1))


def test_an_idempotency_key_records_once_and_its_replay_costs_nothing(store: Store, run: Run[Any]) -> None:
    store.rate_limit_per_minute = 1
    session = run(store.create(Options()))
    history_id, replayed = run(store.record(session, entry(1), "key-1"))
    assert replayed is False
    assert run(store.record(session, entry(2), "key-1")) == (history_id, True)
    replay = run(store.touch(token(session), cost=1, idempotency_key="key-1"))
    assert replay.replay_of == history_id and replay.predictions == 1
    fresh = run(store.touch(token(session), cost=1, idempotency_key="key-2"))  # takes the one token
    assert fresh.replay_of is None
    with pytest.raises(RateLimited):
        run(store.touch(token(session), cost=1))
    items, _ = run(store.history(session.id, limit=10))
    assert [item["predicted_class"] for item in items] == [1]


def test_history_pages_newest_first_and_items_are_found_by_id(store: Store, run: Run[Any]) -> None:
    session = run(store.create(Options()))
    ids = [run(store.record(session, entry(n)))[0] for n in range(HISTORY_MAX_ENTRIES)]
    seen: list[str] = []
    before = None
    while True:
        items, before = run(store.history(session.id, limit=2, before=before))
        seen += [item["id"] for item in items]
        if before is None:
            break
    assert seen == ids[::-1]
    assert run(store.history_item(session.id, ids[3])) == {"id": ids[3], **entry(3)}
    milliseconds, sequence = ids[3].split("-")
    padded = f"0{milliseconds}-0{sequence}"  # Redis reads the numbers: the entry answers with its own id
    assert run(store.history_item(session.id, padded)) == {"id": ids[3], **entry(3)}
    for missing in ("1-1", "not an id", f"{2**64}-0"):
        assert code_of(run, store.history_item(session.id, missing), NotFound) == "history_item_not_found"
    other = run(store.create(Options()))
    assert code_of(run, store.history_item(other.id, ids[3]), NotFound) == "history_item_not_found"
    for bad in ("bad id", f"{2**64}-0", "1-"):
        assert code_of(run, store.history(session.id, limit=3, before=bad), BadRequest) == "invalid_parameter"
    assert run(store.history(session.id, limit=3, before="0-0")) == ([], None)
    assert run(store.history(session.id, limit=3, before="00-000")) == ([], None)


def test_the_history_keeps_the_newest_entries_and_counts_every_prediction(store: Store, run: Run[Any]) -> None:
    session = run(store.create(Options()))
    ids = [run(store.record(session, entry(n)))[0] for n in range(HISTORY_MAX_ENTRIES + 3)]
    items, next_id = run(store.history(session.id, limit=100))
    assert [item["id"] for item in items] == ids[::-1][:HISTORY_MAX_ENTRIES] and next_id is None
    assert run(store.touch(token(session))).predictions == HISTORY_MAX_ENTRIES + 3


def test_option_updates_merge_validate_and_persist(store: Store, run: Run[Any]) -> None:
    session = run(store.create(Options(top_k=2)))
    updated = run(store.update_options(session.id, {"resize": 300}))
    assert (updated.resize, updated.top_k) == (300, 2)
    with pytest.raises(BadOptions):
        run(store.update_options(session.id, {"crop": 400}))  # over the merged resize
    with pytest.raises(BadOptions):
        run(store.update_options(session.id, {"colour": "red"}))
    assert run(store.touch(token(session))).options == updated


def test_logout_revokes_the_token_and_refuses_late_records(store: Store, run: Run[Any]) -> None:
    session = run(store.create(Options()))
    run(store.record(session, entry(1)))
    run(store.delete(session))
    assert code_of(run, store.touch(token(session))) == "session_revoked"
    assert code_of(run, store.record(session, entry(2))) == "session_revoked"
    assert run(store.alive(session.id)) is False
    assert run(store.history(session.id, limit=10)) == ([], None)


def test_an_erase_refuses_new_data_and_leaves_no_tombstone(store: Store, run: Run[Any]) -> None:
    session = run(store.create(Options()))
    assert run(store.alive(session.id)) is True
    run(store.begin_erase(session.id))
    run(store.begin_erase(session.id))  # repeating it is harmless
    assert run(store.alive(session.id)) is False
    assert run(store.touch(token(session))).id == session.id  # the token still works: a retry can finish
    assert code_of(run, store.record(session, entry(1))) == "session_revoked"
    run(store.delete(session, erase=True))
    assert code_of(run, store.touch(token(session))) == "session_not_found"
    assert code_of(run, store.record(session, entry(1))) == "session_not_found"
    run(store.begin_erase(session.id))  # of a session that is gone: nothing to mark
    assert run(store.alive(session.id)) is False


def test_logins_are_a_bucket_per_caller(store: Store, run: Run[Any]) -> None:
    caller, other = f"key-{secrets.token_hex(4)}", f"key-{secrets.token_hex(4)}"
    run(store.take_login(caller, 2))
    run(store.take_login(caller, 2))
    with pytest.raises(RateLimited) as caught:
        run(store.take_login(caller, 2))
    assert caught.value.code == "login_rate_limited" and caught.value.status == 429
    run(store.take_login(other, 2))
    for _ in range(5):
        run(store.take_login(caller, 0))  # 0: unlimited
