"""Bring-your-own models on the inference side: a tiny model of each format (tests/model_folders.py)
exported per its spec, guarded per its own defaults, served lazily, and its published versions checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import BadWeights
from inference import selection
from inference.loading import LazyBackend, LoadedBackends
from inference.model import ModelLoadError, load_exported, softmax
from inference.repository import ModelSpec, read_model
from inference.torch_model import load_checked, load_spec
from server.runtime import build_backend, build_served, prepare_models
from tests.conftest import CAT_JPEG, make_config
from tests.model_folders import onnx_folder, onnx_graph, squeezenet_folder, squeezenet_state, torchscript_folder

SQUEEZE, SCRIPT, ONNX = list("abcde"), ["x", "y", "z"], ["p", "q", "r", "s"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, ModelSpec], Path]]:
    """One model of each format, exported once for the module (cache in its own folder)."""
    root = tmp_path_factory.mktemp("repository")
    specs = {spec.name: spec for spec in (
        read_model(squeezenet_folder(root / "squeeze", SQUEEZE)),
        read_model(torchscript_folder(root / "script", SCRIPT, layout="NHWC")),
        read_model(onnx_folder(root / "fixed", ONNX, layout="NHWC", output="probabilities", size=64)),
    )}
    cache = tmp_path_factory.mktemp("cache")
    prepare_models(config(cache), specs)
    yield specs, cache


def config(cache: Path):  # type: ignore[no-untyped-def]
    return make_config(model={"runtime": "onnxruntime", "cache_dir": str(cache)})


def source_probabilities(spec: ModelSpec, tensor: np.ndarray) -> np.ndarray:
    """The user's own file's answer on an NCHW batch, in its own layout and output."""
    inputs = tensor.transpose(0, 2, 3, 1).copy() if spec.input_layout == "NHWC" else tensor
    if spec.format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(spec.file, providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    else:
        module = torch.jit.load(spec.file) if spec.format == "torchscript" else load_spec(spec).module
        with torch.inference_mode():
            out = module(torch.from_numpy(inputs)).numpy()
    return out if spec.output == "probabilities" else softmax(out)


@pytest.mark.parametrize("name", ["squeeze", "script", "fixed"])
def test_each_format_exports_and_serves_its_own_answers_lazily(models, name: str) -> None:
    specs, cache = models
    spec = specs[name]
    loaded = LoadedBackends(4)
    served = build_served(config(cache), spec, loaded)
    assert (served.model.name, served.model.labels) == (name, list(spec.labels or ()))
    assert served.model.version.startswith("file-")
    assert isinstance(served.backend, LazyBackend) and not served.backend.loaded  # not built until used
    assert (served.backend.name, served.backend.precision) == ("onnxruntime", "fp32")
    from inference.imaging import prepare

    batch = prepare(CAT_JPEG, spec.defaults, max_pixels=10**8)
    assert batch.pixels.shape[1] == spec.defaults.crop
    got = softmax(served.backend.forward(batch))
    assert served.backend.loaded and served.backend in loaded
    np.testing.assert_allclose(got, source_probabilities(spec, batch.to_tensor()), atol=1e-4)


def test_the_guard_runs_each_models_own_defaults_and_variants(models) -> None:
    specs, cache = models
    _, path = load_exported(specs["fixed"], cache)
    cases, reference = selection.reference_cases(path)
    variants = {case.name.partition(" ")[2] for case in cases}
    assert variants == {"default", "bicubic", "nearest", "grayscale"}  # a fixed input: no smaller crop
    assert {case.options.crop for case in cases} == {64} and len(reference[0]) == len(ONNX)
    _, path = load_exported(specs["script"], cache)
    cases, _ = selection.reference_cases(path)
    assert {case.name.partition(" ")[2] for case in cases} >= {"default", "crop160"}


def test_fewer_than_five_classes_pass_the_top5_rule() -> None:
    reference = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    assert selection.compare(reference, reference.copy(), 1e-3)[0]


def test_a_published_version_runs_on_the_chosen_runtime_guarded(models, tmp_path: Path) -> None:
    specs, cache = models
    spec = specs["squeeze"]
    weights = tmp_path / "v2.pt"
    torch.save(squeezenet_state(len(SQUEEZE), seed=1), weights)
    model = load_checked(spec, weights, "v2")
    assert (model.version, model.labels) == ("v2", SQUEEZE)
    loaded = LoadedBackends(1)
    backend = build_backend(config(cache), spec, model, selection.Candidate("onnxruntime", "fp32"), loaded=loaded)
    assert isinstance(backend, LazyBackend) and backend in loaded
    batch = selection.guard_cases(selection.guard_options(spec.defaults))[0].batch
    with torch.inference_mode():
        expected = softmax(model.module(torch.from_numpy(batch.to_tensor())).numpy())
    np.testing.assert_allclose(softmax(backend.forward(batch)), expected, atol=1e-4)

    onnx_spec = specs["fixed"]
    onnx_file = tmp_path / "v2.onnx"
    onnx_file.write_bytes(onnx_graph(len(ONNX), size=64, seed=1).SerializeToString())
    onnx_version = load_checked(onnx_spec, onnx_file, "v2")
    onnx_backend = build_backend(config(cache), onnx_spec, onnx_version, selection.Candidate("onnxruntime", "fp32"))
    onnx_batch = selection.guard_cases(selection.guard_options(onnx_spec.defaults, 64))[0].batch
    np.testing.assert_allclose(softmax(onnx_backend.forward(onnx_batch)),
                               source_probabilities(dataclasses.replace(onnx_spec, file=str(onnx_file)),
                                                    onnx_batch.to_tensor()), atol=1e-4)


def test_published_versions_that_differ_say_what_differs(models, tmp_path: Path) -> None:
    specs, _ = models
    weights = tmp_path / "ten.pt"
    torch.save(squeezenet_state(10), weights)
    with pytest.raises(BadWeights, match=r"^The weights give 10 classes; model 'squeeze' has 5 labels\.$"):
        load_checked(specs["squeeze"], weights, "v3")

    script = torchscript_folder(tmp_path / "script", ["one", "two"], layout="NHWC")
    with pytest.raises(BadWeights, match=r"^The weights give 2 classes; model 'script' has 3 labels\.$"):
        load_checked(specs["script"], script / "model.pt", "v3")
    nchw = torchscript_folder(tmp_path / "nchw", SCRIPT, layout="NCHW")
    with pytest.raises(BadWeights, match=r"failed on a test input of shape \(1, 224, 224, 3\) \(model 'script' "
                                         r"takes NHWC\)"):
        load_checked(specs["script"], nchw / "model.pt", "v3")

    classes = tmp_path / "classes.onnx"
    classes.write_bytes(onnx_graph(3, size=64).SerializeToString())
    with pytest.raises(BadWeights, match=r"^The file gives 3 classes; model 'fixed' has 4 labels\.$"):
        load_checked(specs["fixed"], classes, "v3")
    shape = tmp_path / "shape.onnx"
    shape.write_bytes(onnx_graph(4, size=32).SerializeToString())
    with pytest.raises(BadWeights, match=r"takes input of shape \(\?, 32, 32, 3\); its model.toml says "
                                         r"\(\?, 64, 64, 3\) \(NHWC\)\.$"):
        load_checked(specs["fixed"], shape, "v3")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(BadWeights, match=r"^Could not read the uploaded file as an ONNX file"):
        load_checked(specs["fixed"], junk, "v3")


def test_a_failed_export_names_the_model(tmp_path: Path) -> None:
    folder = onnx_folder(tmp_path / "wrong", ONNX, classes=3)
    with pytest.raises(ModelLoadError, match=r"^Model 'wrong': The file gives 3 classes; model 'wrong' has 4 labels"):
        prepare_models(config(tmp_path / "cache"), {"wrong": read_model(folder)})
