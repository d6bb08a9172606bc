"""docs/training-loop.md for real: a server with capture on, corrections given through the Python
client on the committed photos, then docs/examples/train_from_feedback.py as a training job would run
it (a subprocess with torch): it exports, fine-tunes the last layer, publishes and starts a 10% canary.
The second example, docs/examples/train_new_model.py, makes a new 5-class model from five corrections,
adds it (PUT /v1/models/<name>), publishes a second version of it and starts a canary."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from clients.python import Client
from service.auth import api_key_hash
from tests.conftest import CAT_JPEG, COFFEE_JPEG, DATA, MODEL_CACHE, RedisServer, RunningServer, make_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "examples" / "train_from_feedback.py"
NEW_MODEL_SCRIPT = ROOT / "docs" / "examples" / "train_new_model.py"
ADMIN_KEY = "training-loop-admin-key"
LOOP_DB = 12  # a Redis database of this module's own (feedback counts are per model), emptied first
NEW_MODEL_LOOP_DB = 15  # the second example's own: its export holds its five corrections only
TIGER_CAT, ESPRESSO = 282, 967


@pytest.fixture(scope="module")
def loop_server(serve: Callable[..., Any], redis_server: RedisServer,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    redis.Redis(port=redis_server.port, db=LOOP_DB).flushdb()
    folder = tmp_path_factory.mktemp("training-loop")
    config = make_config(f"redis://127.0.0.1:{redis_server.port}/{LOOP_DB}",
                         # torch serves here, so publishing does not export the new version to ONNX
                         model={"runtime": "torch"},
                         auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                         models={"store_dir": str(folder / "models")},
                         capture={"enabled": True, "store_dir": str(folder / "captures")})
    with serve(config) as running:
        yield running


def training_job(script: Path, url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` as a training job runs it: a subprocess with torch, nothing of the test's environment."""
    return subprocess.run(
        [sys.executable, str(script), "--url", url, "--admin-key", ADMIN_KEY, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "INFERENCE_MODEL_CACHE_DIR": str(MODEL_CACHE), "HOME": str(tmp_path)},
    )


def model_feedback(model: dict[str, Any], version: str) -> dict[str, Any]:
    """The feedback counts GET /v1/models gives `version` (the configured weights' or a published one's)."""
    if model["configured"]["version"] == version:
        return model["configured"]["feedback"]
    return next(entry["feedback"] for entry in model["versions"] if entry["version"] == version)


def score_of(result: dict[str, Any], class_index: int) -> float:
    return next(item["score"] for item in result["top_k"] if item["class_index"] == class_index)


def test_train_from_feedback_publishes_and_starts_a_10_percent_canary(loop_server: RunningServer,
                                                                       tmp_path: Path) -> None:
    with Client(loop_server.url) as user:
        user.login(options={"top_k": 20})
        cat = user.predict(DATA / "cat.jpg")
        coffee = user.predict(COFFEE_JPEG)
        user.feedback(cat["id"], "tiger cat")
        user.feedback(coffee["id"], ESPRESSO, comment="it is an espresso")
        served_version = cat["model"]["version"]

    export = tmp_path / "feedback.tar"
    job = training_job(SCRIPT, loop_server.url, tmp_path, "--version", "fb-1", "--canary-percent", "10",
                       "--keep-export", str(export))
    assert job.returncode == 0, job.stdout + job.stderr
    assert "export: 2 corrected predictions with their image, 0 without" in job.stdout
    with tarfile.open(export) as tar:  # the images the job trained on are the photos as sent
        images = {tar.extractfile(member).read() for member in tar if member.name.endswith(".jpg")}  # type: ignore[union-attr]
    assert images == {CAT_JPEG, COFFEE_JPEG}

    with Client(loop_server.url) as admin:
        (model,) = admin.models(ADMIN_KEY)["models"]
        versions = {version["version"]: version for version in model["versions"]}
        assert "fb-1" in versions and versions["fb-1"]["size"] > 1_000_000
        assert (model["canary"]["version"], model["canary"]["traffic_percent"]) == ("fb-1", 10), model
        assert model["active_version"] in (None, served_version)  # the other 90% keep what served before
        assert model_feedback(model, served_version)["count"] == 2, model

        # The new weights learned from the corrections: pinned to them, the cat's corrected class scores
        # higher than under the weights that made the prediction.
        admin.login(options={"top_k": 20, "model_version": "fb-1"})
        retrained = admin.predict(DATA / "cat.jpg")
        assert retrained["model"]["version"] == "fb-1"
        assert score_of(retrained, TIGER_CAT) > score_of(cat, TIGER_CAT)

        # Promotion, the page's last step: activating at 100 ends the canary.
        admin.activate_version(model["name"], "fb-1", admin_key=ADMIN_KEY, traffic_percent=100)
        (model,) = admin.models(ADMIN_KEY)["models"]
        assert model["canary"] is None and model["active_version"] == "fb-1", model


