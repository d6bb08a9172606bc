"""The Open Inference Protocol over REST, driven by the real tritonclient.http, plus the shared codec."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, urlparse

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.options import Options
from inference.imaging import preprocess
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG, login, make_config

MODEL = "efficientnet_lite0"


# -- over HTTP with tritonclient.http ----------------------------------------------------------------
@pytest.fixture
def triton(server) -> httpclient.InferenceServerClient:
    client = httpclient.InferenceServerClient(urlparse(server.url).netloc, network_timeout=60)
    yield client
    client.close()


def image_input(*images: bytes, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    else:  # JSON form: each image as base64 text
        tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_),
                                   binary_data=False)
    return tensor


def classes(result: httpclient.InferResult, output: str = "probabilities") -> list[list[tuple[int, str]]]:
    """The classification extension's rows as (index, label) pairs, best first."""
    rows = [[e.decode() if isinstance(e, bytes) else e for e in row] for row in result.as_numpy(output)]
    return [[(int(text.split(":")[1]), text.split(":", 2)[2]) for text in row] for row in rows]


def v1_top(client: httpx.Client, image: bytes, auth: dict[str, str]) -> list[tuple[int, str]]:
    response = client.post("/v1/predict", content=image, headers={**auth, "Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    return [(s["class_index"], s["label"]) for s in response.json()["top_k"]]


def test_health_and_metadata(triton: httpclient.InferenceServerClient, server, client: httpx.Client) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    metadata = triton.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])
    version = server.versions.active.model.version
    for model_metadata in (triton.get_model_metadata(MODEL), triton.get_model_metadata(MODEL, version)):
        assert model_metadata["versions"] == [version]
        assert model_metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                                            {"name": "preprocessed", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
        assert model_metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, version)
    assert not triton.is_model_ready("resnet50") and not triton.is_model_ready(MODEL, "7")
    for path in ("/v2/models/resnet50", f"/v2/models/{MODEL}/versions/7", "/v2/models/resnet50/ready", "/v2/nope"):
        response = client.get(path)
        assert response.status_code == 404 and isinstance(response.json()["error"], str), path


def test_binary_infer_with_a_session_matches_v1_and_is_recorded(
    triton: httpclient.InferenceServerClient, client: httpx.Client
) -> None:
    auth = login(client, top_k=3)
    expected_cat, expected_coffee = v1_top(client, CAT_JPEG, auth), v1_top(client, COFFEE_JPEG, auth)
    assert {index for index, _ in expected_cat} & CAT_CLASSES
    # headers=dict(auth): tritonclient.http adds its own headers to the dict it is given.
    result = triton.infer(MODEL, [image_input(CAT_JPEG, COFFEE_JPEG)], request_id="batch-1", headers=dict(auth),
                          outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)])
    assert result.get_response()["id"] == "batch-1"
    assert result.as_numpy("probabilities").shape == (2, 3)
    assert classes(result) == [expected_cat, expected_coffee]
    # The full probabilities (no output named: every output, binary) rank the same way.
    full = triton.infer(MODEL, [image_input(CAT_JPEG)], headers=dict(auth)).as_numpy("probabilities")
    assert full.shape == (1, 1000) and full.dtype == np.float32 and abs(float(full.sum()) - 1) < 1e-3
    assert [int(i) for i in np.argsort(full[0])[::-1][:3]] == [index for index, _ in expected_cat]
    # Recorded like POST /v1/predict, newest first: the batch's cat then coffee, then the lone cat.
    items = client.get("/v1/history", headers=auth, params={"limit": 10}).json()["items"]
    assert len(items) == 5
    by_v1 = items[3]
    for item, expected in zip(items[:3], (expected_cat, expected_coffee, expected_cat)[::-1], strict=True):
        assert set(item) == set(by_v1)
        assert [(s["class_index"], s["label"]) for s in item["top_k"]] == expected
        assert item["options"] == by_v1["options"] and item["model"] == by_v1["model"]


def test_json_form_and_json_outputs(triton: httpclient.InferenceServerClient, client: httpx.Client) -> None:
    expected = v1_top(client, COFFEE_JPEG, login(client))
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=5)]
    result = triton.infer(MODEL, [image_input(COFFEE_JPEG, binary=False)], outputs=outputs)
    assert "binary_data_size" not in json.dumps(result.get_response())  # answered in plain JSON
    assert classes(result) == [expected]
    assert expected[0][0] in COFFEE_CLASSES
    # The same by hand, with nested data and the version in the path.
    version = triton.get_model_metadata(MODEL)["versions"][0]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                        "data": [[base64.b64encode(COFFEE_JPEG).decode()]]}]}
    response = client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=body)
    assert response.status_code == 200 and "Inference-Header-Content-Length" not in response.headers
    output = response.json()["outputs"][0]
    assert output["shape"] == [1, 1000] and len(output["data"]) == 1000
    assert int(np.argmax(output["data"])) == expected[0][0]


