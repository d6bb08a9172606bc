"""The runtime chosen per machine (inference.selection) and the accuracy guard it is held to.

Every runtime and precision the server may pick on this machine must match torch FP32 on the committed
photos under every option set the tests use: the same top-1, at least 4 of the top 5, and each
probability within 1e-3 (FP32) or 0.03 (BF16). A candidate that fails the guard must never be picked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference import imaging, selection
from inference.model import softmax
from inference.openvino_backend import OpenVinoBackend
from inference.pixels import PixelBatch
from inference.selection import Candidate
from inference.torch_model import TorchBackend, export_onnx
from server.runtime import build_runner, make_backend, runtime_choice
from sessions.options import Options
from tests.conftest import CAT_JPEG, COFFEE_JPEG, MODEL_CACHE, make_config

#: Every committed photo: the test photos and the guard's own (which include them).
PHOTOS = {"cat": CAT_JPEG, "coffee": COFFEE_JPEG,
          **{photo.stem: photo.read_bytes() for photo in sorted(selection.GUARD_DIR.glob("*.jpg"))}}
#: The guard's option sets, plus the others the tests predict with.
OPTION_SETS = {**selection.GUARD_OPTIONS,
               "small": Options(resize=128, crop=96),
               "large": Options(resize=320, crop=288),
               "gray-half": Options(color="grayscale", mean=(0.5,) * 3, std=(0.5,) * 3, crop=160)}
_, FLAGS = selection.cpu_model()
MAY_PICK = selection.candidates("auto", "auto", FLAGS)


@pytest.fixture(scope="module")
def onnx_path(default_model) -> Path:
    return export_onnx(default_model, MODEL_CACHE)


@pytest.fixture(scope="module")
def torch_reference(default_model) -> dict[tuple[str, str], tuple[PixelBatch, np.ndarray]]:
    """(photo, option set) -> the batch the server would build, and torch FP32's probabilities for it."""
    backend = TorchBackend(default_model.module)
    cases = {}
    for photo, data in PHOTOS.items():
        for name, options in OPTION_SETS.items():
            batch = imaging.prepare(data, options, max_pixels=10**8)
            cases[photo, name] = batch, softmax(backend.forward(batch.to_tensor()))[0]
    return cases


@pytest.mark.parametrize("candidate", MAY_PICK, ids=str)
def test_every_runtime_the_server_may_pick_passes_the_guard_against_torch_fp32_or_is_never_picked(
        candidate: Candidate, onnx_path: Path, torch_reference) -> None:
    backend = make_backend(make_config(), candidate, onnx_path)
    tolerance = selection.GUARD_TOLERANCE[candidate.precision]
    verdicts = {case: selection.compare(expected, softmax(backend.forward(batch))[0], tolerance)
                for case, (batch, expected) in torch_reference.items()}
    failures = {case: detail["why"] for case, (ok, detail) in verdicts.items() if not ok}
    if candidate.precision == "fp32":
        assert not failures  # FP32 is always offered, so it must always agree
        return
    # A lower precision may fail on this CPU; then the server's own guard must refuse it too.
    cases = selection.guard_cases()
    passed, worst = selection.guard(backend, cases, selection.reference_probabilities(onnx_path, cases), tolerance)
    assert passed or worst["why"]
    if failures:
        assert not passed, f"the guard let {candidate} through, but against torch: {failures}"


def test_the_pixel_graph_normalizes_like_the_float_pipeline(default_model, onnx_path: Path, torch_reference) -> None:
    """uint8 in, normalization and layout inside the graph == the float32 tensor through the original graph
    (and torch normalizes the pixels it is given the same way)."""
    torch_backend = TorchBackend(default_model.module)
    for batch, _ in torch_reference.values():
        assert np.abs(torch_backend.forward(batch) - torch_backend.forward(batch.to_tensor())).max() < 1e-4
    for candidate in (Candidate("onnxruntime", "fp32"), Candidate("openvino", "fp32")):
        backend = make_backend(make_config(), candidate, onnx_path)
        for batch, _ in torch_reference.values():
            assert np.abs(backend.forward(batch) - backend.forward(batch.to_tensor())).max() < 1e-3, candidate


def test_images_with_different_normalizations_share_a_batch(onnx_path: Path) -> None:
    backend = make_backend(make_config(), Candidate("onnxruntime", "fp32"), onnx_path)
    images = [imaging.prepare(CAT_JPEG, Options(), max_pixels=10**8),
              imaging.prepare(COFFEE_JPEG, Options(mean=(0.5,) * 3, std=(0.25,) * 3), max_pixels=10**8),
              imaging.prepare(CAT_JPEG, Options(color="grayscale", mean=(0.4,) * 3, std=(0.3,) * 3), max_pixels=10**8)]
    together = backend.forward(PixelBatch.concat(images))
    for row, image in zip(together, images, strict=True):
        assert np.abs(row - backend.forward(image)[0]).max() < 1e-4


def test_the_guard_refuses_a_changed_top_1_a_lost_top_5_and_a_moved_probability() -> None:
    reference = softmax(np.linspace(0, 8, 1000, dtype=np.float32))
    assert selection.compare(reference, reference, 1e-3)[0]
    swapped = reference.copy()
    swapped[[999, 998]] = swapped[[998, 999]]
    ok, detail = selection.compare(reference, swapped, 1.0)
    assert not ok and "top-1 changed" in detail["why"]
    shuffled = reference.copy()
    shuffled[995:999] = reference[:4]
    ok, detail = selection.compare(reference, shuffled, 1.0)
    assert not ok and "1 of the top 5 kept" in detail["why"]
    moved = reference.copy()
    moved[0] += 0.002
    ok, detail = selection.compare(reference, moved, 1e-3)
    assert not ok and "moved 0.0020" in detail["why"]
    assert selection.compare(reference, moved, 0.03)[0]


def test_auto_measures_once_picks_a_passing_runtime_and_caches_the_choice(onnx_path: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    graph = tmp_path / onnx_path.name  # a cache of its own, so this test measures
    graph.write_bytes(onnx_path.read_bytes())
    config = make_config(model={"runtime_trial_seconds": 0.3, "cache_dir": str(tmp_path), "precision": "auto"})
    chosen = runtime_choice(config, graph)
    (cached,) = tmp_path.glob("*.runtime-*.json")
    record = json.loads(cached.read_text())
    assert (record["runtime"], record["precision"]) == (chosen.runtime, chosen.precision)
    trials = {(t["runtime"], t["precision"]): t for t in record["trials"]}
    assert set(trials) == {(c.runtime, c.precision) for c in MAY_PICK}
    winner = trials[chosen.runtime, chosen.precision]
    assert winner["passed"] and winner["images_per_second"] > 0
    assert all(winner["images_per_second"] >= t["images_per_second"] for t in trials.values() if t["passed"])
    assert record["cpu"] == selection.cpu_model()[0]

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("measured again despite the cached choice")

    monkeypatch.setattr(selection, "_measure_in_child", no_second_measurement)
    assert runtime_choice(config, graph) == chosen  # read back, not measured


def test_a_forced_runtime_and_precision_are_used_without_measuring(default_model, monkeypatch) -> None:
    monkeypatch.setattr(selection, "_measure_in_child", lambda *a, **k: pytest.fail("a forced runtime was measured"))
    runner = build_runner(make_config(model={"runtime": "openvino", "precision": "fp32"}), default_model)
    try:
        assert isinstance(runner.backend, OpenVinoBackend) and runner.backend.precision == "fp32"
    finally:
        runner.close()
