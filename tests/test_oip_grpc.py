"""The Open Inference Protocol over gRPC: the real tritonclient.grpc (in a child process, see
tests/oip_grpc_client.py) and the server's own stubs, against the gRPC service running on the same
event loop as the HTTP app and sharing its store and runner."""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from core.errors import BadImage, InvalidToken, NotFound, RateLimited, ServiceBusy, StoreUnavailable
from core.options import Options
from handlers.grpc import grpc_status
from handlers.oip_grpc import grpc_predict_v2_pb2 as pb
from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from inference.imaging import preprocess
from inference.runner import ServedModel
from server.config import ConfigError, validate
from server.runtime import build_runner, serve_loaded
from server.server import make_signer
from server.transports.grpc import GrpcTransport
from sessions.tokens import new_session_id
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_JPEG, DATA, free_port, login, make_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet_lite0"


def start_grpc(loop_thread, running, **grpc_settings: Any) -> tuple[Any, str]:
    """The gRPC service for a test server (its store and runner), on the loop that serves its HTTP;
    `grpc_settings` override the server's grpc section for this service only."""
    config = copy.deepcopy(running.config)
    for key, value in grpc_settings.items():
        setattr(config.grpc, key, value)

    async def start() -> GrpcTransport:
        transport = GrpcTransport(config, running.use_cases, host="127.0.0.1", port=0)
        await transport.start()
        return transport

    transport = loop_thread.run(start())
    return transport, f"127.0.0.1:{transport.port}"


@pytest.fixture(scope="module")
def grpc_address(server, loop_thread) -> Iterator[str]:
    grpc_server, address = start_grpc(loop_thread, server)
    yield address
    loop_thread.run(grpc_server.stop(0))


