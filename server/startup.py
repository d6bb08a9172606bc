"""What happens once before serving, in the process the command started: the data folder locked, the
port bound, the store started (embedded) or checked (external), the model exported and its runtime
chosen; then one serving process here, or several forked (server.supervisor)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

import tornado.netutil
from redis.exceptions import RedisError

from core.files import private_dir
from server.config import Config
from server.data_dir import development_secret, lock_data_dir
from server.embedded_redis import EmbeddedRedis
from server.runtime import build_store, prepare_models
from server.server import StoreWrapper, serve
from server.supervisor import supervise

log = logging.getLogger("inference.server")


class PortUnavailable(Exception):
    """The HTTP port cannot be bound; the message names it and the fix."""


def run(config: Config, wrap_store: StoreWrapper | None = None) -> int:
    """Lock the data folder, bind the port once (before anything starts, so that a port in use costs
    nothing), start the embedded store or ping the configured one, then serve in this process or in
    `processes` forks."""
    data_dir = config.data_path
    private_dir(data_dir)  # sessions, the secret: this user's only
    lock = lock_data_dir(data_dir)  # before anything in the folder is written
    embedded: EmbeddedRedis | None = None
    try:
        if not config.auth.secret_keys:  # production mode refuses this in config validation
            config.auth.secret_keys = [development_secret(data_dir)]
        sockets = bind_port(config.server.host, config.server.port)
        redis_url = config.redis.url
        if redis_url == "embedded":
            embedded = EmbeddedRedis(data_dir, binary=config.redis.embedded_binary,
                                     maxmemory_mb=config.redis.embedded_maxmemory_mb,
                                     production=config.server.mode == "production")
            redis_url = embedded.start(pass_fds=(lock,))
        else:
            asyncio.run(warn_if_store_unreachable(config))
        store_text = f"embedded redis ({embedded.url})" if embedded else _redact(config.redis.url)
        # Export each model and choose its runtime once, here, so that serving processes read the cache.
        prepare_models(config, config.model_specs())
        if config.serving_processes == 1:
            return asyncio.run(serve(config, sockets, redis_url, store_text, wrap_store=wrap_store))
        return supervise(config, sockets, redis_url, store_text, wrap_store)
    finally:
        if embedded:
            embedded.stop()
        os.close(lock)


def bind_port(host: str, port: int) -> list[socket.socket]:
    """The listening sockets for host:port; raises PortUnavailable, in one sentence, where they cannot be bound."""
    try:
        return tornado.netutil.bind_sockets(port, host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortUnavailable(f"Port {port} on {host} is already in use; stop the program that holds it, or "
                                  f"choose another port with --port or server.port.") from None
        raise PortUnavailable(f"Cannot listen on {host}:{port} ({exc.strerror}); check server.host and "
                              f"server.port (or --host and --port).") from None


async def warn_if_store_unreachable(config: Config) -> None:
    """Ping the configured Redis once (within redis.connect_timeout_seconds) before the model loads, and
    say in one line if it does not answer. The server still starts: /readyz answers 503 until Redis
    does (docs/operations.md, "Faults and retries"), so that Redis and the server may start together."""
    store = build_store(config, config.redis.url)
    try:
        # The client itself, not the store's ping: that one retries and logs a warning of its own, and
        # this is to be said once.
        await store.redis.ping()
    except (RedisError, OSError) as exc:
        reason = str(exc).rstrip(".")  # redis-py's own words: refused, timed out, wrong password
        log.warning("Cannot reach Redis at %s (%s); check redis.url. The server starts and says ready once "
                    "Redis answers (/readyz answers 503 until then).", _redact(config.redis.url), reason)
    finally:
        await store.close()


def _redact(url: str) -> str:
    """The store URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
