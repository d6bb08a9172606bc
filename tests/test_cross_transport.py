"""One session, four transports: `POST /v1/predict`, the stream, the Open Inference Protocol over
REST and over gRPC answer a session pinned to a model version alike, on every serving process, and
refuse alike once that version is removed (issue #16).

The server runs as a user runs it, with two serving processes, so a process that has not loaded the
pinned version yet takes some of the requests: each loads it on first use, whichever transport that is.
The versions are the default weights with one class's bias raised (tests/test_weights.py), so the
class of an answer says which weights produced it, and the torch runtime keeps publishing short.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from websockets.sync.client import connect as ws_connect

from core.errors import (
    BadImage,
    BadOptions,
    BadRequest,
    Conflict,
    Forbidden,
    InferenceFailed,
    InvalidToken,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceBusy,
    ServiceError,
    StoreUnavailable,
    UnsupportedMediaType,
)
from handlers.grpc import grpc_status
from handlers.oip_grpc import grpc_predict_v2_pb2 as pb
from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.auth import api_key_hash
from tests.conftest import CAT_JPEG, error_code, free_port, login, wait_for
from tests.test_replicas import server_process
from tests.test_weights import ADMIN, ADMIN_KEY, MODEL, boosted_weights, make_pinnable, put_version

TIMEOUT = 60
TENCH, GOLDFISH = 0, 1  # ImageNet classes; each version's boosted class, and its name
GRPC_CALLS = 6  # fresh connections, spread over both processes by the kernel (SO_REUSEPORT)


# -- the four transports, each answering (class, model version) or its refusal ----------------------
def v1_predict(http: httpx.Client, auth: dict[str, str]) -> httpx.Response:
    return http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)


def oip_rest(http: httpx.Client, auth: dict[str, str], tensor: np.ndarray | None = None) -> httpx.Response:
    """One image (or a preprocessed tensor) in the JSON form, asking for the best class as text."""
    if tensor is None:
        given = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(CAT_JPEG).decode()]}
    else:
        given = {"name": "preprocessed", "datatype": "FP32", "shape": list(tensor.shape),
                 "data": tensor.ravel().tolist()}
    body = {"inputs": [given],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1, "binary_data": False}}]}
    return http.post(f"/v2/models/{MODEL}/infer", headers=auth, json=body)


def rest_answer(response: httpx.Response) -> tuple[int, str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL
    return int(body["outputs"][0]["data"][0].split(":")[1]), body["model_version"]


def oip_grpc(address: str, auth: dict[str, str]) -> pb.ModelInferResponse | grpc.RpcError:
    """One image over a channel of its own (and a connection of its own: no shared subchannel pool)."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(CAT_JPEG).to_bytes(4, "little") + CAT_JPEG)
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 1
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("authorization", auth["Authorization"]),), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return exc


def grpc_answer(response: pb.ModelInferResponse | grpc.RpcError) -> tuple[int, str]:
    assert isinstance(response, pb.ModelInferResponse), f"{response.code()}: {response.details()}"
    assert response.model_name == MODEL
    raw = response.raw_output_contents[0]
    element = raw[4:4 + int.from_bytes(raw[:4], "little")].decode()  # "<score>:<index>:<label>"
    return int(element.split(":")[1]), response.model_version


@contextmanager
def stream(url: str, auth: dict[str, str]) -> Iterator[Any]:
    with ws_connect(url.replace("http://", "ws://") + "/v1/stream", additional_headers=auth,
                    open_timeout=TIMEOUT) as socket:
        assert json.loads(socket.recv(timeout=TIMEOUT))["type"] == "ready"
        yield socket


def streamed(url: str, auth: dict[str, str]) -> dict[str, Any]:
    """The frame that answers one image sent on a new stream."""
    with stream(url, auth) as socket:
        socket.send(CAT_JPEG)
        return json.loads(socket.recv(timeout=TIMEOUT))


def open_connections(http: httpx.Client) -> dict[str, float]:
    metrics = http.get("/metrics").text
    return {pid: float(value) for pid, value in
            re.findall(r'^inference_open_connections\{pid="(\d+)"\} (\S+)$', metrics, re.M)}


def pin(http: httpx.Client, version: str) -> dict[str, str]:
    auth = login(http)
    patched = http.patch("/v1/session/options", headers=auth, json={"model_version": version})
    assert patched.status_code == 200 and patched.json()["options"]["model_version"] == version, patched.text
    return auth


