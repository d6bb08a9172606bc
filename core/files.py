"""Files written whole or not at all, and the data folder kept this user's only.

The data folder holds every session, the signing secret and the captured images: 0700 folders and
0600 files, whatever the umask, tightened where an earlier version left them readable. The export
cache (graphs, manifests, runtime choices) is written by several processes at once: a reader never
sees half a file. On the ground floor, so that every package uses the one way."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def owner_only(path: Path, mode: int) -> None:
    """Take group and other access off `path` when this user owns it (made before it was kept private)."""
    info = path.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        path.chmod(mode)


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) 0700, and keep an existing one so."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner_only(path, 0o700)


def write_private(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all (a crash leaves the old file or none), readable by its owner only;
    the temporary file is a dot-file beside it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `path` through a file of this process's own and a rename: several processes may write the
    same cache file at once, and a reader never sees half of one."""
    partial = path.with_suffix(f".{os.getpid()}.partial")
    if isinstance(data, str):
        partial.write_text(data)
    else:
        partial.write_bytes(data)
    os.replace(partial, path)
