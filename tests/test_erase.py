"""`DELETE /v1/session?erase=true` on a real server and a real Redis: a failure part-way is finished by
the retry, nothing in Redis names the session afterwards (its Idempotency-Key names included), and on
the embedded Redis the erased data leaves the append-only files."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from core.errors import StoreUnavailable
from inference.model import LoadedModel
from server.embedded_redis import EmbeddedRedis
from server.runtime import build_runner, serve_loaded
from service.capture import Captures
from service.feedback import FeedbackService
from sessions.store import STORE_UNAVAILABLE_MESSAGE, SessionStore
from tests.conftest import LoopThread, RedisServer, error_code, make_config, wait_for

ERASE_DB = 9  # a database of this module's own on the suite's Redis: every key in it is these tests'


def new_session(http: httpx.Client) -> tuple[dict[str, str], str]:
    body = http.post("/v1/sessions").json()
    return {"Authorization": f"Bearer {body['token']}"}, body["session_id"]


def unique_png() -> bytes:
    """An image no other test sends, so that only its own session holds it."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), tuple(uuid.uuid4().bytes[:3])).save(buffer, format="PNG")
    return buffer.getvalue()


def fill_session(http: httpx.Client, auth: dict[str, str], image: bytes, comment: str,
                 idempotency_key: str) -> dict[str, Any]:
    """A predict (with an Idempotency-Key) and feedback with a comment: what an erase must take away."""
    response = http.post("/v1/predict", headers={**auth, "Content-Type": "image/png",
                                                 "Idempotency-Key": idempotency_key}, content=image)
    assert response.status_code == 200, response.text
    item = response.json()
    given = http.put(f"/v1/history/{item['id']}/feedback", headers=auth, json={"label": 3, "comment": comment})
    assert given.status_code == 200, given.text
    return item


def keys_naming(client: redis.Redis, *texts: str) -> list[bytes]:
    """Keys, and members of sets and hashes, that contain any of `texts`."""
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        parts = [key]
        if kind == b"set":
            parts += client.smembers(key)
        elif kind == b"hash":
            parts += [*client.hkeys(key), *client.hvals(key)]
        elif kind == b"zset":
            parts += client.zrange(key, 0, -1)
        found += [key for part in parts if any(text.encode() in part for text in texts)]
    return found


@pytest.fixture(scope="module")
def erase_server(serve: Callable[..., Any], redis_server: RedisServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    redis.Redis(port=redis_server.port, db=ERASE_DB).flushdb()
    capture_dir = tmp_path_factory.mktemp("captures")
    config = make_config(f"{redis_server.url.rsplit('/', 1)[0]}/{ERASE_DB}",
                         capture={"enabled": True, "store_dir": str(capture_dir)})
    with serve(config) as running:
        running.capture_dir = capture_dir
        running.redis = redis.Redis(port=redis_server.port, db=ERASE_DB)
        yield running


# Each step of an erase, in its order; a fault in any of them must leave a retry able to finish.
STEPS = [(FeedbackService, "erase"), (Captures, "erase"), (SessionStore, "delete")]


@pytest.mark.parametrize(("owner", "method"), STEPS, ids=["feedback", "captures", "revoke"])
def test_an_erase_that_fails_part_way_is_finished_by_its_retry(erase_server: Any, monkeypatch: pytest.MonkeyPatch,
                                                               owner: type, method: str) -> None:
    original = getattr(owner, method)
    failures: list[str] = []

    async def fails_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(method)
            raise StoreUnavailable(STORE_UNAVAILABLE_MESSAGE)  # Redis lost between two steps
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, fails_once)
    image, comment, key = unique_png(), f"comment-{uuid.uuid4().hex}", f"client-key-{uuid.uuid4().hex}"
    with erase_server.client() as http:
        auth, session_id = new_session(http)
        fill_session(http, auth, image, comment, key)
        digest = hashlib.sha256(image).hexdigest()
        copies = list(erase_server.capture_dir.glob(f"*/{digest}"))  # <session ref>/<sha256>
        assert len(copies) == 1 and copies[0].is_file()
        image_path, ref = copies[0], copies[0].parent.name

        failed = http.delete("/v1/session", headers=auth, params={"erase": "true"})
        assert failed.status_code == 503 and error_code(failed) == "store_unavailable", failed.text
        assert failures == [method]
        # The token still works, so the retry can finish the job; nothing new is recorded meanwhile.
        assert http.get("/v1/session", headers=auth).status_code == 200
        refused = http.post("/v1/predict", headers={**auth, "Content-Type": "image/png"}, content=unique_png())
        assert refused.status_code == 401 and error_code(refused) == "session_revoked"

        assert http.delete("/v1/session", headers=auth, params={"erase": "true"}).status_code == 204
        assert error_code(http.get("/v1/session", headers=auth)) == "session_not_found"
    assert not image_path.exists() and not image_path.parent.exists()
    assert keys_naming(erase_server.redis, session_id, ref, comment, key) == []


