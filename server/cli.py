"""`python -m server`: load config, model and store, serve, shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import logging
import os
import secrets
import socket
import sys

import tornado.netutil
from redis.exceptions import RedisError

from core.files import private_dir
from inference.model import ModelLoadError
from server.config import ENV_PREFIX, Config, ConfigError, load_config, validate
from server.data_dir import DataDirInUse, development_secret, lock_data_dir
from server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from server.malloc import keep_freed_memory
from server.observability import configure_logging
from server.runtime import build_store, prepare_model
from server.server import StoreWrapper, serve
from server.supervisor import supervise
from service.auth import api_key_hash

log = logging.getLogger("inference.server")
_EXIT_DATA_DIR_IN_USE = 2
_EXIT_PORT_UNAVAILABLE = 2  # like a bad setting: the fix is in the config or on the command line


class PortUnavailable(Exception):
    """The HTTP port cannot be bound; the message names it and the fix."""




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server", description="Session-aware inference server.")
    parser.add_argument("--config", help="path of the TOML config (default: config.toml beside the code)")
    parser.add_argument("--host", help="address to bind (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to bind (overrides server.port; 0 picks a free one)")
    parser.add_argument("--processes", type=int,
                        help="serving processes sharing the port (overrides server.processes; 0: one per core)")
    sub = parser.add_subparsers(dest="command")
    hash_key = sub.add_parser(
        "hash-key", help="print the config line that lets an API key in (--admin: an admin key)",
        description="Print the auth.api_keys line (with --admin: the auth.admin_api_keys line, for the admin "
                    "routes: publishing model versions, the feedback export) that lets a key in, for config.toml "
                    "and as an environment line. The server keeps only the key's hash.")
    hash_key.add_argument("key", nargs="?", help="the key (default: generate a new random one)")
    hash_key.add_argument("--admin", action="store_true",
                          help="an admin key: print the auth.admin_api_keys line instead of auth.api_keys")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, wrap_store: StoreWrapper | None = None) -> int:
    """`wrap_store`: wraps each serving process's session store (the benchmark's experiments only)."""
    args = parse_args(argv)
    if args.command == "hash-key":
        return _hash_key(args.key, admin=args.admin)
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
        return run(config, wrap_store)
    except DataDirInUse as exc:
        log.error("%s", exc)
        return _EXIT_DATA_DIR_IN_USE
    except PortUnavailable as exc:
        log.error("%s", exc)
        return _EXIT_PORT_UNAVAILABLE
    except (ModelLoadError, ConfigError, EmbeddedRedisError) as exc:
        log.error("%s", exc)
        return 1


def _hash_key(key: str | None, *, admin: bool = False) -> int:
    """Print the setting that lets `key` in, as config.toml's line and as the environment override
    (server.config reads a list from the environment as comma-separated items)."""
    if key is None and sys.stdin.isatty():
        key = getpass.getpass("API key (empty: generate one): ") or None
    if key is None:
        key = secrets.token_urlsafe(32)
        print(f"new API key (give it to the client; it is not stored): {key}")
    setting = "admin_api_keys" if admin else "api_keys"
    hashed = api_key_hash(key)
    print(f"add to config.toml under [auth] (beside any hashes already listed):\n{setting} = [\"{hashed}\"]")
    print(f"or set in the environment (comma-separated for several keys):\n"
          f"{ENV_PREFIX}AUTH_{setting.upper()}={hashed}")
    return 0


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
        prepare_model(config)  # export and choose the runtime once, here, so that serving processes read the cache
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
