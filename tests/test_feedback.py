"""Closing the loop with training, end to end on a real server, Redis and model: feedback on
predictions, the quality per version it adds up to, captured images, erasing a session, and the
training export.

The module's server has a Redis database of its own, emptied first, so counts are exact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from websockets.sync.client import connect as ws_connect

from clients.python import AsyncClient, AuthError, Client
from clients.python.cli import main as cli_main
from server.server import make_signer
from service.auth import api_key_hash
from service.capture import Captures
from service.feedback import FeedbackLimits, FeedbackService
from sessions.captures import CaptureRefs
from sessions.feedback import FeedbackStore
from sessions.tokens import TokenSigner
from tests.conftest import CAT_JPEG, COFFEE_JPEG, TEST_SECRET, error_code, login, make_config

ADMIN_KEY = "feedback-export-admin-key"
ADMIN = {"Authorization": f"ApiKey {ADMIN_KEY}"}
FEEDBACK_DB = 7
FEEDBACK_LIMITS_DB = 13  # the daily limit test's own, so that its count starts at zero
SIGNER = TokenSigner([TEST_SECRET], max_age_seconds=3600)
session_ref = SIGNER.session_ref  # how the export, the access log and a purge name a session


def predict(http: httpx.Client, auth: dict[str, str], image: bytes = CAT_JPEG,
            content_type: str = "image/jpeg") -> dict[str, Any]:
    response = http.post("/v1/predict", headers={**auth, "Content-Type": content_type}, content=image)
    assert response.status_code == 200, response.text
    return response.json()


def give(http: httpx.Client, auth: dict[str, str], history_id: str, body: Any) -> httpx.Response:
    return http.put(f"/v1/history/{history_id}/feedback", headers=auth, json=body)


def feedback_config(redis_url: str, capture_dir: str, **capture: Any):
    return make_config(f"{redis_url.rsplit('/', 1)[0]}/{FEEDBACK_DB}",
                       auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                       capture={"enabled": True, "store_dir": capture_dir, **capture},
                       feedback={"export_page_size": 7})


@pytest.fixture(scope="module")
def feedback_server(serve, redis_server, tmp_path_factory) -> Iterator[Any]:
    redis.Redis(port=redis_server.port, db=FEEDBACK_DB).flushdb()
    capture_dir = tmp_path_factory.mktemp("captures")
    with serve(feedback_config(redis_server.url, str(capture_dir))) as running:
        running.capture_dir = capture_dir
        yield running


@pytest.fixture
def http(feedback_server) -> Iterator[httpx.Client]:
    with feedback_server.client() as client:
        yield client


def quality(http: httpx.Client, version: str) -> dict[str, Any]:
    model = http.get("/v1/models", headers=ADMIN).json()["models"][0]
    if model["configured"]["version"] == version:
        return model["configured"]["feedback"]
    return next(entry["feedback"] for entry in model["versions"] if entry["version"] == version)


def test_feedback_by_index_and_by_name_replaces_and_is_withdrawn(http: httpx.Client) -> None:
    auth = login(http)
    item = predict(http, auth)
    assert item["feedback"] is None
    assert http.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"] is None

    by_index = give(http, auth, item["id"], {"label": 285, "comment": "an Egyptian cat"})
    assert by_index.status_code == 200, by_index.text
    body = by_index.json()
    assert body["id"] == item["id"] and body["top_k"] == item["top_k"]
    assert body["feedback"]["class_index"] == 285 and body["feedback"]["label"] == "Egyptian cat"
    assert body["feedback"]["comment"] == "an Egyptian cat" and body["feedback"]["created_at"].endswith("Z")

    by_name = give(http, auth, item["id"], {"label": "  MOTOR Scooter "})  # a repeat replaces it
    assert by_name.status_code == 200
    assert by_name.json()["feedback"] == {**by_name.json()["feedback"], "class_index": 670, "label": "motor scooter",
                                          "comment": None}
    listed = http.get("/v1/history", headers=auth).json()["items"]
    assert [entry["feedback"]["class_index"] for entry in listed] == [670]
    assert http.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"]["label"] == "motor scooter"

    withdrawn = http.delete(f"/v1/history/{item['id']}/feedback", headers=auth)
    assert withdrawn.status_code == 204 and not withdrawn.content
    assert http.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"] is None
    assert http.delete(f"/v1/history/{item['id']}/feedback", headers=auth).status_code == 204  # idempotent


def test_the_labels_a_correction_takes_are_listed_for_a_label_search(http: httpx.Client) -> None:
    auth = login(http)
    name = http.get("/v1/models", headers=auth).json()["models"][0]["name"]
    listed = http.get(f"/v1/models/{name}/labels", headers=auth)
    assert listed.status_code == 200
    body = listed.json()
    assert len(body["labels"]) == 1000 and body["labels"][285] == "Egyptian cat" and body["name"] == name
    assert body["labels"][670] == "motor scooter"  # the name a correction by name resolves to 670
    item = predict(http, auth)
    assert give(http, auth, item["id"], {"label": body["labels"][670].upper()}).json()["feedback"]["class_index"] == 670
    again = http.get(f"/v1/models/{name}/labels", headers={**auth, "If-None-Match": listed.headers["ETag"]})
    assert again.status_code == 304
    assert http.get(f"/v1/models/{name}/labels", headers=ADMIN).status_code == 200
    assert http.get(f"/v1/models/{name}/labels").status_code == 401
    missing = http.get("/v1/models/resnet50/labels", headers=auth)
    assert missing.status_code == 404 and error_code(missing) == "model_not_found"


def test_every_refusal_of_feedback(http: httpx.Client, feedback_server) -> None:
    auth, other = login(http), login(http)
    item = predict(http, auth)
    for history_id in ("1-0", "not-an-id", item["id"]):
        who = other if history_id == item["id"] else auth  # another session's item reads as unknown
        missing = give(http, who, history_id, {"label": 1})
        assert missing.status_code == 404 and error_code(missing) == "history_item_not_found", history_id
        gone = http.delete(f"/v1/history/{history_id}/feedback", headers=who)
        assert gone.status_code == 404 and error_code(gone) == "history_item_not_found"
    limit = feedback_server.config.feedback.max_comment_bytes
    for body in ({"label": 1000}, {"label": -1}, {"label": "no such label"}, {"label": "cardigan"},  # two classes
                 {"label": True}, {"label": 3.5}, {"label": None}, {}, {"label": 1, "comment": "x" * (limit + 1)},
                 {"label": 1, "comment": "😀" * (limit // 4) + "x"},
                 {"label": 1, "comment": 5}, {"label": 1, "extra": 1}):
        refused = give(http, auth, item["id"], body)
        assert refused.status_code == 422 and error_code(refused) == "invalid_feedback", body
    assert give(http, auth, item["id"], {"label": 1, "comment": "x" * limit}).status_code == 200
    assert give(http, auth, item["id"], {"label": 1, "comment": "😀" * (limit // 4)}).status_code == 200
    lone_surrogate = http.put(f"/v1/history/{item['id']}/feedback",  # JSON can spell one; UTF-8 cannot
                              headers={**auth, "Content-Type": "application/json"},
                              content=b'{"label": 1, "comment": "\\ud83d"}')
    assert lone_surrogate.status_code == 422 and error_code(lone_surrogate) == "invalid_feedback"
    assert error_code(http.put(f"/v1/history/{item['id']}/feedback", headers=auth, content=b"{")) == "malformed_json"
    assert error_code(give(http, auth, item["id"], [1])) == "invalid_json_type"
    assert give(http, {}, item["id"], {"label": 1}).status_code == 401
    assert give(http, ADMIN, item["id"], {"label": 1}).status_code == 401


def test_errors_quote_what_a_client_sent_shortened(http: httpx.Client) -> None:
    """A 2 MB label, a long unknown field, history id, option, export parameter or OIP input name: the
    error names it by a short prefix and its length, never whole."""
    auth = login(http)
    item = predict(http, auth)
    huge = "x" * 2_000_000
    long_name = "y" * 5_000
    refusals = [
        (give(http, auth, item["id"], {"label": huge}), 422),
        (give(http, auth, item["id"], {"label": 1, long_name: 1}), 422),
        (http.get(f"/v1/history/1-{'9' * 5_000}", headers=auth), 404),
        (http.patch("/v1/session/options", headers=auth, json={long_name: 1}), 422),
        (http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, params={"top_k": long_name},
                   content=CAT_JPEG), 422),
        (export(http, since=long_name), 400),
        (http.post("/v2/models/efficientnet_lite0/infer", headers=auth,
                   json={"inputs": [{"name": long_name, "datatype": "BYTES", "shape": [1], "data": ["x"]}]}), 400),
    ]
    for response, status in refusals:
        assert response.status_code == status, response.text[:200]
        body = response.json()
        message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
        assert len(message) < 300 and "characters)" in message, message[:300]


def test_agreement_per_version_adds_up_known_feedback(http: httpx.Client) -> None:
    version = http.get("/v1/models", headers=ADMIN).json()["models"][0]["configured"]["version"]
    before = quality(http, version)
    auth = login(http)
    items = [predict(http, auth) for _ in range(4)]
    top1 = items[0]["predicted_class"]
    assert all(item["predicted_class"] == top1 for item in items)
    # Three agree with the top-1, one does not; then one agreeing is replaced by a disagreeing one.
    for item, label in zip(items, [top1, top1, top1, 1], strict=True):
        assert give(http, auth, item["id"], {"label": label}).status_code == 200
    assert give(http, auth, items[0]["id"], {"label": 2}).status_code == 200
    after = quality(http, version)
    count = before["count"] + 4
    agreeing = round((before["agreement"] or 0) * before["count"]) + 2
    assert after == {"count": count, "agreement": round(agreeing / count, 4)}
    assert http.delete(f"/v1/history/{items[3]['id']}/feedback", headers=auth).status_code == 204
    assert quality(http, version) == {"count": count - 1, "agreement": round(agreeing / (count - 1), 4)}
    metrics = http.get("/metrics").text
    assert f'inference_feedback_total{{agreement="true",model="efficientnet_lite0",version="{version}"}}' in metrics
    assert f'inference_feedback_total{{agreement="false",model="efficientnet_lite0",version="{version}"}}' in metrics


def test_a_replayed_predict_shows_its_feedback(http: httpx.Client) -> None:
    auth = login(http)
    keyed = {**auth, "Idempotency-Key": "feedback-replay-1"}
    first = http.post("/v1/predict", headers={**keyed, "Content-Type": "image/jpeg"}, content=COFFEE_JPEG).json()
    assert give(http, auth, first["id"], {"label": 967}).status_code == 200
    again = http.post("/v1/predict", headers={**keyed, "Content-Type": "image/jpeg"}, content=COFFEE_JPEG)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["feedback"]["class_index"] == 967


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def captured_files(directory: Path) -> set[str]:
    return {path.name for path in directory.rglob("*") if path.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_captured_images_are_read_back_byte_for_byte_by_their_session_only(http: httpx.Client,
                                                                           feedback_server) -> None:
    auth, other = login(http), login(http)
    jpeg = predict(http, auth)
    png = png_bytes((10, 200, 30))
    multipart = http.post("/v1/predict", headers=auth, files={"image": ("x.png", png, "image/png")}).json()
    assert jpeg["image"] == {"sha256": sha(CAT_JPEG), "content_type": "image/jpeg", "size": len(CAT_JPEG)}
    assert multipart["image"] == {"sha256": sha(png), "content_type": "image/png", "size": len(png)}
    for item, data, media in ((jpeg, CAT_JPEG, "image/jpeg"), (multipart, png, "image/png")):
        got = http.get(f"/v1/history/{item['id']}/image", headers=auth)
        assert got.status_code == 200 and got.content == data and got.headers["Content-Type"] == media
        assert http.get(f"/v1/history/{item['id']}", headers=auth).json()["image"] == item["image"]
        refused = http.get(f"/v1/history/{item['id']}/image", headers=other)
        assert refused.status_code == 404 and error_code(refused) == "history_item_not_found"
    assert http.get(f"/v1/history/{jpeg['id']}/image").status_code == 401
    # Each session keeps its own copy: the same image from another session is a file of its own.
    again = predict(http, other, png, "image/png")
    assert again["image"] == multipart["image"]
    assert len(list(feedback_server.capture_dir.rglob(sha(png)))) == 2
    assert not [name for name in captured_files(feedback_server.capture_dir) if name.endswith(".partial")]


def test_the_protocol_route_with_a_session_captures_too_and_a_tensor_is_not_an_image(http: httpx.Client) -> None:
    auth = login(http)
    png = png_bytes((1, 2, 3))
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(png).decode()]}]}
    assert http.post("/v2/models/efficientnet_lite0/infer", json=body, headers=auth).status_code == 200
    item = http.get("/v1/history", headers=auth).json()["items"][0]
    assert item["image"]["sha256"] == sha(png)
    assert http.get(f"/v1/history/{item['id']}/image", headers=auth).content == png
    tensor = {"inputs": [{"name": "preprocessed", "datatype": "FP32", "shape": [1, 3, 32, 32],
                          "data": [0.0] * (3 * 32 * 32)}]}
    assert http.post("/v2/models/efficientnet_lite0/infer", json=tensor, headers=auth).status_code == 200
    item = http.get("/v1/history", headers=auth).json()["items"][0]
    assert item["image"] is None
    missing = http.get(f"/v1/history/{item['id']}/image", headers=auth)
    assert missing.status_code == 404 and error_code(missing) == "image_not_found"


def test_the_stream_captures_too(http: httpx.Client, feedback_server) -> None:
    auth = login(http)
    png = png_bytes((3, 140, 3))
    url = feedback_server.url.replace("http://", "ws://") + "/v1/stream"
    with ws_connect(url, additional_headers=auth, open_timeout=30) as socket:
        assert json.loads(socket.recv(timeout=30))["type"] == "ready"
        socket.send(png)
        result = json.loads(socket.recv(timeout=30))
    assert result["type"] == "result" and result["result"]["feedback"] is None
    assert result["result"]["image"]["sha256"] == sha(png)
    assert http.get(f"/v1/history/{result['result']['id']}/image", headers=auth).content == png


def test_without_capture_nothing_is_kept(client: httpx.Client) -> None:
    auth = login(client)
    item = predict(client, auth)
    assert item["image"] is None
    missing = client.get(f"/v1/history/{item['id']}/image", headers=auth)
    assert missing.status_code == 404 and error_code(missing) == "image_not_found"


def test_erase_removes_the_sessions_feedback_and_images_but_not_an_image_another_session_holds(
        http: httpx.Client, feedback_server) -> None:
    erased, keeper = login(http), login(http)
    unique = png_bytes((250, 1, 99))
    shared, own = predict(http, erased), predict(http, erased, unique, "image/png")
    kept = predict(http, keeper)  # the same cat: one file, two holders
    assert give(http, erased, own["id"], {"label": 3}).status_code == 200
    assert give(http, erased, shared["id"], {"label": 4}).status_code == 200
    assert {sha(unique), sha(CAT_JPEG)} <= captured_files(feedback_server.capture_dir)
    version = shared["model"]["version"]
    before = quality(http, version)["count"]

    bad = http.delete("/v1/session", headers=erased, params={"erase": "yes"})
    assert bad.status_code == 400 and error_code(bad) == "invalid_parameter"
    assert http.delete("/v1/session", headers=erased, params={"erase": "true"}).status_code == 204
    # An erase leaves no tombstone (it would name the session): the token reads as not found.
    assert error_code(http.get("/v1/session", headers=erased)) == "session_not_found"
    assert sha(unique) not in captured_files(feedback_server.capture_dir)
    assert sha(CAT_JPEG) in captured_files(feedback_server.capture_dir)
    assert http.get(f"/v1/history/{kept['id']}/image", headers=keeper).content == CAT_JPEG
    assert quality(http, version)["count"] == before - 2


def new_session(http: httpx.Client) -> tuple[dict[str, str], str]:
    body = http.post("/v1/sessions").json()
    return {"Authorization": f"Bearer {body['token']}"}, body["session_id"]


def export(http: httpx.Client, **params: Any) -> httpx.Response:
    return http.get("/v1/feedback/export", headers=ADMIN, params=params)


def tar_items(content: bytes) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read as a stream, as WebDataset reads it."""
    items: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(content), mode="r|") as archive:
        for member in archive:
            key, _, extension = member.name.partition(".")
            data = archive.extractfile(member)
            assert data is not None and member.isfile()
            items.setdefault(key, {})[extension] = data.read()
    return items


