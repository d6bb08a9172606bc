"""Several models served side by side (issue 24): `[model]`'s efficientnet_lite0 and "shapes", a 5-class
squeezenet1_1 from a model repository (tests/conftest.py `model_repository`), on a real server and Redis.

Each model has its own labels, preprocessing defaults, versions and OIP name; a session chooses one with the
`model` option (or one request with `?model=`); history, feedback and the export name the model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch

from handlers.oip_grpc import grpc_predict_v2_pb2 as pb
from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from server.config import ConfigError, load_config
from service.auth import api_key_hash
from tests.conftest import (
    CAT_JPEG,
    COFFEE_JPEG,
    SHAPES,
    RedisServer,
    RunningServer,
    error_code,
    login,
    make_config,
    wait_until,
)
from tests.model_folders import squeezenet_state
from tests.test_oip_grpc import start_grpc

ADMIN_KEY = "models-admin-key"
ADMIN = {"Authorization": f"ApiKey {ADMIN_KEY}"}
DEFAULT = "efficientnet_lite0"
IMAGENET_DEFAULTS = {"resize": 256, "crop": 224, "interpolation": "bilinear",
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SHAPES_DEFAULTS = {**IMAGENET_DEFAULTS, "resize": 160, "crop": 128, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def two(serve: Callable[..., Any], redis_server: RedisServer, model_repository: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Both models, an admin key, capture on, and one model version on its runtime per process at most, so
    that every switch between the models unloads one and loads the other."""
    folder = tmp_path_factory.mktemp("two-models")
    config = make_config(redis_server.url, auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                         models={"repository_dir": str(model_repository), "store_dir": str(folder / "models"),
                                 "max_loaded": 1},
                         capture={"enabled": True, "store_dir": str(folder / "captures")})
    with serve(config, own_models=True) as running:
        yield running


@pytest.fixture
def http(two: RunningServer) -> Iterator[httpx.Client]:
    with two.client() as client:
        yield client


