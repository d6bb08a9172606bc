"""core/files.py: the one way every package writes a file whole or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from core.files import write_atomically, written_whole

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("private", [False, True])
def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path: Path, private: bool) -> None:
    path = tmp_path / "sub" / "file.bin" if private else tmp_path / "file.bin"
    write_atomically(path, b"old", private=private)
    write_atomically(path, "new", private=private)
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_a_private_file_is_the_owners_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        path = tmp_path / "data" / "secret"
        write_atomically(path, "s3cret", private=True)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("private", [False, True])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path, private: bool) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), written_whole(path, private=private) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("the exporter failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
