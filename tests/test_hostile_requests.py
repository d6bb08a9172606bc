"""Hostile and careless requests (issue #15): each ends in a documented 4xx with bounded work, and
nothing that the server keeps grows without a bound. Real app, real Redis."""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
from itsdangerous.timed import TimestampSigner

from handlers.openapi import openapi_document
from server.app import ROUTES, route_template
from service.auth import api_key_hash
from sessions.store import STORE_UNAVAILABLE_MESSAGE
from sessions.tokens import TokenSigner
from tests.conftest import CAT_JPEG, TEST_SECRET, RedisServer, error_code, login, make_config

DEEP = b"[" * 100_000  # a few bytes that exhaust a recursive parser


def test_deeply_nested_json_is_malformed_not_a_server_error(client: httpx.Client) -> None:
    json_type = {"Content-Type": "application/json"}
    login_response = client.post("/v1/sessions", content=DEEP, headers=json_type)
    assert login_response.status_code == 400 and error_code(login_response) == "malformed_json"
    auth = login(client)
    patch = client.patch("/v1/session/options", content=DEEP, headers={**auth, **json_type})
    assert patch.status_code == 400 and error_code(patch) == "malformed_json"
    infer = client.post("/v2/models/efficientnet_lite0/infer", content=DEEP, headers=json_type)
    assert infer.status_code == 400 and "too deeply" in infer.json()["error"]
    # Nesting the parser accepts but no tensor has: refused by the protocol's own rule.
    nested = "[" * 500 + "1" + "]" * 500
    tensor = '{"name": "preprocessed", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ' + nested + "}"
    body = '{"inputs": [' + tensor + "]}"
    deep_data = client.post("/v2/models/efficientnet_lite0/infer", content=body, headers=json_type)
    assert deep_data.status_code == 400 and "nests lists" in deep_data.json()["error"]
    # A deep value in options is an invalid option, not a crash while describing it.
    deep_option = client.patch("/v1/session/options", content='{"top_k": ' + nested + "}",
                               headers={**auth, **json_type})
    assert deep_option.status_code in (400, 422), deep_option.text


def test_preprocess_is_charged_to_the_rate_limit(serve) -> None:
    with serve(make_config(sessions={"rate_limit_per_minute": 3})) as server, server.client() as client:
        auth = {**login(client), "Content-Type": "image/jpeg"}
        statuses = [client.post("/v1/preprocess", headers=auth, content=CAT_JPEG).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]


def test_logins_are_limited_per_address_without_api_keys(serve) -> None:
    with serve(make_config(sessions={"login_rate_limit_per_minute": 3})) as server, server.client() as client:
        # The bucket lives in Redis under the client's address: start from a full one.
        redis.Redis.from_url(server.config.redis.url).delete(*_login_keys(server.config.redis.url))
        statuses = [client.post("/v1/sessions").status_code for _ in range(3)]
        limited = client.post("/v1/sessions")
        assert statuses == [201, 201, 201]
        assert limited.status_code == 429 and error_code(limited) == "login_rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert "sessions.login_rate_limit_per_minute" in limited.json()["error"]["message"]


def test_logins_are_limited_per_api_key_and_wrong_keys_per_address(serve) -> None:
    keys = {"first": "first-key-0123456789", "second": "second-key-0123456789"}
    config = make_config(sessions={"login_rate_limit_per_minute": 2},
                         auth={"api_keys": [api_key_hash(key) for key in keys.values()]})
    with serve(config) as server, server.client() as client:
        redis.Redis.from_url(server.config.redis.url).delete(*_login_keys(server.config.redis.url))

        def log_in(key: str) -> httpx.Response:
            return client.post("/v1/sessions", headers={"Authorization": f"ApiKey {key}"})

        assert [log_in(keys["first"]).status_code for _ in range(3)] == [201, 201, 429]
        assert log_in(keys["second"]).status_code == 201  # another key has a bucket of its own
        wrong = [log_in("guessed-key-0123456789") for _ in range(3)]
        assert [r.status_code for r in wrong] == [401, 401, 429]
        assert error_code(wrong[-1]) == "login_rate_limited"


def _login_keys(url: str) -> list[str]:
    return [key.decode() for key in redis.Redis.from_url(url).scan_iter(match="login:*")] or ["login:none"]


def test_made_up_methods_share_one_metric_label(client: httpx.Client) -> None:
    for index in range(5):
        response = client.request(f"BREW{index}", "/v1/session")
        assert response.status_code == 405
    series = [line for line in client.get("/metrics").text.splitlines()
              if line.startswith("inference_http_requests_total{") and 'route="/v1/session"' in line]
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    assert "OTHER" in methods and not any(method.startswith("BREW") for method in methods)


