"""Weights from training: publish (checked), activate (atomic swap, under load), pin, remove, and
two server processes following one activation through Redis pub/sub.

The versions are the default model's own weights with one class's bias raised far above the rest,
so every image is classified as that class: a result's class says which weights produced it.
The servers run the torch runtime (no ONNX export per version) to keep the tests short.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
import torchvision

from clients.python import AuthError, Client, InferenceError, ValidationError
from inference.runner import ServedModel
from server.runtime import build_runner, serve_loaded
from service.auth import api_key_hash
from tests.conftest import CAT_CLASSES, CAT_JPEG, RedisServer, error_code, login, make_config, wait_for, wait_until
from tests.test_replicas import server_process

ADMIN_KEY = "training-job-admin-key"
ADMIN = {"Authorization": f"ApiKey {ADMIN_KEY}"}
MODEL = "efficientnet_lite0"
WEIGHTS_DB = 5  # a Redis database of this module's own, emptied before it runs


def boosted_weights(default_model, class_index: int) -> bytes:
    """The default model's state_dict with `class_index`'s logit bias raised by 100, as torch.save bytes."""
    state = {name: tensor.clone() for name, tensor in default_model.module.state_dict().items()}
    bias = [name for name, tensor in state.items() if name.endswith("bias") and tuple(tensor.shape) == (1000,)]
    assert len(bias) == 1, bias
    state[bias[0]][class_index] += 100.0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def put_version(http: httpx.Client, version: str, data: bytes, *, sha256: str | None = None,
                headers: dict[str, str] | None = None, name: str = MODEL) -> httpx.Response:
    checksum = sha256 or hashlib.sha256(data).hexdigest()
    return http.put(f"/v1/models/{name}/versions/{version}", content=data,
                    headers={**ADMIN, "X-Content-SHA256": checksum, **(headers or {})})


def activate(http: httpx.Client, version: str) -> httpx.Response:
    return http.post(f"/v1/models/{MODEL}/versions/{version}:activate", headers=ADMIN)


def make_pinnable(http: httpx.Client, version: str, pinnable: bool = True) -> httpx.Response:
    """An admin lets sessions pin `version` (or no longer): they may pin only the active version, the
    canary's, or one marked so."""
    path = f"/v1/models/{MODEL}/versions/{version}/pinnable"
    return http.put(path, headers=ADMIN) if pinnable else http.delete(path, headers=ADMIN)


def predict(http: httpx.Client, auth: dict[str, str]) -> httpx.Response:
    return http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)


def weights_config(redis_url: str, store_dir: Path, db: int = WEIGHTS_DB, **model: Any):
    return make_config(f"{redis_url.rsplit('/', 1)[0]}/{db}", model={"runtime": "torch", **model},
                       auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                       models={"store_dir": str(store_dir), "max_upload_bytes": 32 * 1024 * 1024})


@pytest.fixture(scope="module")
def weights_server(serve, redis_server, tmp_path_factory) -> Iterator[Any]:
    redis.Redis(port=redis_server.port, db=WEIGHTS_DB).flushdb()
    store_dir = tmp_path_factory.mktemp("model-store")
    with serve(weights_config(redis_server.url, store_dir)) as running:
        running.store_dir = store_dir
        yield running


@pytest.fixture(scope="module")
def cock(default_model) -> bytes:
    return boosted_weights(default_model, 7)  # ImageNet class 7: "cock"


@pytest.fixture(scope="module")
def hen(default_model) -> bytes:
    return boosted_weights(default_model, 8)  # class 8: "hen"


