"""Files in the data folder hold every session, the signing secret and the captured images: this user's
only (0700 folders, 0600 files), whatever the umask, and tightened where an earlier version left them
readable. Here, below the server and the service layer, so that both use the one way."""

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