def test_the_export_is_a_tar_of_json_class_and_image_per_item_and_jsonl(http: httpx.Client) -> None:
    started = int(time.time() * 1000)
    auth, session_id = new_session(http)
    png = png_bytes((90, 80, 70))
    cat, square = predict(http, auth), predict(http, auth, png, "image/png")
    predict(http, auth, COFFEE_JPEG)  # no feedback: not exported
    assert give(http, auth, cat["id"], {"label": 285, "comment": "Egyptian"}).status_code == 200
    assert give(http, auth, square["id"], {"label": "Motor Scooter"}).status_code == 200

    response = export(http, since=started)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/x-tar"
    assert response.headers.get("Transfer-Encoding") == "chunked"  # streamed, not buffered to a length
    assert session_id.encode() not in response.content  # only its hash
    items = tar_items(response.content)
    key = f"{session_ref(session_id)}-{cat['id']}"
    assert set(items) == {key, f"{session_ref(session_id)}-{square['id']}"}
    assert set(items[key]) == {"json", "cls", "jpg"} and items[key]["jpg"] == CAT_JPEG
    assert items[key]["cls"] == b"285"
    record = json.loads(items[key]["json"])
    assert record["key"] == key and record["session"] == session_ref(session_id) and record["history_id"] == cat["id"]
    assert record["prediction"] == {"class_index": cat["predicted_class"], "label": cat["label"],
                                    "top_k": cat["top_k"]}
    assert record["feedback"]["class_index"] == 285 and record["feedback"]["label"] == "Egyptian cat"
    assert record["feedback"]["comment"] == "Egyptian" and record["predicted_at"] == cat["created_at"]
    assert record["agrees"] is (cat["predicted_class"] == 285)
    assert record["model"] == cat["model"] and record["options"] == cat["options"]
    assert record["image"] == {**cat["image"], "file": f"{key}.jpg"}
    square_key = f"{session_ref(session_id)}-{square['id']}"
    assert items[square_key]["png"] == png and items[square_key]["cls"] == b"670"

    lines = export(http, since=started, format="jsonl")
    assert lines.status_code == 200 and lines.headers["Content-Type"] == "application/x-ndjson"
    records = [json.loads(line) for line in lines.text.splitlines()]
    assert [r["key"] for r in records] == [key, square_key]  # oldest feedback first
    assert records[0] == {**record, "image": {**cat["image"], "file": None}}