def version_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_publishing_checks_the_key_the_checksum_the_size_and_the_weights(weights_server, cock) -> None:
    version = version_name("v")
    with weights_server.client() as http:
        for headers, code in [({"Authorization": ""}, "missing_api_key"),
                              ({"Authorization": "ApiKey wrong-key"}, "invalid_api_key"),
                              (login(http), "missing_api_key")]:
            refused = put_version(http, version, cock, headers=headers)
            assert refused.status_code == 401 and error_code(refused) == code
        assert error_code(put_version(http, version, cock, sha256="0" * 64)) == "checksum_mismatch"
        missing = http.put(f"/v1/models/{MODEL}/versions/{version}", content=cock, headers=ADMIN)
        assert missing.status_code == 400 and error_code(missing) == "missing_checksum"
        too_big = put_version(http, version, bytes(40 * 1024 * 1024))  # drained, then refused
        assert too_big.status_code == 413 and error_code(too_big) == "payload_too_large"
        other = put_version(http, version, cock, name="resnet50")
        assert other.status_code == 404 and error_code(other) == "model_not_found"
        assert error_code(put_version(http, "bad name!", cock)) == "invalid_version"

        garbage = put_version(http, version, b"this is not a state_dict")
        assert garbage.status_code == 422 and error_code(garbage) == "invalid_weights"
        squeezenet = io.BytesIO()  # another architecture (random init, ~5 MB)
        torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), squeezenet)
        wrong_architecture = put_version(http, version, squeezenet.getvalue())
        assert wrong_architecture.status_code == 422 and "architecture" in wrong_architecture.json()["error"]["message"]
        state = torch.load(io.BytesIO(cock), weights_only=True)
        next(tensor for tensor in state.values() if tensor.is_floating_point()).fill_(float("nan"))
        nan = io.BytesIO()
        torch.save(state, nan)
        assert error_code(put_version(http, version, nan.getvalue())) == "invalid_weights"

        published = put_version(http, version, cock)
        assert published.status_code == 201, published.text
        body = published.json()
        assert body["sha256"] == hashlib.sha256(cock).hexdigest() and body["size"] == len(cock)
        assert body["activated_at"] is None and body["active"] is False
        again = put_version(http, version, cock)
        assert again.status_code == 409 and error_code(again) == "version_exists"

        listing = http.get("/v1/models", headers=login(http)).json()["models"][0]
        assert listing["name"] == MODEL and listing["serving_version"].startswith("imagenet-")
        assert version in {item["version"] for item in listing["versions"]}
        assert http.get("/v1/models").status_code == 401
    files = sorted(p.name for p in (weights_server.store_dir / MODEL).iterdir())
    assert f"{version}.{body['sha256'][:16]}.pt" in files
    assert not [name for name in files if name.endswith(".partial")]  # refused uploads leave nothing


def test_activation_under_load_fails_no_request_and_new_requests_use_the_new_weights(weights_server, cock) -> None:
    version = version_name("load")
    before = weights_server.versions.active.model.version
    results: list[tuple[float, float, httpx.Response]] = []
    stop = threading.Event()

    def load(auth: dict[str, str]) -> None:
        with weights_server.client() as http:
            for _ in range(400):  # bounded: stops on the event, or after 400 requests
                if stop.is_set():
                    return
                started = time.monotonic()
                response = predict(http, auth)
                results.append((started, time.monotonic(), response))

    with weights_server.client() as http:
        assert put_version(http, version, cock).status_code == 201
        sessions = [login(http) for _ in range(3)]
        threads = [threading.Thread(target=load, args=(auth,)) for auth in sessions]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: len(results) >= 6, "the load to be answered on the old weights")
            activation = activate(http, version)
            activated = time.monotonic()
            assert activation.status_code == 200, activation.text
            assert activation.json()["active"] is True and activation.json()["activated_at"]
            wait_until(lambda: sum(started > activated for started, _, _ in results) >= 6,
                       "the load to be answered after the activation")
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert [r.status_code for _, _, r in results if r.status_code != 200] == []
        bodies = [(started, r.json()) for started, _, r in results]
        versions = {body["model"]["version"] for _, body in bodies}
        assert versions == {before, version}
        for started, body in bodies:  # the recorded version is the one whose weights answered
            if body["model"]["version"] == version:
                assert body["predicted_class"] == 7
            else:
                assert body["predicted_class"] in CAT_CLASSES
                assert started < activated  # nothing admitted after the swap ran on the old weights
        assert all(body["model"]["version"] == version for started, body in bodies if started > activated)
        history = http.get("/v1/history", headers=sessions[0], params={"limit": 100}).json()["items"]
        assert {item["model"]["version"] for item in history} == versions
        listing = http.get("/v1/models", headers=ADMIN).json()["models"][0]
        assert listing["active_version"] == version == listing["serving_version"]