# The five corrections the second example learns from: the bundled photos (tests/data and the accuracy
# guard's), and the cat mirrored, each corrected to a label of its own.
NEW_CLASSES = {"cat": "tiger cat", "coffee": "espresso", "rocket": "space shuttle", "astronaut": "suit",
               "mirrored cat": "Egyptian cat"}


def bundled_photos() -> dict[str, bytes]:
    from PIL import Image, ImageOps

    guard = ROOT / "inference" / "guard"
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(DATA / "cat.jpg")).save(mirrored, format="JPEG", quality=90)
    return {"cat": CAT_JPEG, "coffee": COFFEE_JPEG, "rocket": (guard / "rocket.jpg").read_bytes(),
            "astronaut": (guard / "astronaut.jpg").read_bytes(), "mirrored cat": mirrored.getvalue()}


@pytest.fixture(scope="module")
def new_model_server(serve: Callable[..., Any], redis_server: RedisServer,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    redis.Redis(port=redis_server.port, db=NEW_MODEL_LOOP_DB).flushdb()
    folder = tmp_path_factory.mktemp("new-model-loop")
    (folder / "repository").mkdir()
    config = make_config(f"redis://127.0.0.1:{redis_server.port}/{NEW_MODEL_LOOP_DB}", model={"runtime": "torch"},
                         auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                         models={"store_dir": str(folder / "models"), "repository_dir": str(folder / "repository")},
                         capture={"enabled": True, "store_dir": str(folder / "captures")})
    with serve(config) as running:
        yield running


def test_train_new_model_adds_a_5_class_model_and_starts_a_canary_of_its_next_version(
        new_model_server: RunningServer, tmp_path: Path) -> None:
    photos = bundled_photos()
    with Client(new_model_server.url) as user:
        user.login()
        for name, label in NEW_CLASSES.items():
            user.feedback(user.predict(photos[name])["id"], label)

    job = training_job(NEW_MODEL_SCRIPT, new_model_server.url, tmp_path, "--name", "corrected", "--version", "v2",
                       "--canary-percent", "20", "--keep-folder", str(tmp_path / "corrected"))
    assert job.returncode == 0, job.stdout + job.stderr
    labels = sorted(NEW_CLASSES.values())
    assert f"export: 5 corrected images naming 5 classes: {', '.join(labels)}" in job.stdout
    assert (tmp_path / "corrected" / "labels.txt").read_text().splitlines() == labels
    assert 'architecture = "efficientnet_lite0"' in (tmp_path / "corrected" / "model.toml").read_text()

    with Client(new_model_server.url) as admin:
        models = {model["name"]: model for model in admin.models(ADMIN_KEY)["models"]}
        new = models["corrected"]
        assert (new["default"], new["classes"], new["architecture"]) == (False, 5, "efficientnet_lite0"), new
        assert new["serving_version"] == "v1" and [v["version"] for v in new["versions"]] == ["v2"], new
        assert (new["canary"]["version"], new["canary"]["traffic_percent"]) == ("v2", 20), new
        assert admin.labels("corrected", admin_key=ADMIN_KEY) == labels

        # A session that chooses the new model predicts among its five labels, and the head learned them.
        admin.login(model="corrected", options={"top_k": 5, "model_version": "v1"})
        for name, label in NEW_CLASSES.items():
            result = admin.predict(photos[name])
            assert result["model"] == {"name": "corrected", "version": "v1"}
            assert {item["label"] for item in result["top_k"]} == set(labels)
            assert result["top_k"][0]["label"] == label, (name, result["top_k"])