def listing(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/v1/models", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def model_entry(http: httpx.Client, name: str) -> dict[str, Any]:
    return next(model for model in listing(http)["models"] if model["name"] == name)


def predict(http: httpx.Client, auth: dict[str, str], image: bytes = CAT_JPEG, **query: Any) -> dict[str, Any]:
    response = http.post("/v1/predict", content=image, params=query,
                         headers={**auth, "Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_listing_names_every_model_the_default_first_with_its_own_facts(http: httpx.Client) -> None:
    models = listing(http)
    assert models["default"] == DEFAULT
    assert [(m["name"], m["default"]) for m in models["models"]] == [(DEFAULT, True), ("shapes", False)]
    default, shapes = models["models"]
    assert (default["classes"], shapes["classes"]) == (1000, 5)
    assert shapes["format"] == "torchvision" and shapes["architecture"] == "squeezenet1_1"
    assert shapes["preprocess"] == SHAPES_DEFAULTS and default["preprocess"] == IMAGENET_DEFAULTS
    assert shapes["description"] == "five shapes" and shapes["input"] == {"layout": "NCHW", "size": None}
    assert http.get("/v1/models/shapes/labels", headers=ADMIN).json()["labels"] == SHAPES
    assert len(http.get(f"/v1/models/{DEFAULT}/labels", headers=ADMIN).json()["labels"]) == 1000
    missing = http.get("/v1/models/nope/labels", headers=ADMIN)
    assert missing.status_code == 404 and error_code(missing) == "model_not_found"


def test_a_session_chooses_a_model_and_gets_its_defaults_labels_and_history(http: httpx.Client) -> None:
    auth = login(http, model="shapes", top_k=3)
    options = http.get("/v1/session/options", headers=auth).json()["options"]
    assert {key: options[key] for key in SHAPES_DEFAULTS} == SHAPES_DEFAULTS
    assert (options["model"], options["top_k"]) == ("shapes", 3)
    result = predict(http, auth)
    assert result["model"]["name"] == "shapes" and result["label"] in SHAPES and len(result["top_k"]) == 3
    assert {score["label"] for score in result["top_k"]} <= set(SHAPES)
    assert result["options"]["crop"] == 128  # recorded with the options it ran under

    # Back to the default model: its own preprocessing again, top_k kept; the answer is ImageNet's.
    changed = http.patch("/v1/session/options", json={"model": None}, headers=auth).json()["options"]
    assert {key: changed[key] for key in IMAGENET_DEFAULTS} == IMAGENET_DEFAULTS and changed["top_k"] == 3
    again = predict(http, auth)
    assert again["model"]["name"] == DEFAULT and again["label"] not in SHAPES
    history = http.get("/v1/history", headers=auth).json()["items"]
    assert [item["model"]["name"] for item in history[:2]] == [DEFAULT, "shapes"]


def test_one_request_may_run_another_model_without_changing_the_session(http: httpx.Client) -> None:
    auth = login(http)
    result = predict(http, auth, model="shapes")
    assert result["model"]["name"] == "shapes" and result["options"]["crop"] == 128
    assert "model" not in http.get("/v1/session/options", headers=auth).json()["options"]
    unknown = http.post("/v1/predict", content=CAT_JPEG, params={"model": "nope"},
                        headers={**auth, "Content-Type": "image/jpeg"})
    assert unknown.status_code == 422 and error_code(unknown) == "invalid_options"
    assert "'efficientnet_lite0', 'shapes'" in unknown.json()["error"]["message"]


def test_an_unknown_model_is_refused_where_options_are_set(http: httpx.Client) -> None:
    refused = http.post("/v1/sessions", json={"options": {"model": "nope"}})
    assert refused.status_code == 422 and error_code(refused) == "invalid_options"
    auth = login(http)
    patched = http.patch("/v1/session/options", json={"model": "../etc"}, headers=auth)
    assert patched.status_code == 422 and error_code(patched) == "invalid_options"


def test_feedback_takes_the_labels_of_the_predictions_own_model(http: httpx.Client) -> None:
    auth = login(http, model="shapes")
    result = predict(http, auth)
    given = http.put(f"/v1/history/{result['id']}/feedback", json={"label": "Star"}, headers=auth)
    assert given.status_code == 200, given.text
    assert given.json()["feedback"] == {**given.json()["feedback"], "class_index": 2, "label": "star"}
    imagenet_label = http.put(f"/v1/history/{result['id']}/feedback", json={"label": "tabby"}, headers=auth)
    assert imagenet_label.status_code == 422 and error_code(imagenet_label) == "invalid_feedback"
    out_of_range = http.put(f"/v1/history/{result['id']}/feedback", json={"label": 5}, headers=auth)
    assert out_of_range.status_code == 422 and "0 to 4" in out_of_range.json()["error"]["message"]
    shapes = model_entry(http, "shapes")
    assert shapes["configured"]["feedback"]["count"] >= 1  # counted for this model's version, not the default's

    exported = http.get("/v1/feedback/export", params={"model": "shapes", "format": "jsonl"}, headers=ADMIN)
    records = [json.loads(line) for line in exported.text.splitlines()]
    assert records and {record["model"]["name"] for record in records} == {"shapes"}
    assert any(record["history_id"] == result["id"] and record["feedback"]["label"] == "star" for record in records)
    tar = http.get("/v1/feedback/export", params={"model": DEFAULT}, headers=ADMIN)
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        names = [json.load(archive.extractfile(member))["model"]["name"]  # type: ignore[arg-type]
                 for member in archive.getmembers() if member.name.endswith(".json")]
    assert set(names) <= {DEFAULT}


def test_each_model_has_its_own_oip_name_metadata_and_answers(http: httpx.Client) -> None:
    metadata = http.get("/v2/models/shapes").json()
    assert metadata["outputs"][0]["shape"] == [-1, 5]
    assert http.get(f"/v2/models/{DEFAULT}").json()["outputs"][0]["shape"] == [-1, 1000]
    assert http.get("/v2/models/shapes/ready").status_code == 200
    assert http.get("/v2/models/nope/ready").status_code == 404
    auth = login(http)  # a session on the default model: the URL's model answers, under its own defaults
    infer = _infer_binary(http, auth, "shapes")
    assert infer["model_name"] == "shapes"
    labels = [element.split(":", 2)[2] for element in infer["outputs"][0]["data"]]
    assert len(labels) == 2 and set(labels) <= set(SHAPES)
    history = http.get("/v1/history", headers=auth).json()["items"]
    assert history[0]["model"]["name"] == "shapes" and history[0]["options"]["crop"] == 128


def _infer_binary(http: httpx.Client, auth: dict[str, str], model: str) -> dict[str, Any]:
    """POST /v2/models/<model>/infer with the cat as a binary BYTES element; the JSON answer."""
    element = len(CAT_JPEG).to_bytes(4, "little") + CAT_JPEG
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}],
                         "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}).encode()
    response = http.post(f"/v2/models/{model}/infer", content=header + element,
                         headers={**auth, "Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    return response.json()


def test_grpc_names_every_model(two: RunningServer, loop_thread: Any) -> None:
    transport, address = start_grpc(loop_thread, two)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            shapes = stub.ModelMetadata(pb.ModelMetadataRequest(name="shapes"), timeout=30)
            assert list(shapes.outputs[0].shape) == [-1, 5]
            assert stub.ModelReady(pb.ModelReadyRequest(name="shapes"), timeout=30).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=30).ready
            tensor = np.zeros((1, 3, 64, 64), dtype=np.float32)
            request = pb.ModelInferRequest(model_name="shapes", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="preprocessed", datatype="FP32", shape=[1, 3, 64, 64])], raw_input_contents=[tensor.tobytes()])
            answer = stub.ModelInfer(request, timeout=60)
            assert answer.model_name == "shapes" and list(answer.outputs[0].shape) == [1, 5]
    finally:
        loop_thread.run(transport.stop(0))