class HeldBackend:
    """Holds the forward of the request in flight until released."""

    def __init__(self, inner: Any):
        self.inner, self.name, self.precision = inner, inner.name, inner.precision
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, batch: Any, *, alone: bool = False) -> Any:
        self.entered.set()
        assert self.release.wait(60)
        return self.inner.forward(batch, alone=alone)


def test_a_request_in_flight_finishes_on_the_old_weights(serve, redis_server, default_model, tmp_path, hen) -> None:
    config = weights_config(redis_server.url, tmp_path)
    runner, configured = build_runner(config), serve_loaded(config, default_model)
    held = HeldBackend(configured.backend)  # the current (old) weights, held mid-forward
    version = version_name("inflight")
    try:
        with serve(config, runner=runner, served=ServedModel(configured.model, held)) as running, \
                running.client() as http:
            auth = login(http)
            assert put_version(http, version, hen).status_code == 201
            in_flight: list[httpx.Response] = []

            def send() -> None:
                with running.client() as other:
                    in_flight.append(predict(other, auth))

            thread = threading.Thread(target=send)
            thread.start()
            assert held.entered.wait(30)
            assert activate(http, version).status_code == 200
            fresh = predict(http, auth)  # admitted after the swap: new weights, not held
            assert fresh.status_code == 200 and fresh.json()["predicted_class"] == 8
            assert fresh.json()["model"]["version"] == version
            held.release.set()
            thread.join(30)
            old = in_flight[0].json()
            assert old["model"]["version"] != version and old["predicted_class"] in CAT_CLASSES
    finally:
        held.release.set()
        runner.close()


def test_pinned_versions_and_removal(weights_server, cock, hen) -> None:
    pinned_version, active_version = version_name("pinned"), version_name("active")
    with weights_server.client() as http:
        assert put_version(http, pinned_version, cock).status_code == 201
        assert put_version(http, active_version, hen).status_code == 201
        assert activate(http, active_version).status_code == 200
        assert make_pinnable(http, pinned_version).status_code == 200
        pinned, follower = login(http), login(http)
        patched = http.patch("/v1/session/options", headers=pinned, json={"model_version": pinned_version})
        assert patched.status_code == 200 and patched.json()["options"]["model_version"] == pinned_version
        result = predict(http, pinned).json()
        assert result["predicted_class"] == 7 and result["model"]["version"] == pinned_version
        assert result["options"]["model_version"] == pinned_version
        result = predict(http, follower).json()
        assert result["predicted_class"] == 8 and result["model"]["version"] == active_version
        assert "model_version" not in result["options"]  # unpinned sessions read as before

        unknown = http.patch("/v1/session/options", headers=follower, json={"model_version": "no-such-version"})
        assert unknown.status_code == 422 and error_code(unknown) == "invalid_options"
        busy = http.delete(f"/v1/models/{MODEL}/versions/{active_version}", headers=ADMIN)
        assert busy.status_code == 409 and error_code(busy) == "version_active"
        assert http.delete(f"/v1/models/{MODEL}/versions/{pinned_version}", headers=ADMIN).status_code == 204
        gone = predict(http, pinned)
        assert gone.status_code == 409 and error_code(gone) == "model_version_removed"
        assert "model_version" in gone.json()["error"]["message"]
        assert http.delete(f"/v1/models/{MODEL}/versions/{pinned_version}", headers=ADMIN).status_code == 404
        unpinned = http.patch("/v1/session/options", headers=pinned, json={"model_version": None})
        assert "model_version" not in unpinned.json()["options"]
        assert predict(http, pinned).json()["model"]["version"] == active_version
        model = http.get("/v1/models", headers=ADMIN).json()["models"][0]
        listed = {item["version"]: item for item in model["versions"]}
        assert pinned_version not in listed and listed[active_version]["active"] is True
        assert not list((weights_server.store_dir / MODEL).glob(f"{pinned_version}.*"))


