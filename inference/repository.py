"""The models a server serves: the one `[model]` configures, and one per folder of a model repository.

A model repository (`models.repository_dir`) holds one folder per model, named as the model is served,
with a small manifest, `model.toml`, beside the model's files:

    products/
        model.toml      format = "torchvision"; architecture = "mobilenet_v3_small"; file = "weights.pt"
        labels.txt      one label per line, line i naming class i (or labels.json)
        weights.pt      a state_dict of the architecture with one output per label

A model is a torchvision classification architecture (or efficientnet_lite0) with a state_dict of any
class count, an ONNX file, or a TorchScript file; its labels are a text file (one per line) or JSON (a
list, or TorchServe's `index_to_name.json`); `[preprocess]` gives its sessions' default resize, crop,
interpolation, mean and std; `[input]` says what an ONNX or TorchScript file takes (layout, a fixed side).
Reading a repository is torch-free: a ModelSpec is plain data, and the export (inference.model) turns it
into the ONNX graph a serving process runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BadOptions
from core.options import MODEL_NAME, PREPROCESSING, Options

MANIFEST = "model.toml"
FORMATS = ("torchvision", "onnx", "torchscript")
LAYOUTS = ("NCHW", "NHWC")
OUTPUTS = ("logits", "probabilities")
_KEYS = {"format", "architecture", "file", "labels", "version", "output", "input", "preprocess", "description"}
_INPUT_KEYS = {"layout", "size"}


class RepositoryError(ValueError):
    """A model repository or manifest cannot be served as it is; the message is one sentence naming the file."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, as its manifest (or `[model]`) states it: nothing is loaded."""

    name: str  # what sessions choose (the `model` option) and URLs name
    format: str  # one of FORMATS
    architecture: str  # torchvision's name (or efficientnet_lite0); "" for an ONNX or TorchScript file
    file: str  # the weights: "default", a torchvision weights enum name, or a file's absolute path
    labels: tuple[str, ...] | None  # None: the packaged weights' own (ImageNet's)
    defaults: Options  # the preprocessing a session of this model starts with
    input_size: int | None = None  # the one side the model takes, or None: any side in the crop range
    input_layout: str = "NCHW"
    output: str = "logits"  # or "probabilities": a softmax the file applies already
    version: str | None = None  # the manifest's name for this file's version; else made from its hash
    description: str = ""

    @property
    def class_count(self) -> int | None:
        return len(self.labels) if self.labels is not None else None

    def fingerprint(self) -> str:
        """Everything about the spec that changes the export (the file's bytes are hashed by the caller)."""
        data = dataclasses.asdict(self)
        data["defaults"] = self.defaults.to_dict()
        data.pop("description")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """The whole spec as JSON (what an export child process is given; `from_json` reads it back)."""
        data = dataclasses.asdict(self)
        data["defaults"] = {name: value for name, value in self.defaults.to_dict().items()
                            if name in PREPROCESSING or name == "color"}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        data["defaults"] = Options().merged(data["defaults"])
        data["labels"] = tuple(data["labels"]) if data["labels"] is not None else None
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The spec as GET /v1/models shows it."""
        preprocess = self.defaults.to_dict()
        return {
            "format": self.format,
            "architecture": self.architecture or None,
            "classes": self.class_count,
            "input": {"layout": self.input_layout, "size": self.input_size},
            "output": self.output,
            "preprocess": {name: preprocess[name] for name in PREPROCESSING},
            "description": self.description,
        }


def configured_spec(name: str, weights: str) -> ModelSpec:
    """The model `[model]` names: a torchvision architecture (or efficientnet_lite0) with its packaged
    ImageNet weights, a weights enum, or a state_dict file of the ImageNet classes."""
    file = weights if weights == "default" or not Path(weights).expanduser().exists() \
        else str(Path(weights).expanduser().resolve())
    return ModelSpec(name=name, format="torchvision", architecture=name, file=file, labels=None, defaults=Options())


def read_repository(folder: Path) -> dict[str, ModelSpec]:
    """The models in a repository folder, by name: one per model folder (model_folders)."""
    if not folder.is_dir():
        raise RepositoryError(f"models.repository_dir {str(folder)!r} is not a folder.")
    return {name: read_model(folder / name) for name in model_folders(folder)}


def model_folders(folder: Path) -> list[str]:
    """The names of the models a repository folder holds, sorted: its subfolders but hidden ones (uploads
    and additions in progress are hidden); none where the folder is missing."""
    if not folder.is_dir():
        return []
    return sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))


def read_model(folder: Path) -> ModelSpec:
    """The model in `folder`, as its model.toml describes it; RepositoryError saying what is wrong."""
    name = folder.name
    manifest = folder / MANIFEST
    where = f"{name}/{MANIFEST}"
    if not MODEL_NAME.match(name):
        raise RepositoryError(f"The model folder {name!r} is not a model name: 1 to 64 letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit.")
    if not manifest.is_file():
        raise RepositoryError(f"The model folder {name!r} has no {MANIFEST}; see docs/models.md.")
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{where} is not valid TOML ({exc}).") from None
    return spec_from_manifest(name, data, folder, where)


def spec_from_manifest(name: str, data: dict[str, Any], folder: Path, where: str) -> ModelSpec:
    """A ModelSpec from a manifest's values, files resolved in `folder`; `where` names it in errors."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise RepositoryError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(_KEYS))}.")
    model_format = _choice(data, "format", FORMATS, where, default=None)
    architecture = _text(data, "architecture", where)
    if model_format == "torchvision" and not architecture:
        raise RepositoryError(f"{where}: a torchvision model names its architecture, e.g. architecture = \"resnet18\".")
    if model_format != "torchvision" and architecture:
        raise RepositoryError(f"{where}: architecture applies to format = \"torchvision\" only.")
    file = _text(data, "file", where)
    packaged = model_format == "torchvision" and (not file or not _looks_like_path(file))
    if packaged:
        file = file or "default"  # torchvision's packaged weights: "default" or an enum name
    else:
        if not file:
            raise RepositoryError(f"{where}: file names the model's {_file_kind(model_format)} in its folder.")
        file = str(_inside(folder, file, where, "file"))
    labels_name = _text(data, "labels", where)
    if labels_name:
        labels: tuple[str, ...] | None = tuple(read_labels(_inside(folder, labels_name, where, "labels")))
    elif packaged:
        labels = None  # the weights enum's categories
    else:
        raise RepositoryError(f"{where}: labels names the labels file (one label per line, or JSON) in its folder.")
    version = _text(data, "version", where) or None
    if version is not None and not MODEL_NAME.match(version):
        raise RepositoryError(f"{where}: version {version!r} is not a version name: 1 to 64 letters, digits, '.', "
                              "'_' or '-', starting with a letter or digit.")
    size, layout = _input(data.get("input", {}), where)
    if layout == "NHWC" and model_format == "torchvision":
        raise RepositoryError(f"{where}: a torchvision model takes NCHW input; input.layout applies to files.")
    output = _choice(data, "output", OUTPUTS, where, default="logits")
    defaults = _preprocess(data.get("preprocess", {}), size, where)
    return ModelSpec(name=name, format=model_format, architecture=architecture, file=file, labels=labels,
                     defaults=defaults, input_size=size, input_layout=layout, output=output, version=version,
                     description=_text(data, "description", where))


