"""The Python client (clients/python): against the real server, and its retry logic on mock transports."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from clients.python import (
    AsyncClient,
    AuthError,
    Client,
    ConnectionFailed,
    InferenceError,
    NotFoundError,
    RateLimited,
    ServerBusy,
    ServerError,
    ValidationError,
    protocol,
)
from clients.python import client as sync_module
from clients.python.cli import main
from core.errors import NotFound
from service.auth import api_key_hash
from tests.conftest import (
    CAT_CLASSES,
    CAT_JPEG,
    COFFEE_CLASSES,
    COFFEE_JPEG,
    DATA,
    TEST_SECRET,
    LoopThread,
    RunningServer,
    make_config,
)

CAT_PATH = DATA / "cat.jpg"


def top3(result: dict[str, Any]) -> set[int]:
    return {item["class_index"] for item in result["top_k"][:3]}


# -- against the real server ---------------------------------------------------------------------

def test_sync_flow(server: RunningServer) -> None:
    with Client(server.url) as client:
        login = client.login(options={"top_k": 3})
        assert client.token == login["token"] and login["options"]["top_k"] == 3

        by_path = client.predict(CAT_PATH)
        by_bytes = client.predict(COFFEE_JPEG)
        with CAT_PATH.open("rb") as file:
            by_file = client.predict(file)
        by_pil = client.predict(Image.open(io.BytesIO(COFFEE_JPEG)), top_k=2, mean=[0.5, 0.5, 0.5])
        assert top3(by_path) & CAT_CLASSES and top3(by_file) & CAT_CLASSES
        assert top3(by_bytes) & COFFEE_CLASSES and by_pil["predicted_class"] in COFFEE_CLASSES
        assert len(by_path["top_k"]) == 3
        assert len(by_pil["top_k"]) == 2 and by_pil["options"]["mean"] == [0.5, 0.5, 0.5]

        # Newest first, across pages of 2; `limit` stops mid-page.
        newest_first = [by_pil["id"], by_file["id"], by_bytes["id"], by_path["id"]]
        assert [item["id"] for item in client.history(page_size=2)] == newest_first
        assert [item["id"] for item in client.history(limit=3, page_size=2)] == newest_first[:3]
        assert [item["id"] for item in client.history(limit=1)] == newest_first[:1]
        item = client.history_item(by_bytes["id"])
        assert item["id"] == by_bytes["id"] and item["predicted_class"] == by_bytes["predicted_class"]
        with pytest.raises(NotFoundError) as missing:
            client.history_item("1-0")
        assert missing.value.code == "history_item_not_found" and missing.value.status == 404

        assert client.options()["top_k"] == 3
        options = client.set_options(top_k=4, interpolation="bicubic")
        assert options["top_k"] == 4 and options["interpolation"] == "bicubic"
        assert client.session()["predictions"] == 4

        with pytest.raises(ValidationError) as invalid:
            client.set_options(top_k=99)
        assert invalid.value.code == "invalid_options" and invalid.value.status == 422
        assert invalid.value.request_id and "top_k" in invalid.value.message

        token = client.token
        client.logout()
        assert client.token is None
        with pytest.raises(AuthError) as no_token:
            client.session()
        assert no_token.value.code == "missing_token"

    with Client(server.url, token=token) as stale, pytest.raises(AuthError) as revoked:
        stale.predict(CAT_JPEG)
    assert revoked.value.code == "session_revoked" and revoked.value.status == 401


def test_context_manager_logs_out_only_its_own_session(server: RunningServer) -> None:
    with Client(server.url) as client:
        token = client.login()["token"]
    with Client(server.url, token=token) as reused, pytest.raises(AuthError, match="session_revoked"):
        reused.session()

    with Client(server.url) as owner:
        token = owner.login()["token"]
        with Client(server.url, token=token) as borrower:
            borrower.session()
        assert owner.session()["session_id"]  # the borrower's exit did not log it out


def test_async_flow(server: RunningServer) -> None:
    async def flow() -> tuple[str, AsyncClient]:
        async with AsyncClient(server.url, concurrency=2) as client:
            await client.login()
            results = await client.predict_many([CAT_JPEG, COFFEE_JPEG, CAT_PATH, COFFEE_JPEG])
            assert [bool(top3(r) & CAT_CLASSES) for r in results] == [True, False, True, False]
            assert top3(results[1]) & COFFEE_CLASSES and top3(results[3]) & COFFEE_CLASSES
            history = [item["id"] async for item in client.history(page_size=3)]
            assert sorted(history, reverse=True) == history and set(history) == {r["id"] for r in results}
            assert [item["id"] async for item in client.history(limit=2)] == history[:2]
            assert (await client.history_item(history[0]))["id"] == history[0]
            assert (await client.set_options(crop=200))["crop"] == 200
            assert (await client.options())["crop"] == 200
            assert (await client.session())["predictions"] == 4
            with pytest.raises(ValidationError, match="invalid_options"):
                await client.set_options(color="sepia")
            with pytest.raises(ValidationError) as bad_override:
                await client.predict(CAT_JPEG, top_k=0)
            assert bad_override.value.code == "invalid_options"
            token = client.token or ""
        return token, client

    token, client = asyncio.run(flow())
    assert client.token is None  # logged out on exit

    async def stale() -> None:
        async with AsyncClient(server.url, token=token) as old:
            await old.session()

    with pytest.raises(AuthError, match="session_revoked"):
        asyncio.run(stale())


def test_feedback_against_the_server(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    with Client(server.url) as client, Client(server.url) as other:
        client.login()
        other.login()
        cat = client.predict(CAT_PATH)
        assert client.history_item(cat["id"])["feedback"] is None
        labels = client.labels(client.models()["models"][0]["name"])
        assert len(labels) == 1000 and labels[282] == "tiger cat"
        with pytest.raises(NotFoundError, match="model_not_found"):
            client.labels("resnet50")

        by_index = client.feedback(cat["id"], 282, "stripes")
        assert by_index["id"] == cat["id"]
        assert {k: by_index["feedback"][k] for k in ("class_index", "label", "comment")} == \
            {"class_index": 282, "label": "tiger cat", "comment": "stripes"}
        by_name = client.feedback(cat["id"], "EGYPTIAN cat")  # a repeat replaces it
        assert (by_name["feedback"]["class_index"], by_name["feedback"]["comment"]) == (285, None)
        assert client.history_item(cat["id"])["feedback"]["class_index"] == 285
        assert next(client.history(limit=1))["feedback"]["label"] == "Egyptian cat"

        for label in ("no such label", 1000, -1):
            with pytest.raises(ValidationError) as refused:
                client.feedback(cat["id"], label)
            assert refused.value.code == "invalid_feedback" and refused.value.status == 422
        with pytest.raises(ValidationError, match="invalid_feedback"):
            client.feedback(cat["id"], 1, "x" * 2001)  # feedback.max_comment_bytes
        with pytest.raises(NotFoundError, match="history_item_not_found"):
            other.feedback(cat["id"], 1)  # another session's prediction
        with pytest.raises(NotFoundError, match="history_item_not_found"):
            other.remove_feedback(cat["id"])
        assert client.history_item(cat["id"])["feedback"]["class_index"] == 285

        # The command line, with the session's token: by name, then by index.
        assert main(["feedback", cat["id"], "tabby", "--url", server.url, "--token", client.token or "",
                     "--comment", "fur"]) == 0
        assert "corrected to tabby (class 281)" in capsys.readouterr().out
        assert main(["feedback", cat["id"], "282", "--url", server.url, "--token", client.token or "", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["feedback"]["label"] == "tiger cat"
        assert main(["feedback", cat["id"], "not a label", "--url", server.url, "--token", client.token or ""]) == 1
        assert capsys.readouterr().err.startswith("error: invalid_feedback: ")
        assert main(["feedback", cat["id"], "tabby", "--url", server.url]) == 2  # no session: no token
        assert "--token" in capsys.readouterr().err

        client.remove_feedback(cat["id"])
        client.remove_feedback(cat["id"])  # nothing left to remove is fine
        assert client.history_item(cat["id"])["feedback"] is None

    async def flow() -> None:
        async with AsyncClient(server.url) as aclient:
            await aclient.login()
            coffee = await aclient.predict(COFFEE_JPEG)
            given = await aclient.feedback(coffee["id"], "espresso", comment="a small cup")
            assert given["feedback"]["class_index"] == 967 and given["feedback"]["comment"] == "a small cup"
            await aclient.remove_feedback(coffee["id"])
            assert (await aclient.history_item(coffee["id"]))["feedback"] is None

    asyncio.run(flow())


def test_captured_image_and_erase(serve: Callable[..., Any], server: RunningServer, loop_thread: LoopThread,
                                  tmp_path: Path) -> None:
    with Client(server.url) as uncaptured:  # the module's server keeps no images
        uncaptured.login()
        with pytest.raises(NotFoundError):
            uncaptured.history_image(uncaptured.predict(CAT_JPEG)["id"])

    config = make_config(capture={"enabled": True, "store_dir": str(tmp_path / "captures")})
    with serve(config) as capturing, Client(capturing.url) as client, Client(capturing.url) as other:
        session_id = client.login()["session_id"]
        other.login()
        cat = client.predict(CAT_PATH)
        assert client.history_image(cat["id"]) == CAT_JPEG  # byte for byte
        with pytest.raises(NotFoundError):
            other.history_image(cat["id"])
        client.feedback(cat["id"], "tabby")

        async def aflow() -> bytes:
            async with AsyncClient(capturing.url, token=client.token) as aclient:
                return await aclient.history_image(cat["id"])

        assert asyncio.run(aflow()) == CAT_JPEG

        client.logout(erase=True)
        assert client.token is None
        with pytest.raises(NotFound):  # erased in the store, not only logged out
            loop_thread.run(capturing.store.history_item(session_id, cat["id"]))


def test_api_key_login(serve: Callable[..., Any]) -> None:
    config = make_config(auth={"secret_keys": [TEST_SECRET], "api_keys": [api_key_hash("k")]})
    with serve(config) as keyed, Client(keyed.url) as client:
        with pytest.raises(AuthError) as missing:
            client.login()
        assert missing.value.code == "missing_api_key"
        with pytest.raises(AuthError, match="invalid_api_key"):
            client.login("wrong")
        assert client.login("k")["session_id"]
        assert client.session()["predictions"] == 0


def test_cli_predict_and_history(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(CAT_PATH), str(DATA / "coffee.jpg"), "--url", server.url, "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "Egyptian cat" in out or "tabby" in out or "tiger cat" in out
    assert "rank" in out and "%" in out and "coffee.jpg" in out

    assert main(["predict", str(CAT_PATH), "--url", server.url, "--keep-session", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["predicted_class"] in CAT_CLASSES
    token = captured.err.rsplit(" ", 1)[-1].strip()

    assert main(["history", "--url", server.url, "--token", token]) == 0
    out = capsys.readouterr().out
    assert "created" in out and len(out.strip().splitlines()) == 2  # header + the one prediction
    assert main(["history", "--url", server.url, "--token", token, "--json", "--limit", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1

    assert main(["history", "--url", server.url]) == 0
    assert "new session" in capsys.readouterr().out


def test_cli_errors(server: RunningServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["predict", str(CAT_PATH), "--url", server.url, "--top-k", "99"]) == 1
    assert capsys.readouterr().err.startswith("error: invalid_options: ")
    assert main(["history", "--url", server.url, "--token", "nonsense"]) == 1
    assert capsys.readouterr().err.startswith("error: malformed_token: ")
    assert main(["predict", str(tmp_path / "missing.jpg"), "--url", server.url]) == 2
    assert main(["predict"]) == 2
    assert main([]) == 2
    capsys.readouterr()


# -- retries and errors, on mock transports --------------------------------------------------------

class Script:
    """A MockTransport handler that answers from a list, recording the requests it saw."""

    def __init__(self, *answers: httpx.Response | Exception):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code}."}},
                          headers={"X-Request-ID": f"req-{status}", **(headers or {})})


def ok_prediction() -> httpx.Response:
    return httpx.Response(200, json={"id": "1-0", "label": "tabby", "predicted_class": 281, "top_k": []})


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The waits the sync client asked for, without waiting."""
    waits: list[float] = []
    monkeypatch.setattr(sync_module, "sleep", waits.append)
    yield waits


