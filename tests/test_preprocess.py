"""`POST /v1/preprocess`: the tensor the model sees, as .npy or JSON, and the Python client's array."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np

from clients.python import Client, ValidationError
from inference.model import softmax
from tests.conftest import CAT_JPEG, COFFEE_JPEG, error_code, login


def preprocess(client: httpx.Client, auth: dict[str, str], image: bytes = CAT_JPEG, **kwargs) -> httpx.Response:
    headers = {**auth, "Content-Type": "image/jpeg", **kwargs.pop("headers", {})}
    return client.post("/v1/preprocess", headers=headers, content=image, **kwargs)


def test_the_tensor_fed_to_the_model_in_process_gives_predicts_top_k(client: httpx.Client, server) -> None:
    auth = login(client, top_k=5, interpolation="bicubic")
    for image in (CAT_JPEG, COFFEE_JPEG):
        response = preprocess(client, auth, image)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/x-npy"
        tensor = np.load(io.BytesIO(response.content), allow_pickle=False)
        assert tensor.dtype == np.float32 and tensor.shape == (3, 224, 224)

        logits = server.versions.active.backend.forward(tensor[None])[0]
        probabilities = softmax(logits)
        in_process = list(np.argsort(probabilities)[::-1][:5])
        predicted = client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=image).json()
        assert [score["class_index"] for score in predicted["top_k"]] == in_process
        for score in predicted["top_k"]:
            assert abs(score["score"] - float(probabilities[score["class_index"]])) < 1e-4


def test_options_and_overrides_shape_the_tensor_and_nothing_is_recorded(client: httpx.Client) -> None:
    auth = login(client, resize=192, crop=160)
    small = np.load(io.BytesIO(preprocess(client, auth).content))
    assert small.shape == (3, 160, 160)
    gray_params = {"color": "grayscale", "crop": "96", "mean": "0.5,0.5,0.5", "std": "0.25,0.25,0.25"}
    gray = np.load(io.BytesIO(preprocess(client, auth, params=gray_params).content))
    assert gray.shape == (3, 96, 96)
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])  # one gray plane, three times
    assert not np.array_equal(small[0], small[1])
    session = client.get("/v1/session", headers=auth).json()
    assert session["predictions"] == 0 and session["options"]["crop"] == 160
    assert client.get("/v1/history", headers=auth).json()["items"] == []


def test_json_form_carries_shape_and_base64_of_the_same_bytes(client: httpx.Client) -> None:
    auth = login(client)
    npy = np.load(io.BytesIO(preprocess(client, auth).content))
    answer = preprocess(client, auth, headers={"Accept": "application/json"})
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert body["dtype"] == "float32" and body["byte_order"] == "little" and body["shape"] == [3, 224, 224]
    decoded = np.frombuffer(base64.b64decode(body["data"]), dtype="<f4").reshape(body["shape"])
    assert np.array_equal(decoded, npy)
    assert body["options"]["crop"] == 224
    # .npy wins when it is preferred or both are equal; JSON only when preferred.
    both = preprocess(client, auth, headers={"Accept": "application/x-npy, application/json;q=0.5"})
    assert both.headers["Content-Type"] == "application/x-npy"
    assert preprocess(client, auth, headers={"Accept": "*/*"}).headers["Content-Type"] == "application/x-npy"


def test_errors_are_json(client: httpx.Client) -> None:
    auth = login(client)
    bad = preprocess(client, auth, b"not an image", headers={"Content-Type": "image/png"})
    assert bad.status_code == 422 and error_code(bad) == "invalid_image"
    override = preprocess(client, auth, params={"crop": "2000"})
    assert override.status_code == 422 and error_code(override) == "invalid_options"
    anonymous = client.post("/v1/preprocess", headers={"Content-Type": "image/jpeg"}, content=CAT_JPEG)
    assert anonymous.status_code == 401 and error_code(anonymous) == "missing_token"
    wrong_type = preprocess(client, auth, headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415 and error_code(wrong_type) == "unsupported_media_type"


def test_python_client_returns_a_numpy_array(server) -> None:
    with Client(server.url) as api, server.client() as http:
        api.login(options={"crop": 128, "resize": 160})
        array = api.preprocess(CAT_JPEG)
        assert isinstance(array, np.ndarray) and array.shape == (3, 128, 128) and array.dtype == np.float32
        raw = preprocess(http, {"Authorization": f"Bearer {api.token}"})
        assert np.array_equal(array, np.load(io.BytesIO(raw.content)))
        assert api.preprocess(CAT_JPEG, crop=64).shape == (3, 64, 64)
        try:
            api.preprocess(CAT_JPEG, crop=4096)
        except ValidationError as error:
            assert error.code == "invalid_options" and error.status == 422
        else:
            raise AssertionError("an out-of-range override must raise ValidationError")
