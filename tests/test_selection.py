"""The runtime chosen per machine (inference.selection) and the accuracy guard it is held to.

Every runtime and precision the server may pick on this machine must match torch FP32 on the committed
photos under every option set the tests use: the same top-1, at least 4 of the top 5, and each
probability within 1e-3 (FP32) or 0.03 (BF16). A candidate that fails the guard must never be picked,
and when none passes (or the only one the config names fails) the server must not start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.options import Options
from inference import imaging, selection
from inference.backends.openvino_backend import OpenVinoBackend
from inference.backends.torch_backend import TorchBackend
from inference.model import ModelLoadError, softmax
from inference.pixels import PixelBatch
from inference.selection import Candidate
from inference.torch_model import export_onnx
from server.runtime import make_backend, runtime_choice, serve_loaded
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


def reverse_the_classifier_bias(graph: Path) -> None:
    """Alter the exported graph at `graph` as an export error might: the classifier's bias (the one
    initializer of 1,000 values) in reverse order, so class i gets class 999 - i's bias."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    (bias,) = [tensor for tensor in model.graph.initializer if list(tensor.dims) == [1000]]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias)[::-1].copy(), bias.name))
    onnx.save(model, str(graph))


def altered_copy(onnx_path: Path, folder: Path) -> Path:
    """A copy of the export in `folder` with its classifier bias reversed, beside the true export's torch
    FP32 reference: the export disagrees with the model it came from."""
    graph = folder / onnx_path.name
    shutil.copy(onnx_path, graph)
    reverse_the_classifier_bias(graph)
    shutil.copy(selection.reference_path(onnx_path), selection.reference_path(graph))
    return graph


def guard_case_name(photo: str, option_set: str) -> str | None:
    """The guard's own name for a test case, or None where the guard does not look."""
    guarded = {path.stem for path in selection.GUARD_DIR.glob("*.jpg")}
    return f"{photo}.jpg {option_set}" if photo in guarded and option_set in selection.GUARD_OPTIONS else None


@pytest.mark.parametrize("candidate", MAY_PICK, ids=str)
def test_every_runtime_the_server_may_pick_passes_the_guard_against_torch_fp32_or_is_never_picked(
        candidate: Candidate, onnx_path: Path, torch_reference) -> None:
    backend = make_backend(make_config(), candidate, onnx_path)
    tolerance = selection.GUARD_TOLERANCE[candidate.precision]
    failures = {}  # (photo, option set, path) -> why, compared with torch FP32 computed here
    for (photo, option_set), (batch, expected) in torch_reference.items():
        for path, forward in selection.GUARD_PATHS.items():
            ok, detail = selection.compare(expected, softmax(forward(backend, batch))[0], tolerance)
            if not ok:
                failures[photo, option_set, path] = detail["why"]
    cases = selection.guard_cases()
    passed, worst = selection.guard(backend, cases, selection.reference_probabilities(onnx_path, cases), tolerance)
    # The server's reference is torch FP32 itself, so on the guard's own cases its verdict is this one.
    on_guard_cases = {key for key in failures if guard_case_name(*key[:2])}
    assert passed == (not on_guard_cases), (worst, failures)
    if candidate.precision == "fp32":
        assert not failures and passed  # FP32 is always offered, so it must always agree
    if failures:  # also where the tests look beyond the guard's cases
        assert not passed, f"the guard let {candidate} through, but against torch: {failures}"
    if not passed:  # and its worst case is one that fails here, with its tolerance
        assert worst["case"].split(" (")[0] in {guard_case_name(*key[:2]) for key in on_guard_cases}
        assert f"(tolerance {tolerance:g})" in worst["why"] or "top" in worst["why"]


class Perturbed:
    """A runtime whose answers are wrong on one path: its logits get class 0 raised by 10 there."""

    def __init__(self, backend, path: str):
        self.backend, self.path = backend, path
        self.name, self.precision = backend.name, backend.precision

    def forward(self, batch, *, alone: bool = False) -> np.ndarray:
        logits = self.backend.forward(batch, alone=alone)
        wrong = {"every forward": True, "a forward alone": alone,
                 "a float tensor": isinstance(batch, np.ndarray)}[self.path]
        if wrong:
            logits = logits.copy()
            logits[:, 0] += 10.0
        return logits


