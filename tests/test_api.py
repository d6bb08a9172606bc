"""The HTTP API end to end: real app, real Redis, real model."""

from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import (
    CAT_CLASSES,
    CAT_JPEG,
    COFFEE_CLASSES,
    COFFEE_JPEG,
    TEST_SECRET,
    error_code,
    login,
    make_config,
)


def predict(client: httpx.Client, headers: dict[str, str], image: bytes = CAT_JPEG, **params: object) -> httpx.Response:
    return client.post("/v1/predict", headers={**headers, "Content-Type": "image/jpeg"}, content=image,
                       params=params)


def test_cat_and_coffee_are_classified(client: httpx.Client) -> None:
    auth = login(client)
    cat = client.post("/v1/predict", headers=auth, files={"image": ("cat.jpg", CAT_JPEG, "image/jpeg")})
    assert cat.status_code == 200, cat.text
    body = cat.json()
    assert {item["class_index"] for item in body["top_k"][:3]} & CAT_CLASSES
    assert body["predicted_class"] == body["top_k"][0]["class_index"]
    assert body["label"] == body["top_k"][0]["label"]
    assert len(body["top_k"]) == 5
    assert body["model"]["name"] == "efficientnet_lite0" and body["model"]["version"]
    assert set(body["timing_ms"]) >= {"preprocess", "inference"}
    coffee = predict(client, auth, COFFEE_JPEG)
    assert coffee.json()["top_k"][0]["class_index"] in COFFEE_CLASSES


def test_login_session_and_logout(client: httpx.Client) -> None:
    response = client.post("/v1/sessions", json={"options": {"top_k": 3}})
    assert response.status_code == 201
    login_body = response.json()
    assert set(login_body) == {"token", "session_id", "expires_at", "options"}
    assert login_body["options"]["top_k"] == 3
    auth = {"Authorization": f"Bearer {login_body['token']}"}
    predict(client, auth)
    session = client.get("/v1/session", headers=auth).json()
    assert session["session_id"] == login_body["session_id"]
    assert session["predictions"] == 1 and session["options"]["top_k"] == 3
    assert client.delete("/v1/session", headers=auth).status_code == 204
    after = client.get("/v1/session", headers=auth)
    assert after.status_code == 401 and error_code(after) == "session_revoked"
    assert error_code(predict(client, auth)) == "session_revoked"


def test_login_without_body_uses_defaults(client: httpx.Client) -> None:
    body = client.post("/v1/sessions").json()
    assert body["options"] == {"resize": 256, "crop": 224, "interpolation": "bilinear", "color": "rgb",
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "top_k": 5}


def test_patch_options_merges_and_validates(client: httpx.Client) -> None:
    auth = login(client)
    merged = client.patch("/v1/session/options", headers=auth, json={"top_k": 2, "interpolation": "bicubic"})
    assert merged.status_code == 200
    assert merged.json()["options"]["top_k"] == 2 and merged.json()["options"]["interpolation"] == "bicubic"
    assert merged.json()["options"]["resize"] == 256
    assert client.get("/v1/session/options", headers=auth).json() == merged.json()
    for bad, field in [({"top_k": 0}, "top_k"), ({"crop": 300}, "crop"), ({"colour": "rgb"}, "colour"),
                       ({"mean": [1, 2]}, "mean"), ({"std": [0, 1, 1]}, "std"), ({"resize": "big"}, "resize"),
                       ({"interpolation": "lanczos"}, "interpolation")]:
        response = client.patch("/v1/session/options", headers=auth, json=bad)
        assert response.status_code == 422, bad
        assert error_code(response) == "invalid_options" and field in response.json()["error"]["message"]
    assert client.get("/v1/session/options", headers=auth).json() == merged.json()  # nothing half-applied


def test_bad_json_bodies(client: httpx.Client) -> None:
    auth = login(client)
    cases = [
        (b"{not json", "application/json", 400, "malformed_json"),
        (b"[1, 2]", "application/json", 400, "invalid_json_type"),
        (b"", "application/json", 400, "missing_body"),
        (b'{"top_k": 1}', "text/plain", 415, "unsupported_media_type"),
    ]
    for body, content_type, status, code in cases:
        response = client.patch("/v1/session/options", headers={**auth, "Content-Type": content_type}, content=body)
        assert (response.status_code, error_code(response)) == (status, code), body
    bad_login = client.post("/v1/sessions", json={"options": {"top_k": 99}})
    assert bad_login.status_code == 422


