"""An ONNX file as a served model (format = "onnx"), without torch.

The user's file becomes a canonical graph, what every export is: one float32 NCHW batch in, logits out
(a Transpose in front of an NHWC input, a Log after a softmax output, whose softmax is the same
probabilities again), with a dynamic batch. The file is its own reference: ONNX Runtime FP32's answers
on the accuracy guard's cases, on the canonical graph, stored beside it (inference.selection).

Run as `python -m inference.onnx_model` it exports a repository's ONNX model and writes its manifest,
as `inference.torch_model` does for torch's formats (inference.model.load_exported).
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import BadWeights
from inference import selection
from inference.model import (
    LoadedModel,
    ModelLoadError,
    export_child,
    export_key,
    file_sha256,
    softmax,
)
from inference.repository import ModelSpec

INPUT, LOGITS = "input", "logits"
#: A probability of 0 becomes this before its log, so that logits stay finite (its softmax is still 0).
SMALLEST_PROBABILITY = 1e-38


def canonical_graph(spec: ModelSpec, path: Path) -> Any:
    """The ONNX file at `path` as `spec`'s canonical graph (an onnx.ModelProto); ModelLoadError in one
    sentence when it is not an image classifier with `spec`'s input and class count."""
    import onnx
    from onnx import TensorProto, helper

    name = spec.name
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"Could not read {path} as an ONNX file ({type(exc).__name__}).") from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelLoadError(f"Model {name!r}'s ONNX file takes {len(inputs)} inputs and gives {len(graph.output)} "
                             "outputs; an image classifier takes one batch of images and gives one of scores.")
    (original,) = inputs
    tensor = original.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT:
        raise ModelLoadError(f"Model {name!r}'s ONNX file takes {TensorProto.DataType.Name(tensor.elem_type)} "
                             "input; a served model takes float32 images.")
    dims = _dims(tensor)
    layout = spec.input_layout
    expected = _expected(spec)
    channels = dims[1] if layout == "NCHW" else dims[-1] if dims else None
    sides = [dims[2], dims[3]] if layout == "NCHW" else dims[1:3]
    fits = len(dims) == 4 and channels in (None, 3) and all(
        side is None or side == spec.input_size for side in sides)
    if not fits:
        raise ModelLoadError(f"Model {name!r}'s ONNX file takes input of shape {_text(dims)}; its model.toml says "
                             f"{_text(expected)} ({layout}).")
    output_dims = _dims(graph.output[0].type.tensor_type)
    classes = len(spec.labels) if spec.labels is not None else None
    if classes is None:
        raise ModelLoadError(f"Model {name!r} names no labels; an ONNX model needs its labels file.")
    if len(output_dims) != 2:
        raise ModelLoadError(f"Model {name!r}'s ONNX file gives output of shape {_text(output_dims)}; a classifier "
                             "gives (batch, classes).")
    if output_dims[1] is not None and output_dims[1] != classes:
        raise ModelLoadError(f"The file gives {output_dims[1]} classes; model {name!r} has {classes} labels.")

    _set_dims(tensor, ["batch", *dims[1:]])
    if layout == "NHWC":  # the canonical input is NCHW: a transpose in front of the file's own
        height, width = (side or axis for side, axis in zip(sides, ("height", "width"), strict=True))
        graph.input.remove(original)
        graph.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, height, width]))
        graph.node.insert(0, helper.make_node("Transpose", [INPUT], [original.name], perm=[0, 2, 3, 1]))
    output = graph.output[0]
    _set_dims(output.type.tensor_type, ["batch", classes])
    if spec.output == "probabilities":  # logits out: the log of the probabilities (softmax gives them back),
        # kept finite where a probability rounds to 0
        graph.initializer.append(helper.make_tensor("smallest_probability", TensorProto.FLOAT, [],
                                                    [SMALLEST_PROBABILITY]))
        graph.node.append(helper.make_node("Max", [output.name, "smallest_probability"], ["probabilities__clamped"]))
        graph.node.append(helper.make_node("Log", ["probabilities__clamped"], [LOGITS]))
        graph.output.remove(output)
        graph.output.append(helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", classes]))
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"Model {name!r}'s ONNX file does not pass the ONNX checker "
                             f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}).") from None
    return model


def _dims(tensor: Any) -> list[int | None]:
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]


