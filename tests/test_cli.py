"""`python -m server` as a user runs it: embedded Redis, restart keeps everything, clear start-up errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import CAT_CLASSES, CAT_JPEG, MODEL_CACHE

ROOT = Path(__file__).resolve().parent.parent


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a test's server: its own data folder, the shared export cache, and one
    serving process unless the test asks for more (the default, one per core, depends on the machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    return env | {"INFERENCE_SERVER_DATA_DIR": str(data_dir), "INFERENCE_MODEL_CACHE_DIR": str(MODEL_CACHE),
                  "INFERENCE_SERVER_PROCESSES": "1", "PYTHONUNBUFFERED": "1"} | extra


@contextmanager
def running_server(data_dir: Path, **extra: str) -> Iterator[str]:
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", "0"], cwd=ROOT,
                               env=server_env(data_dir, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url, lines = None, []
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"ready on (http://\S+) model=(\S+) .* store=(.+)$", line)
        if match:
            url = match.group(1)
    assert url, "server did not get ready:\n" + "".join(lines)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_first_run_and_restart_keep_sessions_tokens_and_history(tmp_path: Path) -> None:
    # As a user runs it: the default layout, one serving process per core.
    with running_server(tmp_path, INFERENCE_SERVER_PROCESSES="0") as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        login = client.post("/v1/sessions", json={"options": {"top_k": 3}}).json()
        auth = {"Authorization": f"Bearer {login['token']}"}
        first = client.post("/v1/predict", headers=auth, files={"image": ("cat.jpg", CAT_JPEG, "image/jpeg")})
        assert first.status_code == 200 and first.json()["predicted_class"] in CAT_CLASSES
    assert (tmp_path / "secret_key").exists() and (tmp_path / "redis").is_dir()
    with running_server(tmp_path, INFERENCE_SERVER_PROCESSES="0") as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        session = client.get("/v1/session", headers=auth)
        assert session.status_code == 200 and session.json()["predictions"] == 1
        assert session.json()["options"]["top_k"] == 3
        assert client.get("/v1/history", headers=auth).json()["items"][0]["id"] == first.json()["id"]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_model_that_cannot_load_stops_start_up_with_one_sentence(tmp_path: Path, processes: str) -> None:
    result = subprocess.run([sys.executable, "-m", "server", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                            env=server_env(tmp_path, INFERENCE_MODEL_NAME="resnet5000",
                                           INFERENCE_SERVER_PROCESSES=processes), timeout=120)
    assert result.returncode == 1
    assert "Unknown model 'resnet5000'" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_stops_start_up(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, capture_output=True, text=True,
                            env=server_env(tmp_path, INFERENCE_MODEL_WORKERS="lots"), timeout=60)
    assert result.returncode == 2 and "INFERENCE_MODEL_WORKERS must be an integer" in result.stderr


def test_hash_key_helper_prints_a_config_entry() -> None:
    result = subprocess.run([sys.executable, "-m", "server", "hash-key", "my-key"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    from handlers.sessions import api_key_hash

    assert f'"{api_key_hash("my-key")}"' in result.stdout