def mock_client(script: Script, **settings: Any) -> Client:
    return Client("http://mock", token="t", transport=httpx.MockTransport(script), **settings)


def test_503_is_retried_with_the_same_idempotency_key(sleeps: list[float]) -> None:
    script = Script(error(503, "server_busy", {"Retry-After": "0"}), ok_prediction())
    with mock_client(script, backoff=0.1) as client:
        assert client.predict(CAT_JPEG, mean=(0.4, 0.5, 0.6))["label"] == "tabby"
    first, second = script.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.headers["Content-Type"] == "image/jpeg" and first.headers["Authorization"] == "Bearer t"
    assert first.url.params["mean"] == "0.4,0.5,0.6" and first.content == CAT_JPEG == second.content
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.1 / 4  # Retry-After: 0, plus jitter

    script = Script(ok_prediction(), ok_prediction())
    with mock_client(script) as client:
        client.predict(CAT_JPEG)
        client.predict(CAT_JPEG)
    assert script.requests[0].headers["Idempotency-Key"] != script.requests[1].headers["Idempotency-Key"]


def test_busy_until_out_of_retries(sleeps: list[float]) -> None:
    script = Script(*[error(503, "server_busy", {"Retry-After": "2"}) for _ in range(3)])
    with mock_client(script, retries=2, backoff=0) as client, pytest.raises(ServerBusy) as busy:
        client.predict(CAT_JPEG)
    assert len(script.requests) == 3 and sleeps == [2.0, 2.0]
    assert busy.value.retry_after == 2.0 and busy.value.code == "server_busy" and busy.value.request_id == "req-503"
    assert isinstance(busy.value, ServerError)

    script = Script(error(429, "rate_limited", {"Retry-After": "1"}), error(429, "rate_limited"))
    with mock_client(script, retries=1, backoff=0) as client, pytest.raises(RateLimited) as limited:
        client.session()
    assert len(script.requests) == 2 and limited.value.retry_after is None


