"""Starting, watching and stopping the servers under test (each in its own process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerSpec:
    """How to start one server under test."""

    name: str  # e.g. ours-onnx, flask, litserve-torch
    command: list[str]
    env: dict[str, str]
    predict_path: str
    payloads: tuple[str, ...]
    health_path: str | None  # polled until 200; None: wait for a TCP connect
    sessions: bool = False  # ours: Bearer tokens from POST /v1/sessions
    data_dir: Path | None = None  # ours: its data dir (embedded Redis socket lives there)
    grpc_port: int | None = None  # ours-oip: the Open Inference Protocol's gRPC port (grpc.port)
    layout: dict[str, int | str] | None = None  # processes x runner threads x intra-op threads (bench.run)
    pipeline: dict[str, str] | None = None  # decoder, runtime, precision, where known before it starts
    startup_timeout: float = 180.0


@dataclass
class RunningServer:
    spec: ServerSpec
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    known_pids: set[int] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tree(self) -> list[psutil.Process]:
        """The server process and all its descendants (remembered, so that stop() finds strays)."""
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.known_pids.update(p.pid for p in procs)
        return procs

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_server(spec: ServerSpec, log_dir: Path) -> RunningServer:
    """Start `spec` in a new session (process group) and wait until it answers; raise on failure."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in spec.command]
    log_path = log_dir / f"{spec.name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **spec.env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = RunningServer(spec, port, process, log_path)
    try:
        _wait_ready(server)
    except BaseException:
        stop_server(server)
        raise
    return server


def _wait_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + server.spec.startup_timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.spec.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        server.tree()
        if _answers(server):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{server.spec.name} not ready after {server.spec.startup_timeout:.0f} s:\n{server.log_tail()}")


def _answers(server: RunningServer) -> bool:
    if server.spec.health_path is None:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return True
        except OSError:
            return False
    try:
        return httpx.get(server.base_url + server.spec.health_path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_server(server: RunningServer, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it and any descendant that left the group."""
    server.tree()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.process.pid, signal.SIGKILL)
    for pid in server.known_pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=5)


def wait_idle(server: RunningServer, max_wait: float = 30.0, threshold: float = 15.0) -> float:
    """Wait (bounded) until the server tree uses < `threshold` % CPU: abandoned requests drained."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        procs = server.tree()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent(None)
        time.sleep(0.5)
        busy = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                busy += proc.cpu_percent(None)
        if busy < threshold:
            break
    return time.monotonic() - start


class RssSampler:
    """Samples the summed RSS of a server's process tree every `interval` s in a thread; keeps the peak."""

    def __init__(self, server: RunningServer, interval: float = 0.2) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