def test_python_client_publishes_activates_and_lists(weights_server, cock, tmp_path) -> None:
    version = version_name("client")
    path = tmp_path / "weights.pt"
    path.write_bytes(cock)
    with Client(weights_server.url) as api:
        api.login()
        with pytest.raises(AuthError):
            api.publish_version(MODEL, version, path, admin_key="wrong")
        published = api.publish_version(MODEL, version, path, admin_key=ADMIN_KEY)
        assert published["version"] == version and published["size"] == len(cock)
        assert api.activate_version(MODEL, version, admin_key=ADMIN_KEY)["active"] is True
        assert api.models()["models"][0]["active_version"] == version
        assert api.predict(CAT_JPEG)["predicted_class"] == 7
        with pytest.raises(ValidationError):
            api.set_options(model_version="nope-not-here")


def test_python_client_marks_a_version_pinnable_and_unmarks_it(weights_server, cock, tmp_path) -> None:
    version = version_name("pinnable")
    path = tmp_path / "weights.pt"
    path.write_bytes(cock)
    with Client(weights_server.url) as api:
        api.login()
        api.publish_version(MODEL, version, path, admin_key=ADMIN_KEY)
        with pytest.raises(InferenceError) as refused:
            api.set_options(model_version=version)  # published, never activated, not marked
        assert (refused.value.status, refused.value.code) == (403, "model_version_not_pinnable")
        marked = api.set_pinnable(MODEL, version, admin_key=ADMIN_KEY)
        assert marked == {"name": MODEL, "version": version, "pinnable": True}
        assert api.set_options(model_version=version)["model_version"] == version
        assert api.predict(CAT_JPEG)["model"]["version"] == version
        assert api.set_pinnable(MODEL, version, admin_key=ADMIN_KEY, pinnable=False)["pinnable"] is False
        with pytest.raises(InferenceError) as unmarked:
            api.predict(CAT_JPEG)  # the pin is refused at its next use
        assert unmarked.value.code == "model_version_not_pinnable"


def test_two_processes_follow_an_activation_by_pubsub(tmp_path: Path, cock, default_model) -> None:
    store = RedisServer(tmp_path / "redis").start()
    shared = {"INFERENCE_REDIS_URL": store.url, "INFERENCE_AUTH_SECRET_KEYS": "replica-secret-0123456789",
              "INFERENCE_AUTH_ADMIN_API_KEYS": api_key_hash(ADMIN_KEY), "INFERENCE_MODEL_RUNTIME": "torch",
              "INFERENCE_MODELS_STORE_DIR": str(tmp_path / "shared-volume")}
    version = "replicated-1"
    try:
        with server_process(tmp_path / "a", **shared) as (url_a, _), server_process(tmp_path / "b", **shared) as (
                url_b, _), httpx.Client(base_url=url_a, timeout=60) as a, httpx.Client(base_url=url_b, timeout=60) as b:
            assert put_version(a, version, cock).status_code == 201
            auth = login(b)
            assert predict(b, auth).json()["predicted_class"] in CAT_CLASSES
            assert activate(a, version).status_code == 200
            # Replicas learn of an activation only by pub/sub (nothing polls), so following at all shows the
            # push; how fast is the benchmark's business, not a test's.
            wait_until(lambda: b.get("/v1/models", headers=ADMIN).json()["models"][0]["serving_version"] == version,
                       "replica b to serve the activated version", timeout=10)
            result = predict(b, auth).json()
            assert result["predicted_class"] == 7 and result["model"]["version"] == version
            # Rolling back to the configured weights on one replica reaches the other the same way.
            assert activate(a, default_model.version).json()["configured"] is True
            assert wait_for(lambda: b.get("/v1/models", headers=ADMIN).json()["models"][0]["serving_version"]
                            == default_model.version, timeout=5, interval=0.05)
            assert predict(b, auth).json()["predicted_class"] in CAT_CLASSES
            assert activate(a, version).status_code == 200  # and forward again, for the replica below
            assert wait_for(lambda: predict(b, auth).json()["model"]["version"] == version, timeout=5, interval=0.05)
        # A replica started after the activation serves the active version from its start.
        with server_process(tmp_path / "c", **shared) as (url_c, _), httpx.Client(base_url=url_c, timeout=60) as c:
            assert c.get("/v1/models", headers=ADMIN).json()["models"][0]["serving_version"] == version
            assert predict(c, login(c)).json()["model"]["version"] == version
    finally:
        store.stop()


