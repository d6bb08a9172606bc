"""A session's preprocessing options: one immutable, validated value.

Options are hashable so that the model runtime can cache one preprocessing pipeline per distinct set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import BadOptions, quoted

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
COLORS = ("rgb", "grayscale")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A model version's name: what `PUT /v1/models/<name>/versions/<version>` accepts and `model_version` pins.
MODEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A model's name (a model repository's folder, the `model` option, the URL's <name>): the same form.
MODEL_NAME = MODEL_VERSION
# The options each model gives its own defaults for (a model repository's [preprocess]); choosing a model
# starts them from its defaults (service.models).
PREPROCESSING = ("resize", "crop", "interpolation", "mean", "std")
# The integer options' inclusive ranges, stated only here: the OpenAPI document, the Open Inference
# Protocol's preprocessed tensor and the ONNX export read them. The crop is the side of the square the
# model sees, so CROP_RANGE is also the height and width range that the exported model accepts.
RESIZE_RANGE = (32, 1024)
CROP_RANGE = (32, 1024)
TOP_K_RANGE = (1, 20)


@dataclass(frozen=True)
class Options:
    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    color: str = "rgb"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    top_k: int = 5
    # The model the session runs (GET /v1/models lists them); None: the server's default model.
    model: str | None = None
    # Pins the session to one model version; None follows the version activated on the server.
    model_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Spelled out rather than dataclasses.asdict, which deep-copies field by field: this runs
        # on the event loop for every prediction recorded.
        data: dict[str, Any] = {
            "resize": self.resize, "crop": self.crop, "interpolation": self.interpolation, "color": self.color,
            "mean": list(self.mean), "std": list(self.std), "top_k": self.top_k,
        }
        if self.model is not None:  # sessions on the default model read as before models could be chosen
            data["model"] = self.model
        if self.model_version is not None:  # unpinned sessions read as before versions existed
            data["model_version"] = self.model_version
        return data

    def merged(self, changes: Mapping[str, Any]) -> Options:
        """A copy with `changes` applied, validated as a whole (crop <= resize spans two fields)."""
        if not isinstance(changes, Mapping):
            raise BadOptions("options", "Options must be a JSON object.")
        values = dataclasses.asdict(self)
        for name, value in changes.items():
            if name not in values:
                known = ", ".join(values)
                raise BadOptions(name, f"Unknown option {quoted(name)}; known options are {known}.")
            values[name] = _check_field(name, value)
        if values["crop"] > values["resize"]:
            raise BadOptions("crop", f"crop ({values['crop']}) must not exceed resize ({values['resize']}).")
        return Options(**values)

    def with_query(self, query: Mapping[str, str]) -> Options:
        """Apply per-request overrides given as query-string text (`mean=0.5,0.5,0.5`)."""
        return self.merged(Options.parse_query(query))

    @staticmethod
    def parse_query(query: Mapping[str, str]) -> dict[str, Any]:
        """Per-request overrides given as query-string text, as the values `merged` takes."""
        return {name: _parse_text(name, text) for name, text in query.items()}

    def to_redis(self) -> dict[str, str]:
        # model and model_version are always written, so that null overwrites a stored choice.
        values = {**self.to_dict(), "model": self.model, "model_version": self.model_version}
        return {name: json.dumps(value) for name, value in values.items()}

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def from_redis(fields: tuple[tuple[str, str], ...]) -> Options:
        """Options from stored (name, JSON) pairs; cached, since a session reads the same values
        on every request. Stored fields were validated on write; defaults fill options added since."""
        known = {f.name for f in dataclasses.fields(Options)}
        return Options().merged({k: json.loads(v) for k, v in fields if k in known})


# What each option accepts beyond its type, by name: validation below and describe_fields() read these.
INT_RANGES = {"resize": RESIZE_RANGE, "crop": CROP_RANGE, "top_k": TOP_K_RANGE}
CHOICES = {"interpolation": INTERPOLATIONS, "color": COLORS}
PATTERNS = {"model": MODEL_NAME, "model_version": MODEL_VERSION}


@dataclass(frozen=True)
class FieldSpec:
    """One option as a schema states it: its JSON kind, default and the constraints validation applies."""

    name: str
    kind: str  # "integer", "string" or "numbers" (a list of `length` numbers)
    default: Any
    nullable: bool = False
    range: tuple[int, int] | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    length: int | None = None


_KINDS = {int: "integer", str: "string"}


def describe_fields(cls: type = Options, *, ranges: Mapping[str, tuple[int, int]] = INT_RANGES,
                    choices: Mapping[str, tuple[str, ...]] = CHOICES,
                    patterns: Mapping[str, re.Pattern[str]] = PATTERNS) -> list[FieldSpec]:
    """Each field of the dataclass `cls` (Options unless told) with its type, default and the range, choices or
    pattern the mappings give it, so that a document describing options follows a field added here."""
    hints = typing.get_type_hints(cls)
    specs = []
    for field in dataclasses.fields(cls):
        hint, nullable = hints[field.name], False
        arguments = typing.get_args(hint)
        if type(None) in arguments:  # `X | None`
            nullable = True
            (hint,) = [argument for argument in arguments if argument is not type(None)]
            arguments = typing.get_args(hint)
        length = None
        if typing.get_origin(hint) is tuple and arguments and all(a in (int, float) for a in arguments):
            kind, length = "numbers", len(arguments)
        elif hint in _KINDS:
            kind = _KINDS[hint]
        else:
            raise TypeError(f"Option {field.name} has type {hint}, which describe_fields cannot state.")
        pattern = patterns.get(field.name)
        default = None if field.default is dataclasses.MISSING else field.default
        specs.append(FieldSpec(
            name=field.name, kind=kind, default=default, nullable=nullable, range=ranges.get(field.name),
            choices=choices.get(field.name), pattern=pattern.pattern if pattern else None, length=length))
    return specs


def _check_field(name: str, value: Any) -> Any:
    if name == "model":
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not MODEL_NAME.match(value):
            raise BadOptions(name, "model must be null or a model name: 1 to 64 letters, digits, '.', '_' or '-', "
                                   "starting with a letter or digit (GET /v1/models lists them).")
        return value
    if name == "model_version":
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not MODEL_VERSION.match(value):
            raise BadOptions(name, "model_version must be null or a version name: 1 to 64 letters, digits, "
                                   "'.', '_' or '-', starting with a letter or digit.")
        return value
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadOptions(name, f"{name} must be an integer between {low} and {high}.")
        if not low <= value <= high:
            raise BadOptions(name, f"{name} must be between {low} and {high}, got {quoted(value)}.")
        return value
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise BadOptions(name, f"{name} must be one of {', '.join(CHOICES[name])}.")
        return value
    # mean and std: three finite floats; std strictly positive.
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise BadOptions(name, f"{name} must be a list of three numbers.")
    floats = tuple(float(v) for v in value)
    if name == "std" and not all(v > 0 for v in floats):
        raise BadOptions(name, "std values must be greater than 0.")
    if name == "mean" and not all(-10 <= v <= 10 for v in floats):
        raise BadOptions(name, "mean values must be between -10 and 10.")
    return floats


def _parse_text(name: str, text: str) -> Any:
    if name in INT_RANGES:
        try:
            return int(text)
        except ValueError:
            raise BadOptions(name, f"{name} must be an integer, got {quoted(text)}.") from None
    if name in ("mean", "std"):
        try:
            return [float(part) for part in text.split(",")]
        except ValueError:
            raise BadOptions(name, f"{name} must be three comma-separated numbers, got {quoted(text)}.") from None
    return text