def _set_dims(tensor: Any, dims: list[Any]) -> None:
    for dim, value in zip(tensor.shape.dim, dims, strict=True):
        if isinstance(value, str):
            dim.dim_param = value
        elif value is not None:
            dim.dim_value = value


def _expected(spec: ModelSpec) -> list[int | None]:
    side = spec.input_size
    return [None, 3, side, side] if spec.input_layout == "NCHW" else [None, side, side, 3]


def _text(dims: list[int | None]) -> str:
    return "(" + ", ".join("?" if dim is None else str(dim) for dim in dims) + ")"


def _session(graph: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def export(spec: ModelSpec, source: Path, cache_dir: Path) -> tuple[LoadedModel, Path]:
    """The ONNX file `source` (spec's own, or a version of it) as its canonical graph in `cache_dir`, with
    ONNX Runtime FP32's reference beside it; written once, keyed by the spec and the file's bytes."""
    sha = file_sha256(source)
    path = cache_dir / f"{spec.name}-{export_key(spec, sha)}.onnx"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            from core.files import write_atomically

            write_atomically(path, canonical_graph(spec, source).SerializeToString())
        if not selection.reference_path(path).is_file():
            write_reference(spec, path)
    labels = list(spec.labels or ())
    return LoadedModel(spec.name, spec.version or "file-" + sha[:12], None, labels, sha), path


def write_reference(spec: ModelSpec, graph: Path) -> Path:
    """ONNX Runtime FP32's probabilities on `spec`'s guard cases, from the canonical graph at `graph`."""
    session = _session(graph)
    cases = selection.guard_cases(selection.guard_options(spec.defaults, spec.input_size))
    probabilities = []
    feed = session.get_inputs()[0].name
    for case in cases:
        logits = session.run(None, {feed: case.batch.to_tensor()})[0]
        _check_logits(spec, logits)
        probabilities.append(softmax(logits)[0])
    return selection.write_reference(graph, cases, probabilities)


def _check_logits(spec: ModelSpec, logits: np.ndarray) -> None:
    classes = len(spec.labels or ())
    if logits.ndim == 2 and logits.shape[1] != classes:
        raise ModelLoadError(f"The file gives {logits.shape[1]} classes; model {spec.name!r} has {classes} labels.")
    if logits.shape != (1, classes):
        raise ModelLoadError(f"The model gives {logits.shape} scores on one image, not {(1, classes)}.")
    if not np.isfinite(logits).all():
        raise ModelLoadError("The model gives NaN or infinite scores on a test image.")


def load_checked(spec: ModelSpec, path: Path, version: str, sha256: str | None = None) -> LoadedModel:
    """A published version of `spec`'s ONNX model: the file at `path`, checked (its input and class count
    against the model's, and one forward); BadWeights (422) saying what differs. Its `module` is the file."""
    import tempfile

    try:
        graph = canonical_graph(spec, path)
        if sha256 is not None and file_sha256(path) != sha256:
            raise BadWeights("The file changed while it was read; upload it again.")
        with tempfile.TemporaryDirectory(prefix="onnx-check-") as folder:
            canonical = Path(folder) / "model.onnx"
            canonical.write_bytes(graph.SerializeToString())
            side = spec.input_size or 224
            shape = (1, 3, side, side)
            example = np.linspace(-2.0, 2.0, num=int(np.prod(shape)), dtype=np.float32).reshape(shape)
            session = _session(canonical)
            try:
                logits = session.run(None, {session.get_inputs()[0].name: example})[0]
            except Exception as exc:
                raise ModelLoadError(f"The model failed on a test input of shape {_text(list(_expected(spec)))} "
                                     f"with side {side} ({type(exc).__name__}).") from None
            _check_logits(spec, logits)
    except ModelLoadError as exc:
        raise BadWeights(str(exc).replace(str(path), "the uploaded file")) from None
    return LoadedModel(spec.name, version, path, list(spec.labels or ()), sha256 or file_sha256(path))


def main(argv: list[str] | None = None) -> int:
    """Export an ONNX model (its spec as JSON) and write its manifest; on failure, one sentence on stderr."""
    return export_child(argv, prog="python -m inference.onnx_model",
                        description="Make an ONNX model's canonical graph for the serving processes.",
                        export=lambda spec, cache_dir: export(spec, Path(spec.file), cache_dir))


if __name__ == "__main__":
    sys.exit(main())