def test_a_jsonl_record_is_one_line_whatever_its_comment_holds(http: httpx.Client) -> None:
    started = int(time.time() * 1000)
    auth = login(http)
    comment = "next\x85line\u2028separator\u2029paragraph é 😀"
    for item in (predict(http, auth), predict(http, auth)):
        assert give(http, auth, item["id"], {"label": 1, "comment": comment}).status_code == 200
    response = export(http, since=started, format="jsonl")
    lines = response.text.splitlines()  # splits at U+0085, U+2028 and U+2029 too, as many line readers do
    assert len(lines) == 2 and [json.loads(line)["feedback"]["comment"] for line in lines] == [comment] * 2
    assert "é 😀".encode() in response.content  # the rest stays UTF-8, not \u-escaped
    record = next(iter(tar_items(export(http, since=started).content).values()))["json"]
    assert b"\\u2028" in record and json.loads(record)["feedback"]["comment"] == comment


def test_the_python_clients_and_the_cli_download_the_export(http: httpx.Client, feedback_server, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    started = datetime.now(UTC) - timedelta(milliseconds=1)
    auth, session_id = new_session(http)
    cat = predict(http, auth)
    assert give(http, auth, cat["id"], {"label": "tabby"}).status_code == 200
    key = f"{session_ref(session_id)}-{cat['id']}"
    since = {"since": int(started.timestamp() * 1000)}
    expected = export(http, **since).content

    with Client(feedback_server.url) as client:
        written = client.export_feedback(tmp_path / "feedback.tar", admin_key=ADMIN_KEY, since=started)
        assert written == len(expected) and (tmp_path / "feedback.tar").read_bytes() == expected
        assert tar_items(expected)[key]["jpg"] == CAT_JPEG and tar_items(expected)[key]["cls"] == b"281"
        with pytest.raises(AuthError) as refused:
            client.export_feedback(tmp_path / "refused.tar", admin_key="wrong")
        assert refused.value.code == "invalid_api_key" and not (tmp_path / "refused.tar").exists()

    async def jsonl() -> bytes:
        out = io.BytesIO()
        async with AsyncClient(feedback_server.url) as client:
            assert await client.export_feedback(out, admin_key=ADMIN_KEY, since=started,
                                                model_version=cat["model"]["version"], export_format="jsonl") > 0
        return out.getvalue()

    (record,) = [json.loads(line) for line in asyncio.run(jsonl()).splitlines()]
    assert record["key"] == key and record["feedback"]["label"] == "tabby"

    monkeypatch.setenv("INFERENCE_ADMIN_KEY", ADMIN_KEY)
    out = tmp_path / "cli.tar"
    assert cli_main(["export", str(out), "--url", feedback_server.url, "--since", str(since["since"])]) == 0
    assert out.read_bytes() == expected and f"wrote {len(expected)} bytes" in capsys.readouterr().err
    monkeypatch.delenv("INFERENCE_ADMIN_KEY")
    assert cli_main(["export", str(tmp_path / "none.tar"), "--url", feedback_server.url]) == 2
    assert "needs an admin key" in capsys.readouterr().err and not (tmp_path / "none.tar").exists()


def test_the_cli_writes_the_export_to_standard_output(http: httpx.Client, feedback_server,
                                                     capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    auth, _ = new_session(http)
    item = predict(http, auth)
    assert give(http, auth, item["id"], {"label": 3}).status_code == 200
    assert cli_main(["export", "-", "--url", feedback_server.url, "--admin-key", ADMIN_KEY, "--format", "jsonl",
                     "--model-version", item["model"]["version"]]) == 0
    records = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert item["id"] in {record["history_id"] for record in records}


def test_export_filters_and_refusals(http: httpx.Client) -> None:
    auth = login(http)
    first = predict(http, auth)
    assert give(http, auth, first["id"], {"label": 1}).status_code == 200
    middle = int(time.time() * 1000) + 1
    time.sleep(0.01)
    second = predict(http, auth)
    assert give(http, auth, second["id"], {"label": 2}).status_code == 200
    after = int(time.time() * 1000) + 1

    def history_ids(**params: Any) -> list[str]:
        response = export(http, format="jsonl", **params)
        assert response.status_code == 200, response.text
        return [json.loads(line)["history_id"] for line in response.text.splitlines()]

    assert history_ids(since=middle) == [second["id"]]
    iso_middle = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle / 1000)) + f".{middle % 1000:03d}Z"
    assert history_ids(since=iso_middle) == [second["id"]]
    assert first["id"] in history_ids(until=middle) and second["id"] not in history_ids(until=middle)
    assert history_ids(since=after) == []
    version = first["model"]["version"]
    assert history_ids(since=middle, model_version=version) == [second["id"]]
    assert history_ids(model_version="another-version") == []
    empty = export(http, since=after)
    assert empty.status_code == 200 and tar_items(empty.content) == {}
    for params in ({"since": "yesterday"}, {"until": "2026-13-01"}, {"since": after, "until": middle},
                   {"format": "zip"}, {"model_version": "bad version!"}, {"version": version}):
        refused = export(http, **params)
        assert refused.status_code == 400 and error_code(refused) == "invalid_parameter", params
    for headers, code in (({}, "missing_api_key"), (auth, "missing_api_key"),
                          ({"Authorization": "ApiKey wrong"}, "invalid_api_key")):
        refused = http.get("/v1/feedback/export", headers=headers)
        assert refused.status_code == 401 and error_code(refused) == code


