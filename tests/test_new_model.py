"""A new model over HTTP: PUT /v1/models/<name> with the model's folder as a tar archive, DELETE to take it
away, against the real server and Redis; a second server on the same Redis and repository follows both."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from inference.repository import RepositoryError, read_model
from service.auth import api_key_hash
from tests.conftest import CAT_JPEG, LoopThread, RedisServer, RunningServer, error_code, login, make_config, wait_until
from tests.model_folders import squeezenet_folder

ADMIN_KEY = "new-model-admin-key"
ADMIN = {"Authorization": f"ApiKey {ADMIN_KEY}"}
NEW_MODEL_DB = 14  # a Redis database of this module's own, emptied before it runs
LABELS = ["apple", "banana", "cherry", "date", "elderberry"]


def folder_archive(folder: Path) -> bytes:
    """`tar -C folder -czf - .`"""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()


def put_model(http: httpx.Client, name: str, archive: bytes) -> httpx.Response:
    return http.put(f"/v1/models/{name}", content=archive,
                    headers={**ADMIN, "X-Content-SHA256": hashlib.sha256(archive).hexdigest()})


def config_for(redis_server: RedisServer, folder: Path) -> Any:
    return make_config(f"{redis_server.url.rsplit('/', 1)[0]}/{NEW_MODEL_DB}", model={"runtime": "torch"},
                       auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                       models={"store_dir": str(folder / "versions"), "repository_dir": str(folder / "repository")})


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Path:
    redis.Redis(port=redis_server.port, db=NEW_MODEL_DB).flushdb()
    folder = tmp_path_factory.mktemp("new-model")
    (folder / "repository").mkdir()
    return folder


@pytest.fixture(scope="module")
def first(serve: Callable[..., Any], redis_server: RedisServer, loop_thread: LoopThread,
          shared: Path) -> Iterator[RunningServer]:
    with serve(config_for(redis_server, shared)) as running:
        loop_thread.run(running.models.start())  # follows the other replicas, as a serving process does
        yield running
        loop_thread.run(running.models.close())


@pytest.fixture(scope="module")
def second(serve: Callable[..., Any], redis_server: RedisServer, loop_thread: LoopThread, first: RunningServer,
           shared: Path) -> Iterator[RunningServer]:
    """Another replica: the same Redis and model repository, its own runner."""
    with serve(config_for(redis_server, shared), served=first.served) as running:
        loop_thread.run(running.models.start())
        yield running
        loop_thread.run(running.models.close())


def served_names(running: RunningServer) -> list[str]:
    return running.models.names()


def test_a_model_added_over_http_is_served_with_its_labels(first: RunningServer, tmp_path: Path) -> None:
    archive = folder_archive(squeezenet_folder(tmp_path / "fruit", LABELS))
    with first.client() as http:
        answer = put_model(http, "fruit", archive)
        assert answer.status_code == 201, answer.text
        entry = answer.json()
        assert (entry["name"], entry["default"], entry["classes"], entry["format"]) == ("fruit", False, 5,
                                                                                        "torchvision")
        assert entry["architecture"] == "squeezenet1_1" and entry["versions"] == []
        listed = {model["name"]: model for model in http.get("/v1/models", headers=ADMIN).json()["models"]}
        assert listed["fruit"]["classes"] == 5
        assert http.get("/v1/models/fruit/labels", headers=ADMIN).json()["labels"] == LABELS
        session = login(http, model="fruit", top_k=5)
        result = http.post("/v1/predict", headers={**session, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert result.status_code == 200, result.text
        assert {item["label"] for item in result.json()["top_k"]} == set(LABELS)
        assert result.json()["model"]["name"] == "fruit"
    repository = Path(first.config.models.repository_dir)
    assert (repository / "fruit" / "model.toml").is_file()
    assert [child.name for child in repository.iterdir() if child.name.startswith(".")] == []  # nothing left over

    with first.client() as http:  # a name served already, the added one or [model]'s
        for name in ("fruit", first.config.model.name):
            taken = put_model(http, name, archive)
            assert (taken.status_code, error_code(taken)) == (409, "model_exists"), taken.text


def test_a_manifest_that_cannot_be_served_is_422_with_its_sentence(first: RunningServer, tmp_path: Path) -> None:
    folder = squeezenet_folder(tmp_path / "broken", LABELS)
    (folder / "model.toml").write_text('format = "tensorflow"\nfile = "weights.pt"\nlabels = "labels.txt"\n')
    with pytest.raises(RepositoryError) as expected:
        read_model(folder)
    with first.client() as http:
        answer = put_model(http, "broken", folder_archive(folder))
        assert (answer.status_code, error_code(answer)) == (422, "invalid_model"), answer.text
        assert answer.json()["error"]["message"] == str(expected.value)
        assert "broken" not in served_names(first)
    assert not (Path(first.config.models.repository_dir) / "broken").exists()


def test_a_file_whose_class_count_differs_from_the_labels_is_422(first: RunningServer, tmp_path: Path) -> None:
    folder = squeezenet_folder(tmp_path / "three", LABELS, classes=3)
    with first.client() as http:
        answer = put_model(http, "three", folder_archive(folder))
        assert (answer.status_code, error_code(answer)) == (422, "invalid_weights"), answer.text
        assert "3 classes" in answer.json()["error"]["message"] and "5 labels" in answer.json()["error"]["message"]
    assert "three" not in served_names(first)
    assert not (Path(first.config.models.repository_dir) / "three").exists()


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute.txt", "link"])
def test_an_archive_member_outside_the_folder_or_not_a_file_is_refused(first: RunningServer, tmp_path: Path,
                                                                       member: str) -> None:
    folder = squeezenet_folder(tmp_path / "sneaky", LABELS)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=".")
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with first.client() as http:
        answer = put_model(http, "sneaky", buffer.getvalue())
    assert (answer.status_code, error_code(answer)) == (422, "invalid_archive"), answer.text
    assert repr(member) in answer.json()["error"]["message"]
    repository = Path(first.config.models.repository_dir)
    assert not (repository / "sneaky").exists() and not (repository.parent / "escaped.txt").exists()
    assert "sneaky" not in served_names(first)


def test_a_body_that_is_not_an_archive_is_422(first: RunningServer) -> None:
    with first.client() as http:
        answer = put_model(http, "garbage", b"not a tar archive at all" * 100)
    assert (answer.status_code, error_code(answer)) == (422, "invalid_archive"), answer.text


def test_configured_and_default_models_are_not_deleted(first: RunningServer) -> None:
    with first.client() as http:
        answer = http.delete(f"/v1/models/{first.config.model.name}", headers=ADMIN)
        assert (answer.status_code, error_code(answer)) == (409, "model_not_deletable"), answer.text
        assert "[model]" in answer.json()["error"]["message"]
        missing = http.delete("/v1/models/no-such-model", headers=ADMIN)
        assert (missing.status_code, error_code(missing)) == (404, "model_not_found")
        refused = http.delete("/v1/models/fruit")  # the admin key is needed
        assert refused.status_code == 401


def test_a_second_replica_follows_an_addition_and_a_deletion(first: RunningServer, second: RunningServer,
                                                             tmp_path: Path) -> None:
    archive = folder_archive(squeezenet_folder(tmp_path / "berries", LABELS))
    with first.client() as http, second.client() as other:
        assert put_model(http, "berries", archive).status_code == 201
        wait_until(lambda: "berries" in served_names(second), "the second replica to serve the new model")
        session = login(other, model="berries")
        result = other.post("/v1/predict", headers={**session, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert result.status_code == 200 and result.json()["top_k"][0]["label"] in LABELS, result.text

        mine = login(http, model="berries")
        assert http.delete("/v1/models/berries", headers=ADMIN).status_code == 204
        wait_until(lambda: "berries" not in served_names(second), "the second replica to drop the model")
        for client, auth in ((http, mine), (other, session)):  # sessions that chose it are told to choose again
            gone = client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
            assert (gone.status_code, error_code(gone)) == (409, "model_not_served"), gone.text
    assert not (Path(first.config.models.repository_dir) / "berries").exists()


def test_a_replica_catches_up_with_the_repository_and_one_started_later_reads_it(
        first: RunningServer, second: RunningServer, serve: Callable[..., Any], redis_server: RedisServer,
        loop_thread: LoopThread, shared: Path, tmp_path: Path) -> None:
    """What a replica does on (re)subscribing, for the events it missed while not listening: a folder in the
    repository that it does not serve is served, a model whose folder is gone is dropped."""
    repository = Path(first.config.models.repository_dir)
    squeezenet_folder(tmp_path / "plums", LABELS).rename(repository / "plums")  # added while it was not listening
    loop_thread.run(second.models.catch_up())
    assert "plums" in served_names(second)
    with serve(config_for(redis_server, shared), served=first.served) as later:  # a replica started later
        assert "plums" in served_names(later)
    shutil.rmtree(repository / "plums")  # deleted while it was not listening
    loop_thread.run(second.models.catch_up())
    assert "plums" not in served_names(second)


def test_with_no_repository_set_a_model_is_added_under_the_data_folder(serve: Callable[..., Any],
                                                                       redis_server: RedisServer,
                                                                       tmp_path: Path) -> None:
    """models.repository_dir = "" (the default): <data_dir>/model-repository, made by the first addition."""
    config = config_for(redis_server, tmp_path)
    config.models.repository_dir = ""
    config.server.data_dir = str(tmp_path / "data")
    archive = folder_archive(squeezenet_folder(tmp_path / "figs", LABELS))
    with serve(config) as running, running.client() as http:
        assert put_model(http, "figs", archive).status_code == 201
        assert (tmp_path / "data" / "model-repository" / "figs" / "model.toml").is_file()
        assert http.delete("/v1/models/figs", headers=ADMIN).status_code == 204
    assert not (tmp_path / "data" / "model-repository" / "figs").exists()


def test_a_model_added_on_an_exported_runtime_is_exported_guarded_and_served(
        serve: Callable[..., Any], redis_server: RedisServer, tmp_path: Path) -> None:
    """The runtime `auto` chooses (the other tests here serve on torch): the Python client's add_model packs
    the folder, the server exports the model to ONNX, writes its reference, chooses its runtime behind the
    accuracy guard and serves it without torch in the serving path."""
    from clients.python import Client
    from tests.model_folders import onnx_folder

    (tmp_path / "repo").mkdir()
    config = make_config(f"{redis_server.url.rsplit('/', 1)[0]}/{NEW_MODEL_DB}",
                         auth={"admin_api_keys": [api_key_hash(ADMIN_KEY)]},
                         models={"store_dir": str(tmp_path / "versions"), "repository_dir": str(tmp_path / "repo")})
    with serve(config) as running, Client(running.url, timeout=300) as client:
        added = client.add_model("fruit-exported", squeezenet_folder(tmp_path / "fruit", LABELS), admin_key=ADMIN_KEY)
        tiny = client.add_model("tiny-onnx", onnx_folder(tmp_path / "tiny", ["x", "y", "z"], layout="NHWC"),
                                admin_key=ADMIN_KEY)
        assert (added["classes"], added["format"], tiny["format"]) == (5, "torchvision", "onnx")
        for name, labels in (("fruit-exported", LABELS), ("tiny-onnx", ["x", "y", "z"])):
            backend = running.models.catalogue(name).active.backend
            assert backend.name in ("onnxruntime", "openvino"), backend.name  # an exported runtime, not torch
            client.login(model=name)
            result = client.predict(CAT_JPEG)
            assert result["model"]["name"] == name and result["label"] in labels
            client.logout()
        client.delete_model("fruit-exported", admin_key=ADMIN_KEY)
        client.delete_model("tiny-onnx", admin_key=ADMIN_KEY)
        assert running.models.names() == ["efficientnet_lite0"]