@pytest.mark.parametrize(("status", "code", "kind"), [
    (422, "invalid_image", ValidationError),
    (400, "invalid_parameter", ValidationError),
    (401, "token_expired", AuthError),
    (404, "history_item_not_found", NotFoundError),
    (500, "inference_failed", ServerError),
])
def test_other_errors_are_not_retried(sleeps: list[float], status: int, code: str, kind: type[Exception]) -> None:
    script = Script(error(status, code))
    with mock_client(script) as client, pytest.raises(kind) as raised:
        client.predict(CAT_JPEG)
    assert len(script.requests) == 1 and not sleeps
    assert isinstance(raised.value, InferenceError)
    assert (raised.value.status, raised.value.code, raised.value.request_id) == (status, code, f"req-{status}")


def test_connection_errors_back_off_then_fail(sleeps: list[float]) -> None:
    script = Script(*[httpx.ConnectError("refused") for _ in range(4)])
    with mock_client(script, retries=3, backoff=0.1) as client, pytest.raises(ConnectionFailed) as failed:
        client.options()
    assert len(script.requests) == 4 and failed.value.code == "connection_failed" and failed.value.status is None
    for wait, base in zip(sleeps, [0.1, 0.2, 0.4], strict=True):
        assert base <= wait <= base + 0.1 / 4

    script = Script(httpx.ReadTimeout("slow"), ok_prediction())
    with mock_client(script, backoff=0) as client:
        assert client.predict(CAT_JPEG)["id"] == "1-0"
    assert len(script.requests) == 2