def read_labels(path: Path) -> list[str]:
    """Class labels from a text file (line i names class i) or JSON: a list, or an object from class
    index to label (TorchServe's index_to_name.json, whose values may be [id, label] pairs)."""
    where = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"Could not read the labels file {where} ({type(exc).__name__}).") from None
    if path.suffix.lower() == ".json":
        labels = _json_labels(text, where)
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        labels = [line.strip() for line in lines]
        for number, label in enumerate(labels, 1):
            if not label:
                raise RepositoryError(f"Line {number} of {where} is empty; each line names one class.")
    if not labels:
        raise RepositoryError(f"{where} names no classes.")
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise RepositoryError(f"{where} names {twice!r} twice; each class needs its own label.")
    return labels


def _json_labels(text: str, where: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno}).") from None
    if isinstance(data, dict):
        try:
            indexed = {int(key): value for key, value in data.items()}
        except ValueError:
            raise RepositoryError(f"{where}: an object's keys are class indices (\"0\", \"1\", ...).") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise RepositoryError(f"{where}: the class indices must run from 0 to {len(indexed) - 1} without gaps.")
        data = [indexed[index] for index in range(len(indexed))]
    if not isinstance(data, list):
        raise RepositoryError(f"{where} holds neither a list of labels nor an object from class index to label.")
    labels = []
    for index, value in enumerate(data):
        if isinstance(value, list) and value and all(isinstance(part, str) for part in value):
            value = value[-1]  # TorchServe's ["n01440764", "tench"]: the readable name is the last
        if not isinstance(value, str) or not value.strip():
            raise RepositoryError(f"{where}: class {index}'s label is not a non-empty string.")
        labels.append(value.strip())
    return labels


