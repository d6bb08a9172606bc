"""`GET /v1/stream`: WebSocket predictions, authentication, per-image errors, back-pressure, limits
(protocol errors, unread answers, pings), clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from clients.python import AsyncClient, AuthError, Client, ValidationError
from handlers.stream import StreamHandler
from inference.runner import ServedModel
from server.balance import GuardedHTTPServer
from server.runtime import build_runner, serve_loaded
from sessions.tokens import TokenSigner
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG, login, make_config, wait_until

TIMEOUT = 30


def stream_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/stream"


def frame(socket: ClientConnection) -> dict[str, Any]:
    return json.loads(socket.recv(timeout=TIMEOUT))


def close_code(socket: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            socket.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


@contextmanager
def open_stream(server, auth: dict[str, str]) -> Iterator[ClientConnection]:
    with ws_connect(stream_url(server), additional_headers=auth, open_timeout=TIMEOUT) as socket:
        ready = frame(socket)
        assert ready["type"] == "ready", ready
        yield socket


def test_stream_results_equal_post_and_are_recorded_in_the_history(server, client: httpx.Client) -> None:
    auth = login(client, top_k=3)
    posted = {
        name: client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=image).json()
        for name, image in (("cat", CAT_JPEG), ("coffee", COFFEE_JPEG))
    }
    with open_stream(server, auth) as socket:
        socket.send(json.dumps({"ref": "cat-1"}))
        socket.send(CAT_JPEG)
        socket.send(COFFEE_JPEG)  # no JSON frame: ref is null, seq says which image
        socket.send(json.dumps({"ref": 7, "options": {"top_k": 1}}))
        socket.send(CAT_JPEG)
        results = [frame(socket) for _ in range(3)]
    assert all(item["type"] == "result" for item in results), results
    by_seq = {item["seq"]: item for item in results}
    assert (by_seq[0]["ref"], by_seq[1]["ref"], by_seq[2]["ref"]) == ("cat-1", None, 7)
    for seq, name in ((0, "cat"), (1, "coffee")):
        streamed, post = by_seq[seq]["result"], posted[name]
        assert [s["class_index"] for s in streamed["top_k"]] == [s["class_index"] for s in post["top_k"]]
        assert streamed["options"] == post["options"] and streamed["model"] == post["model"]
    assert len(by_seq[2]["result"]["top_k"]) == 1

    history = client.get("/v1/history", headers=auth, params={"limit": 10}).json()["items"]
    assert len(history) == 5
    for item in results:
        recorded = client.get(f"/v1/history/{item['result']['id']}", headers=auth).json()
        assert recorded == {k: v for k, v in item["result"].items() if k != "timing_ms"}
    assert client.get("/v1/session", headers=auth).json()["predictions"] == 5


def test_first_frame_authentication_and_never_the_query_string(server, client: httpx.Client) -> None:
    token = login(client)["Authorization"].removeprefix("Bearer ")
    with ws_connect(stream_url(server), open_timeout=TIMEOUT) as socket:
        socket.send(json.dumps({"token": token}))
        assert frame(socket)["type"] == "ready"
        socket.send(COFFEE_JPEG)
        assert set(frame(socket)["result"]["top_k"][0]) == {"class_index", "label", "score"}
    # A token in the URL is ignored (URLs end up in logs): the stream still waits for a token frame.
    with ws_connect(f"{stream_url(server)}?token={token}", open_timeout=TIMEOUT) as socket:
        socket.send(CAT_JPEG)
        assert frame(socket)["error"]["code"] == "missing_token"
        assert close_code(socket) == (1008, "missing_token")


FORGED = "forged"  # stands for a well-formed token signed with another server's secret


@pytest.mark.parametrize(("header", "first_frame", "code"), [
    ({"Authorization": "Bearer not-a-token"}, None, "malformed_token"),
    ({"Authorization": "Bearer x.y.z"}, None, "invalid_signature"),
    ({"Authorization": "Basic abc"}, None, "malformed_token"),
    ({}, {"token": FORGED}, "invalid_signature"),
    ({}, {"hello": 1}, "missing_token"),
    ({}, "not json", "missing_token"),
])
def test_a_bad_token_closes_the_stream_with_policy_violation(server, header, first_frame, code) -> None:
    if first_frame == {"token": FORGED}:
        other = TokenSigner(["another-servers-secret-0123456789"], max_age_seconds=3600)
        first_frame = {"token": other.issue(uuid.uuid4().hex)}
    with ws_connect(stream_url(server), additional_headers=header, open_timeout=TIMEOUT) as socket:
        if first_frame is not None:
            socket.send(first_frame if isinstance(first_frame, str) else json.dumps(first_frame))
        refusal = frame(socket)
        assert refusal["type"] == "error" and refusal["status"] == 401
        assert refusal["error"]["code"] == code
        assert close_code(socket) == (1008, code)


def test_logout_mid_stream_refuses_the_next_image_and_closes(server, client: httpx.Client) -> None:
    auth = login(client)
    with open_stream(server, auth) as socket:
        socket.send(CAT_JPEG)
        assert frame(socket)["type"] == "result"
        assert client.delete("/v1/session", headers=auth).status_code == 204
        socket.send(json.dumps({"ref": "after-logout"}))
        socket.send(CAT_JPEG)
        refusal = frame(socket)
        assert (refusal["ref"], refusal["seq"], refusal["error"]["code"]) == ("after-logout", 1, "session_revoked")
        assert close_code(socket) == (1008, "session_revoked")


def test_errors_per_image_come_back_as_frames_and_the_stream_stays_open(server, client: httpx.Client) -> None:
    auth = login(client)
    with open_stream(server, auth) as socket:
        socket.send(json.dumps({"ref": "broken"}))
        socket.send(b"\x89PNG\r\n\x1a\nnot really")
        socket.send(json.dumps({"ref": "bad-option", "options": {"top_k": 99}}))
        socket.send(CAT_JPEG)
        socket.send("{not json")
        socket.send(json.dumps({"ref": "x", "colour": "red"}))
        socket.send(json.dumps({"ref": "orphan"}))
        socket.send(json.dumps({"ref": "good", "options": {"crop": 192}}))
        socket.send(COFFEE_JPEG)
        frames = [frame(socket) for _ in range(6)]
    by_ref: dict[Any, list[dict[str, Any]]] = {}
    for item in frames:
        by_ref.setdefault(item["ref"], []).append(item)
    assert by_ref["broken"][0]["error"]["code"] == "invalid_image" and by_ref["broken"][0]["status"] == 422
    assert by_ref["bad-option"][0]["error"]["code"] == "invalid_options"
    assert sorted(item["error"]["code"] for item in by_ref[None]) == ["invalid_frame", "malformed_json"]
    assert all(item["seq"] is None for item in by_ref[None])  # about the stream, not an image
    assert by_ref["orphan"][0]["error"]["code"] == "missing_image"
    good = by_ref["good"][0]
    assert good["type"] == "result" and good["seq"] == 2 and good["result"]["options"]["crop"] == 192
    assert client.get("/v1/session", headers=auth).json()["predictions"] == 1


class GatedBackend:
    """Holds every forward until released; counts the forwards that started."""

    def __init__(self, inner: Any):
        self.inner, self.name, self.precision = inner, inner.name, inner.precision
        self.started = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def forward(self, batch: Any, *, alone: bool = False) -> Any:
        with self.lock:
            self.started += 1
        assert self.release.wait(TIMEOUT)
        return self.inner.forward(batch, alone=alone)


def test_backpressure_bounds_the_images_in_flight_per_connection(serve, default_model,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(http={"stream_max_in_flight": 3}, model={"workers": 2, "max_queue": 64})
    runner, configured = build_runner(config), serve_loaded(config, default_model)
    gate = GatedBackend(configured.backend)
    # The server's side of each image frame: how many it began to handle, and how many images the
    # connection had in flight once it had taken each one.
    images_read: list[int] = []
    in_flight_once_taken: list[int] = []
    handle_frame = StreamHandler._handle_frame

    async def recorded(self: StreamHandler, message: str | bytes) -> None:
        if isinstance(message, bytes) and self._verified is not None:
            images_read.append(len(images_read))
            await handle_frame(self, message)
            in_flight_once_taken.append(len(self._tasks))
        else:
            await handle_frame(self, message)

    monkeypatch.setattr(StreamHandler, "_handle_frame", recorded)
    try:
        with serve(config, runner=runner, served=ServedModel(configured.model, gate)) as running, \
                running.client() as http:
            socket = ws_connect(stream_url(running), additional_headers=login(http), open_timeout=TIMEOUT)
            with socket:
                ready = frame(socket)
                assert ready["type"] == "ready" and ready["max_in_flight"] == 3
                for index in range(10):  # more than the limit, sent without waiting
                    socket.send(json.dumps({"ref": index}))
                    socket.send(CAT_JPEG)
                # Both workers busy, a third image queued, and the fourth image's frame read: with
                # nothing able to finish, that frame can only be waiting for a slot.
                wait_until(lambda: gate.started == 2 and runner.queue_depth >= 3 and len(images_read) >= 4,
                           "two forwards held, three images admitted and the fourth image's frame read")
                assert in_flight_once_taken == [1, 2, 3]  # the fourth is not taken while three are in flight
                assert runner.queue_depth == 3 and len(images_read) == 4  # nor is any frame after it read
                gate.release.set()
                results = [frame(socket) for _ in range(10)]
            assert sorted(item["ref"] for item in results) == list(range(10))
            assert all(item["type"] == "result" for item in results)
            assert len(in_flight_once_taken) == 10 and max(in_flight_once_taken) == 3
    finally:
        gate.release.set()
        runner.close()


def test_python_client_predict_stream(server) -> None:
    items = [CAT_JPEG, {"image": COFFEE_JPEG, "ref": "coffee", "options": {"top_k": 2}}, b"GIF89a broken", CAT_JPEG]
    with Client(server.url) as api:
        api.login()
        results = list(api.predict_stream(items, top_k=3))
        assert sorted(str(r.ref) for r in results) == ["0", "2", "3", "coffee"]
        by_ref = {r.ref: r for r in results}
        assert {c["class_index"] for c in by_ref[0].unwrap()["top_k"]} & CAT_CLASSES
        assert len(by_ref[0].result["top_k"]) == 3
        assert {c["class_index"] for c in by_ref["coffee"].unwrap()["top_k"]} & COFFEE_CLASSES
        assert len(by_ref["coffee"].result["top_k"]) == 2
        assert not by_ref[2].ok and isinstance(by_ref[2].error, ValidationError)
        with pytest.raises(ValidationError):
            by_ref[2].unwrap()
        assert api.session()["predictions"] == 3
        ids = {r.result["id"] for r in results if r.ok}
        assert {item["id"] for item in api.history(limit=10)} == ids
        assert list(api.predict_stream([])) == []

    with Client(server.url, token="not-a-token") as stranger, pytest.raises(AuthError) as refused:
        list(stranger.predict_stream([CAT_JPEG]))
    assert refused.value.code == "malformed_token"


def test_python_client_stream_raises_auth_error_after_logout(server) -> None:
    with Client(server.url) as api, server.client() as http:
        api.login()

        def images():
            yield CAT_JPEG
            # Asked for the second image: log out first, so it (and maybe the first) is refused.
            assert http.delete("/v1/session", headers={"Authorization": f"Bearer {api.token}"}).status_code == 204
            yield CAT_JPEG

        seen = []
        with pytest.raises(AuthError) as refused:
            for item in api.predict_stream(images()):
                seen.append(item)
        assert refused.value.code == "session_revoked"
        assert seen and seen[-1].error is not None and seen[-1].error.code == "session_revoked"
        assert all(item.ok for item in seen[:-1])


def test_python_clients_raise_auth_error_when_the_last_image_is_refused(
        server, monkeypatch: pytest.MonkeyPatch) -> None:
    """No result is owed after the refusal, so the stream would end quietly if the client waited
    for the close: both clients raise on the refusal frame itself."""
    closed: set[str] = set()  # the sessions whose stream the server has closed
    on_close = StreamHandler.on_close

    def recorded_close(self: StreamHandler) -> None:
        if self._verified is not None:
            closed.add(self._verified.session_id)
        on_close(self)

    monkeypatch.setattr(StreamHandler, "on_close", recorded_close)

    def logged_out_then(api, http, session_id: str, after_the_close: bool):
        # The stream is open (ready came) when the generator is first asked: log out, then send one image.
        assert http.delete("/v1/session", headers={"Authorization": f"Bearer {api.token}"}).status_code == 204
        yield CAT_JPEG
        if after_the_close:
            # Once the server has refused that image and closed the stream, sending this one finds
            # the stream closed: the refusal's error frame, already received, must still come first.
            wait_until(lambda: session_id in closed, "the server to refuse the first image and close the stream")
            yield CAT_JPEG

    for after_the_close in (False, True):
        seen: list[Any] = []
        with Client(server.url) as api, server.client() as http:
            session_id = api.login()["session_id"]
            with pytest.raises(AuthError) as refused:
                for item in api.predict_stream(logged_out_then(api, http, session_id, after_the_close)):
                    seen.append(item)
        assert refused.value.code == "session_revoked"
        assert [(item.seq, item.error.code) for item in seen] == [(0, "session_revoked")], after_the_close

        async def run(after_the_close: bool) -> list[Any]:
            async with AsyncClient(server.url) as api:
                session_id = (await api.login())["session_id"]
                with server.client() as http:
                    seen = []
                    with pytest.raises(AuthError) as refused:
                        async for item in api.predict_stream(logged_out_then(api, http, session_id, after_the_close)):
                            seen.append(item)
                    assert refused.value.code == "session_revoked"
                    return seen

        assert [(item.seq, item.error.code) for item in asyncio.run(run(after_the_close))] == [
            (0, "session_revoked")], after_the_close


def test_async_client_predict_stream(server) -> None:
    async def run() -> list[Any]:
        async with AsyncClient(server.url) as api:
            await api.login(options={"top_k": 1})
            return [item async for item in api.predict_stream([CAT_JPEG, COFFEE_JPEG, CAT_JPEG])]

    results = {r.ref: r for r in asyncio.run(run())}
    assert sorted(results) == [0, 1, 2]
    assert all(r.ok and len(r.result["top_k"]) == 1 for r in results.values())
    top1 = {ref: r.result["predicted_class"] for ref, r in results.items()}
    assert top1[0] == top1[2] != top1[1]  # the same photo twice, then another


# -- limits -------------------------------------------------------------------------------------
def test_protocol_errors_past_the_limit_close_the_stream_with_1008(serve, server, client: httpx.Client) -> None:
    auth = login(client)
    with serve(make_config(http={"stream_max_errors": 3}), runner=server.runner, served=server.served) as running, \
            open_stream(running, auth) as socket:
        for _ in range(3):  # errors about an image are not protocol errors: not counted
            socket.send(b"GIF89a broken")
        assert [frame(socket)["error"]["code"] for _ in range(3)] == ["invalid_image"] * 3
        socket.send(CAT_JPEG)
        assert frame(socket)["type"] == "result"
        socket.send("{not json")
        socket.send(json.dumps({"colour": "red"}))
        socket.send(json.dumps({"ref": "a"}))
        socket.send(json.dumps({"ref": "b"}))  # the third: "a" never got its image
        with contextlib.suppress(ConnectionClosed):
            socket.send(CAT_JPEG)  # sent before the close was seen: not classified
        errors = [frame(socket) for _ in range(4)]
        assert [(item["ref"], item["error"]["code"]) for item in errors] == [
            (None, "malformed_json"), (None, "invalid_frame"), ("a", "missing_image"), (None, "too_many_errors")]
        assert errors[-1]["status"] == 400 and "3 protocol errors" in errors[-1]["error"]["message"]
        assert close_code(socket) == (1008, "too_many_errors")
    assert client.get("/v1/session", headers=auth).json()["predictions"] == 1


def test_deeply_nested_json_is_a_malformed_json_frame_not_a_crash(server, client: httpx.Client) -> None:
    nested = "[" * 100_000
    with open_stream(server, login(client)) as socket:
        socket.send(nested)
        error = frame(socket)
        assert (error["type"], error["error"]["code"], error["seq"]) == ("error", "malformed_json", None)
        socket.send(CAT_JPEG)  # the stream goes on
        assert frame(socket)["type"] == "result"
    with ws_connect(stream_url(server), open_timeout=TIMEOUT) as socket:  # as the token frame
        socket.send(nested)
        assert frame(socket)["error"]["code"] == "missing_token"
        assert close_code(socket) == (1008, "missing_token")


def client_frame(payload: str | bytes) -> bytes:
    """A whole text (str) or binary frame as a client sends it: masked."""
    opcode, data = (1, payload.encode()) if isinstance(payload, str) else (2, payload)
    mask = os.urandom(4)
    length = (struct.pack("!B", 0x80 | len(data)) if len(data) < 126
              else struct.pack("!BH", 0x80 | 126, len(data)) if len(data) < 65536
              else struct.pack("!BQ", 0x80 | 127, len(data)))
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(data))
    return struct.pack("!B", 0x80 | opcode) + length + mask + masked


class RawStream:
    """A WebSocket client on a plain socket that does only what it is told: it reads when asked and
    answers no ping (the `websockets` client answers pings on its own)."""

    def __init__(self, url: str, headers: dict[str, str], receive_buffer: int | None = None):
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /v1/stream HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        return chunk

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send(self, payload: str | bytes) -> None:
        self.sock.sendall(client_frame(payload))

    def recv(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload); 1 text, 8 close, 9 ping."""
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        return first & 0x0F, self._take(length)

    def close(self) -> None:
        self.sock.close()