def test_a_large_export_pages_through_every_item_once(http: httpx.Client, feedback_server) -> None:
    started = int(time.time() * 1000)
    auth, session_id = new_session(http)
    items = [predict(http, auth, png_bytes((n, 0, 0)), "image/png") for n in range(24)]
    for n, item in enumerate(items):  # feedback given within the same milliseconds pages by position
        assert give(http, auth, item["id"], {"label": n}).status_code == 200
    assert feedback_server.config.feedback.export_page_size < len(items)  # several pages
    with http.stream("GET", "/v1/feedback/export", headers=ADMIN, params={"since": started}) as response:
        chunks = [chunk for chunk in response.iter_raw()]
    exported = tar_items(b"".join(chunks))
    assert sorted(exported) == sorted(f"{session_ref(session_id)}-{item['id']}" for item in items)
    assert all(exported[f"{session_ref(session_id)}-{item['id']}"]["png"] == png_bytes((n, 0, 0))
               for n, item in enumerate(items))


def test_pages_of_the_feedback_index_get_each_record_once_while_it_changes(feedback_server, loop_thread) -> None:
    """Records of one millisecond, paged 3 at a time, while a record already read is withdrawn and another
    arrives in that same millisecond: an offset within the millisecond would skip one."""
    store = FeedbackStore(feedback_server.store.redis, "page-test-model")

    async def put(ref: str, n: int, at_ms: int) -> None:
        await store.set([ref], f"{n}-0", {"model": {"name": "page-test-model", "version": "v"}, "agrees": False,
                                          "n": n}, at_ms=at_ms, model="page-test-model", version="v", agrees=False,
                        keep_until_ms=2**41, owner="o", max_per_session=100, daily_limit=0)

    async def fill_and_read() -> list[int]:
        for n in range(10):
            await put(f"{n % 3:016x}", n, 5000 + (n >= 8))
        page, cursor = await store.page(0, 10**13, after=None, limit=3)
        seen = [item["n"] for item in page]
        await store.delete([f"{seen[0] % 3:016x}"], f"{seen[0]}-0")
        await put(f"{9:016x}", 10, 5000)
        while cursor is not None:
            page, cursor = await store.page(0, 10**13, after=cursor, limit=3)
            seen += [item["n"] for item in page]
        return seen

    seen = loop_thread.run(fill_and_read())
    assert sorted(seen) == list(range(11)), seen  # each exactly once, the one that came meanwhile too
    assert loop_thread.run(store.stats("page-test-model")) == {"v": (10, 0)}