def test_logout_takes_the_client_chosen_idempotency_keys_with_it(erase_server: Any) -> None:
    key = f"client-key-{uuid.uuid4().hex}"
    with erase_server.client() as http:
        auth, _ = new_session(http)
        fill_session(http, auth, unique_png(), "kept as training data", key)
        assert keys_naming(erase_server.redis, key)  # stored while the session lives (its retries need it)
        assert http.delete("/v1/session", headers=auth).status_code == 204
        assert error_code(http.get("/v1/session", headers=auth)) == "session_revoked"  # a plain logout's tombstone
    assert keys_naming(erase_server.redis, key) == []


def files_containing(folder: Path, *texts: str) -> set[str]:
    """Which of `texts` occur in any file under `folder` (the append-only files, the snapshot)."""
    contents = b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file() and not path.is_socket())
    return {text for text in texts if text.encode() in contents}


def test_erased_data_leaves_the_embedded_redis_files(tmp_path: Path, loop_thread: LoopThread,
                                                     default_model: LoadedModel) -> None:
    embedded = EmbeddedRedis(tmp_path)
    embedded.start()
    config = make_config(redis={"url": "embedded", "embedded_erase_rewrite_seconds": 0.1})
    runner = build_runner(config)

    # As the CLI does: config says "embedded", this is its socket.
    server = loop_thread.start_server(config, runner, serve_loaded(config, default_model), embedded.url)
    port, rewrites = server.http.port, server.rewrite_after_erase
    client = redis.Redis(unix_socket_path=str(embedded.socket), socket_timeout=5)
    folder = embedded.data_dir
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            (erased, erased_id), (keeper, keeper_id) = new_session(http), new_session(http)
            secret = {"id": erased_id, "comment": f"comment-{uuid.uuid4().hex}", "key": f"key-{uuid.uuid4().hex}"}
            fill_session(http, erased, unique_png(), secret["comment"], secret["key"])
            fill_session(http, keeper, unique_png(), f"comment-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}")
            # appendfsync everysec: on disk within about a second
            assert wait_for(lambda: files_containing(folder, *secret.values()) == set(secret.values()))

            assert http.delete("/v1/session", headers=erased, params={"erase": "true"}).status_code == 204

            def rewritten() -> bool:
                info = client.info("persistence")
                return (rewrites.rewrites >= 1 and rewrites.idle and not info["aof_rewrite_in_progress"]
                        and not info["aof_rewrite_scheduled"] and not info["rdb_bgsave_in_progress"])

            assert wait_for(rewritten, timeout=30)
            assert wait_for(lambda: not files_containing(folder, *secret.values()), timeout=30), \
                files_containing(folder, *secret.values())
            # The search reads the rewritten files: what was not erased is still found in them.
            assert files_containing(folder, keeper_id) == {keeper_id}
            assert http.get("/v1/session", headers=keeper).status_code == 200
    finally:
        loop_thread.stop_server(server)
        runner.close()
        client.close()
        embedded.stop()
