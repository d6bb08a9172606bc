"""A model version that answers pinned or canary sessions can be named in the Open Inference Protocol's
URLs and gRPC calls, and is listed in the model's metadata (the model catalogue resolves it), over REST,
tritonclient.http and tritonclient.grpc; one that may not be served is refused, an unknown one is 404."""

from __future__ import annotations

import uuid
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
import tritonclient.http as httpclient

from server.transports.grpc import GrpcTransport
from tests.conftest import CAT_JPEG, DATA, login
from tests.test_oip_grpc import tritonclient_grpc
from tests.test_weights import ADMIN, MODEL, boosted_weights, make_pinnable, put_version, weights_config

VERSIONS_DB = 9  # a Redis database of this module's own, emptied before it runs
COCK = 7  # the class the published weights always answer


@pytest.fixture(scope="module")
def versions_server(serve, redis_server, tmp_path_factory, default_model) -> Iterator[Any]:
    redis.Redis(port=redis_server.port, db=VERSIONS_DB).flushdb()
    config = weights_config(redis_server.url, tmp_path_factory.mktemp("model-store"), db=VERSIONS_DB)
    with serve(config) as running, running.client() as http:
        weights = boosted_weights(default_model, COCK)
        pinnable, unmarked = f"pinnable-{uuid.uuid4().hex[:8]}", f"unmarked-{uuid.uuid4().hex[:8]}"
        for version in (pinnable, unmarked):
            assert put_version(http, version, weights).status_code == 201
        assert make_pinnable(http, pinnable).status_code == 200
        yield running, pinnable, unmarked


def top_class(response: dict[str, Any]) -> int:
    return int(response["outputs"][0]["data"][0].split(":")[1])


def test_a_pinnable_version_is_named_in_rest_urls_and_listed(versions_server) -> None:
    running, pinnable, unmarked = versions_server
    active = running.versions.active.model.version
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64encode(CAT_JPEG).decode()]}],
             "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
    with running.client() as http:
        auth = login(http)
        ready = http.get(f"/v2/models/{MODEL}/versions/{pinnable}/ready")
        assert ready.status_code == 200 and ready.json() == {"name": MODEL, "ready": True}
        answered = http.post(f"/v2/models/{MODEL}/versions/{pinnable}/infer", json=infer, headers=auth)
        assert answered.status_code == 200, answered.text
        assert answered.json()["model_version"] == pinnable and top_class(answered.json()) == COCK
        # The session itself is not pinned: without the version in the URL the active one answers.
        plain = http.post(f"/v2/models/{MODEL}/infer", json=infer, headers=auth).json()
        assert plain["model_version"] == active and top_class(plain) != COCK
        for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/{pinnable}"):
            assert set(http.get(path).json()["versions"]) >= {active, pinnable}, path
        refused = http.get(f"/v2/models/{MODEL}/versions/{unmarked}/ready")
        assert refused.status_code == 403 and isinstance(refused.json()["error"], str)
        assert http.post(f"/v2/models/{MODEL}/versions/{unmarked}/infer", json=infer).status_code == 403
        assert http.get(f"/v2/models/{MODEL}/versions/no-such-version/ready").status_code == 404
        assert unmarked not in http.get(f"/v2/models/{MODEL}").json()["versions"]


def test_tritonclient_http_names_a_pinnable_and_a_canary_version(versions_server, default_model) -> None:
    running, pinnable, _ = versions_server
    triton = httpclient.InferenceServerClient(urlparse(running.url).netloc, network_timeout=60)
    assert triton.is_model_ready(MODEL, pinnable)
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([CAT_JPEG], dtype=np.object_), binary_data=True)
    result = triton.infer(MODEL, [image], model_version=pinnable,
                          outputs=[httpclient.InferRequestedOutput("probabilities", class_count=1)])
    assert result.get_response()["model_version"] == pinnable
    assert int(result.as_numpy("probabilities")[0][0].decode().split(":")[1]) == COCK
    # A canary's version answers its share of sessions: it can be named, and is listed.
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    with running.client() as http:
        assert put_version(http, canary, boosted_weights(default_model, COCK)).status_code == 201
        started = http.post(f"/v1/models/{MODEL}/versions/{canary}:activate", headers=ADMIN,
                            json={"traffic_percent": 10})
        assert started.status_code == 200, started.text
        try:
            assert canary in triton.get_model_metadata(MODEL)["versions"]
            assert triton.is_model_ready(MODEL, canary)
        finally:  # the active version again serves everyone
            active = running.versions.active.model.version
            assert http.post(f"/v1/models/{MODEL}/versions/{active}:activate", headers=ADMIN).status_code == 200
    triton.close()


def test_grpc_names_a_pinnable_version(versions_server, loop_thread, tmp_path: Path) -> None:
    running, pinnable, unmarked = versions_server

    async def start() -> GrpcTransport:
        transport = GrpcTransport(running.config, running.use_cases, host="127.0.0.1", port=0)
        await transport.start()
        return transport

    transport = loop_thread.run(start())
    try:
        infer = {"op": "infer", "version": pinnable, "input": {"name": "image", "datatype": "BYTES",
                                                               "files": [str(DATA / "cat.jpg")]},
                 "outputs": [{"name": "probabilities", "class_count": 1}]}
        ready, unmarked_ready, metadata, answered = tritonclient_grpc(f"127.0.0.1:{transport.port}", [
            {"op": "model_ready", "model": MODEL, "version": pinnable},
            {"op": "model_ready", "model": MODEL, "version": unmarked},
            {"op": "model_metadata", "model": MODEL, "version": pinnable},
            infer,
        ], tmp_path)
        assert ready == {"ok": True, "value": True} and unmarked_ready == {"ok": True, "value": False}
        assert pinnable in metadata["value"]["versions"]
        assert answered["ok"], answered
        assert answered["value"]["model_version"] == pinnable
        assert int(answered["value"]["outputs"]["probabilities"]["data"][0].split(":")[1]) == COCK
    finally:
        loop_thread.run(transport.stop(0))
