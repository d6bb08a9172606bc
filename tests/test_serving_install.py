"""A serving install without torch (issue 24): the project's own requirements leave torch out (the `export`
extra has it); `python -m server export` fills a model cache where torch is; a server whose Python cannot
import torch at all serves that cache and a user's ONNX model, and says in one sentence what to do when
a model still needs exporting."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.conftest import CAT_JPEG, MODEL_CACHE
from tests.model_folders import onnx_folder
from tests.test_cli import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
TORCH_PACKAGES = ("torch", "torchvision", "efficientnet_lite_pytorch", "onnxscript")

# Put first on a server's PYTHONPATH: every import of torch (or what needs it) fails at once, as in a venv
# where the export extra was never installed.
NO_TORCH = f'''
import importlib.abc, importlib.metadata, sys

LEFT_OUT = {TORCH_PACKAGES!r}

class LeftOut(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in LEFT_OUT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (left out of this install)", name=name)
        return None

sys.meta_path.insert(0, LeftOut())
installed_version = importlib.metadata.version

def version(name):  # nor are their distributions' metadata there
    if name.replace("-", "_").lower() in LEFT_OUT:
        raise importlib.metadata.PackageNotFoundError(name)
    return installed_version(name)

importlib.metadata.version = version
'''


def requirement_names(requirements: list[str]) -> set[str]:
    return {requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
            for requirement in requirements}


def test_the_serving_requirements_leave_torch_to_the_export_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serving = requirement_names(project["dependencies"])
    assert not serving & {"torch", "torchvision", "efficientnet-lite-pytorch", "onnxscript"}, serving
    assert not any(name.startswith("nvidia") for name in serving)
    assert {"torch", "torchvision"} <= requirement_names(project["optional-dependencies"]["export"])


def no_torch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    blocker = tmp_path / "no-torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    return {"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), **extra}


def test_a_server_without_torch_serves_an_export_made_elsewhere_and_an_onnx_model(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    onnx_folder(repository / "tiny", ["a", "b", "c"], layout="NHWC", output="probabilities")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    settings = {"INFERENCE_MODEL_CACHE_DIR": str(MODEL_CACHE), "INFERENCE_MODELS_REPOSITORY_DIR": str(repository),
                "INFERENCE_SERVER_DATA_DIR": str(tmp_path / "export-data")}
    # Where torch is: export every served model (the run's shared cache may hold [model]'s already).
    exported = subprocess.run([sys.executable, "-m", "server", "export"], cwd=ROOT, env=env | settings,
                              capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "efficientnet_lite0: version " in exported.stdout and "tiny: version " in exported.stdout

    # Where it is not: the same cache serves both models.
    server = ServerProcess(tmp_path / "data",
                           **no_torch_env(tmp_path, INFERENCE_MODELS_REPOSITORY_DIR=str(repository)))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            token = client.post("/v1/sessions").json()["token"]
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
            default = client.post("/v1/predict", content=CAT_JPEG, headers=auth)
            tiny = client.post("/v1/predict", params={"model": "tiny"}, content=CAT_JPEG, headers=auth)
            assert default.status_code == 200 and default.json()["model"]["name"] == "efficientnet_lite0", default.text
            assert tiny.status_code == 200 and tiny.json()["label"] in {"a", "b", "c"}, tiny.text
    finally:
        assert server.stop() == 0, "".join(server.lines)
    assert not [line for line in server.lines if "Traceback" in line], "".join(server.lines)


def test_a_model_to_export_without_torch_is_one_sentence_naming_the_fix(tmp_path: Path) -> None:
    env = no_torch_env(tmp_path, INFERENCE_MODEL_CACHE_DIR=str(tmp_path / "empty"))
    server = ServerProcess(tmp_path / "data", **env)
    assert server.process.wait(120) == 1
    log = "".join(server.lines)
    assert "Exporting efficientnet_lite0 to ONNX needs torch, which this install leaves out" in log, log
    assert "python -m server export" in log and "Traceback" not in log


@pytest.mark.parametrize("module", ["server.server", "inference.runner", "server.runtime"])
def test_the_serving_modules_import_without_torch(tmp_path: Path, module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                          env={**os.environ, **no_torch_env(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