def test_retry_policy_caps_waits() -> None:
    policy = protocol.RetryPolicy(retries=10, backoff=1.0, max_wait=5.0)
    busy = error(503, "server_busy", {"Retry-After": "3600"})
    assert 5.0 <= policy.wait(0, busy) <= 5.25  # type: ignore[operator]
    assert 5.0 <= policy.wait(8, httpx.ConnectError("x")) <= 5.25  # type: ignore[operator]
    assert policy.wait(10, busy) is None
    assert policy.wait(0, error(422, "invalid_options")) is None
    date = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert protocol.retry_after(date.headers) == 0.0  # a date in the past: go now


def test_non_json_error_bodies() -> None:
    script = Script(httpx.Response(502, text="<html>Bad gateway</html>"), httpx.Response(200, text="not json"))
    with mock_client(script, retries=0) as client:
        with pytest.raises(ServerError) as bad_gateway:
            client.session()
        assert bad_gateway.value.code == "http_502" and "Bad gateway" in bad_gateway.value.message
        with pytest.raises(InferenceError, match="invalid_response"):
            client.session()


def test_login_sends_api_key_and_options() -> None:
    script = Script(httpx.Response(201, json={"token": "new", "session_id": "s"}), httpx.Response(204))
    with Client("http://mock", transport=httpx.MockTransport(script)) as client:
        client.login("secret", options={"top_k": 2})
        assert client.token == "new"
    login, logout = script.requests
    assert login.headers["Authorization"] == "ApiKey secret" and json.loads(login.content) == {"options": {"top_k": 2}}
    assert logout.method == "DELETE" and logout.headers["Authorization"] == "Bearer new"


