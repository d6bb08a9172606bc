"""Tiny model folders of each format, built by the tests themselves: a model repository's folders
(`model.toml`, labels, the file) small enough to export in seconds.

Each builder writes the folder `path` (made if missing) and returns it; `read_model(path)` reads it.
The models are random but decisive (large final weights), so that the accuracy guard's top-1 is never a
near tie that float rounding could flip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _write(path: Path, file: str, labels: list[str], toml: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "labels.txt").write_text("\n".join(labels) + "\n")
    (path / "model.toml").write_text(f'file = "{file}"\nlabels = "labels.txt"\n' + toml)
    return path


def squeezenet_state(classes: int, seed: int = 0) -> dict[str, Any]:
    """A squeezenet1_1 state_dict with `classes` outputs (random, decisive)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    module = torchvision.models.squeezenet1_1(weights=None, num_classes=classes)
    with torch.no_grad():
        module.classifier[1].weight.mul_(20.0)
    return dict(module.state_dict())


def squeezenet_folder(path: Path, labels: list[str], *, classes: int | None = None, extra: str = "") -> Path:
    """A torchvision model: squeezenet1_1 with a state_dict of `classes` outputs (default: one per label)."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    torch.save(squeezenet_state(classes or len(labels)), path / "weights.pt")
    return _write(path, "weights.pt", labels, 'format = "torchvision"\narchitecture = "squeezenet1_1"\n' + extra)


def tiny_module(classes: int, *, nhwc: bool = False, probabilities: bool = False, seed: int = 0) -> Any:
    """A small convolutional classifier (torch.nn.Module) taking NCHW, or NHWC, float images."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.head = torch.nn.Linear(8, classes)
            self.nhwc, self.probabilities = nhwc, probabilities

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            if self.nhwc:
                batch = batch.permute(0, 3, 1, 2)
            features = torch.relu(self.conv(batch)).mean(dim=(2, 3))
            logits = self.head(features) * 10.0
            return torch.softmax(logits, dim=1) if self.probabilities else logits

    torch.manual_seed(seed)
    return Tiny().eval()


def torchscript_folder(path: Path, labels: list[str], *, classes: int | None = None, layout: str = "NHWC",
                       output: str = "logits", extra: str = "") -> Path:
    """A TorchScript file of tiny_module, taking `layout` and giving `output`."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    module = tiny_module(classes or len(labels), nhwc=layout == "NHWC", probabilities=output == "probabilities")
    torch.jit.save(torch.jit.script(module), str(path / "model.pt"))
    return _write(path, "model.pt", labels, f'format = "torchscript"\noutput = "{output}"\n'
                                            f'[input]\nlayout = "{layout}"\n' + extra)


def onnx_graph(classes: int, *, layout: str = "NHWC", output: str = "probabilities", size: int | None = None,
               seed: int = 0) -> Any:
    """A hand-built ONNX classifier (onnx.ModelProto): conv, global pooling, a dense layer, and a softmax for
    `output` = "probabilities"; input float `layout` with a fixed side `size` or any."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    side: Any = size or "side"
    shape = ["batch", side, side, 3] if layout == "NHWC" else ["batch", 3, side, side]
    nodes = []
    first = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        first = "nchw"
    last = "probabilities" if output == "probabilities" else "scores"
    nodes += [
        helper.make_node("Conv", [first, "conv_w", "conv_b"], ["conv"], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["scores" if output == "probabilities" else last],
                         transB=1),
    ]
    if output == "probabilities":
        nodes.append(helper.make_node("Softmax", ["scores"], [last], axis=1))
    weights = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array((rng.normal(size=(classes, 8)) * 10).astype(np.float32), "dense_w"),
        numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "dense_b"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", classes])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def onnx_folder(path: Path, labels: list[str], *, classes: int | None = None, layout: str = "NHWC",
                output: str = "probabilities", size: int | None = None, extra: str = "") -> Path:
    """An ONNX model: onnx_graph written as model.onnx."""
    path.mkdir(parents=True, exist_ok=True)
    graph = onnx_graph(classes or len(labels), layout=layout, output=output, size=size)
    (path / "model.onnx").write_bytes(graph.SerializeToString())
    size_line = f"size = {size}\n" if size else ""
    return _write(path, "model.onnx", labels, f'format = "onnx"\noutput = "{output}"\n'
                                              f'[input]\nlayout = "{layout}"\n{size_line}' + extra)
