"""The data folder's lock (one server per folder) and the development signing key kept in it."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
from pathlib import Path

from core.files import owner_only, write_atomically
from server.config import ConfigError

log = logging.getLogger("inference.server")
_MIN_SECRET_CHARS = 32


class DataDirInUse(Exception):
    """Another server holds the data folder's lock; the message names its pid."""


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