def open_connections(url: str) -> float:
    """The server's inference_open_connections, asked on a connection of its own (counted too)."""
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        text = http.get("/metrics").text
    return float(re.search(r"^inference_open_connections(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))


def test_a_client_that_sends_and_never_reads_stops_being_read_then_is_dropped(
        serve, server, client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small socket buffers on both ends, so that the server's answers back up after a few frames.
    adopt = GuardedHTTPServer.adopt

    def adopt_with_small_send_buffer(self: GuardedHTTPServer, connection: socket.socket, address: Any) -> None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        adopt(self, connection, address)

    written: list[int] = []  # what the server wrote to the stream (into its buffers), frame by frame
    write_message = StreamHandler.write_message

    def counted(self: StreamHandler, message: Any, binary: bool = False) -> Any:
        written.append(len(message))
        return write_message(self, message, binary)

    monkeypatch.setattr(GuardedHTTPServer, "adopt", adopt_with_small_send_buffer)
    monkeypatch.setattr(StreamHandler, "write_message", counted)
    config = make_config(http={"stream_max_errors": 10_000, "write_timeout_seconds": 0.5})
    with serve(config, runner=server.runner, served=server.served) as running:
        stream = RawStream(stream_url(running), login(client), receive_buffer=4096)
        try:
            assert json.loads(stream.recv()[1])["type"] == "ready"
            sent = 3000  # each answered by an error frame several times its size
            stream.sock.sendall(b"".join(client_frame(json.dumps({"colour": index})) for index in range(sent)))

            # The server drops the connection when its answers are not read in time (only the
            # /metrics request that asks is left open) ...
            wait_until(lambda: open_connections(running.url) == 1, "the server to drop the stream")
            # ... having stopped reading while they waited: it wrote about what the socket buffers hold
            # (4 KiB at each end, doubled by the kernel: about a hundred of these frames), not an
            # answer to each frame sent.
            assert 1 < len(written) < 300
            # What the client then reads ends in a reset, short of the answers to all it sent.
            answers = 0
            with pytest.raises(ConnectionError):
                while True:
                    answers += stream.recv()[0] == 1
            assert answers < sent // 3 and len(written) < sent // 3
        finally:
            stream.close()


def test_a_stream_that_does_not_answer_pings_is_closed(serve, server, client: httpx.Client,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pongs: list[str] = []  # one entry per pong the server received: the Authorization its stream opened with
    monkeypatch.setattr(StreamHandler, "on_pong",
                        lambda self, data: pongs.append(self.request.headers["Authorization"]))
    config = make_config(http={"stream_ping_interval_seconds": 0.2, "stream_ping_timeout_seconds": 0.2})
    with serve(config, runner=server.runner, served=server.served) as running:
        auth = login(client)
        with open_stream(running, auth) as answering:  # websockets answers pings: the stream stays
            wait_until(lambda: pongs.count(auth["Authorization"]) >= 3, "three pings answered")
            answering.send(CAT_JPEG)
            assert frame(answering)["type"] == "result"
        silent = RawStream(stream_url(running), auth)
        try:
            assert json.loads(silent.recv()[1])["type"] == "ready"
            started = time.monotonic()
            assert silent.recv()[0] == 9  # a ping, not answered
            opcode, payload = silent.recv()
            assert opcode == 8 and payload[2:] == b"ping timed out"
            assert time.monotonic() - started < TIMEOUT / 2
        finally:
            silent.close()


def test_an_image_whose_record_reply_is_lost_in_a_failover_is_tried_again_and_recorded_once(
        server, client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's reply to a record is lost as in a Redis failover (the script ran, the connection dropped:
    503 store_unavailable), and the next attempt also meets an unavailable store: the stream tries the image
    again under its idempotency key (http.stream_store_retry_seconds), answers it once, and the history holds
    it once."""
    from core.errors import StoreUnavailable

    store, record = server.store, server.store.record
    failures: list[str | None] = []

    async def lossy(session: Any, entry: dict[str, Any], idempotency_key: str | None = None) -> Any:
        if len(failures) == 0:
            await record(session, entry, idempotency_key)  # written, but the answer never comes back
            failures.append(idempotency_key)
            raise StoreUnavailable("The session store is unavailable; retry shortly.")
        if len(failures) == 1:
            failures.append(idempotency_key)
            raise StoreUnavailable("The session store is unavailable; retry shortly.")
        return await record(session, entry, idempotency_key)

    auth = login(client)
    monkeypatch.setattr(store, "record", lossy)
    with open_stream(server, auth) as socket:
        socket.send(CAT_JPEG)
        answer = frame(socket)
    monkeypatch.undo()
    assert answer["type"] == "result", answer
    assert len(failures) == 2 and failures[0] is not None and failures[0] == failures[1]  # one key, each try
    history = client.get("/v1/history", headers=auth, params={"limit": 10}).json()["items"]
    assert [item["id"] for item in history] == [answer["result"]["id"]]
