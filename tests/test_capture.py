"""Capture end to end, on the real server and Redis: what a session is told does not depend on other
sessions' images, only the image is kept (not what follows it), each session's quota, owner-only files,
and no Redis key left naming a session or an image after its erase and after the retention sweep."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from server.server import make_signer
from service.capture import Captures
from sessions.captures import CaptureRefs
from tests.conftest import login, make_config

CAPTURE_DB = 12


def png_bytes(color: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def capture_config(redis_server, store_dir: Path, **capture: Any):
    return make_config(f"{redis_server.url.rsplit('/', 1)[0]}/{CAPTURE_DB}",
                       capture={"enabled": True, "store_dir": str(store_dir), **capture})


def predict(client: httpx.Client, auth: dict[str, str], image: bytes) -> dict[str, Any]:
    response = client.post("/v1/predict", headers={**auth, "Content-Type": "image/png"}, content=image)
    assert response.status_code == 200, response.text
    return response.json()


def session_id(client: httpx.Client, auth: dict[str, str]) -> str:
    return client.get("/v1/session", headers=auth).json()["session_id"]


def skipped(client: httpx.Client, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'inference_capture_skipped_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def capture_redis(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=CAPTURE_DB, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()


def test_short_of_disk_an_image_another_session_sent_gets_the_answer_a_new_one_gets(
        serve, redis_server, capture_redis, tmp_path: Path) -> None:
    # Two replicas sharing the store and Redis; the second one's disk is short.
    sent = png_bytes((11, 22, 33))
    with serve(capture_config(redis_server, tmp_path)) as roomy, roomy.client() as client:
        assert predict(client, login(client), sent)["image"]["sha256"] == sha(sent)
    with serve(capture_config(redis_server, tmp_path, min_free_disk_bytes=1 << 62)) as full, full.client() as client:
        auth = login(client)
        already_sent, new = predict(client, auth, sent), predict(client, auth, png_bytes((44, 55, 66)))
        assert already_sent["image"] is None and new["image"] is None
        assert skipped(client, "low_disk") == 2


def test_only_the_image_is_kept_not_what_follows_it_and_each_session_has_a_quota(
        serve, redis_server, capture_redis, tmp_path: Path) -> None:
    image = png_bytes((7, 8, 9))
    trailing = os.urandom(9 << 20)  # 9 MiB after a valid 32x32 PNG
    others = [png_bytes((n, 100, 200), size=64) for n in range(3)]
    quota = len(image) + len(others[0]) + len(others[1])
    with serve(capture_config(redis_server, tmp_path, max_session_bytes=quota)) as server, \
            server.client() as client:
        auth = login(client)
        item = predict(client, auth, image + trailing)
        assert item["image"] == {"sha256": sha(image), "content_type": "image/png", "size": len(image)}
        assert client.get(f"/v1/history/{item['id']}/image", headers=auth).content == image
        assert [path.stat().st_size for path in tmp_path.rglob("*") if path.is_file()] == [len(image)]
        assert [predict(client, auth, other)["image"] is not None for other in others] == [True, True, False]
        assert skipped(client, "quota") == 1
        assert predict(client, auth, image)["image"] is not None  # a copy it holds costs nothing more
        assert predict(client, login(client), others[2])["image"] is not None  # another session's quota


def test_captured_files_are_the_owners_only_and_the_queue_wait_is_measured(
        serve, redis_server, capture_redis, tmp_path: Path) -> None:
    store_dir = tmp_path / "captures"
    previous = os.umask(0o022)
    try:
        with serve(capture_config(redis_server, store_dir)) as server, server.client() as client:
            item = predict(client, login(client), png_bytes((1, 1, 1)))
            metrics = client.get("/metrics").text
    finally:
        os.umask(previous)
    [path] = [path for path in store_dir.rglob("*") if path.is_file()]
    assert path.name == item["image"]["sha256"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in (store_dir, path.parent)} == {0o700}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "inference_capture_queue_wait_seconds_count" in metrics


def capture_entries(client: redis.Redis) -> list[str]:
    """Every capture key's name, and every member and field in it."""
    entries = []
    for key in client.scan_iter("captures:*"):
        entries.append(key)
        kind = client.type(key)
        if kind == "zset":
            entries += client.zrange(key, 0, -1)
        elif kind == "set":
            entries += client.smembers(key)
        elif kind == "hash":
            entries += client.hkeys(key)
    return entries


