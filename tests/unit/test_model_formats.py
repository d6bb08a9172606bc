"""A model repository's manifests and labels (inference/repository.py), a spec's JSON round trip, and the
lazy, bounded backends (inference/loading.py): torch-free, no export."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from inference.loading import LazyBackend, LoadedBackends
from inference.repository import ModelSpec, RepositoryError, read_labels, read_model, read_repository

pytestmark = pytest.mark.unit


def folder(tmp_path: Path, toml: str, name: str = "products", files: dict[str, str] | None = None) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "model.toml").write_text(toml)
    for file, text in (files or {"model.onnx": "x", "labels.txt": "cat\ndog\n"}).items():
        (path / file).write_text(text)
    return path


GOOD = 'format = "onnx"\nfile = "model.onnx"\nlabels = "labels.txt"\n'


def test_a_good_manifest_reads_as_a_spec_and_round_trips_as_json(tmp_path: Path) -> None:
    toml = GOOD + 'version = "1"\noutput = "probabilities"\n[input]\nlayout = "NHWC"\nsize = 192\n' \
                  '[preprocess]\ninterpolation = "bicubic"\nmean = [0.5, 0.5, 0.5]\n'
    spec = read_model(folder(tmp_path, toml))
    assert (spec.name, spec.format, spec.labels, spec.version) == ("products", "onnx", ("cat", "dog"), "1")
    assert (spec.input_layout, spec.input_size, spec.output) == ("NHWC", 192, "probabilities")
    assert (spec.defaults.crop, spec.defaults.resize, spec.defaults.interpolation) == (192, 219, "bicubic")
    assert spec.defaults.mean == (0.5, 0.5, 0.5)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert ModelSpec.from_json(spec.to_json()).fingerprint() == spec.fingerprint()


def test_packaged_torchvision_weights_need_no_labels(tmp_path: Path) -> None:
    spec = read_model(folder(tmp_path, 'format = "torchvision"\narchitecture = "resnet18"\n', files={}))
    assert (spec.file, spec.labels, spec.class_count) == ("default", None, None)
    assert read_repository(tmp_path) == {"products": spec}


@pytest.mark.parametrize(("toml", "sentence"), [
    ("format = ", "products/model.toml is not valid TOML ("),
    ('format = "keras"\n', 'products/model.toml: format must be "torchvision" or "onnx" or "torchscript", not '
                           "'keras'."),
    (GOOD + "colour = 1\n", "products/model.toml: unknown key 'colour'; the keys are architecture, description, "
                            "file, format, input, labels, output, preprocess, version."),
    ('format = "torchvision"\nfile = "model.onnx"\n', 'products/model.toml: a torchvision model names its '
                                                      'architecture, e.g. architecture = "resnet18".'),
    (GOOD + 'architecture = "resnet18"\n', 'products/model.toml: architecture applies to format = "torchvision" '
                                           "only."),
    ('format = "onnx"\nlabels = "labels.txt"\n', "products/model.toml: file names the model's ONNX file in its "
                                                 "folder."),
    ('format = "onnx"\nfile = "missing.onnx"\nlabels = "labels.txt"\n',
     "products/model.toml: file 'missing.onnx' is not a file in the model's folder."),
    ('format = "onnx"\nfile = "../model.onnx"\nlabels = "labels.txt"\n',
     "products/model.toml: file '../model.onnx' is outside the model's folder."),
    ('format = "onnx"\nfile = "model.onnx"\n', "products/model.toml: labels names the labels file (one label per "
                                               "line, or JSON) in its folder."),
    (GOOD + 'version = "v 2"\n', "products/model.toml: version 'v 2' is not a version name: 1 to 64 letters, "
                                 "digits, '.', '_' or '-', starting with a letter or digit."),
    (GOOD + 'output = "scores"\n', 'products/model.toml: output must be "logits" or "probabilities", not '
                                   "'scores'."),
    (GOOD + "[input]\nsize = -1\n", "products/model.toml: input.size must be a whole number of pixels (0: any "
                                    "size)."),
    (GOOD + "[input]\nchannels = 3\n", "products/model.toml: unknown key input.channels; [input] takes layout "
                                       "and size."),
    ('format = "torchvision"\narchitecture = "resnet18"\n[input]\nlayout = "NHWC"\n',
     "products/model.toml: a torchvision model takes NCHW input; input.layout applies to files."),
    (GOOD + "[preprocess]\ntop_k = 3\n", "products/model.toml: unknown key preprocess.top_k; [preprocess] takes "
                                         "resize, crop, interpolation, mean, std."),
    (GOOD + "[input]\nsize = 192\n[preprocess]\ncrop = 160\n",
     "products/model.toml: preprocess.crop (160) must equal input.size (192)."),
])
def test_each_bad_manifest_says_what_is_wrong_in_one_sentence(tmp_path: Path, toml: str, sentence: str) -> None:
    with pytest.raises(RepositoryError) as raised:
        read_model(folder(tmp_path, toml))
    assert str(raised.value).startswith(sentence)


def test_folders_that_are_not_models(tmp_path: Path) -> None:
    (tmp_path / "bad name").mkdir()
    with pytest.raises(RepositoryError, match=re.escape("The model folder 'bad name' is not a model name")):
        read_repository(tmp_path)
    (tmp_path / "bad name").rmdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match=re.escape("The model folder 'empty' has no model.toml; see "
                                                        "docs/models.md.")):
        read_repository(tmp_path)
    with pytest.raises(RepositoryError, match=re.escape("is not a folder.")):
        read_repository(tmp_path / "missing")


@pytest.mark.parametrize(("name", "text", "labels"), [
    ("labels.txt", "cat\ndog\n\n", ["cat", "dog"]),
    ("labels.json", '["cat", "dog"]', ["cat", "dog"]),
    ("labels.json", '{"1": "dog", "0": "cat"}', ["cat", "dog"]),
    ("labels.json", '{"0": ["n01", "cat"], "1": ["n02", "dog"]}', ["cat", "dog"]),  # TorchServe's index_to_name
])
def test_labels_as_text_or_json(tmp_path: Path, name: str, text: str, labels: list[str]) -> None:
    (tmp_path / name).write_text(text)
    assert read_labels(tmp_path / name) == labels


@pytest.mark.parametrize(("name", "text", "sentence"), [
    ("labels.txt", "cat\n\ndog\n", "Line 2 of labels.txt is empty; each line names one class."),
    ("labels.txt", "\n", "labels.txt names no classes."),
    ("labels.txt", "cat\ncat\n", "labels.txt names 'cat' twice; each class needs its own label."),
    ("labels.json", "[", "labels.json is not valid JSON ("),
    ("labels.json", '{"a": "cat"}', 'labels.json: an object\'s keys are class indices ("0", "1", ...).'),
    ("labels.json", '{"0": "cat", "2": "dog"}', "labels.json: the class indices must run from 0 to 1 without gaps."),
    ("labels.json", '"cat"', "labels.json holds neither a list of labels nor an object from class index to label."),
    ("labels.json", '["cat", 3]', "labels.json: class 1's label is not a non-empty string."),
])
def test_each_bad_labels_file_says_what_is_wrong(tmp_path: Path, name: str, text: str, sentence: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(RepositoryError) as raised:
        read_labels(tmp_path / name)
    assert str(raised.value).startswith(sentence)


# -- lazy backends, at most max_loaded built ------------------------------------------------------------
class Counted:
    """A backend that counts its builds and can hold a forward until told to finish."""

    name, precision = "fake", "fp32"

    def __init__(self, builds: list[str], label: str, gate: threading.Event | None = None):
        builds.append(label)
        self.gate, self.started = gate, threading.Event()

    def forward(self, batch: np.ndarray, *, alone: bool = False) -> np.ndarray:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return np.zeros((len(batch), 2), dtype=np.float32)


def lazy(loaded: LoadedBackends, builds: list[str], label: str, gate: threading.Event | None = None) -> LazyBackend:
    return LazyBackend("fake", "fp32", lambda: Counted(builds, label, gate), loaded, label=label)


def test_backends_are_built_on_first_forward_and_the_least_recent_released() -> None:
    loaded, builds = LoadedBackends(2), []
    a, b, c = (lazy(loaded, builds, label) for label in "abc")
    assert (a.name, a.precision, a.loaded, builds) == ("fake", "fp32", False, [])  # known before it is built
    batch = np.zeros((1, 3, 4, 4), dtype=np.float32)
    a.forward(batch)
    b.forward(batch)
    a.forward(batch)  # a is now the most recent
    assert builds == ["a", "b"] and loaded.names() == ["b", "a"]
    c.forward(batch)  # past max_loaded: b, the least recent, goes
    assert loaded.names() == ["a", "c"] and not b.loaded and a.loaded and c.loaded
    b.forward(batch)  # rebuilt on its next forward
    assert builds == ["a", "b", "c", "b"] and loaded.names() == ["c", "b"]


def test_a_forward_in_flight_keeps_its_backend_when_it_is_released() -> None:
    loaded, builds, gate = LoadedBackends(1), [], threading.Event()
    slow, other = lazy(loaded, builds, "slow", gate), lazy(loaded, builds, "other")
    batch = np.zeros((1, 3, 4, 4), dtype=np.float32)
    results: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: results.append(slow.forward(batch)))
    thread.start()
    backend = slow.get()
    assert isinstance(backend, Counted) and backend.started.wait(10)
    other.forward(batch)  # releases `slow` while its forward runs
    assert not slow.loaded
    gate.set()
    thread.join(10)
    assert len(results) == 1 and results[0].shape == (1, 2)