def test_a_scrape_does_not_scan_the_keyspace(server, client: httpx.Client) -> None:
    info = redis.Redis.from_url(server.config.redis.url)
    login(client)

    def scans() -> int:
        return int(info.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    before = scans()
    for _ in range(3):
        assert client.get("/metrics").status_code == 200
    assert scans() == before


def test_the_session_counter_runs_in_the_background(server, loop_thread, client: httpx.Client) -> None:
    import asyncio

    from server.observability import count_sessions_forever

    login(client)
    gauge = server.runner.metrics.active_sessions

    async def count_once() -> float:
        task = asyncio.ensure_future(count_sessions_forever(server.store, gauge, interval=60))
        await asyncio.sleep(0.5)
        task.cancel()
        return gauge._value.get()

    assert loop_thread.run(count_once()) >= 1


def test_a_logout_tombstone_lives_no_longer_than_the_session_could(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tombstone lives as long as the session had left, not the full idle TTL. The session here
    has 12 s left of its 30 s lifetime (its token was issued 18 s ago), though its idle TTL is 30 s."""
    lifetime, age = 30, 18
    config = make_config(sessions={"ttl_seconds": lifetime, "max_lifetime_seconds": lifetime})
    with serve(config) as server, server.client() as client:
        session_id = client.post("/v1/sessions").json()["session_id"]
        issued_at = int(time.time()) - age
        with monkeypatch.context() as backdated:
            backdated.setattr(TimestampSigner, "get_timestamp", lambda signer: issued_at)
            auth = {"Authorization": f"Bearer {TokenSigner([TEST_SECRET], lifetime).issue(session_id)}"}
        assert client.delete("/v1/session", headers=auth).status_code == 204
        ttl_ms = redis.Redis.from_url(server.config.redis.url).pttl(f"sess:{{{session_id}}}:revoked")
        left_ms = (issued_at + lifetime) * 1000 - time.time() * 1000  # what the session had left, now
        assert abs(ttl_ms - left_ms) < 1000, (ttl_ms, left_ms)
        refused = client.get("/v1/session", headers=auth)
        assert refused.status_code == 401 and error_code(refused) == "session_revoked"


def test_redis_error_text_never_reaches_clients(serve, caplog: pytest.LogCaptureFixture) -> None:
    with tempfile.TemporaryDirectory(prefix="test-redis-oom-") as directory:
        full = RedisServer(Path(directory)).start()
        try:
            redis.Redis(port=full.port).config_set("maxmemory", 1)  # every write now fails with OOM
            with serve(make_config(full.url)) as server, server.client() as client, \
                    caplog.at_level(logging.WARNING, logger="sessions.store"):
                refused = client.post("/v1/sessions")
                assert refused.status_code == 503 and error_code(refused) == "store_unavailable"
                assert refused.json()["error"]["message"] == STORE_UNAVAILABLE_MESSAGE
                assert "maxmemory" in caplog.text  # the details are in the log
            full.stop()
            with serve(make_config(full.url, redis={"connect_timeout_seconds": 0.3})) as server, \
                    server.client() as client:
                ready = client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["checks"]["store"] == STORE_UNAVAILABLE_MESSAGE
                assert str(full.port) not in ready.text
        finally:
            full.stop()


def test_a_model_upload_without_the_admin_key_is_refused_before_its_body(serve) -> None:
    config = make_config(auth={"admin_api_keys": [api_key_hash("admin-key-0123456789")]})
    with serve(config) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for authorization in ("", "Authorization: ApiKey wrong-key-0123456789\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                # 50 MB declared, none sent: a server that raised the upload limit first would wait for it.
                raw.sendall(("PUT /v1/models/efficientnet_lite0/versions/v2 HTTP/1.1\r\nHost: x\r\n"
                             f"{authorization}Content-Length: 50000000\r\n\r\n").encode())
                head = raw.recv(65536).decode("latin-1")
            assert head.startswith("HTTP/1.1 401"), head
            assert "invalid_api_key" in head or "missing_api_key" in head


def test_every_operation_documents_a_malformed_request() -> None:
    for path, item in openapi_document([(route_template(p), h) for p, h in ROUTES]).get("paths", {}).items():
        for method, operation in item.items():
            assert "400" in operation["responses"], f"{method.upper()} {path}"


def test_an_admin_upload_gets_the_upload_timeout_not_the_body_timeout(serve, tmp_path: Path) -> None:
    config = make_config(http={"body_timeout_seconds": 0.3}, models={"store_dir": str(tmp_path)},
                         auth={"admin_api_keys": [api_key_hash("admin-key-0123456789")]})
    with serve(config) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for key, status in (("admin-key-0123456789", "400"), (None, None)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                authorization = f"Authorization: ApiKey {key}\r\n" if key else ""
                raw.sendall(("PUT /v1/models/efficientnet_lite0/versions/slow HTTP/1.1\r\nHost: x\r\n"
                             f"{authorization}X-Content-SHA256: {'0' * 64}\r\nContent-Length: 2048\r\n\r\n").encode()
                            + b"x" * 1024)
                time.sleep(1.0)  # over the body timeout, well within the upload timeout
                with contextlib.suppress(OSError):
                    raw.sendall(b"x" * 1024)
                head = raw.recv(65536).decode("latin-1")
            if status:  # the whole body arrived: the upload is judged (a wrong checksum here)
                assert head.startswith(f"HTTP/1.1 {status}") and "checksum_mismatch" in head, head
            else:  # without the key the body timeout holds: cut off
                assert head == "", head
