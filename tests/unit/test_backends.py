"""The backend registry (inference.backends): a runtime is one row, and every reader of the table sees it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inference import backends, selection
from inference.backends import BackendSpec, Layout
from inference.selection import Candidate
from server import runtime
from server.config import Config, validate
from tests.unit.fakes import FakeBackend

pytestmark = pytest.mark.unit


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str, Layout]]:
    """A dummy runtime registered by one row; records what its factory was built with."""
    built: list[tuple[Any, str, Layout]] = []

    def make(source: Any, precision: str, layout: Layout) -> FakeBackend:
        built.append((source, precision, layout))
        return FakeBackend()

    monkeypatch.setitem(backends.SPECS, "dummy", BackendSpec("dummy", make, ("fp32", "int4"), ("cpu",),
                                                             "dummy_platform", exported=True))
    return built


def test_a_row_is_all_a_new_runtime_needs(dummy: list[tuple[Any, str, Layout]]) -> None:
    # selection: a candidate of `auto`, and what a forced runtime and precision narrow to
    assert Candidate("dummy", "fp32") in selection.candidates("auto", "auto", set())
    assert selection.candidates("dummy", "int4", set()) == [Candidate("dummy", "int4")]
    # config validation: its name and precisions are accepted, and its devices are enforced
    config = Config()
    config.model.runtime, config.model.precision = "dummy", "int4"
    validate(config)
    config.model.device = "cuda"
    with pytest.raises(ValueError, match=r"model\.runtime 'dummy' runs on the CPU"):
        validate(config)
    # the factory: built with the configured layout, by selection and by the server's runtime assembly
    config.model.device, config.model.workers = "cpu", 3
    backend = runtime.make_backend(config, Candidate("dummy", "int4"), Path("graph.onnx"))
    assert isinstance(backend, FakeBackend)
    assert dummy == [(Path("graph.onnx"), "int4", Layout(3, config.model.intra_op_threads,
                                                         config.model.idle_intra_op_threads, "cpu"))]
    # the Open Inference Protocol's model platform
    assert backends.oip_platform("dummy") == "dummy_platform"


def test_the_table_answers_what_the_runtimes_offer() -> None:
    assert backends.runtimes() == ("auto", "onnxruntime", "openvino", "torch")
    assert backends.precisions() == ("auto", "fp32", "bf16")
    assert backends.oip_platform("onnxruntime") == "onnxruntime_onnx"
    assert backends.oip_platform("torch") == "pytorch_libtorch"
    assert backends.oip_platform("unregistered") == "unregistered"
    assert not backends.runs_exported("torch") and backends.runs_exported("auto")
    assert backends.first_exported_on("cuda:1").name == "onnxruntime"