def test_each_models_versions_are_counted_apart_and_a_removal_uncounts_its_own(feedback_server, loop_thread) -> None:
    """The counters of another model than the one the keys are named after (several models share them): the
    Lua scripts' uncount and the store's set name them alike, so a removal takes from the right counter."""
    store = FeedbackStore(feedback_server.store.redis, "counters-home")

    async def give(model: str, n: int, agrees: bool) -> None:
        record = {"model": {"name": model, "version": "v1"}, "agrees": agrees}
        await store.set([f"{n:016x}"], f"{n}-0", record, at_ms=1000 + n, model=model, version="v1", agrees=agrees,
                        keep_until_ms=2**41, owner="o", max_per_session=100, daily_limit=0)

    async def run() -> tuple[dict, dict, dict, dict]:
        await give("counters-home", 1, True)
        await give("shapes", 2, True)
        await give("shapes", 3, False)
        counted = await store.stats("counters-home"), await store.stats("shapes")
        await store.delete([f"{3:016x}"], "3-0")
        return (*counted, await store.stats("counters-home"), await store.stats("shapes"))

    home, shapes, home_after, shapes_after = loop_thread.run(run())
    assert (home, shapes) == ({"v1": (1, 1)}, {"v1": (2, 1)})
    assert (home_after, shapes_after) == ({"v1": (1, 1)}, {"v1": (1, 1)})