def test_async_retries() -> None:
    script = Script(httpx.ConnectError("refused"), error(503, "server_busy", {"Retry-After": "0"}), ok_prediction(),
                    error(422, "invalid_image"))

    async def handler(request: httpx.Request) -> httpx.Response:
        return script(request)

    async def run() -> None:
        async with AsyncClient("http://mock", token="t", backoff=0.01, transport=httpx.MockTransport(handler)) as c:
            assert (await c.predict(CAT_JPEG))["id"] == "1-0"
            with pytest.raises(ValidationError):
                await c.predict(CAT_JPEG)

    asyncio.run(run())
    assert len(script.requests) == 4
    assert len({request.headers["Idempotency-Key"] for request in script.requests[:3]}) == 1


def test_image_inputs(tmp_path: Path) -> None:
    assert protocol.encode_image(CAT_JPEG) == (CAT_JPEG, "image/jpeg")
    assert protocol.encode_image(str(CAT_PATH)) == (CAT_JPEG, "image/jpeg")
    for fmt, media_type in [("PNG", "image/png"), ("GIF", "image/gif"), ("BMP", "image/bmp"), ("WEBP", "image/webp")]:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        assert protocol.sniff_content_type(buffer.getvalue()) == media_type
    data, media_type = protocol.encode_image(Image.new("CMYK", (8, 8)))
    assert media_type == "image/png" and Image.open(io.BytesIO(data)).mode == "RGB"
    with pytest.raises(ValueError, match="not a JPEG"):
        protocol.encode_image(b"hello")
    with pytest.raises(TypeError, match="binary mode"):
        protocol.encode_image(io.StringIO("text"))
    with pytest.raises(TypeError):
        protocol.encode_image(42)
    assert protocol.query_params({"top_k": 3, "mean": [1, 2, 3], "crop": None}) == {"top_k": "3", "mean": "1,2,3"}


def test_feedback_calls_on_the_wire() -> None:
    item = {"id": "1/0", "feedback": {"class_index": 282, "label": "tiger cat", "comment": "stripes"}}
    script = Script(httpx.Response(200, json=item), httpx.Response(200, json=item), httpx.Response(204),
                    httpx.Response(200, content=CAT_JPEG, headers={"Content-Type": "image/jpeg"}),
                    httpx.Response(200, json={"version": "v2"}), httpx.Response(204))
    with mock_client(script) as client:
        assert client.feedback("1/0", 282, "stripes") == item
        client.feedback("1/0", "Tiger Cat")
        assert client.remove_feedback("1/0") is None
        assert client.history_image("1/0") == CAT_JPEG
        client.activate_version("m", "v2", admin_key="a", traffic_percent=10)
        client.logout(erase=True)
        assert client.token is None
    put, put_name, delete, image, activate, logout = script.requests
    assert (put.method, put.url.raw_path) == ("PUT", b"/v1/history/1%2F0/feedback")
    assert json.loads(put.content) == {"label": 282, "comment": "stripes"}
    assert put.headers["Authorization"] == "Bearer t" and put.headers["Content-Type"] == "application/json"
    assert json.loads(put_name.content) == {"label": "Tiger Cat"}
    assert (delete.method, delete.url.raw_path) == ("DELETE", b"/v1/history/1%2F0/feedback")
    assert (image.method, image.url.raw_path) == ("GET", b"/v1/history/1%2F0/image")
    assert json.loads(activate.content) == {"traffic_percent": 10}
    assert activate.url.raw_path == b"/v1/models/m/versions/v2:activate"
    assert (logout.method, logout.url.raw_path) == ("DELETE", b"/v1/session?erase=true")
    for label in (2.5, True, None):
        with pytest.raises(TypeError, match="label"):
            protocol.feedback("1-0", label)  # type: ignore[arg-type]
    assert protocol.activate_version("m", "v", "a").json is None  # no body: the server's default, 100
    assert protocol.logout().params is None


def test_feedback_refusals_are_typed_and_not_retried(sleeps: list[float]) -> None:
    script = Script(error(422, "invalid_feedback"), error(404, "history_item_not_found"),
                    error(404, "history_item_not_found"))
    with mock_client(script) as client:
        with pytest.raises(ValidationError, match="invalid_feedback"):
            client.feedback("1-0", "no such label")
        with pytest.raises(NotFoundError):
            client.remove_feedback("1-0")
        with pytest.raises(NotFoundError) as missing:
            client.history_image("1-0")
    assert missing.value.status == 404 and len(script.requests) == 3 and not sleeps


