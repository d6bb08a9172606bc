"""The runtimes a model can be served on: one module each, and one row each in SPECS.

Everything that depends on which runtimes exist reads this table: candidate selection for
`model.runtime = "auto"` (inference.selection), the config's runtime, precision and device checks
(server.config), building a backend (inference.selection.make_backend, server.runtime) and the Open
Inference Protocol's model platform. A new runtime is a module here with a `make` factory and a row.

A runtime is either `exported`: it runs the ONNX graph exported once from the torch model, so its
serving processes never import torch (inference.model); or not: it runs the loaded torch module itself.
Each backend module imports its runtime library only when a backend is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.backends import onnxruntime_backend, openvino_backend, torch_backend
from inference.model import Backend, ModelLoadError


@dataclass(frozen=True)
class Layout:
    """How a backend is built: `workers` forwards at once of `intra_op_threads` threads each, a forward
    alone on `idle_intra_op_threads` (0: no second layout), on `device` ("cpu" or "cuda[:N]")."""

    workers: int = 1
    intra_op_threads: int = 1
    idle_intra_op_threads: int = 0
    device: str = "cpu"


#: (what it runs: the exported graph's Path when the runtime is `exported`, else the torch module;
#:  the precision, one of the row's; the layout) -> the backend.
Factory = Callable[[Any, str, Layout], Backend]


@dataclass(frozen=True)
class BackendSpec:
    name: str  # model.runtime's value, and Backend.name
    factory: Factory
    precisions: tuple[str, ...]  # what it computes in; the first is its default
    devices: tuple[str, ...]  # "cpu", "cuda" (any cuda:N)
    oip_platform: str  # the Open Inference Protocol's model metadata "platform"
    exported: bool  # runs the ONNX export (torch-free) rather than the torch module


#: In order of preference: `auto` times the exported ones on the CPU, and a GPU runs the first that
#: runs there (inference.selection, server.runtime).
SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("onnxruntime", onnxruntime_backend.make, ("fp32",), ("cpu", "cuda"), "onnxruntime_onnx", True),
    BackendSpec("openvino", openvino_backend.make, ("fp32", "bf16"), ("cpu",), "openvino", True),
    BackendSpec("torch", torch_backend.make, ("fp32",), ("cpu", "cuda"), "pytorch_libtorch", False),
)}

AUTO = "auto"  # model.runtime and model.precision: chosen for this machine (inference.selection)


def runtimes() -> tuple[str, ...]:
    """model.runtime's values."""
    return (AUTO, *SPECS)


def precisions() -> tuple[str, ...]:
    """model.precision's values: every runtime's, each once."""
    return (AUTO, *dict.fromkeys(p for spec in SPECS.values() for p in spec.precisions))


def spec(name: str) -> BackendSpec:
    """The row of the runtime `name`; ModelLoadError for none."""
    found = SPECS.get(name)
    if found is None:
        raise ModelLoadError(f"No runtime named {name!r}; model.runtime is one of {', '.join(map(repr, runtimes()))}.")
    return found


def device_kind(device: str) -> str:
    """"cpu", or "cuda" for any cuda:N."""
    return device.partition(":")[0]


def runs_exported(runtime: str) -> bool:
    """Whether model.runtime serves the ONNX export (a torch-free process): `auto` always does."""
    row = SPECS.get(runtime)
    return row is None or row.exported  # an unknown name is the config check's to refuse


def first_exported_on(device: str) -> BackendSpec:
    """The preferred exported runtime on `device`: what a GPU runs when model.runtime is `auto`."""
    for row in SPECS.values():
        if row.exported and device_kind(device) in row.devices:
            return row
    raise ModelLoadError(f"No exported runtime runs on {device!r}; set model.runtime = 'torch'.")


def oip_platform(name: str) -> str:
    """The Open Inference Protocol platform of the backend `name` (its own name when it has no row)."""
    row = SPECS.get(name)
    return row.oip_platform if row is not None else name
