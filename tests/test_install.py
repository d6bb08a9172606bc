"""The clients install on their own: the Python client into a fresh virtual environment with httpx
and websockets only (no torch, no server), and the JavaScript client packs to exactly its files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

from tests.conftest import in_ci, tool_missing

ROOT = Path(__file__).resolve().parent.parent
PYTHON_CLIENT = ROOT / "clients" / "python"
JS_CLIENT = ROOT / "clients" / "js"

# pip's words when it cannot reach an index (offline machine): the only failure this test may skip on.
_NO_INDEX = ("No matching distribution found", "Failed to establish a new connection",
             "Temporary failure in name resolution", "Network is unreachable", "Could not fetch URL")


def _run(argv: list[str | Path], timeout: float, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Without PYTHONPATH (the suite runs with the checkout on it): the venv must find only what it installed.
    clean = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=cwd, env=clean)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install clients/python` done in it; returns its bin directory."""
    tmp = tmp_path_factory.mktemp("client-install")
    # A copy: pip builds in the source folder, and its build/ and egg-info must not land in the tree.
    source = tmp / "python"
    shutil.copytree(PYTHON_CLIENT, source, ignore=shutil.ignore_patterns(
        "__pycache__", "build", "*.egg-info"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    installed = _run([bin_dir / "python", "-m", "pip", "install", "--disable-pip-version-check", str(source)],
                     timeout=300)
    if installed.returncode != 0:
        output = installed.stdout + installed.stderr
        if not in_ci() and any(words in output for words in _NO_INDEX):
            pytest.skip(f"pip cannot reach a package index to install httpx and websockets:\n{output[-2000:]}")
        pytest.fail(f"pip install clients/python failed (exit {installed.returncode}):\n{output[-4000:]}")
    return bin_dir


def test_the_python_client_installs_alone_without_torch_or_the_server(client_venv: Path) -> None:
    python = client_venv / "python"
    # Run away from the repository so nothing imports the checkout's clients/ instead of the install.
    imported = _run([python, "-c", "import clients.python as c; from clients.python import Client, AsyncClient;"
                     " print(c.__file__)"], timeout=60, cwd=client_venv)
    assert imported.returncode == 0, imported.stderr
    assert str(client_venv.parent) in imported.stdout, imported.stdout  # the venv's copy, not the checkout's

    torch = _run([python, "-c", "import torch"], timeout=60, cwd=client_venv)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr

    listed = _run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                  timeout=60, cwd=client_venv)
    assert listed.returncode == 0, listed.stderr
    names = {package["name"].lower().replace("_", "-") for package in json.loads(listed.stdout)}
    assert "session-inference-client" in names
    assert {"httpx", "websockets"} <= names
    assert not names & {"torch", "torchvision", "numpy", "tornado", "redis", "pillow",
                        "session-inference-server"}, names


def test_the_installed_command_line_answers_help(client_venv: Path) -> None:
    helped = _run([client_venv / "inference-client", "--help"], timeout=60, cwd=client_venv)
    assert helped.returncode == 0, helped.stderr
    assert "predict" in helped.stdout and "feedback" in helped.stdout


def test_the_installed_client_sends_its_own_version(client_venv: Path) -> None:
    agent = _run([client_venv / "python", "-c", "from clients.python.base import USER_AGENT; print(USER_AGENT)"],
                 timeout=60, cwd=client_venv)
    assert agent.stdout.strip() == f"inference-client-python/{_client_version()}", agent.stderr


def _client_version() -> str:
    return str(tomllib.loads((PYTHON_CLIENT / "pyproject.toml").read_text())["project"]["version"])


def test_the_js_client_packs_to_its_module_types_readme_and_manifest() -> None:
    npm = shutil.which("npm")
    if npm is None:
        tool_missing("npm is not on the PATH: cannot check that the JavaScript client packs")
    # --dry-run lists the tarball without writing it; --offline: packing needs no registry.
    packed = _run([npm, "pack", "--dry-run", "--json", "--offline", "--ignore-scripts"], timeout=120,
                  cwd=JS_CLIENT, env={**os.environ, "npm_config_update_notifier": "false"})
    assert packed.returncode == 0, packed.stderr
    (tarball,) = json.loads(packed.stdout)
    assert sorted(f["path"] for f in tarball["files"]) == ["README.md", "client.d.ts", "client.js", "package.json"]

    manifest = json.loads((JS_CLIENT / "package.json").read_text())
    for entry in (manifest["main"], manifest["types"], *manifest["exports"]["."].values()):
        assert (JS_CLIENT / entry).is_file(), entry
    # Node 20 has everything the client uses but WebSocket (predictStream: Node 22+, or a flag or class).
    assert manifest["engines"]["node"] == ">=20"
    readme = (JS_CLIENT / "README.md").read_text()
    assert "Node 18" not in readme and "Node 20+" in readme

