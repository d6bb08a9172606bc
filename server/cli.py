"""`python -m server`: load config, model and store, serve, shut down gracefully; `export` and `hash-key`."""

from __future__ import annotations

import argparse
import getpass
import logging
import secrets
import sys

from inference.model import ModelLoadError, load_exported
from server.config import ENV_PREFIX, Config, ConfigError, load_config, validate
from server.data_dir import DataDirInUse
from server.embedded_redis import EmbeddedRedisError
from server.malloc import keep_freed_memory
from server.observability import configure_logging
from server.runtime import onnx_cache_dir, prepare_models
from server.server import StoreWrapper
from server.startup import PortUnavailable, run
from service.auth import api_key_hash

log = logging.getLogger("inference.server")
_EXIT_DATA_DIR_IN_USE = 2
_EXIT_PORT_UNAVAILABLE = 2  # like a bad setting: the fix is in the config or on the command line


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
    sub.add_parser(
        "export", help="export every served model to ONNX (with its accuracy-guard reference) and exit",
        description="Export `[model]`'s model and every model of models.repository_dir to ONNX in model.cache_dir, "
                    "with their references, and choose each one's runtime for this CPU; then exit. Run it where "
                    "torch is installed (the export extra) and give the cache to a serving install without torch.")
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
    if args.command == "export":
        return _export(config)
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


def _export(config: Config) -> int:
    """Every served model exported (once: a cached export is kept) and its runtime chosen; one line each."""
    cache = onnx_cache_dir(config)
    try:
        for name, spec in config.model_specs().items():
            prepare_models(config, {name: spec})
            model, graph = load_exported(spec, cache)
            print(f"{name}: version {model.version}, {len(model.labels)} classes, {graph.name}")
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 1
    print(f"exported to {cache}; a serving install reads it from model.cache_dir")
    return 0


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