def feedback_key(model: str, name: str) -> str:
    return f"feedback:{{{model}}}:{name}"


def test_a_comment_is_stored_as_utf8_measured_in_redis(http: httpx.Client, redis_server) -> None:
    """The bytes one feedback record takes in Redis for a 500-emoji comment: the record itself (HSTRLEN), its
    member in the time index and the session's set. Stored \\u-escaped (ensure_ascii) the comment alone was
    6,000 bytes; as UTF-8 it is 2,000."""
    auth, session_id = new_session(http)
    item = predict(http, auth)
    comment = "😀" * 500
    assert give(http, auth, item["id"], {"label": 1, "comment": comment}).status_code == 200
    client = redis.Redis(port=redis_server.port, db=FEEDBACK_DB)
    model, member = item["model"]["name"], f"{session_ref(session_id)}/{item['id']}"
    stored = client.hget(feedback_key(model, "records"), member)
    assert stored is not None and comment.encode() in stored
    record_bytes = client.hstrlen(feedback_key(model, "records"), member)
    index_bytes = len(member) + 8  # the member and its score
    print(f"feedback record with a 500-emoji comment: {record_bytes} bytes of JSON, +{index_bytes} in the index, "
          f"+{len(member)} in the session's set")
    assert record_bytes < len(comment.encode()) + 1500  # the comment as UTF-8 and the rest of the record
    assert client.sismember(feedback_key(model, f"session:{session_ref(session_id)}"), member)
    assert client.pttl(feedback_key(model, f"session:{session_ref(session_id)}")) > 300 * 24 * 3600 * 1000


def test_the_admin_purges_feedback_by_session_and_by_time(http: httpx.Client) -> None:
    started = int(time.time() * 1000)
    (purged, purged_id), (keeper, keeper_id) = new_session(http), new_session(http)
    for auth in (purged, keeper, purged):
        item = predict(http, auth)
        assert give(http, auth, item["id"], {"label": 967}).status_code == 200
    version = item["model"]["version"]
    before = quality(http, version)["count"]

    def purge(**params: Any) -> httpx.Response:
        return http.delete("/v1/feedback", headers=ADMIN, params=params)

    def exported_sessions() -> list[str]:
        return [json.loads(line)["session"] for line in export(http, since=started, format="jsonl").text.splitlines()]

    by_session = purge(session=session_ref(purged_id), since=started)
    assert by_session.status_code == 200 and by_session.json() == {"deleted": 2}
    assert exported_sessions() == [session_ref(keeper_id)] and quality(http, version)["count"] == before - 2
    assert purge(session=session_ref(purged_id)).json() == {"deleted": 0}  # again: nothing left
    later = int(time.time() * 1000) + 1
    assert purge(since=later).json() == {"deleted": 0}
    assert purge(since=started, until=later).json() == {"deleted": 1} and exported_sessions() == []
    for params in ({}, {"session": purged_id}, {"session": "x" * 5000}, {"since": "soon"},
                   {"since": later, "until": started}, {"sessions": session_ref(keeper_id)}):
        refused = purge(**params)
        assert refused.status_code == 400 and error_code(refused) == "invalid_parameter", params
    assert http.delete("/v1/feedback", headers=keeper, params={"since": started}).status_code == 401


def test_retention_sweeps_feedback_through_the_time_index(http: httpx.Client, feedback_server, redis_server,
                                                         loop_thread) -> None:
    auth, session_id = new_session(http)
    item = predict(http, auth)
    assert give(http, auth, item["id"], {"label": 3}).status_code == 200
    given_at = int(time.time() * 1000)
    feedback = FeedbackService(feedback_server.store, FeedbackStore(feedback_server.store.redis, item["model"]["name"]),
                               labels=lambda: [], signer=SIGNER, limits=FeedbackLimits(retention_days=1))
    assert loop_thread.run(feedback.sweep()) == 0
    assert http.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"]["class_index"] == 3
    assert loop_thread.run(feedback.sweep(now=given_at + 24 * 3600 * 1000 + 1000)) >= 1
    assert http.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"] is None
    client = redis.Redis(port=redis_server.port, db=FEEDBACK_DB)
    model, member = item["model"]["name"], f"{session_ref(session_id)}/{item['id']}"
    assert client.zscore(feedback_key(model, "index"), member) is None
    assert not client.sismember(feedback_key(model, f"session:{session_ref(session_id)}"), member)


