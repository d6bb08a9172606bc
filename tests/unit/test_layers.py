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


def imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """The top-level packages `path` imports; a relative import is resolved against its package."""
    package = path.relative_to(root).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".") if node.module else []
            else:  # `from . import x` is the module's own package; each further dot goes one up
                parts = [*package[: len(package) - node.level + 1], *(node.module.split(".") if node.module else [])]
            if parts:
                names.add(parts[0])
    return names


def upward_imports(root: Path, package: str) -> dict[str, list[str]]:
    """Each module of `package` under `root` that imports a package it may not, with what it imports.
    A package without modules is an error: the check would pass without having looked at anything."""
    modules = sorted((root / package).rglob("*.py"))
    assert modules, f"no Python files under {root / package}: the layer check would pass on nothing"
    offenders = {}
    for path in modules:
        wrong = imported_packages(path, root) & FORBIDDEN[package]
        if wrong:
            offenders[str(path.relative_to(root))] = sorted(wrong)
    return offenders


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_upward(package: str) -> None:
    assert not upward_imports(ROOT, package)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from __future__ import annotations\nif True:\n    from server.config import Config\n")
    assert "server" in imported_packages(module, tmp_path)


def test_the_check_finds_upward_imports_in_a_tree_laid_out_like_the_repository(tmp_path: Path) -> None:
    for package, source in {
        "service": "import json\nfrom sessions.store import SessionStore\n",  # allowed
        "service/deep": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import handlers.base\n",
        "sessions": "from ..inference import runner\n",  # relative, one package up
        "inference": "from . import imaging\n",  # its own package: allowed
        "handlers": "def late():\n    from server import app\n",
    }.items():
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "module.py").write_text(source)
    assert upward_imports(tmp_path, "service") == {"service/deep/module.py": ["handlers"]}
    assert upward_imports(tmp_path, "sessions") == {"sessions/module.py": ["inference"]}
    assert upward_imports(tmp_path, "inference") == {}
    assert upward_imports(tmp_path, "handlers") == {"handlers/module.py": ["server"]}


def test_the_check_refuses_a_package_with_no_files(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    with pytest.raises(AssertionError, match="no Python files"):
        upward_imports(tmp_path, "service")
    with pytest.raises(AssertionError, match="no Python files"):
        upward_imports(tmp_path, "sessions")  # not there at all: a wrong ROOT
