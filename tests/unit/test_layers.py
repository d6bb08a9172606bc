"""The dependency direction (docs/architecture.md), checked on the source: server -> handlers ->
service -> sessions and inference. A module that imports upward, even only for types, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# What each package may not import (top-level package names), whatever the import is for.
FORBIDDEN = {
    "handlers": {"server"},
    "service": {"server", "handlers", "tornado", "grpc"},
    "sessions": {"server", "handlers", "service", "inference", "tornado", "grpc"},
    "inference": {"server", "handlers", "service", "tornado", "grpc"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_upward(package: str) -> None:
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_packages(path) & FORBIDDEN[package]
        if wrong:
            offenders[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not offenders, offenders


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from __future__ import annotations\nif True:\n    from server.config import Config\n")
    assert "server" in imported_packages(module)
