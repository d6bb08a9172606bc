"""The export cache's files (graphs, manifests, runtime choices) are written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `path` through a file of this process's own and a rename: several processes may write the
    same cache file at once, and a reader never sees half of one."""
    partial = path.with_suffix(f".{os.getpid()}.partial")
    if isinstance(data, str):
        partial.write_text(data)
    else:
        partial.write_bytes(data)
    os.replace(partial, path)