@pytest.fixture
def server_with(serve, redis_server, feedback_server, tmp_path) -> Any:
    """Another server on the module's Redis and model runner, with some settings changed."""

    def start(db: int = FEEDBACK_DB, **sections: dict[str, Any]) -> Any:
        """`db`: another Redis database than the module's (emptied first), for counts of its own."""
        if db != FEEDBACK_DB:
            redis.Redis(port=redis_server.port, db=db).flushdb()
        config = feedback_config(redis_server.url, str(tmp_path / "captures"))
        config.redis.url = f"{redis_server.url.rsplit('/', 1)[0]}/{db}"
        for section, values in sections.items():
            for key, value in values.items():
                setattr(getattr(config, section), key, value)
        return serve(config, runner=feedback_server.runner, served=feedback_server.served)

    return start


def test_giving_feedback_costs_one_from_the_sessions_rate_limit(server_with) -> None:
    with server_with(sessions={"rate_limit_per_minute": 3}) as running, running.client() as http:
        auth = login(http)
        item = predict(http, auth)
        assert http.get("/v1/history", headers=auth).status_code == 200  # reads are free
        for label in (1, 2):
            assert give(http, auth, item["id"], {"label": label}).status_code == 200
        refused = give(http, auth, item["id"], {"label": 3})
        assert refused.status_code == 429 and error_code(refused) == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        assert http.delete(f"/v1/history/{item['id']}/feedback", headers=auth).status_code == 204  # free


def test_feedback_is_bounded_per_session_by_the_history_and_per_address_a_day(server_with) -> None:
    with server_with(db=FEEDBACK_LIMITS_DB, history={"max_entries": 1}, feedback={"daily_limit": 3}) as running, \
            running.client() as http:
        auth = login(http)
        first = predict(http, auth)
        assert give(http, auth, first["id"], {"label": 1}).status_code == 200
        second = predict(http, auth)  # the history holds one: the first item is gone from it, its feedback stays
        full = give(http, auth, second["id"], {"label": 1})
        assert full.status_code == 409 and error_code(full) == "feedback_limit_reached"
        for _ in range(2):  # every session of this client address counts toward its day
            other = login(http)
            assert give(http, other, predict(http, other)["id"], {"label": 2}).status_code == 200
        other = login(http)
        limited = give(http, other, predict(http, other)["id"], {"label": 2})
        assert limited.status_code == 429 and error_code(limited) == "feedback_rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 24 * 3600


def test_erase_finds_feedback_given_before_a_secret_rotation(http: httpx.Client, server_with) -> None:
    started = int(time.time() * 1000)
    auth, session_id = new_session(http)
    item = predict(http, auth)
    assert give(http, auth, item["id"], {"label": 5}).status_code == 200
    rotated = ["a-newer-secret-0123456789", TEST_SECRET]  # the old token still verifies
    with server_with(auth={"secret_keys": rotated, "admin_api_keys": [api_key_hash(ADMIN_KEY)]}) as running, \
            running.client() as after:
        assert after.get(f"/v1/history/{item['id']}", headers=auth).json()["feedback"]["class_index"] == 5
        assert after.delete("/v1/session", headers=auth, params={"erase": "true"}).status_code == 204
    assert not [line for line in export(http, since=started, format="jsonl").text.splitlines()
                if json.loads(line)["session"] == session_ref(session_id)]


def test_erase_finds_feedback_recorded_before_sessions_were_named_by_ref(http: httpx.Client, redis_server) -> None:
    """Feedback stored by the earlier layout, keyed by the raw session id, goes with the session's erase too."""
    auth, session_id = new_session(http)
    item = predict(http, auth)
    client = redis.Redis(port=redis_server.port, db=FEEDBACK_DB)
    model, version = item["model"]["name"], item["model"]["version"]
    before = quality(http, version)["count"]
    member = f"{session_id}/{item['id']}"  # what the earlier store wrote: the id itself, a plain hash inside
    record = {"session": hashlib.sha256(session_id.encode()).hexdigest()[:16], "history_id": item["id"],
              "feedback": {"class_index": 1, "comment": "given before refs"}, "agrees": False, "model": item["model"]}
    client.hset(feedback_key(model, "records"), member, json.dumps(record))
    client.zadd(feedback_key(model, "index"), {member: int(time.time() * 1000)})
    client.sadd(feedback_key(model, f"session:{session_id}"), member)
    client.hincrby(feedback_key(model, "stats"), f"count:{version}", 1)
    assert quality(http, version)["count"] == before + 1
    assert http.delete("/v1/session", headers=auth, params={"erase": "true"}).status_code == 204
    assert client.hget(feedback_key(model, "records"), member) is None
    assert client.zscore(feedback_key(model, "index"), member) is None
    assert not client.exists(feedback_key(model, f"session:{session_id}"))
    assert quality(http, version)["count"] == before


def test_the_python_clients_purge_feedback_by_session(feedback_server) -> None:
    with Client(feedback_server.url) as client:
        client.login()
        item = client.predict(CAT_JPEG)
        client.feedback(item["id"], 5)
        ref = session_ref(client.session()["session_id"])
        with pytest.raises(ValueError, match="since, until or session"):
            client.purge_feedback(admin_key=ADMIN_KEY)
        assert client.purge_feedback(admin_key=ADMIN_KEY, session=ref) == 1
        assert client.history_item(item["id"])["feedback"] is None

        async def purge_again() -> int:
            async with AsyncClient(feedback_server.url) as admin:
                return await admin.purge_feedback(admin_key=ADMIN_KEY, session=ref, until=datetime.now(UTC))

        assert asyncio.run(purge_again()) == 0


