"""The Open Inference Protocol (KServe V2, Triton's) without a transport: its dataplane.

As MLServer's DataPlane, everything that REST (`handlers/oip.py`) and gRPC (`handlers/grpc.py`) share
lives here, so the two cannot drift: readiness (also `/readyz`'s), server and model metadata, the
model-and-version check, the BYTES length-prefix codec, validating an inference request into images or
a preprocessed tensor, running it (and recording it in the caller's session exactly as
`POST /v1/predict` does), and the outputs, classification extension included. Each transport only
maps its own wire form to `RawInput`/`RequestedOutput` and `OutputTensor` back.

The model takes one of two inputs per request:
- `image`: BYTES `[N]` or `[N, 1]`, each element one encoded image (a format of core.images),
  preprocessed under the session's options (defaults when anonymous);
- `preprocessed`: FP32 `[N, 3, H, W]`, already normalized, fed to the model as is.
It answers `probabilities`: FP32 `[N, classes]`, or with the `classification: k` parameter on the
requested output, BYTES `[N, k]` elements `"<score>:<index>:<label>"`, best first.
What a request gives the model is bounded: N x crop x crop (N x H x W for `preprocessed`) at most
`model.max_request_pixels`, checked by the runner before any image is decoded (422
`request_too_large`); it runs larger batches as forwards of at most `model.max_forward_pixels`.
A session pinned to a model version (the `model_version` option) is answered by that version, on
either input, as on /v1; a version named in the request (`/v2/models/<m>/versions/<v>/infer`, gRPC's
`model_version`) answers that request, where the model catalogue may serve it (the active version, the
canary's, or one marked pinnable). The response's `model_version` names the version that answered.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import BadRequest, ServiceError, quoted
from core.options import CROP_RANGE
from core.session import Session
from inference.backends import oip_platform
from inference.postprocess import top_k
from inference.runner import ServedModel
from service.classify import Classifier
from service.models import Models
from sessions.store import SessionStore

SERVER_NAME = "session-inference-server"  # the distribution's name in pyproject.toml
# The one version string (here, in /v2 and gRPC's ServerMetadata, and in /openapi.json's info): the
# installed distribution's, so pyproject.toml's `version` is its only source.
try:
    SERVER_VERSION = importlib.metadata.version(SERVER_NAME)
except importlib.metadata.PackageNotFoundError:  # a source tree that was never pip-installed
    SERVER_VERSION = "0+unknown"
EXTENSIONS = ("classification", "binary_tensor_data")

IMAGE_INPUT = "image"
TENSOR_INPUT = "preprocessed"
PROBABILITIES_OUTPUT = "probabilities"
BYTES, FP32 = "BYTES", "FP32"
#: Images (or tensor rows) in one request; the body size limit usually binds first.
MAX_BATCH = 64
#: A preprocessed tensor's height and width: the options' crop range, which the ONNX export spans too.
MIN_SIDE, MAX_SIDE = CROP_RANGE

_LENGTH = struct.Struct("<I")
#: Readiness' reason while the process shuts down.
SHUTTING_DOWN = "shutting down"


# -- readiness and metadata -------------------------------------------------------------------
@dataclass(frozen=True)
class Readiness:
    """Whether this process can serve: each check's "ok" or why not."""

    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return all(value == "ok" for value in self.checks.values())


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