def tritonclient_grpc(address: str, steps: list[dict[str, Any]], tmp_path: Path,
                      root_certificate: Path | None = None) -> list[dict[str, Any]]:
    steps_file = tmp_path / "steps.json"
    steps_file.write_text(json.dumps(steps))
    tls = [str(root_certificate)] if root_certificate else []
    out = subprocess.run([sys.executable, "-m", "tests.oip_grpc_client", address, str(steps_file), *tls], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def labels(value: dict[str, Any]) -> list[list[tuple[int, str]]]:
    output = value["outputs"]["probabilities"]
    rows, k = output["shape"]
    elements = [(int(e.split(":")[1]), e.split(":", 2)[2]) for e in output["data"]]
    return [elements[i * k:(i + 1) * k] for i in range(rows)]


def v1_top(client: httpx.Client, image: bytes, auth: dict[str, str]) -> list[tuple[int, str]]:
    response = client.post("/v1/predict", content=image, headers={**auth, "Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    return [(s["class_index"], s["label"]) for s in response.json()["top_k"]]


def test_tritonclient_grpc_health_metadata_infer_and_errors(grpc_address: str, server, client: httpx.Client,
                                                             tmp_path: Path) -> None:
    auth = login(client, top_k=4)
    token = auth["Authorization"]
    expected = v1_top(client, CAT_JPEG, auth)
    version = server.versions.active.model.version
    np.save(tmp_path / "cat.npy", preprocess(CAT_JPEG, Options(), max_pixels=40_000_000)[None])
    cat, coffee = str(DATA / "cat.jpg"), str(DATA / "coffee.jpg")
    image = {"name": "image", "datatype": "BYTES", "files": [cat]}
    top4 = [{"name": "probabilities", "class_count": 4}]
    results = tritonclient_grpc(grpc_address, [
        {"op": "live"}, {"op": "ready"}, {"op": "server_metadata"},
        {"op": "model_metadata", "model": MODEL}, {"op": "model_metadata", "model": MODEL, "version": version},
        {"op": "model_ready", "model": MODEL}, {"op": "model_ready", "model": "resnet50"},
        {"op": "infer", "input": image, "outputs": top4, "authorization": token, "id": "grpc-1"},          # 7
        {"op": "infer", "input": {**image, "files": [cat, coffee], "shape": [2, 1]}, "outputs": top4,
         "authorization": token},                                                                        # 8
        {"op": "infer", "input": image},                                                                 # 9
        {"op": "infer", "input": {"name": "preprocessed", "datatype": "FP32", "npy": str(tmp_path / "cat.npy")},
         "outputs": top4, "authorization": token},                                                       # 10
        {"op": "infer", "input": image, "authorization": "Bearer forged.token.here"},                     # 11
        {"op": "infer", "input": {"name": "image", "datatype": "FP32", "values": [1.0]}},                 # 12
        {"op": "infer", "input": {**image, "files": [cat, coffee], "shape": [1, 2]}},                     # 13
        {"op": "infer", "input": {**image, "files": [str(ROOT / "README.md")]}},                          # 14
        {"op": "infer", "input": image, "model": "resnet50"},                                            # 15
        {"op": "infer", "input": image, "version": "999"},                                               # 16
        {"op": "infer", "input": image, "outputs": [{"name": "probabilities", "class_count": 1}]},        # 17
    ], tmp_path)
    assert [r["ok"] for r in results[:7]] == [True] * 7, results[:7]
    assert results[0]["value"] and results[1]["value"]
    assert {"binary_tensor_data", "classification"} <= set(results[2]["value"]["extensions"])
    for metadata in (results[3]["value"], results[4]["value"]):
        assert metadata["versions"] == [version]
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
            ("image", "BYTES", [-1]), ("preprocessed", "FP32", [-1, 3, -1, -1])]
    assert results[5]["value"] is True and results[6]["value"] is False

    assert results[7]["ok"] and results[7]["value"]["id"] == "grpc-1"
    assert labels(results[7]["value"]) == [expected]
    assert labels(results[8]["value"])[0] == expected and len(labels(results[8]["value"])) == 2
    full = results[9]["value"]["outputs"]["probabilities"]
    assert full["shape"] == [1, 1000] and full["datatype"] == "FP32"
    assert int(np.argmax(full["data"])) == expected[0][0]
    assert labels(results[10]["value"])[0][0] == expected[0]  # preprocessed tensor, default options: same top-1
    assert {index for index, _ in labels(results[10]["value"])[0]} & CAT_CLASSES

    def status(result: dict[str, Any]) -> str:
        assert not result["ok"], result
        return result["status"]

    assert status(results[11]) == "StatusCode.UNAUTHENTICATED"
    assert status(results[12]) == "StatusCode.INVALID_ARGUMENT" and "must be BYTES" in results[12]["message"]
    assert status(results[13]) == "StatusCode.INVALID_ARGUMENT" and "shape" in results[13]["message"]
    assert status(results[14]) == "StatusCode.INVALID_ARGUMENT" and "not an image" in results[14]["message"]
    assert status(results[15]) == "StatusCode.NOT_FOUND" and status(results[16]) == "StatusCode.NOT_FOUND"
    assert results[17]["ok"], "the service keeps serving after errors"

    # Every image sent with the token is in the session's history, newest first: tensor, coffee, cat, cat, v1 cat.
    items = client.get("/v1/history", headers=auth, params={"limit": 10}).json()["items"]
    assert len(items) == 5
    assert [(s["class_index"], s["label"]) for s in items[2]["top_k"]] == expected
    assert items[0]["options"]["top_k"] == 4 and set(items[0]) == set(items[4])


def test_contents_form_and_metadata_token(grpc_address: str, client: httpx.Client) -> None:
    expected = v1_top(client, COFFEE_JPEG, login(client))
    auth = login(client, top_k=2)
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL, id="contents")
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(COFFEE_JPEG)
        output = request.outputs.add(name="probabilities")
        output.parameters["classification"].int64_param = 3
        response = stub.ModelInfer(request, metadata=(("authorization", auth["Authorization"]),), timeout=60)
        assert response.id == "contents" and list(response.outputs[0].shape) == [1, 3]
        raw = response.raw_output_contents[0]
        first = raw[4:4 + int.from_bytes(raw[:4], "little")].decode()
        assert int(first.split(":")[1]) == expected[0][0]
        history = client.get("/v1/history", headers=auth).json()["items"]
        assert len(history) == 1 and len(history[0]["top_k"]) == 2  # recorded under the session's top_k
        # FP32 in contents, without raw_input_contents.
        request = pb.ModelInferRequest(model_name=MODEL)
        batch = preprocess(COFFEE_JPEG, Options(), max_pixels=40_000_000)
        request.inputs.add(name="preprocessed", datatype="FP32", shape=[1, *batch.shape])
        request.inputs[0].contents.fp32_contents.extend(batch.ravel().tolist())
        probabilities = np.frombuffer(stub.ModelInfer(request, timeout=60).raw_output_contents[0], "<f4")
        assert int(np.argmax(probabilities)) == expected[0][0]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one input" in caught.value.details()
    metrics = client.get("/metrics").text  # gRPC calls are counted beside the HTTP requests
    assert 'inference_grpc_requests_total{code="OK",method="ModelInfer"}' in metrics
    assert 'inference_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}' in metrics


def test_status_codes_for_each_failure() -> None:
    assert grpc_status(InvalidToken("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(BadImage("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert grpc_status(ServiceBusy("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(RateLimited("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(StoreUnavailable("x")) == grpc.StatusCode.UNAVAILABLE


def infer_cat(address: str, token: str | None = None) -> grpc.RpcError | pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(CAT_JPEG).to_bytes(4, "little") + CAT_JPEG)
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("authorization", token),) if token else (), timeout=60)
        except grpc.RpcError as exc:
            return exc


def test_rate_limit_anonymous_off_and_store_down(serve, loop_thread, redis_server) -> None:
    config = make_config(http={"legacy_predict": False}, sessions={"rate_limit_per_minute": 1})
    with serve(config) as limited, limited.client() as client:
        grpc_server, address = start_grpc(loop_thread, limited)
        try:
            refused = infer_cat(address)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "anonymous" in refused.details()
            token = login(client)["Authorization"]
            assert isinstance(infer_cat(address, token), pb.ModelInferResponse)
            over = infer_cat(address, token)
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(over.trailing_metadata())["retry-after"]
        finally:
            loop_thread.run(grpc_server.stop(0))
    dead = make_config(f"redis://127.0.0.1:{free_port()}/0", redis={"connect_timeout_seconds": 0.2})
    with serve(dead) as down:
        grpc_server, address = start_grpc(loop_thread, down)
        try:
            token = "Bearer " + make_signer(dead).issue(new_session_id())  # well signed; the store is unreachable
            assert infer_cat(address, token).code() == grpc.StatusCode.UNAVAILABLE
            with grpc.insecure_channel(address) as channel:
                assert not pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready
            assert isinstance(infer_cat(address), pb.ModelInferResponse)  # anonymous needs no store
        finally:
            loop_thread.run(grpc_server.stop(0))


def test_grpc_port_is_validated() -> None:
    for port, message in ((70000, "between 1 and 65535"), (8000, "differ from server.port")):
        config = make_config()
        config.grpc.port = port
        with pytest.raises(ConfigError, match=message):
            validate(config)


def batch_request(image: bytes, count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[count])
    request.raw_input_contents.append((len(image).to_bytes(4, "little") + image) * count)
    return request


def test_cli_serves_grpc_beside_http_and_sigterm_finishes_calls_in_flight(tmp_path: Path) -> None:
    from tests.test_cli import server_env

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", "0"], cwd=ROOT,
                               env=server_env(tmp_path, INFERENCE_GRPC_PORT=str(port)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        while not lines or ("ready on " not in lines[-1] and lines[-1]):
            lines.append(process.stdout.readline())
        assert f"grpc=127.0.0.1:{port}" in lines[-1], "".join(lines)
        url = lines[-1].split("ready on ")[1].split()[0]
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()  # keep the pipe drained
        response = infer_cat(f"127.0.0.1:{port}")
        assert isinstance(response, pb.ModelInferResponse), response
        assert int(np.argmax(np.frombuffer(response.raw_output_contents[0], "<f4"))) in CAT_CLASSES
        # A call in flight when SIGTERM arrives is finished, then the process exits 0.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(batch_request(COFFEE_JPEG, 24),
                                                                               timeout=120)
            deadline = time.monotonic() + 60
            while "inference_queue_depth 0.0" in httpx.get(url + "/metrics").text:  # not yet admitted
                assert time.monotonic() < deadline and not call.done(), "the call never reached the model"
                time.sleep(0.005)
            process.send_signal(signal.SIGTERM)
            answer = call.result()
            assert list(answer.outputs[0].shape) == [24, 1000]
        assert process.wait(60) == 0
        assert any("shutting down" in line for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_every_process_serves_grpc(tmp_path: Path) -> None:
    from tests.test_replicas import server_process

    port = free_port()
    with server_process(tmp_path, "--processes", "2", ready_lines=2, INFERENCE_GRPC_PORT=str(port)) as (_, ready):
        # Both children bound the port (SO_REUSEPORT), after the fork: a failed bind stops a child.
        assert all(f"grpc=127.0.0.1:{port}" in line for line in ready), ready
        for _ in range(4):  # a new connection each time: the kernel spreads them over the processes
            response = infer_cat(f"127.0.0.1:{port}")
            assert isinstance(response, pb.ModelInferResponse), response


class GatedBackend:
    """Holds every forward until released; counts the forwards that started."""

    def __init__(self, inner: Any):
        self.inner, self.name, self.precision = inner, inner.name, inner.precision
        self.started, self.lock, self.release = 0, threading.Lock(), threading.Event()

    def forward(self, batch: Any, *, alone: bool = False) -> Any:
        with self.lock:
            self.started += 1
        assert self.release.wait(60)
        return self.inner.forward(batch, alone=alone)


def server_live(address: str) -> grpc.RpcError | pb.ServerLiveResponse:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc


def test_calls_beyond_max_concurrent_calls_are_refused_before_authentication(serve, loop_thread,
                                                                            default_model) -> None:
    config = make_config(grpc={"max_concurrent_calls": 2}, model={"workers": 2, "max_queue": 16})
    runner, configured = build_runner(config), serve_loaded(config, default_model)
    gate = GatedBackend(configured.backend)
    forged = "Bearer forged.token.here"
    try:
        with serve(config, runner=runner, served=ServedModel(configured.model, gate)) as running:
            grpc_server, address = start_grpc(loop_thread, running)
            try:
                with grpc.insecure_channel(address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    held = [stub.ModelInfer.future(batch_request(CAT_JPEG, 1), timeout=60) for _ in range(2)]
                    assert wait_for(lambda: gate.started == 2), "both calls should be in the model"
                    # The bound is full: any further call is refused at once, whatever its token, and never
                    # reaches the runner (admitted, the anonymous one would wait for the gate).
                    for refused in (infer_cat(address), infer_cat(address, forged), server_live(address)):
                        assert isinstance(refused, grpc.RpcError), refused
                        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
                    assert runner.queue_depth == 2
                    gate.release.set()
                    for call in held:
                        assert list(call.result().outputs[0].shape) == [1, 1000]
                # Slots free again once the held calls end (the count drops as grpc finishes each call).
                assert wait_for(lambda: isinstance(server_live(address), pb.ServerLiveResponse), timeout=10)
                assert infer_cat(address, forged).code() == grpc.StatusCode.UNAUTHENTICATED
            finally:
                gate.release.set()
                loop_thread.run(grpc_server.stop(0))
    finally:
        gate.release.set()
        runner.close()


def test_a_message_over_max_message_bytes_is_refused_before_authentication(server, loop_thread) -> None:
    limit = 64 * 1024  # far below http.max_body_bytes: the gRPC bound is its own
    assert server.config.http.max_body_bytes > 2 * len(CAT_JPEG) + limit
    grpc_server, address = start_grpc(loop_thread, server, max_message_bytes=limit)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer forged.token.here"),)):
                request = batch_request(CAT_JPEG, 2)
                assert request.ByteSize() > limit
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ModelInfer(request, metadata=metadata, timeout=60)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        # The same server keeps serving messages within the bound.
        response = infer_cat(address)
        assert isinstance(response, pb.ModelInferResponse), response
        assert int(np.argmax(np.frombuffer(response.raw_output_contents[0], "<f4"))) in CAT_CLASSES
    finally:
        loop_thread.run(grpc_server.stop(0))


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A PEM certificate for 127.0.0.1 and localhost, and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=60)
    return cert, key


def test_tls_serves_trusting_clients_and_refuses_plaintext(server, loop_thread, client: httpx.Client,
                                                           tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    grpc_server, address = start_grpc(loop_thread, server, tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        token = login(client, top_k=3)["Authorization"]
        image = {"name": "image", "datatype": "BYTES", "files": [str(DATA / "cat.jpg")]}
        results = tritonclient_grpc(address, [
            {"op": "live"},
            {"op": "infer", "input": image, "outputs": [{"name": "probabilities", "class_count": 3}],
             "authorization": token},
        ], tmp_path, root_certificate=cert)
        assert results[0] == {"ok": True, "value": True}, results
        assert results[1]["ok"] and {index for index, _ in labels(results[1]["value"])[0]} & CAT_CLASSES, results

        trusting = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(address, trusting) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
        # A plaintext client, or one that does not trust the certificate, gets no answer from the service.
        refused = server_live(address)
        assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        with grpc.secure_channel(address, grpc.ssl_channel_credentials()) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop_thread.run(grpc_server.stop(0))


def test_unusable_tls_files_stop_startup_with_one_sentence(server, loop_thread, tmp_path: Path) -> None:
    from tests.test_cli import server_env

    cert, key = self_signed_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed_certificate(tmp_path / "other")  # a valid key, not the certificate's
    missing = tmp_path / "missing.pem"
    for cert_file, key_file, message in (
        (missing, key, re.escape(f"Could not read grpc.tls_cert_file '{missing}' (No such file or directory).")),
        (cert, tmp_path, "Could not read grpc.tls_key_file"),
        (key, key, "grpc.tls_cert_file .* holds no PEM certificate"),
        (cert, cert, "grpc.tls_key_file .* holds no PEM private key"),
        (cert, other_key, "Could not serve gRPC over TLS on 127.0.0.1:0; grpc.tls_cert_file and grpc.tls_key_file"),
    ):
        with pytest.raises(OSError, match=message):
            start_grpc(loop_thread, server, tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    # The CLI turns it into one line and a failed start (the sentence, not a traceback).
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "server", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=180, env=server_env(tmp_path / "data", INFERENCE_GRPC_PORT=str(port),
                                                     INFERENCE_GRPC_TLS_CERT_FILE=str(missing),
                                                     INFERENCE_GRPC_TLS_KEY_FILE=str(key)))
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Could not read grpc.tls_cert_file" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