def test_erase_removes_everything_of_the_session_from_the_export(http: httpx.Client) -> None:
    started = int(time.time() * 1000)
    (erased, erased_id), (keeper, keeper_id) = new_session(http), new_session(http)
    for auth in (erased, keeper):
        item = predict(http, auth, COFFEE_JPEG)
        assert give(http, auth, item["id"], {"label": 967}).status_code == 200
    sessions = {json.loads(line)["session"] for line in export(http, since=started, format="jsonl").text.splitlines()}
    assert sessions == {session_ref(erased_id), session_ref(keeper_id)}
    assert http.delete("/v1/session", headers=erased, params={"erase": "true"}).status_code == 204
    items = tar_items(export(http, since=started).content)
    assert {key.split("-")[0] for key in items} == {session_ref(keeper_id)}
    assert next(iter(items.values()))["jpg"] == COFFEE_JPEG  # the shared image stays for the keeper


def test_answers_match_the_documented_schemas(http: httpx.Client) -> None:
    document = http.get("/openapi.json").json()
    registry = Registry().with_resource("urn:api", Resource.from_contents(document,
                                                                        default_specification=DRAFT202012))

    def check(response: httpx.Response, path: str, method: str) -> None:
        responses = document["paths"][path][method]["responses"]
        assert str(response.status_code) in responses, f"{method} {path} answered {response.status_code}"
        content = responses[str(response.status_code)].get("content", {}).get("application/json")
        if content:
            pointer = content["schema"]["$ref"].removeprefix("#")
            Draft202012Validator({"$ref": f"urn:api#{pointer}"}, registry=registry).validate(response.json())

    auth = login(http)
    item = predict(http, auth)
    check(http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG),
          "/v1/predict", "post")
    check(give(http, auth, item["id"], {"label": 3, "comment": "x"}), "/v1/history/{id}/feedback", "put")
    check(give(http, auth, item["id"], {"label": 3000}), "/v1/history/{id}/feedback", "put")
    check(give(http, auth, "1-0", {"label": 3}), "/v1/history/{id}/feedback", "put")
    check(http.delete(f"/v1/history/{item['id']}/feedback", headers=auth), "/v1/history/{id}/feedback", "delete")
    check(http.get(f"/v1/history/{item['id']}", headers=auth), "/v1/history/{id}", "get")
    check(http.get("/v1/history", headers=auth), "/v1/history", "get")
    check(http.get(f"/v1/history/{item['id']}/image", headers=auth), "/v1/history/{id}/image", "get")
    check(http.get("/v1/history/1-0/image", headers=auth), "/v1/history/{id}/image", "get")
    check(http.get("/v1/models", headers=auth), "/v1/models", "get")
    check(export(http, since="x"), "/v1/feedback/export", "get")
    check(http.get("/v1/feedback/export", headers=auth), "/v1/feedback/export", "get")
    check(export(http, format="jsonl"), "/v1/feedback/export", "get")
    check(http.delete("/v1/session", headers=auth, params={"erase": "maybe"}), "/v1/session", "delete")


def test_short_of_disk_the_prediction_is_recorded_without_its_image(serve, redis_server, tmp_path: Path) -> None:
    config = make_config(redis_server.url, capture={"enabled": True, "store_dir": str(tmp_path / "captures"),
                                                    "min_free_disk_bytes": 1 << 62})
    with serve(config) as running, running.client() as client:
        auth = login(client)
        item = predict(client, auth, png_bytes((1, 2, 3)), "image/png")
        assert item["image"] is None and client.get(f"/v1/history/{item['id']}", headers=auth).json()["image"] is None
        metrics = client.get("/metrics").text
        assert 'inference_capture_skipped_total{reason="low_disk"} 1.0' in metrics
        assert captured_files(tmp_path / "captures") == set()


def test_retention_deletes_images_nobody_sent_within_it(http: httpx.Client, feedback_server, loop_thread) -> None:
    auth = login(http)
    item = predict(http, auth, png_bytes((7, 7, 7)), "image/png")
    captures = Captures(CaptureRefs(feedback_server.store.redis), names=make_signer(feedback_server.config),
                        store_dir=feedback_server.capture_dir, enabled=True, retention_days=1)
    # Files Redis does not know: an image whose holder was never recorded, a write a crash cut short.
    unknown = hashlib.sha256(b"never recorded").hexdigest()
    folder = feedback_server.capture_dir / "0123456789abcdef"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / unknown).write_bytes(b"never recorded")
    partial = folder / f".{unknown}.0.partial"
    partial.write_bytes(b"never")
    assert loop_thread.run(captures.sweep()) == 0  # nothing is a day old
    assert unknown in captured_files(feedback_server.capture_dir) and partial.exists()
    day_later = int(time.time() * 1000) + 24 * 3600 * 1000 + 1000
    assert loop_thread.run(captures.sweep(now=day_later)) >= 2
    assert item["image"]["sha256"] not in captured_files(feedback_server.capture_dir)
    assert unknown not in captured_files(feedback_server.capture_dir) and not partial.exists()
    gone = http.get(f"/v1/history/{item['id']}/image", headers=auth)
    assert gone.status_code == 404 and error_code(gone) == "image_not_found"
    again = predict(http, auth, png_bytes((7, 7, 7)), "image/png")  # sent again: kept again
    assert http.get(f"/v1/history/{again['id']}/image", headers=auth).status_code == 200
    captures.close()
