"""The dependency direction (docs/architecture.md), checked on the source: server -> handlers ->
service -> sessions and inference -> core. A module that imports upward, even only for types, fails
here; so does a transport that reaches past the use cases to the store or the runner."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# What each package may not import (top-level package names), whatever the import is for.
# A dotted name forbids that module (and its submodules) only: handlers may import sessions.tokens, not
# sessions.store.
FORBIDDEN = {
    "core": {"server", "handlers", "service", "sessions", "inference", "tornado", "grpc", "redis"},
    "handlers": {"server", "sessions.store", "inference.runner"},
    "service": {"server", "handlers", "tornado", "grpc"},
    "sessions": {"server", "handlers", "service", "inference", "tornado", "grpc"},
    "inference": {"server", "handlers", "service", "sessions", "tornado", "grpc", "redis"},
    "server/cli.py": {"handlers"},
}


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The dotted names `path` imports (`from a.b import c` is both `a.b` and `a.b.c`: c may be a module);
    a relative import is resolved against its package."""
    package = path.relative_to(root).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = node.module.split(".") if node.module else []
            else:  # `from . import x` is the module's own package; each further dot goes one up
                parts = [*package[: len(package) - node.level + 1], *(node.module.split(".") if node.module else [])]
            if parts:
                names.add(".".join(parts))
                names.update(".".join([*parts, alias.name]) for alias in node.names)
    return names


def forbidden_imports(imported: set[str], forbidden: set[str]) -> list[str]:
    """The entries of `forbidden` that `imported` reaches: the module itself or one below it."""
    return sorted(rule for rule in forbidden if any(name == rule or name.startswith(rule + ".") for name in imported))


def upward_imports(root: Path, where: str) -> dict[str, list[str]]:
    """Each module of `where` (a package, or one file) under `root` that imports what it may not, with
    what it imports. Nothing to look at is an error: the check would pass without having looked."""
    target = root / where
    modules = [target] if target.suffix == ".py" and target.is_file() else sorted(target.rglob("*.py"))
    assert modules, f"no Python files under {target}: the layer check would pass on nothing"
    offenders = {}
    for path in modules:
        wrong = forbidden_imports(imported_modules(path, root), FORBIDDEN[where])
        if wrong:
            offenders[str(path.relative_to(root))] = wrong
    return offenders


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_package_imports_upward(where: str) -> None:
    assert not upward_imports(ROOT, where)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from __future__ import annotations\nif True:\n    from server.config import Config\n")
    assert "server.config" in imported_modules(module, tmp_path)
    assert forbidden_imports(imported_modules(module, tmp_path), {"server"}) == ["server"]


def test_the_check_finds_upward_imports_in_a_tree_laid_out_like_the_repository(tmp_path: Path) -> None:
    for package, source in {
        "service": "import json\nfrom sessions.store import SessionStore\n",  # allowed
        "service/deep": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import handlers.base\n",
        "sessions": "from ..inference import runner\n",  # relative, one package up
        "inference": "from . import imaging\n",  # its own package: allowed
        "handlers": "def late():\n    from server import app\nfrom sessions import tokens\n",
        "handlers/deep": "from sessions import store\nfrom inference.runner import ModelRunner\n",
        "server": "from handlers.base import InFlight\n",
    }.items():
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "module.py").write_text(source)
    assert upward_imports(tmp_path, "service") == {"service/deep/module.py": ["handlers"]}
    assert upward_imports(tmp_path, "sessions") == {"sessions/module.py": ["inference"]}
    assert upward_imports(tmp_path, "inference") == {}
    assert upward_imports(tmp_path, "handlers") == {"handlers/deep/module.py": ["inference.runner", "sessions.store"],
                                                    "handlers/module.py": ["server"]}


def test_the_check_reads_one_file_as_its_own_rule(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "cli.py").write_text("from handlers.base import InFlight\n")
    assert upward_imports(tmp_path, "server/cli.py") == {"server/cli.py": ["handlers"]}
    (tmp_path / "server" / "cli.py").write_text("from server.supervisor import supervise\n")
    assert upward_imports(tmp_path, "server/cli.py") == {}


def test_the_check_refuses_a_package_with_no_files(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    with pytest.raises(AssertionError, match="no Python files"):
        upward_imports(tmp_path, "service")
    with pytest.raises(AssertionError, match="no Python files"):
        upward_imports(tmp_path, "sessions")  # not there at all: a wrong ROOT
