"""Graceful shutdown (docs/operations.md, "Graceful shutdown"): not ready at once while still serving for
the delay, then no new connections, requests in flight finished, streams closed with 1001 after their
in-flight answers; the clients resume a stream on another server with the same session.

Servers here are real ones (transports, Redis) on the test loop; images are held at the classifier by a
gate, so that "in flight" is a state the test waits for, never a timing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from clients.python import AsyncClient, Client
from handlers.oip_grpc import grpc_predict_v2_pb2 as pb
from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from server.server import Server
from service.dataplane import SHUTTING_DOWN
from tests.conftest import CAT_JPEG, COFFEE_JPEG, LoopThread, RunningServer, free_port, login, make_config, wait_until

GRACE = 30.0  # bounds each drain; the tests wait on conditions, never on this
LONG_DELAY = 600.0  # the delay under test; cut short by the test once it has seen what it checks


class Gate:
    """Holds every classification at the classifier until opened; counts those held."""

    def __init__(self, server: RunningServer, monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop):
        self.loop, self.held = loop, 0
        self.event = asyncio.Event()
        classifier = server.use_cases.classifier
        classify = classifier.classify

        async def held(*args: Any, **kwargs: Any) -> Any:
            self.held += 1
            await self.event.wait()
            return await classify(*args, **kwargs)

        monkeypatch.setattr(classifier, "classify", held)

    def open(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)


def begin_shutdown(loop_thread: LoopThread, server: Server, delay: float) -> tuple[Future[None], Callable[[], None]]:
    """Start server.shut_down on the loop; returns its future and what cuts its delay short."""
    cut_short = loop_thread.run(_event())
    future = asyncio.run_coroutine_threadsafe(server.shut_down(delay, GRACE, cut_short=cut_short), loop_thread.loop)
    return future, lambda: loop_thread.loop.call_soon_threadsafe(cut_short.set)


async def _event() -> asyncio.Event:
    return asyncio.Event()


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_during_the_delay_it_serves_and_says_not_ready_on_every_path_then_refuses(serve, loop_thread) -> None:
    grpc_port = free_port()
    config = make_config(grpc={"port": grpc_port})
    with serve(config) as running, running.client() as client:
        auth = login(client)
        model = running.versions.name
        assert client.get("/readyz").status_code == 200
        future, cut_short = begin_shutdown(loop_thread, running.server, LONG_DELAY)
        try:
            wait_until(lambda: running.use_cases.dataplane.shutting_down, "the shutdown to begin")
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["shutdown"] == SHUTTING_DOWN
            assert ready.headers["Retry-After"] == "1"
            assert client.get("/v2/health/ready").json() == {"ready": False}
            model_ready = client.get(f"/v2/models/{model}/ready")
            assert model_ready.status_code == 503 and model_ready.json() == {"name": model, "ready": False}
            assert client.get("/healthz").status_code == 200  # liveness: not restarted meanwhile
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready is False
                assert stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=30).ready is False
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            # Everything is still served, on new connections too.
            with running.client() as fresh:
                answer = fresh.post("/v1/predict", headers=auth, files={"image": ("cat.jpg", CAT_JPEG)})
                assert answer.status_code == 200, answer.text
            assert not future.done()
        finally:
            cut_short()
        future.result(GRACE * 2)
        assert refused(running.url)  # after the delay: no new connections


def test_requests_in_flight_finish_and_a_stream_gets_1001_after_its_answers(serve, loop_thread, monkeypatch) -> None:
    with serve() as running, running.client() as client:
        auth = login(client)
        gate = Gate(running, monkeypatch, loop_thread.loop)
        answers: list[httpx.Response] = []
        post = threading.Thread(target=lambda: answers.append(running.client().post(
            "/v1/predict", headers=auth, files={"image": ("cat.jpg", CAT_JPEG)})))
        post.start()
        token = auth["Authorization"].split()[1]
        url = running.url.replace("http", "ws") + "/v1/stream"
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=30) as ws:
            assert json.loads(ws.recv(30))["type"] == "ready"
            for ref in range(3):
                ws.send(json.dumps({"ref": ref}))
                ws.send(COFFEE_JPEG)
            wait_until(lambda: gate.held == 4, "the predict and three stream images to be in flight")
            future, _ = begin_shutdown(loop_thread, running.server, 0)
            wait_until(lambda: running.use_cases.in_flight.closing, "the drain to begin")
            wait_until(lambda: refused(running.url), "new connections to be refused")
            ws.send(json.dumps({"ref": "late"}))  # sent after the stream went away: never answered
            ws.send(COFFEE_JPEG)
            gate.open()
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(json.loads(ws.recv(60)))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
        assert sorted(frame["ref"] for frame in frames) == [0, 1, 2]
        assert all(frame["type"] == "result" for frame in frames)
        post.join(60)
        assert answers and answers[0].status_code == 200, answers
        future.result(GRACE * 2)


@contextlib.contextmanager
def first_that_accepts(ports: Callable[[], list[int]]) -> Iterator[int]:
    """A tiny TCP proxy: each connection goes to the first of `ports()` that accepts it (a load balancer
    that has taken a stopped server out). Yields its own port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            for port in ports():
                try:
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
                except OSError:
                    continue
                upstream.settimeout(None)
                threading.Thread(target=pipe, args=(connection, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, connection), daemon=True).start()
                break
            else:
                connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        listener.close()
        thread.join(10)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_the_clients_resume_a_stream_on_another_server_without_losing_or_repeating_an_image(
        serve, loop_thread, monkeypatch, flavour: str) -> None:
    images = [{"image": CAT_JPEG if i % 2 else COFFEE_JPEG, "ref": f"img-{i}"} for i in range(10)]
    config = make_config(http={"stream_max_in_flight": 3})
    with serve(config) as first, serve(make_config(), first.runner, first.served) as second:
        gate = Gate(first, monkeypatch, loop_thread.loop)
        with first_that_accepts(lambda: [first.server.http.port, second.server.http.port]) as port:
            url = f"http://127.0.0.1:{port}"
            results: list[Any] = []
            failures: list[BaseException] = []
            recorded: list[int] = []  # the session's history, across both servers

            def stream() -> None:
                try:
                    if flavour == "sync":
                        with Client(url) as api:
                            api.login()
                            results.extend(api.predict_stream(images))
                            recorded.append(len(list(api.history())))  # before the client logs out
                    else:
                        asyncio.run(stream_async())
                except BaseException as exc:  # reported by the test below
                    failures.append(exc)

            async def stream_async() -> None:
                async with AsyncClient(url) as api:
                    await api.login()
                    results.extend([result async for result in api.predict_stream(images)])
                    recorded.append(len([item async for item in api.history()]))

            thread = threading.Thread(target=stream)
            thread.start()
            wait_until(lambda: gate.held == 3, "three images in flight on the first server")
            future, _ = begin_shutdown(loop_thread, first.server, 0)
            wait_until(lambda: first.use_cases.in_flight.closing, "the first server's drain to begin")
            gate.open()
            future.result(GRACE * 2)
            thread.join(120)
        assert not failures, failures
        answers = results
        assert all(answer.ok for answer in answers), answers
        assert sorted(answer.ref for answer in answers) == sorted(item["ref"] for item in images)
        assert sorted(answer.seq for answer in answers) == list(range(len(images)))
        assert recorded == [len(images)]  # each image recorded once
