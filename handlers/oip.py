"""The Open Inference Protocol over REST (`/v2/...`): what `tritonclient.http` speaks.

The wire forms live here (JSON `data`, and the binary tensor data extension: a JSON header of
`Inference-Header-Content-Length` bytes followed by the tensors' bytes); validation, running and
outputs are shared with gRPC in the dataplane, `service/dataplane.py`. Errors are `{"error": "<message>"}`
(BaseHandler gives every /v2 path that shape).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from core.errors import BadRequest, UnsupportedMediaType, quoted
from handlers.base import BaseHandler, parse_json
from service.auth import Policy
from service.dataplane import BYTES, InferenceRequest, RawInput, RequestedOutput, parse_request, server_metadata

HEADER_LENGTH = "Inference-Header-Content-Length"


class ServerMetadataHandler(BaseHandler):
    """GET /v2: name, version and the protocol extensions served."""

    auth_policy = Policy.PUBLIC

    def get(self) -> None:
        self.write_json(server_metadata())


class ServerLiveHandler(BaseHandler):
    """GET /v2/health/live"""

    auth_policy = Policy.PUBLIC

    def get(self) -> None:
        self.write_json({"live": True})


class ServerReadyHandler(BaseHandler):
    """GET /v2/health/ready: the model is loaded and the session store answers (as /readyz)."""

    auth_policy = Policy.PUBLIC

    async def get(self) -> None:
        if not (await self.dataplane.readiness()).ready:
            self.set_header("Retry-After", "1")
            self.write_json({"ready": False}, status=503)
            return
        self.write_json({"ready": True})


class ModelMetadataHandler(BaseHandler):
    """GET /v2/models/{model}[/versions/{version}]"""

    auth_policy = Policy.PUBLIC

    async def get(self, model: str, version: str | None = None) -> None:
        self.write_json(await self.dataplane.model_metadata(model, version))


class ModelReadyHandler(BaseHandler):
    """GET /v2/models/{model}[/versions/{version}]/ready: 200 `{"name", "ready": true}`, 503 with
    `"ready": false` while the server shuts down, or 404."""

    auth_policy = Policy.PUBLIC

    async def get(self, model: str, version: str | None = None) -> None:
        if not await self.dataplane.model_ready(model, version):  # shutting down
            self.set_header("Retry-After", "1")
            self.write_json({"name": model, "ready": False}, status=503)
            return
        self.write_json({"name": model, "ready": True})


@dataclass(frozen=True)
class _RestRequest:
    request: InferenceRequest
    binary_output: bool  # the request-level `binary_data_output` parameter


class InferHandler(BaseHandler):
    """POST /v2/models/{model}[/versions/{version}]/infer

    With `Authorization: Bearer <token>` the session's options preprocess the images and each image
    is recorded in its history; without one the call is anonymous where that is allowed.
    """

    auth_policy = Policy.OPTIONAL_SESSION
    _parsed: _RestRequest | None = None

    @property
    def rate_limit_cost(self) -> int:  # type: ignore[override]
        # Each image takes one from the session's rate limit, as one POST /v1/predict would.
        return self.parsed().request.batch_size

    async def post(self, model: str, version: str | None = None) -> None:
        await self.dataplane.check_model(model, version)
        parsed = self.parsed()
        result = await self.dataplane.infer(self.session, parsed.request, model, version)
        header: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
        if parsed.request.id:
            header["id"] = parsed.request.id
        described, chunks = [], []
        for output in result.outputs:
            tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
            if output.binary if output.binary is not None else parsed.binary_output:
                raw = output.raw()
                tensor["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                tensor["data"] = output.json_data()
            described.append(tensor)
        header["outputs"] = described
        head = json.dumps(header, separators=(",", ":")).encode()
        if not chunks:
            self.finish(head)
            return
        self.set_header(HEADER_LENGTH, str(len(head)))
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(head + b"".join(chunks))

    def parsed(self) -> _RestRequest:
        """The body, parsed and validated once (authentication needs its batch size)."""
        if self._parsed is None:
            self._parsed = _parse_body(self.request.body, self.request.headers.get(HEADER_LENGTH),
                                       self.request.headers.get("Content-Encoding"))
        return self._parsed


def _parse_body(body: bytes, header_length: str | None, encoding: str | None) -> _RestRequest:
    if encoding and encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {quoted(encoding)} is not supported; send the body uncompressed.")
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's "
                             f"{len(body)}; got {quoted(header_length)}.", code="invalid_header_length")
        split = int(header_length)
        head, binary = body[:split], memoryview(body)[split:]
    document = parse_json(head, "The inference request")
    if not isinstance(document, dict):
        raise BadRequest("The inference request must be a JSON object.", code="malformed_json")
    parameters = _object(document.get("parameters"), "parameters")
    inputs, offset = [], 0
    for item in _list(document.get("inputs"), "inputs"):
        tensor, offset = _input(_object(item, "an input"), binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(f"The body has {len(binary) - offset} bytes after the JSON header that no input's "
                         "binary_data_size accounts for.", code="invalid_tensor")
    outputs = []
    for item in _list(document.get("outputs", []), "outputs"):
        output = _object(item, "an output")
        outputs.append(RequestedOutput.from_parameters(str(output.get("name")),
                                                       _object(output.get("parameters"), "output parameters")))
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise BadRequest("id must be a string.", code="invalid_request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("binary_data_output must be true or false.", code="invalid_request")
    return _RestRequest(parse_request(request_id, inputs, outputs), binary_output)


def _input(item: dict[str, Any], binary: memoryview, offset: int) -> tuple[RawInput, int]:
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise BadRequest("Each input needs a string name, a string datatype and a shape list.",
                         code="invalid_input")
    parameters = _object(item.get("parameters"), "input parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise BadRequest("The shared memory extension is not supported; send the data in the request.",
                         code="invalid_input")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"Input {quoted(name)}: binary_data_size {quoted(size)} does not fit the "
                             f"{len(binary) - offset} bytes left after the JSON header.", code="invalid_tensor")
        return RawInput(name, datatype, shape, raw=binary[offset : offset + size]), offset + size
    if "data" not in item:
        raise BadRequest(f"Input {quoted(name)} has neither data nor the binary_data_size parameter.",
                         code="invalid_tensor")
    data = _flatten(item["data"], name)
    if datatype == BYTES:
        # JSON cannot carry raw bytes: each element of a BYTES input is its base64 text.
        data = [_base64(element, name) for element in data]
    return RawInput(name, datatype, shape, elements=data), offset


_MAX_DATA_DEPTH = 8  # a tensor's rank is at most 4; deeper nesting is a malformed request


def _flatten(data: Any, name: str) -> list[Any]:
    """The JSON form's data may be flat or nested row-major lists (at most _MAX_DATA_DEPTH deep)."""
    flat: list[Any] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:  # iterative: nesting depth must not become Python recursion
        element, depth = stack.pop()
        if not isinstance(element, list):
            flat.append(element)
        elif depth >= _MAX_DATA_DEPTH:
            raise BadRequest(f"Input {quoted(name)}: data nests lists more than {_MAX_DATA_DEPTH} deep.",
                             code="invalid_tensor")
        else:
            stack.extend((item, depth + 1) for item in reversed(element))
    return flat


def _base64(element: Any, name: str) -> bytes:
    if not isinstance(element, str):
        raise BadRequest(f"Input {quoted(name)}: in the JSON form a BYTES element is a base64 string.",
                         code="invalid_tensor")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"Input {quoted(name)}: a BYTES element is not valid base64 (in the JSON form each image is "
                         "sent as base64 text; the binary form takes the bytes as they are).",
                         code="invalid_tensor") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what[0].upper()}{what[1:]} must be a JSON object.", code="invalid_request")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list.", code="invalid_request")
    return value
