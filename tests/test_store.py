"""The session store against the suite's real Redis, without HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis as sync_redis

from core.errors import BadRequest, InvalidToken, NotFound, RateLimited, StoreUnavailable
from core.options import Options
from sessions.store import SessionStore, connect
from sessions.tokens import TokenSigner

SIGNER = TokenSigner(["store-test-key-0123456789"], max_age_seconds=3600)


def run_with_store(redis_url: str, body: Callable[[SessionStore], Coroutine[Any, Any, Any]], **limits: int) -> Any:
    async def main() -> Any:
        store = SessionStore(connect(redis_url, 1, 1), ttl_seconds=limits.get("ttl", 60),
                             max_lifetime_seconds=limits.get("lifetime", 3600),
                             history_max_entries=limits.get("max_entries", 50),
                             rate_limit_per_minute=limits.get("rate", 0))
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def entry(n: int) -> dict[str, Any]:
    return {"created_at": "2026-01-01T00:00:00.000Z", "predicted_class": n, "label": str(n), "top_k": [],
            "options": {}, "model": {"name": "m", "version": "v"}}


def test_keys_of_a_session_share_one_hash_tag(redis_server) -> None:
    async def body(store: SessionStore) -> str:
        session = await store.create(Options())
        await store.record(session, entry(1))
        return session.id

    session_id = run_with_store(redis_server.url, body)
    keys = sync_redis.Redis.from_url(redis_server.url, decode_responses=True).keys(f"*{session_id}*")
    assert sorted(keys) == [f"sess:{{{session_id}}}", f"sess:{{{session_id}}}:history"]


def test_record_and_page_through_history(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options(top_k=2))
        ids = [(await store.record(session, entry(n)))[0] for n in range(7)]
        touched = await store.touch(SIGNER.verify(SIGNER.issue(session.id)))
        assert touched.predictions == 7 and touched.options.top_k == 2
        seen, before = [], None
        while True:
            items, before = await store.history(session.id, limit=3, before=before)
            seen += [item["id"] for item in items]
            if before is None:
                break
        assert seen == ids[::-1]
        assert (await store.history_item(session.id, ids[3]))["predicted_class"] == 3
        with pytest.raises(NotFound):
            await store.history_item(session.id, "1-1")
        with pytest.raises(BadRequest):
            await store.history(session.id, limit=3, before="bad id")
        # Edge ids that Redis itself refuses (found by the fuzz test): answers, not store errors.
        assert await store.history(session.id, limit=3, before="0-0") == ([], None)
        assert await store.history(session.id, limit=3, before="00-000") == ([], None)
        too_big = f"{2**64}-0"
        with pytest.raises(BadRequest):
            await store.history(session.id, limit=3, before=too_big)
        with pytest.raises(NotFound):
            await store.history_item(session.id, too_big)

    run_with_store(redis_server.url, body)


def test_history_is_capped_newest_kept(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        ids = [(await store.record(session, entry(n)))[0] for n in range(8)]
        items, next_id = await store.history(session.id, limit=100)
        assert [i["id"] for i in items] == ids[::-1][:5] and next_id is None

    run_with_store(redis_server.url, body, max_entries=5)


def test_sixteen_concurrent_records_all_land(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        ids = [i for i, _ in await asyncio.gather(*(store.record(session, entry(n)) for n in range(16)))]
        items, _ = await store.history(session.id, limit=100)
        assert len(set(ids)) == 16 and sorted(i["id"] for i in items) == sorted(ids)

    run_with_store(redis_server.url, body)


def test_logout_revokes_and_blocks_late_records(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        token = SIGNER.verify(SIGNER.issue(session.id))
        await store.delete(session)
        with pytest.raises(InvalidToken) as caught:
            await store.touch(token)
        assert caught.value.code == "session_revoked"
        with pytest.raises(InvalidToken) as late:
            await store.record(session, entry(1))  # a predict racing the logout records nothing
        assert late.value.code == "session_revoked"  # and says why, as the next request would
        items, _ = await store.history(session.id, limit=10)
        assert items == []

    run_with_store(redis_server.url, body)


def test_idle_expiry_covers_session_and_history(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        await store.record(session, entry(1))
        await asyncio.sleep(2.3)
        with pytest.raises(InvalidToken) as caught:
            await store.touch(SIGNER.verify(SIGNER.issue(session.id)))
        assert caught.value.code == "session_not_found"
        items, _ = await store.history(session.id, limit=10)
        assert items == []

    run_with_store(redis_server.url, body, ttl=2)


def test_concurrent_option_updates_are_atomic(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        await asyncio.gather(store.update_options(session.id, {"resize": 512}),
                             store.update_options(session.id, {"crop": 400}),
                             store.update_options(session.id, {"top_k": 9}))
        touched = await store.touch(SIGNER.verify(SIGNER.issue(session.id)))
        assert (touched.options.resize, touched.options.crop, touched.options.top_k) == (512, 400, 9)

    run_with_store(redis_server.url, body)


def test_unreachable_redis_is_a_fast_store_unavailable() -> None:
    async def body(store: SessionStore) -> None:
        with pytest.raises(StoreUnavailable) as caught:
            await store.create(Options())
        assert caught.value.status == 503 and caught.value.headers["Retry-After"]

    started = time.perf_counter()
    run_with_store("redis://127.0.0.1:1/0", body)
    assert time.perf_counter() - started < 5


def test_idempotency_key_records_once_even_when_retries_race(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        token = SIGNER.verify(SIGNER.issue(session.id))
        # Two attempts with one key race past the touch; the second record gets the first's id.
        first, second = await asyncio.gather(store.record(session, entry(1), "key-1"),
                                             store.record(session, entry(2), "key-1"))
        assert {first[1], second[1]} == {False, True} and first[0] == second[0]
        retried = await store.touch(token, idempotency_key="key-1")
        assert retried.replay_of == first[0] and retried.predictions == 1
        assert (await store.touch(token, idempotency_key="key-2")).replay_of is None
        items, _ = await store.history(session.id, limit=10)
        assert len(items) == 1

    run_with_store(redis_server.url, body)


def test_rate_limit_is_a_token_bucket_in_redis(redis_server) -> None:
    async def body(store: SessionStore) -> None:
        session = await store.create(Options())
        token = SIGNER.verify(SIGNER.issue(session.id))
        for _ in range(3):
            await store.touch(token, cost=1)
        await store.touch(token)  # reads are free
        with pytest.raises(RateLimited) as caught:
            await store.touch(token, cost=1)
        assert caught.value.status == 429 and 1 <= int(caught.value.headers["Retry-After"]) <= 20
        other = await store.create(Options())  # per session
        await store.touch(SIGNER.verify(SIGNER.issue(other.id)), cost=1)

    run_with_store(redis_server.url, body, rate=3)