def test_the_default_onnx_runtime_serves_an_activated_version(serve, redis_server, cock, tmp_path: Path) -> None:
    """The default runtime exports each version to ONNX once (at upload) and serves it after the swap."""
    onnx_db = WEIGHTS_DB + 1  # its own database: the torch-runtime servers above must not follow it
    redis.Redis(port=redis_server.port, db=onnx_db).flushdb()
    config = weights_config(redis_server.url, tmp_path / "store", db=onnx_db, runtime="onnxruntime")
    with serve(config) as running, running.client() as http:
        auth = login(http)
        assert running.versions.active.backend.name == "onnxruntime"
        assert predict(http, auth).json()["predicted_class"] in CAT_CLASSES
        version = version_name("onnx")
        assert put_version(http, version, cock).status_code == 201
        assert activate(http, version).status_code == 200
        answer = predict(http, auth).json()
        assert answer["predicted_class"] == 7 and answer["model"]["version"] == version
        assert running.versions.active.backend.name == "onnxruntime"


def test_a_version_whose_export_disagrees_with_its_torch_reference_is_refused(
        serve, redis_server, default_model, tmp_path: Path, monkeypatch) -> None:
    """At publish the version's export is held to the accuracy guard against the version's own torch FP32
    answers, on the runtime it would be served with: an export error is a 422 that says what differs."""
    from inference import torch_model
    from tests.test_selection import reverse_the_classifier_bias

    onnx_db = WEIGHTS_DB + 1  # the ONNX servers' database: a refused version writes nothing there
    redis.Redis(port=redis_server.port, db=onnx_db).flushdb()
    store_dir = tmp_path / "store"
    config = weights_config(redis_server.url, store_dir, db=onnx_db, runtime="onnxruntime")
    export, altered = torch_model._export, []

    def altered_export(model, path: Path, spec) -> None:  # what an exporter bug would leave in the cache
        export(model, path, spec)
        reverse_the_classifier_bias(path)
        altered.append(path)

    with serve(config) as running, running.client() as http, contextlib.ExitStack() as cleanup:
        # The export cache is shared by the whole run: no other test may find the altered graph.
        cleanup.callback(lambda: [file.unlink() for path in altered for file in path.parent.glob(f"{path.stem}.*")])
        monkeypatch.setattr(torch_model, "_export", altered_export)  # the served model's export is cached already
        version = version_name("altered")
        refused = put_version(http, version, boosted_weights(default_model, 11))  # weights of its own: a new export
        assert refused.status_code == 422 and error_code(refused) == "invalid_weights", refused.text
        message = refused.json()["error"]["message"]
        assert message.startswith(f"Version {version!r} was refused: onnxruntime fp32 on version {version} fails "
                                  "the accuracy guard against its torch FP32 reference: "), message
        assert "(tolerance 0.001) on " in message and ".jpg " in message
        listing = http.get("/v1/models", headers=ADMIN).json()["models"][0]
        assert version not in {item["version"] for item in listing["versions"]}
        assert activate(http, version).status_code == 404
    assert not list((store_dir / MODEL).glob("*.pt"))  # nothing kept of it


def test_activating_the_configured_version_rolls_back_to_the_configured_weights(
        weights_server, default_model, cock) -> None:
    with weights_server.client() as http:
        auth = login(http)
        version = version_name("rollback")
        assert put_version(http, version, cock).status_code == 201
        assert activate(http, version).status_code == 200
        assert predict(http, auth).json()["predicted_class"] == 7
        rollback = activate(http, default_model.version)
        assert rollback.status_code == 200, rollback.text
        assert rollback.json()["configured"] is True and rollback.json()["active"] is True
        answer = predict(http, auth).json()
        assert answer["predicted_class"] in CAT_CLASSES and answer["model"]["version"] == default_model.version
        listing = http.get("/v1/models", headers=ADMIN).json()["models"][0]
        assert listing["active_version"] is None and listing["serving_version"] == default_model.version