@pytest.mark.parametrize("path", ["every forward", "a forward alone", "a float tensor"])
def test_a_candidate_with_wrong_answers_on_any_path_fails_the_guard_and_is_never_picked(
        path: str, onnx_path: Path) -> None:
    """The forward alone runs on a second compilation (model.idle_intra_op_threads) and float tensors on
    the original graph: a candidate wrong on either is as wrong as one wrong everywhere."""
    honest, wrong = Candidate("onnxruntime", "fp32"), Candidate("openvino", "fp32")
    config = make_config(model={"workers": 2, "intra_op_threads": 1, "idle_intra_op_threads": 2})

    def make(candidate: Candidate):
        backend = make_backend(config, candidate, onnx_path)
        return Perturbed(backend, path) if candidate == wrong else backend

    choice = selection.measure(onnx_path, [wrong, honest], cpu="test", workers=1, make=make, trial_seconds=0.05)
    trials = {Candidate(t.runtime, t.precision): t for t in choice.trials}
    assert (choice.runtime, choice.precision) == ("onnxruntime", "fp32")
    assert trials[honest].passed and not trials[wrong].passed
    why = trials[wrong].worst["why"]
    assert "top-1 changed" in why or "a probability moved" in why
    if path != "every forward":
        assert f"({path})" in why  # the worst case names the path it came through


def test_when_no_candidate_passes_the_server_refuses_to_start_and_says_why(onnx_path: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    graph = altered_copy(onnx_path, tmp_path)
    config = make_config(model={"runtime_trial_seconds": 0.1, "cache_dir": str(tmp_path), "precision": "fp32"})
    with pytest.raises(ModelLoadError) as caught:
        runtime_choice(config, graph)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("No runtime passed the accuracy guard against torch FP32")
    for candidate in ("onnxruntime fp32", "openvino fp32"):  # each candidate, its photo, difference and tolerance
        assert f"{candidate}: " in message
    assert ".jpg" in message and "(tolerance 0.001)" in message and "a probability moved" in message

    monkeypatch.setattr(selection, "_measure_in_child", lambda *a, **k: pytest.fail("measured again"))
    with pytest.raises(ModelLoadError, match="No runtime passed"):  # the refusal is cached like a choice
        runtime_choice(config, graph)


def test_a_single_candidate_is_guarded_and_a_broken_one_refuses_the_start(onnx_path: Path, tmp_path: Path) -> None:
    """A config naming one runtime and precision has nothing to time, but its one candidate is still
    held to the guard: with an altered export the server does not start on it."""
    forced = {"runtime": "onnxruntime", "precision": "fp32", "cache_dir": str(tmp_path)}
    (tmp_path / "altered").mkdir()
    graph = altered_copy(onnx_path, tmp_path / "altered")
    with pytest.raises(ModelLoadError, match=r"onnxruntime fp32: .*\(tolerance 0\.001\) on \w+\.jpg "):
        runtime_choice(make_config(model={**forced, "cache_dir": str(tmp_path / "altered")}), graph)

    honest = tmp_path / onnx_path.name
    shutil.copy(onnx_path, honest)
    shutil.copy(selection.reference_path(onnx_path), selection.reference_path(honest))
    assert runtime_choice(make_config(model=forced), honest) == Candidate("onnxruntime", "fp32")
    (cached,) = tmp_path.glob("*.runtime-*.json")
    (trial,) = json.loads(cached.read_text())["trials"]
    assert trial["passed"] and trial["images_per_second"] == 0  # guarded, not timed


def test_an_export_without_its_torch_reference_is_not_guarded_against_itself(onnx_path: Path,
                                                                             tmp_path: Path) -> None:
    graph = tmp_path / onnx_path.name
    shutil.copy(onnx_path, graph)  # no reference beside it
    config = make_config(model={"runtime_trial_seconds": 0.1, "cache_dir": str(tmp_path)})
    with pytest.raises(ModelLoadError, match="no readable FP32 reference"):
        runtime_choice(config, graph)


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
    shutil.copy(onnx_path, graph)
    shutil.copy(selection.reference_path(onnx_path), selection.reference_path(graph))
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


def test_a_forced_runtime_and_precision_are_served(default_model) -> None:
    served = serve_loaded(make_config(model={"runtime": "openvino", "precision": "fp32"}), default_model)
    assert isinstance(served.backend, OpenVinoBackend) and served.backend.precision == "fp32"
