"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, what `tritonclient.grpc` speaks.

grpcio's asyncio server runs on the same event loop as Tornado, in the same process, with the same
use cases (service.use_cases.UseCases), so a session and its history are one thing whichever
transport a client uses. This module maps protobuf messages to the transport-neutral protocol in
`service/dataplane.py` and back; readiness, validation, inference, recording and outputs live there.

Errors: a bad or missing token is UNAUTHENTICATED, bad input INVALID_ARGUMENT, an unknown model or
version NOT_FOUND, a session pinned to a removed model version FAILED_PRECONDITION, a full queue or
the rate limit RESOURCE_EXHAUSTED, Redis down UNAVAILABLE, and anything unexpected INTERNAL with a
fixed message (the traceback goes to the log, never the client).

The generated messages register the protocol's names (`inference.*`) in protobuf's default pool, so
a process cannot also import tritonclient.grpc (its copy claims the same names): import this module
only where the server runs (server/transports/grpc.py, imported only when grpc.port is set). Serving it
(port, TLS, limits) is composition: server/transports/grpc.py.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from core.errors import BadRequest, ServiceBusy, ServiceError, StoreUnavailable
from handlers.oip_grpc import grpc_predict_v2_pb2 as pb
from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.auth import Policy
from service.dataplane import BYTES, InferenceRequest, RawInput, RequestedOutput, parse_request, server_metadata
from service.use_cases import UseCases

log = logging.getLogger("inference.grpc")

Message = TypeVar("Message")
_Handler = Callable[[Any, Any, aio.ServicerContext], Awaitable[Message]]

_STATUS_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,  # the session's state (a removed pinned version), not a duplicate
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
}


def grpc_status(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status for a domain error (which carries its HTTP status)."""
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, ServiceBusy):  # queue full, or the session's rate limit
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _STATUS_BY_HTTP.get(error.status, grpc.StatusCode.INTERNAL)


def _answering(method: _Handler[Message]) -> _Handler[Message]:
    """Every RPC ends in a response or a status with a message: never an unhandled exception."""

    @functools.wraps(method)
    async def wrapper(self: InferenceService, request: Any, context: aio.ServicerContext) -> Message:
        started = time.perf_counter()
        metrics = self.metrics
        failure: Exception
        try:
            response = await method(self, request, context)
            metrics.grpc_requests.labels(method.__name__, "OK").inc()
            return response
        except ServiceError as exc:
            failure, code, message = exc, grpc_status(exc), exc.message
        except Exception as exc:  # a bug: logged with its traceback, the client gets a fixed sentence
            log.exception("gRPC %s failed", method.__name__)
            failure, code, message = exc, grpc.StatusCode.INTERNAL, "The server failed on this request; it was logged."
        finally:
            metrics.grpc_latency.labels(method.__name__).observe(time.perf_counter() - started)
        metrics.grpc_requests.labels(method.__name__, code.name).inc()
        if isinstance(failure, StoreUnavailable):
            metrics.store_errors.inc()
        if isinstance(failure, ServiceError):
            log.info("gRPC %s -> %s %s", method.__name__, code.name, failure.code)
            if "Retry-After" in failure.headers:
                context.set_trailing_metadata((("retry-after", failure.headers["Retry-After"]),))
        await context.abort(code, message)  # raises: grpc ends the call with this status
        raise AssertionError("unreachable")

    return wrapper


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, use_cases: UseCases):
        self.auth, self.dataplane, self.metrics = use_cases.auth, use_cases.dataplane, use_cases.metrics

    @_answering
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_answering
    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=(await self.dataplane.readiness()).ready)

    @_answering
    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            ready = await self.dataplane.model_ready(request.name, request.version or None)
        except ServiceError as exc:
            if exc.status not in (403, 404):  # no such model or version, or one this server may not serve
                raise
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=ready)

    @_answering
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**server_metadata())

    @_answering
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        metadata = await self.dataplane.model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
            inputs=[tensor(**item) for item in metadata["inputs"]],
            outputs=[tensor(**item) for item in metadata["outputs"]],
        )

    @_answering
    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        parsed: list[InferenceRequest] = []

        def batch_size() -> int:  # parsed once, after the token's signature is checked
            if not parsed:
                parsed.append(_parse(request))
            return parsed[0].batch_size

        principal = await self.auth.authenticate(Policy.OPTIONAL_SESSION, _authorization(context), cost=batch_size)
        version = request.model_version or None
        await self.dataplane.check_model(request.model_name, version)
        batch_size()
        result = await self.dataplane.infer(principal.session, parsed[0], request.model_name, version)
        return pb.ModelInferResponse(
            model_name=result.model_name,
            model_version=result.model_version,
            id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
                     for o in result.outputs],
            raw_output_contents=[output.raw() for output in result.outputs],
        )


def _authorization(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def _parameters(parameters: Any) -> dict[str, Any]:
    """A protobuf map<string, InferParameter> as plain values."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice else None
    return values


def _parse(request: pb.ModelInferRequest) -> InferenceRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                         "send one per input, in order.", code="invalid_tensor")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise BadRequest("The shared memory extension is not supported; send the data in the request.",
                             code="invalid_input")
        shape = list(tensor.shape)
        if raw:
            inputs.append(RawInput(tensor.name, tensor.datatype, shape, raw=raw[index]))
        else:
            contents = tensor.contents
            elements = list(contents.bytes_contents if tensor.datatype == BYTES else contents.fp32_contents)
            inputs.append(RawInput(tensor.name, tensor.datatype, shape, elements=elements))
    outputs = [RequestedOutput.from_parameters(output.name, _parameters(output.parameters))
               for output in request.outputs]
    return parse_request(request.id, inputs, outputs)