def test_preprocessed_fp32_tensor_gives_the_same_top_k(triton: httpclient.InferenceServerClient,
                                                         client: httpx.Client) -> None:
    auth = login(client)
    expected = v1_top(client, CAT_JPEG, auth)
    batch = preprocess(CAT_JPEG, Options(), max_pixels=40_000_000)[None]
    tensor = httpclient.InferInput("preprocessed", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = triton.infer(MODEL, [tensor], headers=dict(auth),
                          outputs=[httpclient.InferRequestedOutput("probabilities", class_count=5)])
    assert classes(result) == [expected]
    # Recorded as well, under the session's options.
    newest = client.get("/v1/history", headers=auth, params={"limit": 1}).json()["items"][0]
    assert [(s["class_index"], s["label"]) for s in newest["top_k"]] == expected


def test_protocol_errors_and_the_server_keeps_serving(
    triton: httpclient.InferenceServerClient, client: httpx.Client
) -> None:
    def refused(inputs: list[httpclient.InferInput], model: str = MODEL, version: str = "",
                headers: dict[str, str] | None = None) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(model, inputs, model_version=version, headers=headers)
        return caught.value.status(), caught.value.message()

    forged = refused([image_input(CAT_JPEG)], headers={"Authorization": "Bearer not.a.token"})
    assert forged[0] == "401"
    wrong_type = httpclient.InferInput("image", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, np.float32))
    assert refused([wrong_type]) == ("400", "Input 'image' must be BYTES, got 'FP32'.")
    wrong_shape = httpclient.InferInput("preprocessed", [1, 3, 8, 8], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    status, message = refused([wrong_shape])
    assert status == "400" and "shape" in message
    status, message = refused([image_input(b"this is not an image")])
    assert status == "422" and "not an image" in message
    assert refused([image_input(CAT_JPEG)], model="resnet50")[0] == "404"
    assert refused([image_input(CAT_JPEG)], version="999")[0] == "404"
    # Malformed bodies, by hand: always {"error": "<message>"}.
    short_header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": 10}}]}).encode()
    for content, headers in [
        (b"{not json", {}),
        (b'{"inputs": []}', {}),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', {}),
        (short_header + b"\x01\x00", {"Inference-Header-Content-Length": str(len(short_header))}),
        (b"{}", {"Inference-Header-Content-Length": "999"}),
    ]:
        response = client.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)
        assert response.status_code == 400, (content, response.text)
        assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
    # Still serving.
    ok = triton.infer(MODEL, [image_input(CAT_JPEG)],
                      outputs=[httpclient.InferRequestedOutput("probabilities", class_count=1)])
    assert classes(ok)[0][0][0] in CAT_CLASSES
    assert client.get("/healthz").status_code == 200


def test_anonymous_inference_follows_the_plain_predict_setting(serve) -> None:
    with serve(make_config(http={"legacy_predict": False})) as closed, closed.client() as client:
        triton = httpclient.InferenceServerClient(urlparse(closed.url).netloc, network_timeout=60)
        try:
            with pytest.raises(InferenceServerException) as caught:
                triton.infer(MODEL, [image_input(CAT_JPEG)])
            assert caught.value.status() == "401" and "anonymous" in caught.value.message()
            # With a session it works, and metadata stays public.
            result = triton.infer(MODEL, [image_input(CAT_JPEG)], headers=login(client))
            assert result.as_numpy("probabilities").shape == (1, 1000)
            assert triton.is_model_ready(MODEL)
        finally:
            triton.close()


def test_responses_match_the_openapi_document(client: httpx.Client) -> None:
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    document = client.get("/openapi.json").json()
    registry = Registry().with_resource("urn:api", Resource.from_contents(document, default_specification=DRAFT202012))

    def check(response: httpx.Response, path: str, method: str) -> None:
        documented = document["paths"][path][method]["responses"]
        assert str(response.status_code) in documented, (path, response.status_code)
        assert "application/json" in documented[str(response.status_code)]["content"]
        # The schema by its place in the document, so that the references inside it resolve too.
        pointer = "/".join(part.replace("~", "~0").replace("/", "~1") for part in
                           ("paths", path, method, "responses", str(response.status_code), "content",
                            "application/json", "schema"))
        schema = {"$ref": "urn:api#/" + quote(pointer, safe="/~")}
        Draft202012Validator(schema, registry=registry).validate(response.json())

    check(client.get("/v2"), "/v2", "get")
    check(client.get("/v2/health/live"), "/v2/health/live", "get")
    check(client.get(f"/v2/models/{MODEL}"), "/v2/models/{model}", "get")
    check(client.get("/v2/models/resnet50"), "/v2/models/{model}", "get")
    check(client.get(f"/v2/models/{MODEL}/ready"), "/v2/models/{model}/ready", "get")
    body = {"id": "doc", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "data": [base64.b64encode(CAT_JPEG).decode()]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    answer = client.post(f"/v2/models/{MODEL}/infer", json=body)
    check(answer, "/v2/models/{model}/infer", "post")
    assert answer.json()["id"] == "doc" and answer.json()["outputs"][0]["shape"] == [1, 2]
    check(client.post(f"/v2/models/{MODEL}/infer", json={"inputs": []}), "/v2/models/{model}/infer", "post")
    check(client.post(f"/v2/models/{MODEL}/infer", json=body, headers={"Authorization": "Bearer x"}),
          "/v2/models/{model}/infer", "post")