def test_async_feedback_calls() -> None:
    item = {"id": "1-0", "feedback": {"class_index": 3, "label": "tiger shark", "comment": None}}
    script = Script(httpx.Response(200, json=item), httpx.Response(204),
                    httpx.Response(200, content=CAT_JPEG, headers={"Content-Type": "image/jpeg"}),
                    httpx.Response(204))

    async def handler(request: httpx.Request) -> httpx.Response:
        return script(request)

    async def run() -> None:
        async with AsyncClient("http://mock", token="t", transport=httpx.MockTransport(handler)) as c:
            assert await c.feedback("1-0", 3) == item
            await c.remove_feedback("1-0")
            assert await c.history_image("1-0") == CAT_JPEG
            await c.logout(erase=True)

    asyncio.run(run())
    assert [(r.method, r.url.raw_path) for r in script.requests] == [
        ("PUT", b"/v1/history/1-0/feedback"), ("DELETE", b"/v1/history/1-0/feedback"),
        ("GET", b"/v1/history/1-0/image"), ("DELETE", b"/v1/session?erase=true")]
    assert json.loads(script.requests[0].content) == {"label": 3}


class _CutOff(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that stops after its first chunk, as when the connection drops mid-download."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"first chunk"
        raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first chunk"
        raise httpx.ReadError("connection reset")


def test_the_export_download_is_retried_until_it_starts_and_streamed_to_the_path(sleeps: list[float],
                                                                                 tmp_path: Path) -> None:
    body = b"tar bytes " * 10_000
    script = Script(error(503, "server_busy", {"Retry-After": "0"}),
                    httpx.Response(200, content=body, headers={"Content-Type": "application/x-tar"}))
    since = datetime(2026, 11, 30, 23, 0, tzinfo=timezone(timedelta(hours=-1)))
    with mock_client(script) as client:
        assert client.export_feedback(tmp_path / "f.tar", admin_key="adm", since=since, until=1796150310065,
                                      model_version="v2", export_format="jsonl") == len(body)
    assert (tmp_path / "f.tar").read_bytes() == body and len(sleeps) == 1
    first, second = script.requests
    assert first.url == second.url and first.url.path == "/v1/feedback/export"
    assert dict(first.url.params) == {"since": "2026-12-01T00:00:00.000Z", "until": "1796150310065",
                                      "model_version": "v2", "format": "jsonl"}
    assert first.headers["Authorization"] == "ApiKey adm"  # the admin key, not the session's token

    with pytest.raises(ValueError, match="naive"):
        client.export_feedback(tmp_path / "x", admin_key="adm", since=datetime(2026, 12, 1))
    with pytest.raises(ValueError, match="export_format"):
        client.export_feedback(tmp_path / "x", admin_key="adm", export_format="zip")


def test_a_download_cut_off_midway_raises_and_leaves_the_path_as_it_was(sleeps: list[float], tmp_path: Path) -> None:
    target = tmp_path / "feedback.tar"
    target.write_bytes(b"last week's export")
    with mock_client(Script(httpx.Response(200, stream=_CutOff()))) as client, \
            pytest.raises(ConnectionFailed, match="stopped after 11 bytes"):
        client.export_feedback(target, admin_key="adm")
    assert target.read_bytes() == b"last week's export" and sorted(tmp_path.iterdir()) == [target]
    assert sleeps == []  # not retried: the answer had started

    async def cut_off() -> None:
        async def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, stream=_CutOff())

        async with AsyncClient("http://mock", token="t", transport=httpx.MockTransport(handler)) as aclient:
            await aclient.export_feedback(target, admin_key="adm")

    with pytest.raises(ConnectionFailed, match="stopped after 11 bytes"):
        asyncio.run(cut_off())
    assert target.read_bytes() == b"last week's export" and sorted(tmp_path.iterdir()) == [target]


# -- choosing a model ---------------------------------------------------------------------------------