def test_a_version_must_match_its_models_classes_and_then_serves_it(http: httpx.Client, tmp_path: Path) -> None:
    def publish(version: str, classes: int) -> httpx.Response:
        path = tmp_path / f"{version}.pt"
        torch.save(squeezenet_state(classes, seed=7), path)
        data = path.read_bytes()
        return http.put(f"/v1/models/shapes/versions/{version}", content=data,
                        headers={**ADMIN, "X-Content-SHA256": hashlib.sha256(data).hexdigest()})

    wrong = publish("ten-classes", 10)
    assert wrong.status_code == 422 and error_code(wrong) == "invalid_weights"
    assert "10 classes" in wrong.json()["error"]["message"] and "5" in wrong.json()["error"]["message"]
    imagenet = http.put(f"/v1/models/{DEFAULT}/versions/x", content=b"x" * 2048,
                        headers={**ADMIN, "X-Content-SHA256": "0" * 64})
    assert imagenet.status_code == 400  # the checksum is checked before anything is loaded
    good = publish("retrained", 5)
    assert good.status_code == 201, good.text
    assert good.json()["name"] == "shapes"
    activated = http.post("/v1/models/shapes/versions/retrained:activate", headers=ADMIN)
    assert activated.status_code == 200, activated.text
    try:
        auth = login(http, model="shapes")
        assert predict(http, auth)["model"] == {"name": "shapes", "version": "retrained"}
        assert predict(http, auth, model=DEFAULT)["model"]["name"] == DEFAULT  # the other model keeps its own
        assert model_entry(http, "shapes")["active_version"] == "retrained"
        assert model_entry(http, DEFAULT)["active_version"] is None
    finally:
        configured = model_entry(http, "shapes")["configured"]["version"]
        assert http.post(f"/v1/models/shapes/versions/{configured}:activate", headers=ADMIN).status_code == 200


def test_past_max_loaded_the_least_used_model_is_unloaded_and_loads_again(http: httpx.Client) -> None:
    auth = login(http)
    for _ in range(2):  # one version on its runtime at a time (models.max_loaded = 1): each switch reloads
        assert predict(http, auth, model="shapes")["model"]["name"] == "shapes"
        wait_until(lambda: model_entry(http, "shapes")["loaded"] and not model_entry(http, DEFAULT)["loaded"],
                   "shapes loaded, the default unloaded")
        assert predict(http, auth, COFFEE_JPEG)["model"]["name"] == DEFAULT
        wait_until(lambda: model_entry(http, DEFAULT)["loaded"] and not model_entry(http, "shapes")["loaded"],
                   "the default loaded, shapes unloaded")


def test_a_bad_manifest_stops_the_start_with_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.toml").write_text('format = "onnx"\nfile = "missing.onnx"\nlabels = "l.txt"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(env={"INFERENCE_MODELS_REPOSITORY_DIR": str(tmp_path)})
    assert str(caught.value) == ("models.repository_dir: broken/model.toml: file 'missing.onnx' is not a file in "
                                 "the model's folder.")
    with pytest.raises(ConfigError, match=r"models\.default 'nope' is not a served model"):
        load_config(env={"INFERENCE_MODELS_DEFAULT": "nope"})


def test_each_models_version_counts_its_own_predictions(http: httpx.Client) -> None:
    """inference_predictions_total{model,version}: each version's traffic (the dashboard's canary split)."""

    def counted(model: str) -> float:
        version = model_entry(http, model)["serving_version"]
        line = f'inference_predictions_total{{model="{model}",version="{version}"}} '
        return sum(float(row.rsplit(" ", 1)[1]) for row in http.get("/metrics").text.splitlines()
                   if row.startswith(line))

    before = {name: counted(name) for name in (DEFAULT, "shapes")}
    auth = login(http)
    predict(http, auth, model="shapes")
    predict(http, auth, model="shapes")
    predict(http, auth)
    assert counted("shapes") - before["shapes"] == 2
    assert counted(DEFAULT) - before[DEFAULT] == 1
