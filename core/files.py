"""Files written whole or not at all, and the data folder kept this user's only.

The data folder holds every session, the signing secret and the captured images: 0700 folders and
0600 files, whatever the umask, tightened where an earlier version left them readable. The export
cache (graphs, manifests, runtime choices) is written by several processes at once: a reader never
sees half a file. On the ground floor, so that every package uses the one way."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def written_whole(path: Path, *, private: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block ends and
    removed if it fails, so that a reader (or a crash) sees the old file or the new one, never half of one.

    `private`: a file of the data folder (the signing secret, a captured image), the only copy there is:
    made 0600 whatever the umask, its folder 0700, and the caller syncs it before the rename. Otherwise a
    cache file that several processes may write at once: the temporary name is this process's own."""
    if private:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        os.close(fd)
        temporary = Path(name)
    else:
        temporary = path.with_suffix(f".{os.getpid()}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomically(path: Path, data: bytes | str, *, private: bool = False) -> None:
    """Write `path` whole or not at all (written_whole); `private` for the data folder's files."""
    with written_whole(path, private=private) as temporary, \
            open(temporary, "wb" if isinstance(data, bytes) else "w") as file:
        file.write(data)
        if private:  # the only copy: on disk before it replaces the old one
            file.flush()
            os.fsync(file.fileno())