class DataPlane:
    """The protocol's use cases, shared by every transport that speaks it (and /readyz)."""

    def __init__(self, classifier: Classifier, models: Models, store: SessionStore):
        self.classifier, self.models, self.store = classifier, models, store
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        """From now on this process says it is not ready (while it still serves: server.shutdown_delay_seconds),
        so that load balancers stop sending it requests before it stops taking them."""
        self.shutting_down = True

    async def readiness(self) -> Readiness:
        """The model is loaded (this object exists only once it is), the session store answers, and the
        process is not shutting down (then a `shutdown` check says so)."""
        checks = {"model": "ok"}
        try:
            await self.store.ping()
            checks["store"] = "ok"
        except ServiceError as exc:
            checks["store"] = exc.message
        if self.shutting_down:
            checks["shutdown"] = SHUTTING_DOWN
        return Readiness(checks)

    async def model_ready(self, name: str, version: str | None) -> bool:
        """Whether the model `name` (at `version`) is served here and ready: false while shutting down.
        NotFound (or 403) as check_model for a model or version this server does not serve."""
        await self.check_model(name, version)
        return not self.shutting_down

    async def check_model(self, name: str, version: str | None) -> ServedModel:
        """The served model `name` (at `version`, when given): NotFound unless this server serves that model
        and may answer with that version (403 `model_version_not_pinnable` for one it may not serve)."""
        return await self.models.catalogue(name).served_for_version(version)

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """The model's name, the versions it may be asked for, its platform and tensors; -1 marks a
        variable dimension."""
        served = await self.check_model(name, version)
        catalogue = self.models.catalogue(name)
        side = catalogue.spec.input_size or -1
        return {
            "name": served.model.name,
            "versions": catalogue.listed_versions(),
            "platform": oip_platform(served.backend.name),
            "inputs": [
                {"name": IMAGE_INPUT, "datatype": BYTES, "shape": [-1]},
                {"name": TENSOR_INPUT, "datatype": FP32, "shape": [-1, 3, side, side]},
            ],
            "outputs": [{"name": PROBABILITIES_OUTPUT, "datatype": FP32, "shape": [-1, len(served.model.labels)]}],
        }

    async def infer(self, session: Session | None, request: InferenceRequest, name: str,
                    version: str | None = None) -> InferenceResult:
        """Classify (and, with a session, record) the request's batch with the model `name` through
        service.classify, as every transport does, and build the requested outputs. Images are preprocessed
        under the session's options where it runs this model, else under the model's defaults. A `version`
        named in the request answers it in place of the session's (checked by the caller with check_model)."""
        options = session.options if session is not None else self.models.initial_options({})
        if self.models.catalogue_for(options).name != name:  # another model than the session's: its defaults
            options = self.models.options_for(options, {"model": name})
        size = self.models.spec(name).input_size
        if request.tensor is not None and size is not None and request.tensor.shape[2:] != (size, size):
            raise BadRequest(f"Input {TENSOR_INPUT!r}: the model {name!r} takes [N, 3, {size}, {size}], got "
                             f"{list(request.tensor.shape)}.", code="invalid_tensor")
        run = dataclasses.replace(options, model_version=version) if version else options
        result = await self.classifier.classify_batch(session, run, images=request.images, tensor=request.tensor)
        wanted = request.outputs or [RequestedOutput(PROBABILITIES_OUTPUT)]
        return InferenceResult(result.model_name, result.model_version,
                               [_output(result.probabilities, output, result.labels) for output in wanted])


# -- the BYTES codec ----------------------------------------------------------------------------
def encode_bytes_elements(elements: Iterable[bytes]) -> bytes:
    """BYTES tensor in the protocol's binary layout: each element as a 4-byte little-endian length
    followed by its bytes."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def decode_bytes_elements(raw: bytes | memoryview, name: str) -> list[bytes]:
    """The inverse of `encode_bytes_elements`; a length running past the end is a client error."""
    view = memoryview(raw)
    elements, offset = [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequest(f"Input {quoted(name)}: BYTES data ends inside an element's 4-byte length prefix.",
                             code="invalid_tensor")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadRequest(f"Input {quoted(name)}: a BYTES element claims {length} bytes but only "
                             f"{len(view) - offset} remain.", code="invalid_tensor")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


# -- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawInput:
    """One input tensor as a transport delivered it: `raw` in the binary layout (BYTES length-
    prefixed, FP32 little-endian), or `elements`, the flat values (bytes for BYTES, numbers for FP32)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    elements: list[Any] | None = None


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: the classification extension's top-k strings
    binary: bool | None = None  # REST only: the output-level `binary_data` parameter, when sent

    @classmethod
    def from_parameters(cls, name: str, parameters: Mapping[str, Any]) -> RequestedOutput:
        if name != PROBABILITIES_OUTPUT:
            raise BadRequest(f"Unknown output {quoted(name)}; the model's output is {PROBABILITIES_OUTPUT!r}.",
                             code="invalid_output")
        k = parameters.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequest(f"Output {quoted(name)}: the classification parameter must be a positive integer.",
                             code="invalid_output")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"Output {quoted(name)}: binary_data must be true or false.", code="invalid_output")
        return cls(name, k, binary)


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request: exactly one of `images` and `tensor` is set."""

    id: str
    outputs: list[RequestedOutput]
    images: list[bytes] | None = None
    tensor: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)  # type: ignore[arg-type]


def parse_request(request_id: str, inputs: list[RawInput], outputs: list[RequestedOutput]) -> InferenceRequest:
    """Check the one input against the model's metadata and decode it; raise BadRequest saying why not."""
    if len(inputs) != 1:
        raise BadRequest(f"Send exactly one input, {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32); "
                         f"this request has {len(inputs)}.", code="invalid_input")
    tensor = inputs[0]
    if tensor.name not in (IMAGE_INPUT, TENSOR_INPUT):
        raise BadRequest(f"Unknown input {quoted(tensor.name)}; the model takes {IMAGE_INPUT!r} (BYTES [-1]) or "
                         f"{TENSOR_INPUT!r} (FP32 [-1, 3, -1, -1]).", code="invalid_input")
    expected = BYTES if tensor.name == IMAGE_INPUT else FP32
    if tensor.datatype != expected:
        raise BadRequest(f"Input {quoted(tensor.name)} must be {expected}, got {quoted(tensor.datatype)}.",
                         code="invalid_datatype")
    shape = _check_shape(tensor)
    if len({output.name for output in outputs}) != len(outputs):
        raise BadRequest("An output is requested twice.", code="invalid_output")
    if tensor.name == IMAGE_INPUT:
        return InferenceRequest(request_id, outputs, images=_images(tensor, shape[0]))
    return InferenceRequest(request_id, outputs, tensor=_fp32(tensor, shape))