def _looks_like_path(file: str) -> bool:
    # A torchvision weights enum name is upper-case letters, digits and '_' (IMAGENET1K_V2); a file has a suffix.
    return not re.fullmatch(r"[A-Z0-9_]+|default", file)


def _file_kind(model_format: str | None) -> str:
    return {"onnx": "ONNX file", "torchscript": "TorchScript file"}.get(model_format or "", "state_dict file")


def _inside(folder: Path, name: str, where: str, key: str) -> Path:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise RepositoryError(f"{where}: {key} {name!r} is outside the model's folder.")
    if not path.is_file():
        raise RepositoryError(f"{where}: {key} {name!r} is not a file in the model's folder.")
    return path


def _text(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise RepositoryError(f"{where}: {key} must be a string.")
    return value.strip()


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...], where: str, *, default: str | None) -> str:
    value = data.get(key, default)
    if value not in choices:
        shown = " or ".join(f'"{choice}"' for choice in choices)
        raise RepositoryError(f"{where}: {key} must be {shown}" + (f", not {value!r}." if value is not None else "."))
    return str(value)


def _input(table: Any, where: str) -> tuple[int | None, str]:
    if not isinstance(table, dict):
        raise RepositoryError(f"{where}: [input] must be a table.")
    unknown = sorted(set(table) - _INPUT_KEYS)
    if unknown:
        raise RepositoryError(f"{where}: unknown key input.{unknown[0]}; [input] takes layout and size.")
    layout = _choice(table, "layout", LAYOUTS, where, default="NCHW")
    size = table.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise RepositoryError(f"{where}: input.size must be a whole number of pixels (0: any size).")
    return (size or None), layout


def _preprocess(table: Any, size: int | None, where: str) -> Options:
    if not isinstance(table, dict):
        raise RepositoryError(f"{where}: [preprocess] must be a table.")
    unknown = sorted(set(table) - set(PREPROCESSING))
    if unknown:
        raise RepositoryError(f"{where}: unknown key preprocess.{unknown[0]}; [preprocess] takes "
                              f"{', '.join(PREPROCESSING)}.")
    changes = dict(table)
    if size is not None:  # a fixed input: the crop is the input's side unless the manifest says otherwise
        changes.setdefault("crop", size)
        changes.setdefault("resize", max(size, round(size * 256 / 224)))
    try:
        defaults = Options().merged(changes)
    except BadOptions as exc:
        raise RepositoryError(f"{where}: preprocess.{exc.field}: {exc.message}") from None
    if size is not None and defaults.crop != size:
        raise RepositoryError(f"{where}: preprocess.crop ({defaults.crop}) must equal input.size ({size}).")
    return defaults
