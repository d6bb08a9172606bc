"""Canaries by session and the training loop across replicas, end to end on real servers and Redis.

The canary version is the default model's weights with one class's bias raised far above the rest
(tests.test_weights.boosted_weights), so a prediction's class says which weights produced it. The
servers run the torch runtime to keep publishing short.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.auth import api_key_hash
from sessions.store import CANARY_SLOTS_KEY
from tests.conftest import CAT_CLASSES, CAT_JPEG, RedisServer, error_code, login, wait_for
from tests.test_feedback import png_bytes
from tests.test_replicas import server_process
from tests.test_weights import ADMIN, ADMIN_KEY, MODEL, boosted_weights, make_pinnable, put_version, weights_config

CANARY_DB = 8
COCK = 7  # the class the canary's weights always answer


def activate(http: httpx.Client, version: str, body: Any = None) -> httpx.Response:
    return http.post(f"/v1/models/{MODEL}/versions/{version}:activate", headers=ADMIN,
                     json=body if body is not None else None)


def predict(http: httpx.Client, auth: dict[str, str], image: bytes = CAT_JPEG) -> dict[str, Any]:
    response = http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=image)
    assert response.status_code == 200, response.text
    return response.json()


def listing(http: httpx.Client) -> dict[str, Any]:
    return http.get("/v1/models", headers=ADMIN).json()["models"][0]


def listed(http: httpx.Client, version: str) -> dict[str, Any]:
    return next(entry for entry in listing(http)["versions"] if entry["version"] == version)


def feedback(http: httpx.Client, auth: dict[str, str], item: dict[str, Any], label: int) -> None:
    given = http.put(f"/v1/history/{item['id']}/feedback", headers=auth, json={"label": label})
    assert given.status_code == 200, given.text


@pytest.fixture(scope="module")
def cock(default_model) -> bytes:
    return boosted_weights(default_model, COCK)


@pytest.fixture(scope="module")
def canary_server(serve, redis_server, tmp_path_factory) -> Iterator[Any]:
    redis.Redis(port=redis_server.port, db=CANARY_DB).flushdb()
    with serve(weights_config(redis_server.url, tmp_path_factory.mktemp("model-store"), db=CANARY_DB)) as running:
        yield running


def test_a_canary_serves_its_share_of_sessions_each_on_one_version_until_it_ends(canary_server, redis_server, cock,
                                                                                 default_model) -> None:
    version = f"canary-{uuid.uuid4().hex[:8]}"
    configured = default_model.version
    with canary_server.client() as http:
        assert put_version(http, version, cock).status_code == 201
        for body in ({"traffic_percent": 0}, {"traffic_percent": 101}, {"traffic_percent": "20"}, {"share": 20}):
            refused = activate(http, version, body)
            assert refused.status_code == 422 and error_code(refused) == "invalid_traffic_percent", body
        assert error_code(activate(http, configured, {"traffic_percent": 50})) == "version_active"  # it serves all
        session_token = login(http)
        assert http.post(f"/v1/models/{MODEL}/versions/{version}:activate", headers=session_token,
                         json={"traffic_percent": 20}).status_code == 401

        started = activate(http, version, {"traffic_percent": 20})
        assert started.status_code == 200, started.text
        assert started.json() == {**started.json(), "name": MODEL, "version": version, "traffic_percent": 20,
                                  "baseline": configured}
        model = listing(http)
        assert model["active_version"] is None and model["serving_version"] == configured
        assert model["canary"] == {key: started.json()[key] for key in ("version", "traffic_percent", "baseline",
                                                                        "started_at")}
        removing = http.delete(f"/v1/models/{MODEL}/versions/{version}", headers=ADMIN)
        assert removing.status_code == 409 and error_code(removing) == "version_active"

        served: dict[str, set[str]] = {}
        sessions: dict[str, dict[str, str]] = {}
        numbers: dict[str, int] = {}  # each session's place in the store's count of sessions
        store = redis.Redis(port=redis_server.port, db=CANARY_DB, decode_responses=True)
        first = int(store.get(CANARY_SLOTS_KEY) or 0) + 1  # what the next login draws
        for number in range(first, first + 100):
            auth = login(http)
            for _ in range(2):
                result = predict(http, auth)
                assert (result["predicted_class"] == COCK) == (result["model"]["version"] == version)
                served.setdefault(auth["Authorization"], set()).add(result["model"]["version"])
            sessions[auth["Authorization"]] = auth
            numbers[auth["Authorization"]] = number
        assert int(store.get(CANARY_SLOTS_KEY)) == first + 99  # the 100 logins drew 100 consecutive numbers
        assert all(len(versions) == 1 for versions in served.values())  # each session kept its version
        on_canary = {token for token, versions in served.items() if versions == {version}}
        # The slot scheme (docs/model-versions.md), worked out here rather than by the server's code: the
        # n-th session's slot is n * 37 mod 100, shifted by the version's hash; the canary takes it below
        # 20. So exactly 20 of any 100 consecutive sessions, and which 20 is known; a hash of random ids
        # would give 20 only on average, and other sessions.
        shift = int.from_bytes(hashlib.sha256(version.encode()).digest()[:8], "big") % 100
        assert on_canary == {token for token, number in numbers.items() if (number * 37 + shift) % 100 < 20}
        assert len(on_canary) == 20
        canary_auth = sessions[min(on_canary)]
        history = http.get("/v1/history", headers=canary_auth).json()["items"]
        assert {item["model"]["version"] for item in history} == {version}  # its history shows which

        # A pinned version wins over the canary.
        assert http.patch("/v1/session/options", headers=canary_auth,
                          json={"model_version": configured}).status_code == 200
        assert predict(http, canary_auth)["model"]["version"] == configured
        assert http.patch("/v1/session/options", headers=canary_auth, json={"model_version": None}).status_code == 200
        assert predict(http, canary_auth)["model"]["version"] == version
        # Anonymous requests run the baseline.
        assert http.post("/predict", files={"image": ("c.jpg", CAT_JPEG, "image/jpeg")}).json()[
            "predicted_class"] in CAT_CLASSES

        ended = activate(http, configured)  # the configured weights at 100%: the split ends
        assert ended.status_code == 200 and ended.json()["configured"] is True
        assert listing(http)["canary"] is None
        assert predict(http, canary_auth)["model"]["version"] == configured
        assert http.delete(f"/v1/models/{MODEL}/versions/{version}", headers=ADMIN).status_code == 204


def test_only_the_active_version_the_canary_or_one_an_admin_marked_may_be_pinned(canary_server, cock,
                                                                                 default_model) -> None:
    version = f"unpinned-{uuid.uuid4().hex[:8]}"
    with canary_server.client() as http:
        assert put_version(http, version, cock).status_code == 201  # published, never activated
        refused = http.post("/v1/sessions", json={"options": {"model_version": version}})
        assert refused.status_code == 403 and error_code(refused) == "model_version_not_pinnable"
        auth = login(http)
        refused = http.patch("/v1/session/options", headers=auth, json={"model_version": version})
        assert refused.status_code == 403 and error_code(refused) == "model_version_not_pinnable"
        refused = http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG,
                            params={"model_version": version})  # nor for one request
        assert refused.status_code == 403 and error_code(refused) == "model_version_not_pinnable"
        assert http.get("/v1/history", headers=auth).json()["items"] == []
        unknown = http.patch("/v1/session/options", headers=auth, json={"model_version": "no-such-version"})
        assert unknown.status_code == 422 and error_code(unknown) == "invalid_options"
        assert listed(http, version)["pinnable"] is False

        # Only an admin marks a version pinnable, and only one that exists.
        path = f"/v1/models/{MODEL}/versions/{version}/pinnable"
        assert http.put(path, headers=auth).status_code == 401
        assert http.put(path).status_code == 401
        missing = make_pinnable(http, "no-such-version")
        assert missing.status_code == 404 and error_code(missing) == "model_version_not_found"
        other_model = http.put(f"/v1/models/resnet50/versions/{version}/pinnable", headers=ADMIN)
        assert other_model.status_code == 404 and error_code(other_model) == "model_not_found"
        marked = make_pinnable(http, version)
        assert marked.status_code == 200 and marked.json() == {"name": MODEL, "version": version, "pinnable": True}
        assert make_pinnable(http, version).status_code == 200  # again: the same
        assert listed(http, version)["pinnable"] is True
        assert http.patch("/v1/session/options", headers=auth, json={"model_version": version}).status_code == 200
        assert predict(http, auth)["model"]["version"] == version
        pinned_at_login = login(http, model_version=version)
        assert predict(http, pinned_at_login)["predicted_class"] == COCK

        # Unmarked: its pinned sessions are refused at their next use, until they unpin.
        unmarked = make_pinnable(http, version, pinnable=False)
        assert unmarked.status_code == 200 and unmarked.json()["pinnable"] is False
        assert listed(http, version)["pinnable"] is False
        for session in (auth, pinned_at_login):
            refused = http.post("/v1/predict", headers={**session, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
            assert refused.status_code == 403 and error_code(refused) == "model_version_not_pinnable"
            assert "model_version" in refused.json()["error"]["message"]
        assert http.patch("/v1/session/options", headers=auth, json={"model_version": None}).status_code == 200
        assert predict(http, auth)["model"]["version"] == default_model.version

        # A pin to the active version lasts as long as it is active (or marked): another activation ends it.
        on_configured = login(http, model_version=default_model.version)
        assert activate(http, version).status_code == 200
        refused = http.post("/v1/predict", headers={**on_configured, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert refused.status_code == 403 and error_code(refused) == "model_version_not_pinnable"
        assert activate(http, default_model.version).status_code == 200  # rolled back: active, so pinnable again
        assert predict(http, on_configured)["model"]["version"] == default_model.version

        # Removing a version takes its mark with it: published again under the name, it is not pinnable.
        assert make_pinnable(http, version).status_code == 200
        assert http.delete(f"/v1/models/{MODEL}/versions/{version}", headers=ADMIN).status_code == 204
        gone = http.post("/v1/predict", headers={**pinned_at_login, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert gone.status_code == 409 and error_code(gone) == "model_version_removed"
        assert put_version(http, version, cock).status_code == 201
        assert listed(http, version)["pinnable"] is False
        refused = http.post("/v1/predict", headers={**pinned_at_login, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert refused.status_code == 403 and error_code(refused) == "model_version_not_pinnable"
        assert http.delete(f"/v1/models/{MODEL}/versions/{version}", headers=ADMIN).status_code == 204


def test_a_pinned_sessions_feedback_does_not_move_the_agreement_of_the_sessions_a_canary_was_assigned(
        canary_server, cock, default_model) -> None:
    version = f"voted-{uuid.uuid4().hex[:8]}"
    configured = default_model.version
    with canary_server.client() as http:
        assert put_version(http, version, cock).status_code == 201
        assert activate(http, version, {"traffic_percent": 50}).status_code == 200
        for _ in range(10):  # at 50%, one of any three consecutive new sessions is the canary's
            assigned = login(http)
            if predict(http, assigned)["model"]["version"] == version:
                break
        else:
            pytest.fail("no session was assigned to the canary")
        agreed, disagreed = predict(http, assigned), predict(http, assigned)
        feedback(http, assigned, agreed, COCK)
        feedback(http, assigned, disagreed, 281)
        quality = {"count": 2, "agreement": 0.5}
        assert listed(http, version)["feedback"] == quality
        baseline = listing(http)["configured"]["feedback"]

        # A session pins the canary (allowed: it serves a canary) and agrees with every prediction; another
        # asks for it on one request. Their votes are counted apart: the assigned agreement does not move.
        pinned = login(http, model_version=version)
        votes = [predict(http, pinned) for _ in range(3)]
        for item in votes:
            feedback(http, pinned, item, COCK)
        unpinned = login(http)
        asked = http.post("/v1/predict", headers={**unpinned, "Content-Type": "image/jpeg"}, content=CAT_JPEG,
                          params={"model_version": version})
        assert asked.status_code == 200 and asked.json()["model"]["version"] == version
        feedback(http, unpinned, asked.json(), COCK)
        entry = listed(http, version)
        assert entry["feedback"] == quality
        assert entry["pinned_feedback"] == {"count": 4, "agreement": 1.0}
        assert listing(http)["configured"]["feedback"] == baseline
        # Replacing or withdrawing feedback moves its own counter only.
        feedback(http, pinned, votes[0], 281)
        assert http.delete(f"/v1/history/{votes[1]['id']}/feedback", headers=pinned).status_code == 204
        feedback(http, assigned, disagreed, COCK)
        entry = listed(http, version)
        assert entry["feedback"] == {"count": 2, "agreement": 1.0}
        assert entry["pinned_feedback"] == {"count": 3, "agreement": round(2 / 3, 4)}

        assert activate(http, configured).status_code == 200  # ends the canary
        assert http.delete(f"/v1/models/{MODEL}/versions/{version}", headers=ADMIN).status_code == 204


def test_two_replicas_agree_on_feedback_images_export_canary_and_erase(tmp_path: Path, cock, default_model) -> None:
    store = RedisServer(tmp_path / "redis").start()
    shared = {"INFERENCE_REDIS_URL": store.url, "INFERENCE_AUTH_SECRET_KEYS": "replica-secret-0123456789",
              "INFERENCE_AUTH_ADMIN_API_KEYS": api_key_hash(ADMIN_KEY), "INFERENCE_MODEL_RUNTIME": "torch",
              "INFERENCE_MODELS_STORE_DIR": str(tmp_path / "shared-models"),
              "INFERENCE_CAPTURE_ENABLED": "true", "INFERENCE_CAPTURE_MIN_FREE_DISK_BYTES": "0",
              "INFERENCE_CAPTURE_STORE_DIR": str(tmp_path / "shared-captures")}
    version = "replicated-canary"
    try:
        with server_process(tmp_path / "a", **shared) as (url_a, _), server_process(tmp_path / "b", **shared) as (
                url_b, _), httpx.Client(base_url=url_a, timeout=60) as a, httpx.Client(base_url=url_b, timeout=60) as b:
            # Feedback and the image: given on one replica, read on the other.
            auth, image = login(a), png_bytes((200, 100, 50))
            item = predict(b, auth, image)
            assert a.get(f"/v1/history/{item['id']}/image", headers=auth).content == image
            given = b.put(f"/v1/history/{item['id']}/feedback", headers=auth, json={"label": "tiger cat"})
            assert given.status_code == 200
            assert a.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"] == given.json()["feedback"]
            assert listing(a)["configured"]["feedback"] == listing(b)["configured"]["feedback"] == {
                "count": 1, "agreement": 1.0 if item["predicted_class"] == 282 else 0.0}
            exports = [http.get("/v1/feedback/export", headers=ADMIN).content for http in (a, b)]
            assert exports[0] == exports[1]
            with tarfile.open(fileobj=io.BytesIO(exports[0]), mode="r|") as archive:
                members = {member.name.partition(".")[2]: archive.extractfile(member).read()  # type: ignore[union-attr]
                           for member in archive}
            assert members["png"] == image and json.loads(members["json"])["feedback"]["class_index"] == 282

            # A canary started on one replica splits the sessions of the other the same way.
            assert put_version(a, version, cock).status_code == 201
            assert activate(a, version, {"traffic_percent": 50}).status_code == 200
            assert wait_for(lambda: listing(b)["canary"] is not None, timeout=5, interval=0.05)
            tokens = [login(a) for _ in range(12)]

            def versions_on(http: httpx.Client) -> list[str]:
                return [predict(http, token)["model"]["version"] for token in tokens]

            assert wait_for(lambda: versions_on(b) == versions_on(a), timeout=10, interval=0.2)
            split = versions_on(b)
            assert set(split) == {version, default_model.version}, split  # 12 sessions at 50%: both sides
            assert activate(b, default_model.version).status_code == 200  # ended on the other replica
            assert wait_for(lambda: listing(a)["canary"] is None, timeout=5, interval=0.05)
            assert wait_for(lambda: set(versions_on(a)) == {default_model.version}, timeout=5, interval=0.2)

            # Erase on one replica: gone from the export and the shared captures, on both.
            assert a.delete("/v1/session", headers=auth, params={"erase": "true"}).status_code == 204
            for http in (a, b):
                assert http.get("/v1/feedback/export", headers=ADMIN, params={"format": "jsonl"}).text == ""
            captured = [path.read_bytes() for path in (tmp_path / "shared-captures").rglob("*") if path.is_file()]
            assert image not in captured and CAT_JPEG in captured  # the cat stays for the canary's sessions
    finally:
        store.stop()