# -- the test ----------------------------------------------------------------------------------------
def test_a_pinned_version_answers_and_is_refused_alike_on_every_transport_and_process(
        tmp_path: Path, default_model) -> None:
    grpc_port = free_port()
    env = {"INFERENCE_GRPC_PORT": str(grpc_port), "INFERENCE_AUTH_ADMIN_API_KEYS": api_key_hash(ADMIN_KEY),
           "INFERENCE_MODEL_RUNTIME": "torch"}
    with server_process(tmp_path, "--processes", "2", ready_lines=2, **env) as (url, ready), \
            httpx.Client(base_url=url, timeout=TIMEOUT) as first, httpx.Client(base_url=url, timeout=TIMEOUT) as second:
        assert all(f"grpc=127.0.0.1:{grpc_port}" in line for line in ready), ready
        address = f"127.0.0.1:{grpc_port}"
        # Two kept-alive connections, one on each process: the balancer gives the second connection
        # to the process that holds none, so every HTTP check below is made on both processes.
        assert first.get("/healthz").status_code == 200 and second.get("/healthz").status_code == 200
        pids = {re.search(r"pid=(\d+)", line).group(1) for line in ready}
        assert open_connections(first) == dict.fromkeys(pids, 1.0)
        processes = (first, second)

        assert put_version(first, "tench", boosted_weights(default_model, TENCH)).status_code == 201
        assert put_version(first, "goldfish", boosted_weights(default_model, GOLDFISH)).status_code == 201
        configured = first.get("/v1/models", headers=ADMIN).json()["models"][0]["serving_version"]
        assert configured not in ("tench", "goldfish")  # neither is active: only a pin selects them
        assert all(make_pinnable(first, version).status_code == 200 for version in ("tench", "goldfish"))
        tench, goldfish = pin(first, "tench"), pin(first, "goldfish")

        # Neither version is loaded in a serving process yet (publishing only validates it), so each
        # OIP transport's first calls meet processes without their version: gRPC with tench, REST
        # with goldfish on both processes.
        for _ in range(GRPC_CALLS):
            assert grpc_answer(oip_grpc(address, tench)) == (TENCH, "tench")
        for http in processes:
            assert rest_answer(oip_rest(http, goldfish)) == (GOLDFISH, "goldfish")

        # Every transport answers the tench session from tench: HTTP on both processes, then on fresh connections.
        for http in processes:
            assert rest_answer(oip_rest(http, tench)) == (TENCH, "tench")
            answer = v1_predict(http, tench).json()
            assert (answer["predicted_class"], answer["model"]["version"]) == (TENCH, "tench")
        for _ in range(2):
            with httpx.Client(base_url=url, timeout=TIMEOUT) as fresh:
                assert rest_answer(oip_rest(fresh, tench)) == (TENCH, "tench")
        tensor = np.zeros((1, 3, 224, 224), np.float32)  # a preprocessed input follows the pin too
        assert rest_answer(oip_rest(first, tench, tensor)) == (TENCH, "tench")
        result = streamed(url, tench)
        assert result["type"] == "result", result
        assert (result["result"]["predicted_class"], result["result"]["model"]["version"]) == (TENCH, "tench")
        # Each transport recorded what it answered, under the version that answered.
        history = first.get("/v1/history", headers=tench, params={"limit": 100}).json()["items"]
        assert len(history) == GRPC_CALLS + 4 + 2 + 1 + 1
        assert {(item["predicted_class"], item["model"]["version"]) for item in history} == {(TENCH, "tench")}

        # Removed: once the other process has heard of it (pub/sub), all four refuse, on both processes.
        assert first.delete(f"/v1/models/{MODEL}/versions/tench", headers=ADMIN).status_code == 204
        for http in processes:  # bounded: the event usually arrives within milliseconds
            assert wait_for(lambda http=http: v1_predict(http, tench).status_code == 409, timeout=10, interval=0.05)
        for http in processes:
            refused = v1_predict(http, tench)
            assert refused.status_code == 409 and error_code(refused) == "model_version_removed"
            refused = oip_rest(http, tench)
            assert refused.status_code == 409, refused.text
            body = refused.json()  # the protocol's error shape: a message, no code
            assert set(body) == {"error"} and "'tench'" in body["error"] and "model_version" in body["error"]
        for _ in range(GRPC_CALLS):
            failed = oip_grpc(address, tench)
            assert isinstance(failed, grpc.RpcError), failed
            assert failed.code() == grpc.StatusCode.FAILED_PRECONDITION, failed
            assert "'tench'" in failed.details() and "model_version" in failed.details()
        frame = streamed(url, tench)
        assert frame["type"] == "error" and frame["status"] == 409, frame
        assert frame["error"]["code"] == "model_version_removed"
        # Only that version: the goldfish session is still answered from goldfish.
        assert grpc_answer(oip_grpc(address, goldfish)) == (GOLDFISH, "goldfish")


@pytest.mark.parametrize(("error", "code"), [
    (BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidToken("x"), grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden("x"), grpc.StatusCode.PERMISSION_DENIED),
    (NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (Conflict("x", code="model_version_removed"), grpc.StatusCode.FAILED_PRECONDITION),
    (PayloadTooLarge("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedMediaType("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (BadOptions("top_k", "x"), grpc.StatusCode.INVALID_ARGUMENT),
    (BadImage("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (RateLimited("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServiceBusy("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (InferenceFailed("x"), grpc.StatusCode.INTERNAL),
])
def test_each_http_status_has_its_grpc_status(error: ServiceError, code: grpc.StatusCode) -> None:
    assert grpc_status(error) == code