def test_add_model_packs_the_folders_contents_with_their_checksum_and_the_export_takes_a_model(
        tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    folder.mkdir()
    (folder / "model.toml").write_text('format = "onnx"\n')
    (folder / "labels.txt").write_text("circle\nsquare\n")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "PUT":
            return httpx.Response(201, json={"name": "shapes", "classes": 2})
        if request.url.path == "/v1/feedback/export":
            return httpx.Response(200, content=b"tar")
        return httpx.Response(204)

    with Client("http://mock", transport=httpx.MockTransport(handler)) as client:
        assert client.add_model("shapes", folder, admin_key="adm") == {"name": "shapes", "classes": 2}
        client.delete_model("shapes", admin_key="adm")
        client.export_feedback(io.BytesIO(), admin_key="adm", model="shapes")
    put, delete, export = seen
    assert (put.method, put.url.path, delete.method, delete.url.path) == (
        "PUT", "/v1/models/shapes", "DELETE", "/v1/models/shapes")
    assert put.headers["Authorization"] == "ApiKey adm"
    assert put.headers["X-Content-SHA256"] == hashlib.sha256(put.content).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(put.content), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == ["labels.txt", "model.toml"]  # the contents at the top, no folder
        member = archive.extractfile("labels.txt")
        assert member is not None and member.read() == b"circle\nsquare\n"
    assert export.url.params["model"] == "shapes"


SHAPES_LABELS = {"name": "shapes", "version": "1", "labels": ["circle", "square", "star", "triangle", "cross"]}
TWO_MODELS = {"default": "efficientnet_lite0", "models": [
    {"name": "efficientnet_lite0", "default": True, "classes": 1000, "active_version": "v1"},
    {"name": "shapes", "default": False, "classes": 5, "active_version": None, "serving_version": "1"}]}


def test_the_model_choice_on_the_wire() -> None:
    script = Script(httpx.Response(201, json={"token": "new", "session_id": "s"}), ok_prediction(), ok_prediction(),
                    httpx.Response(200, json=TWO_MODELS), httpx.Response(200, json=SHAPES_LABELS),
                    httpx.Response(200, json={"options": {"top_k": 5, "model": "shapes"}}),
                    httpx.Response(200, json=SHAPES_LABELS),
                    httpx.Response(200, json={"options": {"top_k": 5}}), httpx.Response(200, json=TWO_MODELS),
                    httpx.Response(200, json={**SHAPES_LABELS, "name": "efficientnet_lite0"}),
                    httpx.Response(200, json=TWO_MODELS), httpx.Response(200, json=SHAPES_LABELS),
                    httpx.Response(204))
    with Client("http://mock", transport=httpx.MockTransport(script)) as client:
        client.login(options={"top_k": 2}, model="shapes")
        client.predict(CAT_JPEG, model="shapes", top_k=1)
        client.predict(CAT_JPEG)
        assert client.models() == TWO_MODELS
        assert client.labels("shapes") == SHAPES_LABELS["labels"]
        assert client.labels() == SHAPES_LABELS["labels"]  # the session's model
        assert client.model_labels()["name"] == "efficientnet_lite0"  # no model option: the default
        assert client.labels(admin_key="a") == SHAPES_LABELS["labels"]  # an admin key has no session
    login, per_request, plain, listing, named, *rest = script.requests
    assert json.loads(login.content) == {"options": {"top_k": 2, "model": "shapes"}}
    assert dict(per_request.url.params) == {"model": "shapes", "top_k": "1"}
    assert "model" not in plain.url.params
    assert (listing.method, listing.url.path) == ("GET", "/v1/models")
    assert named.url.raw_path == b"/v1/models/shapes/labels"
    assert [(r.method, r.url.path) for r in rest] == [
        ("GET", "/v1/session/options"), ("GET", "/v1/models/shapes/labels"),
        ("GET", "/v1/session/options"), ("GET", "/v1/models"), ("GET", "/v1/models/efficientnet_lite0/labels"),
        ("GET", "/v1/models"), ("GET", "/v1/models/efficientnet_lite0/labels"), ("DELETE", "/v1/session")]
    assert rest[5].headers["Authorization"] == "ApiKey a"
    # A server from before several models names no default: its one model (or the one marked) is it.
    assert protocol.default_model({"models": [{"name": "only"}]}) == "only"
    assert protocol.default_model({"models": [{"name": "a"}, {"name": "b", "default": True}]}) == "b"


def test_the_async_model_choice_on_the_wire() -> None:
    script = Script(httpx.Response(201, json={"token": "new", "session_id": "s"}),
                    httpx.Response(200, json={"options": {"model": "shapes"}}), httpx.Response(200, json=SHAPES_LABELS),
                    ok_prediction(), httpx.Response(204))

    async def handler(request: httpx.Request) -> httpx.Response:
        return script(request)

    async def run() -> None:
        async with AsyncClient("http://mock", transport=httpx.MockTransport(handler)) as c:
            await c.login(model="shapes")
            assert await c.labels() == SHAPES_LABELS["labels"]
            await c.predict(CAT_JPEG, model="shapes")

    asyncio.run(run())
    login, options, labels, predict, _ = script.requests
    assert json.loads(login.content) == {"options": {"model": "shapes"}}
    assert (options.url.path, labels.url.path) == ("/v1/session/options", "/v1/models/shapes/labels")
    assert predict.url.params["model"] == "shapes"


def test_the_model_option_against_the_server(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    with Client(server.url) as client:
        client.login()
        default = protocol.default_model(client.models())
        assert client.labels() == client.labels(default) and client.model_labels()["name"] == default
        chosen = client.login(model=default)
        assert chosen["options"]["model"] == default
        assert client.predict(CAT_PATH, model=default)["predicted_class"] in CAT_CLASSES
        assert client.set_options(model=None).get("model") is None

    # The command line: the models (the default marked), a model's labels, a session on a model.
    assert main(["models", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert f"{default} *" in out and "* the default model" in out
    assert main(["labels", default, "--url", server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{default} (version ") and any(line.split() == ["282", "tiger", "cat"] for line in out)
    assert main(["login", "--model", default, "--url", server.url]) == 0
    token = capsys.readouterr().out.strip()
    with Client(server.url, token=token) as resumed:
        assert resumed.options()["model"] == default
        resumed.logout()
    assert main(["predict", str(CAT_PATH), "--model", default, "--url", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == default
    assert main(["labels", "--url", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == default


def _another_model(client: Client) -> dict[str, Any]:
    """A served model other than the default (models_server serves "shapes" beside it)."""
    listing = client.models()
    default = protocol.default_model(listing)
    others = [model for model in listing["models"] if model["name"] != default]
    assert others, listing
    return others[0]


def test_a_second_model_chosen_from_each_client(models_server: RunningServer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    server = models_server
    with Client(server.url) as client:
        client.login(options={"top_k": 3})
        other = _another_model(client)
        name = other["name"]
        labels = client.labels(name)
        assert len(labels) == other["classes"]

        # Per request: the session keeps its model, the image goes to the other one.
        once = client.predict(CAT_PATH, model=name)
        assert once["model"]["name"] == name and once["label"] in labels
        assert client.options().get("model") is None

        # For the session: preprocessing starts from the model's defaults, top_k is kept.
        options = client.set_options(model=name)
        assert options["model"] == name and options["top_k"] == 3
        assert {key: options[key] for key in other["preprocess"]} == other["preprocess"]
        assert client.labels() == labels
        result = client.predict(CAT_PATH)
        assert result["model"]["name"] == name and len(result["top_k"]) == min(3, len(labels))

        # Feedback takes a label of the entry's model, by name or index; another model's label is refused.
        given = client.feedback(result["id"], labels[-1].upper())
        assert given["feedback"]["class_index"] == len(labels) - 1
        with pytest.raises(ValidationError, match="invalid_feedback"):
            client.feedback(result["id"], len(labels))
        assert main(["feedback", result["id"], labels[0], "--url", server.url, "--token", client.token or ""]) == 0
        assert f"corrected to {labels[0]} (class 0)" in capsys.readouterr().out

        with pytest.raises(ValidationError) as unknown:
            client.set_options(model="no-such-model")
        assert unknown.value.code == "invalid_options"

        assert main(["models", "--url", server.url]) == 0
        assert re.search(rf"^\s+{re.escape(name)}\s+{other['classes']}\s", capsys.readouterr().out, re.MULTILINE)
        client.predict(CAT_PATH, model=protocol.default_model(client.models()))  # one item of the default model
        assert main(["history", "--url", server.url, "--token", client.token or ""]) == 0
        assert "model" in capsys.readouterr().out.splitlines()[0]  # items from two models: a model column

    async def flow() -> None:
        async with AsyncClient(server.url) as aclient:
            await aclient.login(model=name)
            assert await aclient.labels() == labels
            assert (await aclient.predict(COFFEE_JPEG))["model"]["name"] == name

    asyncio.run(flow())