def _check_shape(tensor: RawInput) -> list[int]:
    shape = tensor.shape
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"Input {quoted(tensor.name)}: shape must be a list of integers.", code="invalid_shape")
    if tensor.name == IMAGE_INPUT:
        ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        wanted = "[N] or [N, 1]"
    else:
        ok = len(shape) == 4 and shape[1] == 3 and all(MIN_SIDE <= side <= MAX_SIDE for side in shape[2:])
        wanted = f"[N, 3, H, W] with H and W between {MIN_SIDE} and {MAX_SIDE}"
    if not ok or not 1 <= shape[0] <= MAX_BATCH:
        raise BadRequest(f"Input {quoted(tensor.name)} has shape {quoted(shape)}; it must be {wanted}, with N "
                         f"between 1 and {MAX_BATCH}.", code="invalid_shape")
    return shape


def _images(tensor: RawInput, count: int) -> list[bytes]:
    if tensor.raw is not None:
        images = decode_bytes_elements(tensor.raw, tensor.name)
    else:
        images = list(tensor.elements or [])
        if not all(isinstance(element, bytes) for element in images):
            raise BadRequest(f"Input {quoted(tensor.name)}: every element must be bytes.", code="invalid_tensor")
    if len(images) != count:
        raise BadRequest(f"Input {quoted(tensor.name)}: the shape says {count} elements, the data has {len(images)}.",
                         code="invalid_tensor")
    return images


def _fp32(tensor: RawInput, shape: list[int]) -> np.ndarray:
    count = math.prod(shape)
    if tensor.raw is not None:
        if len(tensor.raw) != count * 4:
            raise BadRequest(f"Input {quoted(tensor.name)}: shape {shape} needs {count * 4} bytes of FP32 data, "
                             f"got {len(tensor.raw)}.", code="invalid_tensor")
        # A copy: the slice of the body may be unaligned for float32, and runtimes want writable arrays.
        values = np.frombuffer(tensor.raw, dtype="<f4").copy()
    else:
        try:
            values = np.asarray(tensor.elements if tensor.elements is not None else [], dtype=np.float32).ravel()
        except (TypeError, ValueError):
            raise BadRequest(f"Input {quoted(tensor.name)}: data must be numbers.", code="invalid_tensor") from None
        if values.size != count:
            raise BadRequest(f"Input {quoted(tensor.name)}: shape {shape} needs {count} values, got {values.size}.",
                             code="invalid_tensor")
    if not np.isfinite(values).all():
        raise BadRequest(f"Input {quoted(tensor.name)} holds NaN or infinite values.", code="invalid_tensor")
    return values.astype(np.float32, copy=False).reshape(shape)


# -- running it ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]  # FP32 array, or BYTES elements in row-major order
    binary: bool | None = None  # as requested (REST); None: the request-level default applies

    def raw(self) -> bytes:
        """The binary layout: little-endian FP32, or length-prefixed BYTES."""
        if isinstance(self.values, np.ndarray):
            return self.values.astype("<f4", copy=False).tobytes()
        return encode_bytes_elements(self.values)

    def json_data(self) -> list[Any]:
        """The JSON form's flat, row-major `data`."""
        if isinstance(self.values, np.ndarray):
            return self.values.ravel().tolist()
        return [element.decode() for element in self.values]


@dataclass(frozen=True)
class InferenceResult:
    """The outputs and the model version that produced them: a pinned session's version, which need
    not be the active one (`catalogue.active`), so each transport names this one in its response."""

    model_name: str
    model_version: str
    outputs: list[OutputTensor]


def _output(probabilities: np.ndarray, requested: RequestedOutput, labels: list[str]) -> OutputTensor:
    batch, classes = probabilities.shape
    if not requested.classification:
        return OutputTensor(requested.name, FP32, [batch, classes], probabilities, requested.binary)
    k = min(requested.classification, classes)
    elements = [f"{score.score:f}:{score.class_index}:{score.label}".encode()
                for row in probabilities for score in top_k(row, k, labels)]
    return OutputTensor(requested.name, BYTES, [batch, k], elements, requested.binary)