def test_each_option_changes_the_prediction(client: httpx.Client) -> None:
    auth = login(client)
    base = predict(client, auth).json()
    assert len(predict(client, auth, top_k=2).json()["top_k"]) == 2

    def scores(**params: object) -> list[float]:
        return [item["score"] for item in predict(client, auth, **params).json()["top_k"]]

    reference = [item["score"] for item in base["top_k"]]
    for params in [{"resize": 224}, {"crop": 160}, {"interpolation": "nearest"}, {"color": "grayscale"},
                   {"mean": "0.5,0.5,0.5"}, {"std": "0.5,0.5,0.5"}]:
        changed = scores(**params)
        assert not np.allclose(changed, reference, atol=1e-4), params
    # Per-request overrides do not change the session.
    assert client.get("/v1/session/options", headers=auth).json()["options"]["top_k"] == 5
    # Session options apply without query parameters.
    client.patch("/v1/session/options", headers=auth, json={"color": "grayscale", "top_k": 3})
    gray = predict(client, auth).json()
    assert gray["options"]["color"] == "grayscale" and len(gray["top_k"]) == 3


def test_bad_query_overrides(client: httpx.Client) -> None:
    auth = login(client)
    for params in [{"top_k": "many"}, {"top_k": "50"}, {"mean": "1,2"}, {"color": "sepia"}, {"bogus": "1"}]:
        response = predict(client, auth, **params)
        assert response.status_code == 422 and error_code(response) == "invalid_options", params


