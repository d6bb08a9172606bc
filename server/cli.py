"""`python -m server`: load config, model and store, serve, shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import fcntl
import getpass
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tornado.httpserver
import tornado.netutil

from core.errors import ServiceError
from core.files import owner_only, private_dir, write_atomically
from handlers.base import InFlight
from inference.model import ModelLoadError
from server.app import http_server, make_app
from server.balance import GuardedHTTPServer, SharedCounts
from server.config import Config, ConfigError, load_config, validate
from server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from server.malloc import keep_freed_memory
from server.observability import (
    configure_logging,
    count_sessions_forever,
    forget_process_metrics,
    share_metrics_across_processes,
)
from server.runtime import build_runner, build_store, prepare_model
from service.auth import api_key_hash
from service.retention import sweep_forever

log = logging.getLogger("inference.server")
_EXIT_MODEL_LOAD_FAILED = 3  # a child that cannot load the model is not restarted: it would fail again
_EXIT_DATA_DIR_IN_USE = 2
_MIN_SECRET_CHARS = 32
_POLL_SECONDS = 0.05  # while a restart waits out its pause: how soon a stop or another exit is seen


class DataDirInUse(Exception):
    """Another server holds the data folder's lock; the message names its pid."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server", description="Session-aware inference server.")
    parser.add_argument("--config", help="path of the TOML config (default: config.toml beside the code)")
    parser.add_argument("--host", help="address to bind (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to bind (overrides server.port; 0 picks a free one)")
    parser.add_argument("--processes", type=int,
                        help="serving processes sharing the port (overrides server.processes; 0: one per core)")
    sub = parser.add_subparsers(dest="command")
    hash_key = sub.add_parser("hash-key", help="print the auth.api_keys entry for an API key")
    hash_key.add_argument("key", nargs="?", help="the key (default: generate a new random one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "hash-key":
        return _hash_key(args.key)
    try:
        config = load_config(args.config)
        if args.host:
            config.server.host = args.host
        if args.port is not None:
            config.server.port = args.port
        if args.processes is not None:
            config.server.processes = args.processes
        validate(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.server.log_level, config.server.log_format)
    keep_freed_memory(config.server.malloc_keep_mb)  # once, before serving: forked children inherit it
    try:
        return run(config)
    except DataDirInUse as exc:
        log.error("%s", exc)
        return _EXIT_DATA_DIR_IN_USE
    except (ModelLoadError, ConfigError, EmbeddedRedisError) as exc:
        log.error("%s", exc)
        return 1


def _hash_key(key: str | None) -> int:
    if key is None and sys.stdin.isatty():
        key = getpass.getpass("API key (empty: generate one): ") or None
    if key is None:
        key = secrets.token_urlsafe(32)
        print(f"new API key (give it to the client; it is not stored): {key}")
    print(f'auth.api_keys entry: "{api_key_hash(key)}"')
    return 0


def development_secret(data_dir: Path) -> str:
    """A random signing key made once and kept in the data folder (0600), so a restart keeps sessions.
    One too short to be a key (an empty or truncated file) is replaced."""
    path = data_dir / "secret_key"
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = None
    except UnicodeDecodeError:
        secret = ""
    if secret is not None and len(secret) >= _MIN_SECRET_CHARS:
        owner_only(path, 0o600)
        return secret
    if secret is not None:
        log.warning("%s holds no usable secret (%d characters, at least %d needed); writing a new one: sessions "
                    "signed with the old one end", path, len(secret), _MIN_SECRET_CHARS)
    secret = secrets.token_urlsafe(48)
    write_atomically(path, secret, private=True)
    return secret


def lock_data_dir(data_dir: Path) -> int:
    """Lock the data folder for this server's life and return the lock's descriptor.

    Two servers on one folder would run two Redis servers on one set of files and empty each other's
    metrics. The lock is an flock on `server.lock` (holding the pid): the kernel drops it when the
    last process holding the descriptor exits (the forked serving processes and the embedded Redis
    inherit it), so a server killed hard leaves nothing to clean up."""
    path = data_dir / "server.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"Cannot lock {path}: {exc.strerror}; server.data_dir must support file locks.") from None
        raise DataDirInUse(
            f"The data folder {data_dir} is in use by another server (pid {holder}, or the redis-server it started, "
            f"still shutting down); stop it, or start this one with its own server.data_dir (and a redis.url "
            f"shared with the other if both should serve the same sessions)."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    owner_only(path, 0o600)
    return fd


def run(config: Config) -> int:
    """Lock the data folder, start the store and bind the port once, then serve in this process or in
    `processes` forks."""
    data_dir = config.data_path
    private_dir(data_dir)  # sessions, the secret: this user's only
    lock = lock_data_dir(data_dir)  # before anything in the folder is written
    embedded: EmbeddedRedis | None = None
    try:
        if not config.auth.secret_keys:  # production mode refuses this in config validation
            config.auth.secret_keys = [development_secret(data_dir)]
        redis_url = config.redis.url
        if redis_url == "embedded":
            embedded = EmbeddedRedis(data_dir, binary=config.redis.embedded_binary,
                                     maxmemory_mb=config.redis.embedded_maxmemory_mb,
                                     production=config.server.mode == "production")
            redis_url = embedded.start(pass_fds=(lock,))
        store_text = f"embedded redis ({embedded.url})" if embedded else _redact(config.redis.url)
        sockets = tornado.netutil.bind_sockets(config.server.port, config.server.host)
        prepare_model(config)  # export and choose the runtime once, here, so that serving processes read the cache
        if config.serving_processes == 1:
            return asyncio.run(serve(config, sockets, redis_url, store_text))
        return supervise(config, sockets, redis_url, store_text)
    finally:
        if embedded:
            embedded.stop()
        os.close(lock)


async def serve(config: Config, sockets: list[socket.socket], redis_url: str, store_text: str,
                counts: SharedCounts | None = None, slot: int = 0) -> int:
    """One serving process: load the model, serve until SIGTERM/SIGINT, then drain and close.
    `counts` and `slot`: this is process `slot` of several sharing the sockets (see server.balance)."""
    counts = counts or SharedCounts(1)
    runner = build_runner(config, siblings=counts.siblings(slot))
    store = build_store(config, redis_url)
    app = make_app(config, store, runner)
    await app.settings["model_versions"].start()  # serve the active version, follow activations
    # One process counts the sessions for the gauge (a keyspace scan), in the background.
    session_counter = asyncio.ensure_future(count_sessions_forever(store, runner.metrics.active_sessions)) \
        if slot == 0 else None
    # One process enforces the capture retention (the others read it on every image read).
    capture_sweeper = asyncio.ensure_future(sweep_forever(
        app.settings["captures"].sweep, config.capture.sweep_interval_seconds, "captured images",
        errors=(ServiceError, OSError))) if slot == 0 else None
    # ... and the feedback retention.
    feedback_sweeper = asyncio.ensure_future(sweep_forever(
        app.settings["feedback"].sweep, config.feedback.sweep_interval_seconds, "feedback records")) \
        if slot == 0 else None
    server = http_server(app, config, counts, slot)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    grpc_server, grpc_text = None, ""
    if config.grpc.port:
        # Imported only when on (see the module's note), and created here, after any fork: a gRPC
        # server does not survive fork, and each process binds the port (SO_REUSEPORT).
        from server.grpc_server import start_grpc_server

        try:
            grpc_server, grpc_port = await start_grpc_server(config, app.settings["auth"], app.settings["classifier"],
                                                             store, runner, host=config.server.host,
                                                             port=config.grpc.port)
        except OSError as exc:  # the port is taken: one sentence, like any bad setting
            server.stop()
            runner.close()
            await store.close()
            raise ConfigError(str(exc)) from None
        grpc_text = f" grpc={config.server.host}:{grpc_port}"
    log.info("ready on http://%s:%d model=%s version=%s runtime=%s precision=%s device=%s workers=%d%s pid=%d store=%s",
             config.server.host, port, runner.model.name, runner.model.version, runner.backend.name,
             runner.backend.precision, config.model.device, config.model.workers, grpc_text,
             os.getpid(), store_text)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("shutting down: no new connections, finishing requests in flight")
    _serve_backlog(server, sockets)
    server.stop()
    # gRPC stops taking calls now and gets the same grace for those in flight as HTTP requests.
    grpc_stopped = (asyncio.ensure_future(grpc_server.stop(config.http.shutdown_grace_seconds))
                    if grpc_server is not None else None)
    await _drain(app.settings["in_flight"], config.http.shutdown_grace_seconds)
    if grpc_stopped is not None:
        await grpc_stopped
    await server.close_all_connections()
    if session_counter is not None:
        session_counter.cancel()
    if capture_sweeper is not None:
        capture_sweeper.cancel()
    if feedback_sweeper is not None:
        feedback_sweeper.cancel()
    app.settings["captures"].close()
    if app.settings["rewrite_after_erase"] is not None:  # an erase's rewrite still waiting: now, not never
        await app.settings["rewrite_after_erase"].flush()
    await app.settings["model_versions"].close()
    runner.close()
    await store.close()
    log.info("stopped")
    return 0


class RestartBudget:
    """How many crashed serving processes the supervisor restarts, and after what pause.

    At most `max_restarts` restarts (of any slot) per sliding `window` seconds: crashes spread over
    days (an OOM kill now and then) are all restarted, a crash loop stops the server. Each slot's
    pause doubles from `first_pause` up to `max_pause` while it keeps crashing, and starts over once
    it has run a whole window without crashing."""

    def __init__(self, max_restarts: int, window: float, first_pause: float = 0.5, max_pause: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_restarts, self.window = max_restarts, window
        self.first_pause, self.max_pause = first_pause, max_pause
        self.clock = clock
        self._restarts: collections.deque[float] = collections.deque()  # when, within the window
        self._last: dict[int, tuple[float, float]] = {}  # slot -> (last crash, its pause)

    @property
    def recent(self) -> int:
        """Restarts within the window up to now."""
        self._forget(self.clock())
        return len(self._restarts)

    def pause(self, slot: int) -> float | None:
        """A process of `slot` crashed: the seconds to wait before starting another, or None when the
        budget is spent (the server should stop)."""
        now = self.clock()
        self._forget(now)
        if len(self._restarts) >= self.max_restarts:
            return None
        self._restarts.append(now)
        last = self._last.get(slot)
        pause = self.first_pause if last is None or now - last[0] >= self.window else min(last[1] * 2, self.max_pause)
        self._last[slot] = (now, pause)
        return pause

    def _forget(self, now: float) -> None:
        while self._restarts and now - self._restarts[0] >= self.window:
            self._restarts.popleft()


def supervise(config: Config, sockets: list[socket.socket], redis_url: str, store_text: str) -> int:
    """Fork `config.serving_processes` children that share the listening sockets; each loads the model once.

    The parent only forwards SIGTERM/SIGINT and restarts a child that crashes (within a RestartBudget),
    so a load balancer in front sees one port. Forking happens before any model or event loop exists.
    """
    children: dict[int, int] = {}  # pid -> slot
    stopping = False
    counts = SharedCounts(config.serving_processes)  # shared with the children: made before fork
    metrics_dir = config.data_path / "metrics"  # every child's metrics, so that any one reports all
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counts of an earlier run would add up
    metrics_dir.mkdir(parents=True)

    def start(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            # Until serve() installs its own handlers, a stop ends a child still loading its model
            # cleanly: it has nothing to drain yet.
            signal.signal(signal.SIGTERM, _exit_at_once)
            signal.signal(signal.SIGINT, _exit_at_once)
            code = 1
            try:
                share_metrics_across_processes(metrics_dir)
                code = asyncio.run(serve(config, sockets, redis_url, store_text, counts, slot))
            except ModelLoadError as exc:
                log.error("%s", exc)
                code = _EXIT_MODEL_LOAD_FAILED
            finally:
                os._exit(code)
        children[pid] = slot
        if stopping:  # the stop came while forking: forward() did not see this one
            os.kill(pid, signal.SIGTERM)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(config.serving_processes):
        start(slot)
    budget = RestartBudget(config.server.max_restarts, config.server.restart_window_seconds)
    pending: dict[int, float] = {}  # slot -> when its next process starts (a crashed one's pause)
    failed = False
    while True:
        if stopping:
            pending.clear()
        for slot, due in list(pending.items()):
            if due <= time.monotonic():
                del pending[slot]
                start(slot)
        if not children and not pending:
            break
        try:
            if pending:
                # A pause is running: poll, so that a stop, another exit or the end of the pause is
                # seen within _POLL_SECONDS.
                pid, status = os.waitpid(-1, os.WNOHANG) if children else (0, 0)
                if pid == 0:
                    time.sleep(_POLL_SECONDS)
                    continue
            else:
                pid, status = os.wait()
        except ChildProcessError:
            break
        slot = children.pop(pid, None)
        forget_process_metrics(metrics_dir, pid)
        code = os.waitstatus_to_exitcode(status)
        if slot is None or stopping:
            failed |= code != 0
            continue
        if code not in (0, _EXIT_MODEL_LOAD_FAILED):
            counts.reset(slot)  # the crashed process's connections and work are gone with it
            pause = budget.pause(slot)
            if pause is not None:
                log.warning("worker process %d exited with %d; starting another in %.1fs (restart %d of at most "
                            "%d per %gs)", pid, code, pause, budget.recent, budget.max_restarts, budget.window)
                pending[slot] = time.monotonic() + pause
                continue
            log.error("worker process %d exited with %d after %d restarts within %gs (server.max_restarts per "
                      "server.restart_window_seconds); stopping the server rather than crash-looping", pid, code,
                      budget.recent, budget.window)
        failed = True
        forward(signal.SIGTERM, None)
    return 1 if failed else 0


def _exit_at_once(_signum: int, _frame: object) -> None:
    os._exit(0)


def _serve_backlog(server: GuardedHTTPServer, sockets: list[socket.socket]) -> None:
    """Take the connections the kernel has already completed for the listening sockets.

    Their clients were told "connected" and have sent their requests; closing the sockets would
    reset them. Handed to the server, they are answered like every request in flight. (With
    --processes, a sibling may take some of them: it serves them the same way.)
    """
    for listening in sockets:
        while True:
            try:
                connection, address = listening.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            server.adopt(connection, address)


async def _drain(in_flight: InFlight, grace_seconds: float) -> None:
    """Wait until no request has been in flight for a moment (connections just taken from the
    backlog need a few milliseconds to have their requests read), or the grace runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_seconds
    quiet_since = None
    while loop.time() < deadline:
        if in_flight.count > 0:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= 0.2:
            break
        await asyncio.sleep(0.02)
    if in_flight.count:
        log.warning("%d requests still in flight after %.0fs; closing them", in_flight.count, grace_seconds)


def _redact(url: str) -> str:
    """The store URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