def test_no_capture_key_names_a_session_or_its_images_after_its_erase_and_after_the_sweep(
        serve, redis_server, capture_redis, tmp_path: Path, loop_thread) -> None:
    with serve(capture_config(redis_server, tmp_path)) as server, server.client() as client:
        erased, keeper = login(client), login(client)
        shared, own = png_bytes((90, 91, 92)), png_bytes((93, 94, 95))
        predict(client, erased, shared)
        predict(client, erased, own)
        predict(client, keeper, shared)
        signer = make_signer(server.config)
        erased_id, keeper_id = session_id(client, erased), session_id(client, keeper)
        names = {erased_id, keeper_id, *signer.session_refs(erased_id), *signer.session_refs(keeper_id),
                 sha(shared), sha(own)}

        def naming(entries: list[str]) -> set[str]:
            return {name for name in names if any(name in entry for entry in entries)}

        # The check sees them while they are there (and a session id never: sessions are named by ref).
        assert naming(capture_entries(capture_redis)) == names - {erased_id, keeper_id}
        assert client.delete("/v1/session", headers=erased, params={"erase": "true"}).status_code == 204
        assert naming(capture_entries(capture_redis)) == {signer.session_ref(keeper_id), sha(shared)}
        assert {path.name for path in tmp_path.rglob("*")} == {signer.session_ref(keeper_id), sha(shared)}

        captures = Captures(CaptureRefs(server.store.redis), names=signer, store_dir=tmp_path, enabled=True,
                            retention_days=1)
        try:
            day_later = int(time.time() * 1000) + 24 * 3600 * 1000 + 1000
            assert loop_thread.run(captures.sweep(now=day_later)) == 1
        finally:
            captures.close()
        assert capture_entries(capture_redis) == []
        assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_an_erase_also_removes_what_the_earlier_shared_layout_kept_of_the_session(
        serve, redis_server, capture_redis, tmp_path: Path) -> None:
    """Images sent before copies were kept per session: one shared file each, and keys naming the session
    by its id. Its erase takes its keys, and each file no other session holds."""
    with serve(capture_config(redis_server, tmp_path)) as server, server.client() as client:
        erased, keeper = login(client), login(client)
        erased_id, keeper_id = session_id(client, erased), session_id(client, keeper)
        own, shared = png_bytes((10, 11, 12)), png_bytes((13, 14, 15))
        for image, holders in ((own, [erased_id]), (shared, [erased_id, keeper_id])):
            digest = sha(image)
            (tmp_path / digest[:2]).mkdir(exist_ok=True)
            (tmp_path / digest[:2] / digest).write_bytes(image)
            capture_redis.zadd("captures:{captures}:seen", {digest: int(time.time() * 1000)})
            capture_redis.sadd(f"captures:{{captures}}:owners:{digest}", *holders)
            for holder in holders:
                capture_redis.sadd(f"captures:{{captures}}:session:{holder}", digest)
        assert client.delete("/v1/session", headers=erased, params={"erase": "true"}).status_code == 204
        assert not (tmp_path / sha(own)[:2] / sha(own)).exists()
        assert (tmp_path / sha(shared)[:2] / sha(shared)).read_bytes() == shared  # the keeper still holds it
        left = capture_entries(capture_redis)
        assert not [entry for entry in left if erased_id in entry or sha(own) in entry]
        assert capture_redis.smembers(f"captures:{{captures}}:owners:{sha(shared)}") == {keeper_id}