def test_history_pages_newest_first(client: httpx.Client) -> None:
    auth = login(client)
    ids = [predict(client, auth, image, top_k=1).json()["id"] for image in [CAT_JPEG, COFFEE_JPEG, CAT_JPEG]]
    first = client.get("/v1/history", headers=auth, params={"limit": 2}).json()
    assert [item["id"] for item in first["items"]] == ids[::-1][:2]
    assert "timing_ms" not in first["items"][0]
    second = client.get("/v1/history", headers=auth, params={"limit": 2, "before": first["next"]}).json()
    assert [item["id"] for item in second["items"]] == [ids[0]] and second["next"] is None
    everything = client.get("/v1/history", headers=auth).json()
    assert len(everything["items"]) == 3 and everything["next"] is None
    item = client.get(f"/v1/history/{ids[1]}", headers=auth).json()
    assert item["id"] == ids[1] and item["top_k"][0]["class_index"] in COFFEE_CLASSES
    assert item == everything["items"][1]
    missing = client.get("/v1/history/1-0", headers=auth)
    assert missing.status_code == 404 and error_code(missing) == "history_item_not_found"
    assert client.get("/v1/history/not-an-id", headers=auth).status_code == 404
    for params in [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": "yesterday"}]:
        response = client.get("/v1/history", headers=auth, params=params)
        assert response.status_code == 400 and error_code(response) == "invalid_parameter", params


def test_sessions_are_isolated(client: httpx.Client) -> None:
    alice, bob = login(client), login(client)
    item_id = predict(client, alice).json()["id"]
    client.patch("/v1/session/options", headers=bob, json={"top_k": 1})
    assert client.get("/v1/history", headers=bob).json()["items"] == []
    assert client.get(f"/v1/history/{item_id}", headers=bob).status_code == 404
    assert client.get("/v1/session/options", headers=alice).json()["options"]["top_k"] == 5


def test_history_is_capped(serve) -> None:
    with serve(make_config(history={"max_entries": 3})) as server, server.client() as client:
        auth = login(client, top_k=1)
        ids = [predict(client, auth).json()["id"] for _ in range(5)]
        items = client.get("/v1/history", headers=auth).json()["items"]
        assert [item["id"] for item in items] == ids[::-1][:3]
        assert client.get("/v1/session", headers=auth).json()["predictions"] == 5


def test_concurrent_predicts_on_one_session_are_all_recorded(client: httpx.Client) -> None:
    auth = login(client, top_k=1)
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: predict(client, auth), range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    items = client.get("/v1/history", headers=auth, params={"limit": 100}).json()["items"]
    assert sorted(item["id"] for item in items) == sorted(r.json()["id"] for r in responses)
    assert client.get("/v1/session", headers=auth).json()["predictions"] == 16


def test_concurrent_option_updates_all_land(client: httpx.Client) -> None:
    auth = login(client)
    changes = [{"top_k": 7}, {"resize": 300}, {"color": "grayscale"}, {"interpolation": "nearest"},
               {"mean": [0.5, 0.5, 0.5]}, {"std": [0.25, 0.25, 0.25]}]
    with ThreadPoolExecutor(6) as pool:
        assert all(r.status_code == 200 for r in pool.map(
            lambda c: client.patch("/v1/session/options", headers=auth, json=c), changes))
    options = client.get("/v1/session/options", headers=auth).json()["options"]
    assert options == {"resize": 300, "crop": 224, "interpolation": "nearest", "color": "grayscale",
                       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "top_k": 7}


@pytest.mark.parametrize("header, code", [
    (None, "missing_token"),
    ("Basic abc", "malformed_token"),
    ("Bearer", "malformed_token"),
    ("Bearer not-a-token", "malformed_token"),
    ("Bearer ImFiYyI.awbthg.AAAAAAAAAAAAAAAAAAAAAAAAAAA", "invalid_signature"),
])
def test_bad_tokens_get_401(client: httpx.Client, header: str | None, code: str) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = client.get("/v1/session", headers=headers)
    assert response.status_code == 401 and error_code(response) == code


def test_tampered_and_foreign_tokens(client: httpx.Client, serve) -> None:
    token = client.post("/v1/sessions").json()["token"]
    payload, stamp, signature = token.split(".")
    tampered = f"{payload}.{stamp}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    response = client.get("/v1/session", headers={"Authorization": f"Bearer {tampered}"})
    assert error_code(response) == "invalid_signature"
    other = make_config(auth={"secret_keys": ["another-server-secret-xyz"]})
    with serve(other) as foreign, foreign.client() as foreign_client:
        foreign_token = foreign_client.post("/v1/sessions").json()["token"]
    response = client.get("/v1/session", headers={"Authorization": f"Bearer {foreign_token}"})
    assert response.status_code == 401 and error_code(response) == "invalid_signature"


def test_token_for_a_session_redis_no_longer_has(client: httpx.Client, server) -> None:
    body = client.post("/v1/sessions").json()
    redis.Redis.from_url(server.config.redis.url).delete(f"sess:{{{body['session_id']}}}")
    response = client.get("/v1/session", headers={"Authorization": f"Bearer {body['token']}"})
    assert response.status_code == 401 and error_code(response) == "session_not_found"


def test_key_rotation(serve) -> None:
    old_key, new_key = "old-secret-key-aaaaaaaa", "new-secret-key-bbbbbbbb"
    with serve(make_config(auth={"secret_keys": [old_key]})) as before, before.client() as client:
        old_auth = login(client)
    rotated = make_config(auth={"secret_keys": [new_key, old_key]})
    with serve(rotated) as after, after.client() as client:
        assert client.get("/v1/session", headers=old_auth).status_code == 200  # old tokens still verify
        new_token = client.post("/v1/sessions").json()["token"]
    with serve(make_config(auth={"secret_keys": [new_key]})) as retired, retired.client() as client:
        assert client.get("/v1/session", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200
        response = client.get("/v1/session", headers=old_auth)  # old key retired: old tokens stop
        assert error_code(response) == "invalid_signature"


def test_sessions_expire_when_idle_and_use_slides_expiry(serve) -> None:
    with serve(make_config(sessions={"ttl_seconds": 2, "max_lifetime_seconds": 60})) as server, \
            server.client() as client:
        idle, active = login(client), login(client)
        for _ in range(4):
            time.sleep(0.7)
            assert client.get("/v1/session", headers=active).status_code == 200
        time.sleep(0.3)
        response = client.get("/v1/session", headers=idle)
        assert response.status_code == 401 and error_code(response) == "session_not_found"


def test_sessions_never_outlive_their_max_lifetime(serve) -> None:
    with serve(make_config(sessions={"ttl_seconds": 2, "max_lifetime_seconds": 2})) as server, \
            server.client() as client:
        auth = login(client)
        for _ in range(3):
            time.sleep(0.5)
            client.get("/v1/session", headers=auth)
        time.sleep(1.5)
        response = client.get("/v1/session", headers=auth)
        assert response.status_code == 401 and error_code(response) in {"token_expired", "session_not_found"}


def test_api_keys_gate_login(serve) -> None:
    from service.auth import api_key_hash

    config = make_config(auth={"secret_keys": [TEST_SECRET], "api_keys": [api_key_hash("s3cret-key")]})
    with serve(config) as server, server.client() as client:
        assert error_code(client.post("/v1/sessions")) == "missing_api_key"
        wrong = client.post("/v1/sessions", headers={"Authorization": "ApiKey nope"})
        assert wrong.status_code == 401 and error_code(wrong) == "invalid_api_key"
        assert client.post("/v1/sessions", headers={"Authorization": "ApiKey s3cret-key"}).status_code == 201


def test_upload_errors(client: httpx.Client) -> None:
    auth = login(client)
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "PNG")
    png = buffer.getvalue()
    cases = [
        ({"Content-Type": "image/jpeg"}, b"", 422, "empty_image"),
        ({"Content-Type": "image/jpeg"}, b"this is not an image", 422, "invalid_image"),
        ({"Content-Type": "image/jpeg"}, CAT_JPEG[: len(CAT_JPEG) // 3], 422, "invalid_image"),
        ({"Content-Type": "text/plain"}, png, 415, "unsupported_media_type"),
        ({}, png, 415, "unsupported_media_type"),
        ({"Content-Type": "multipart/form-data; boundary=xyz"}, b"--xyz\r\nbroken", 400, "malformed_multipart"),
        ({"Content-Type": "multipart/form-data"}, b"whatever", 400, "malformed_multipart"),
    ]
    for headers, body, status, code in cases:
        response = client.post("/v1/predict", headers={**auth, **headers}, content=body)
        assert (response.status_code, error_code(response)) == (status, code), (headers, body[:20])
    no_field = client.post("/v1/predict", headers=auth, files={"picture": ("a.png", png, "image/png")})
    assert no_field.status_code == 400 and error_code(no_field) == "missing_image"
    two = client.post("/v1/predict", headers=auth,
                      files=[("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))])
    assert two.status_code == 400 and error_code(two) == "too_many_images"
    assert client.get("/v1/session", headers=auth).json()["predictions"] == 0  # nothing recorded


def test_oversized_body_is_refused_with_413(serve) -> None:
    with serve(make_config(http={"max_body_bytes": 100_000})) as server, server.client() as client:
        auth = login(client)
        response = client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"},
                               content=b"\xff" * 400_000)
        assert response.status_code == 413 and error_code(response) == "payload_too_large"
        assert predict(client, auth).status_code == 200  # the server is unharmed
        # A huge declared length is refused before the body is sent (curl sends Expect: 100-continue).
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                        b"Content-Length: 5000000000\r\nExpect: 100-continue\r\n"
                        + f"Authorization: {auth['Authorization']}\r\n\r\n".encode())
            head = raw.recv(65536).decode()
        assert head.startswith("HTTP/1.1 413") and "payload_too_large" in head


def test_refusals_of_uploads_are_readable_answers_not_resets(client: httpx.Client) -> None:
    big_body = CAT_JPEG * 20  # ~700 KB: the server refuses before reading; it must still answer cleanly
    response = client.post("/v1/predict", headers={"Content-Type": "image/jpeg"}, content=big_body)
    assert response.status_code == 401 and error_code(response) == "missing_token"
    forged = client.post("/v1/predict", headers={"Content-Type": "image/jpeg", "Authorization": "Bearer a.b.c"},
                         content=big_body)
    assert forged.status_code == 401 and error_code(forged) == "invalid_signature"


def test_plain_predict(client: httpx.Client) -> None:
    response = client.post("/predict", files={"image": ("cat.jpg", CAT_JPEG, "image/jpeg")})
    assert response.status_code == 200
    assert response.json().keys() == {"predicted_class"} and response.json()["predicted_class"] in CAT_CLASSES


def test_plain_predict_can_be_turned_off(serve) -> None:
    with serve(make_config(http={"legacy_predict": False})) as server, server.client() as client:
        response = client.post("/predict", files={"image": ("cat.jpg", CAT_JPEG * 20, "image/jpeg")})
        assert response.status_code == 404 and error_code(response) == "not_found"
        assert "/predict" not in client.get("/openapi.json").json()["paths"]


def test_unknown_routes_and_methods_are_json(client: httpx.Client) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    wrong = client.put("/healthz")
    assert wrong.status_code == 405 and error_code(wrong) == "method_not_allowed"
    assert client.get("/v1/predict", headers=login(client)).status_code == 405


def test_request_ids(client: httpx.Client) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    generated = client.get("/nope").headers["X-Request-ID"]
    assert len(generated) == 32 and generated != client.get("/nope").headers["X-Request-ID"]


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "checks": {"model": "ok", "store": "ok"}}


def test_readiness_fails_without_redis(serve) -> None:
    config = make_config("redis://127.0.0.1:1/0", redis={"connect_timeout_seconds": 0.5})
    with serve(config) as server, server.client() as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["checks"]["store"] != "ok"
        login_response = client.post("/v1/sessions")
        assert login_response.status_code == 503 and error_code(login_response) == "store_unavailable"
        assert login_response.headers["Retry-After"]


class SlowBackend:
    """Wraps a backend and holds every forward until released."""

    name, precision = "slow", "fp32"

    def __init__(self, inner) -> None:
        self.inner, self.release, self.started = inner, threading.Event(), threading.Event()

    def forward(self, batch, alone=False):
        self.started.set()
        self.release.wait(30)
        return self.inner.forward(batch, alone=alone)


def test_ioloop_stays_responsive_while_inference_is_busy(serve, default_model) -> None:
    from inference.runner import ServedModel
    from server.runtime import build_runner, serve_loaded

    config = make_config()
    runner, configured = build_runner(config), serve_loaded(config, default_model)
    slow = SlowBackend(configured.backend)
    with serve(config, runner=runner, served=ServedModel(configured.model, slow)) as server, \
            server.client() as client:
        auth = login(client)
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(predict, client, auth) for _ in range(2)]
            assert slow.started.wait(10)
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/session", headers=auth).status_code == 200
            assert time.perf_counter() - started < 0.5
            assert not any(f.done() for f in pending)
            slow.release.set()
            assert [f.result().status_code for f in pending] == [200, 200]
    runner.close()


def test_full_queue_gives_fast_503(serve, default_model) -> None:
    from inference.runner import ServedModel
    from server.runtime import build_runner, serve_loaded

    config = make_config(model={"max_queue": 1, "workers": 1})
    runner, configured = build_runner(config), serve_loaded(config, default_model)
    slow = SlowBackend(configured.backend)
    with serve(config, runner=runner, served=ServedModel(configured.model, slow)) as server, \
            server.client() as client:
        auth = login(client)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(predict, client, auth)
            assert slow.started.wait(10)
            busy = predict(client, auth)
            assert busy.status_code == 503 and error_code(busy) == "server_busy"
            assert busy.headers["Retry-After"] == "1"
            slow.release.set()
            assert first.result().status_code == 200
    runner.close()


class FailingBackend:
    name, precision = "failing", "fp32"

    def forward(self, batch, alone=False):
        raise RuntimeError("boom inside forward")


def test_failing_model_gives_500_inference_failed(serve, default_model) -> None:
    from inference.runner import ServedModel
    from server.runtime import build_runner, serve_loaded

    config = make_config()
    runner, configured = build_runner(config), serve_loaded(config, default_model)
    with serve(config, runner=runner, served=ServedModel(configured.model, FailingBackend())) as server, \
            server.client() as client:
        auth = login(client)
        response = predict(client, auth)
        assert response.status_code == 500 and error_code(response) == "inference_failed"
        assert "boom" not in response.text and "Traceback" not in response.text
        server.versions.loaded.activate(configured)  # the healthy backend
        assert predict(client, auth).status_code == 200
        assert client.get("/v1/session", headers=auth).json()["predictions"] == 1
    runner.close()


def test_idempotency_key_makes_retries_exactly_once(client: httpx.Client) -> None:
    auth = login(client)
    keyed = {**auth, "Idempotency-Key": "retry-me-123"}
    first = predict(client, keyed)
    again = predict(client, keyed, COFFEE_JPEG)  # a retry: same key, whatever the body
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"] and again.json()["top_k"] == first.json()["top_k"]
    assert client.get("/v1/session", headers=auth).json()["predictions"] == 1
    assert predict(client, {**auth, "Idempotency-Key": "another"}).json()["id"] != first.json()["id"]
    bad = predict(client, {**auth, "Idempotency-Key": "no spaces allowed"})
    assert bad.status_code == 400 and error_code(bad) == "invalid_idempotency_key"


def test_rate_limit_gives_429_with_retry_after(serve) -> None:
    with serve(make_config(sessions={"rate_limit_per_minute": 2})) as server, server.client() as client:
        auth = login(client, top_k=1)
        assert [predict(client, auth).status_code for _ in range(2)] == [200, 200]
        limited = predict(client, auth)
        assert limited.status_code == 429 and error_code(limited) == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert client.get("/v1/history", headers=auth).status_code == 200  # reads are not limited
        assert predict(client, login(client)).status_code == 200  # other sessions are not affected
