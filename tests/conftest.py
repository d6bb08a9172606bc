"""Shared fixtures: a real Redis server that the suite starts itself, the real default model, and
servers built by `server.server.Server` exactly as the CLI builds them, run on a background IOLoop thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import pytest
import redis
import tornado.netutil

from inference.model import LoadedModel
from inference.runner import ModelRunner, ServedModel
from server.config import Config
from server.embedded_redis import redis_server_binary
from server.runtime import build_runner, build_store, serve_loaded
from server.server import Server

DATA = Path(__file__).parent / "data"
CAT_JPEG = (DATA / "cat.jpg").read_bytes()
COFFEE_JPEG = (DATA / "coffee.jpg").read_bytes()
# ImageNet classes a correct model puts in its top 3.
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
TEST_SECRET = "test-secret-key-0123456789"

T = TypeVar("T")


def wait_for(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> bool:
    """Poll `check` until it holds or `timeout` seconds pass (bounded; the caller asserts the result)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.02) -> None:
    """Wait for a condition instead of sleeping: poll `check` until it holds, or fail saying `what`
    was awaited. The deadline is only a bound for a test that would otherwise hang; a test never
    depends on how soon the condition holds."""
    if not wait_for(check, timeout, interval):
        pytest.fail(f"gave up after {timeout:g} s waiting for {what}")


async def wait_until_async(check: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """`wait_until` inside a coroutine, for a condition that tasks on the same loop bring about."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)


def in_ci() -> bool:
    """Whether this run is CI's (`CI=true`, as CI services set it)."""
    return os.environ.get("CI") == "true"


def tool_missing(reason: str) -> NoReturn:
    """A test that needs a tool this machine lacks (Chromium, Playwright): skipped on a developer's
    machine, failed under CI=true, where a skip would keep CI green without running the test."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool fails the run rather than skipping the test)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process of the suite's own: free port, temporary folder."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        from server.config import load_config

        binary = redis_server_binary(load_config().redis.embedded_binary)  # the one the server would run
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError("test redis-server did not start")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="test-redis-") as directory:
        server = RedisServer(Path(directory)).start()
        yield server
        server.stop()


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    # Imported here: torch takes seconds to import, and the unit tier (tests/unit) loads this file too.
    from inference.torch_model import load_model

    return load_model("efficientnet_lite0", "default")


# Exported ONNX graphs, shared by every test (and test subprocess) of one run: one export per run.
# Removed when the process that made it exits (about 70 MB a run would pile up on a CI machine).
MODEL_CACHE = Path(tempfile.mkdtemp(prefix="test-model-cache-"))
atexit.register(shutil.rmtree, MODEL_CACHE, ignore_errors=True)


def make_config(redis_url: str = "", **sections: dict[str, Any]) -> Config:
    config = Config()
    config.auth.secret_keys = [TEST_SECRET]
    config.model.cache_dir = str(MODEL_CACHE)
    config.redis.url = redis_url or "redis://unused"
    # Tests log in far more often than a person; the login limit's own tests turn it back on.
    config.sessions.login_rate_limit_per_minute = 0
    # Tests compare answers across paths within 1e-4: FP32 on every machine (auto still chooses the
    # runtime). BF16, which `auto` may pick on a CPU with AMX, is held to its guard in test_selection.py.
    config.model.precision = "fp32"
    # Whether capture keeps an image must not hang on the test machine's free disk; test_feedback.py
    # tests the guard itself.
    config.capture.min_free_disk_bytes = 0
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


class LoopThread:
    """An asyncio loop on a background thread: servers under test run here, tests call in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-ioloop")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def start_server(self, config: Config, runner: ModelRunner, served: ServedModel | None,
                     redis_url: str | None = None) -> Server:
        """A Server (server/server.py) for `config`, `runner` and the configured `served` model with its
        transports started on this loop, HTTP on a free port of 127.0.0.1, without the background tasks of
        a serving process (tests drive model versions themselves); its store uses `redis_url` (default:
        the config's)."""

        async def start() -> Server:
            store = build_store(config, redis_url or config.redis.url)
            server = Server(config, store, runner, served, tornado.netutil.bind_sockets(0, "127.0.0.1"))
            await server.start(background=False)
            return server

        return self.run(start())

    def stop_server(self, server: Server) -> None:
        """Stop a server started by start_server: its transports at once (no grace), then its store's
        connections."""

        async def stop() -> None:
            await server.stop(0)
            await server.store.close()

        self.run(stop())


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


class RunningServer:
    def __init__(self, server: Server):
        self.server, self.config, self.store, self.runner = server, server.config, server.store, server.runner
        self.use_cases = server.use_cases
        self.models = server.use_cases.models
        self.versions = self.models.catalogue(None)  # the default model's
        self.served = self.versions.base  # the configured weights on their runtime, to share with another server
        self.url = f"http://127.0.0.1:{server.http.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})


@pytest.fixture(scope="session")
def serve(loop_thread: LoopThread, redis_server: RedisServer, default_model: LoadedModel) -> Callable[..., Any]:
    """`with serve(config) as server:` runs a Server(config, store, runner, served) on a free port; a test
    passes `runner` and `served` (the configured model on its runtime) to reuse another server's."""

    @contextlib.contextmanager
    def _serve(config: Config | None = None, runner: ModelRunner | None = None,
               served: ServedModel | None = None, *, own_models: bool = False) -> Iterator[RunningServer]:
        config = config or make_config(redis_server.url)
        if config.redis.url == "redis://unused":
            config.redis.url = redis_server.url
        owns_runner = runner is None
        runner = runner or build_runner(config)
        # `own_models`: the server builds every model itself, `[model]`'s on its runtime on first use as a
        # serving process does (counted in models.max_loaded), rather than sharing the session's copy.
        served = None if own_models else served or serve_loaded(config, default_model)

        server = loop_thread.start_server(config, runner, served)
        try:
            yield RunningServer(server)
        finally:
            loop_thread.stop_server(server)
            if owns_runner:
                runner.close()

    return _serve


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Iterator[RunningServer]:
    with serve() as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def login(client: httpx.Client, **options: Any) -> dict[str, str]:
    """Log in and return the Authorization header for the new session."""
    response = client.post("/v1/sessions", json={"options": options} if options else None)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"]


SHAPES = ["circle", "square", "star", "triangle", "cross"]  # the labels of the repository's "shapes" model


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository beside `[model]`'s: "shapes", a 5-class squeezenet1_1 with its own preprocessing
    defaults (tests/model_folders.py builds it: nothing is downloaded)."""
    from tests.model_folders import squeezenet_folder

    repository = tmp_path_factory.mktemp("model-repository")
    squeezenet_folder(repository / "shapes", SHAPES, extra='description = "five shapes"\n'
                                                        '[preprocess]\nresize = 160\ncrop = 128\n'
                                                        'interpolation = "bicubic"\n')
    return repository


@pytest.fixture(scope="session")
def models_server(serve: Callable[..., Any], redis_server: RedisServer, model_repository: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with a model repository: `[model]`'s efficientnet_lite0 (the default) and "shapes"."""
    config = make_config(redis_server.url, models={"repository_dir": str(model_repository),
                                                   "store_dir": str(tmp_path_factory.mktemp("models-store"))})
    with serve(config) as running:
        yield running
