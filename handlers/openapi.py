"""The OpenAPI 3.1 description of every route. A test checks it against the app's routes and
validates real responses against these schemas, so it cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import tornado.web

from core.images import MEDIA_TYPES
from core.options import MODEL_NAME, MODEL_VERSION, FieldSpec, describe_fields
from service.auth import Policy
from service.canary import TRAFFIC_PERCENT
from service.dataplane import SERVER_VERSION
from service.history import DEFAULT_PAGE, MAX_PAGE


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


# A session's requests over sessions.rate_limit_per_minute (predict, preprocess, feedback, the stream's images).
_RATE_LIMITED = _error("Over the session's rate limit, sessions.rate_limit_per_minute (rate_limited); see "
                       "Retry-After.")


# The purge's and the export's time range: which feedback, by when it was given.
_FEEDBACK_TIME_RANGE = [
    {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Feedback given at or after this time: ISO 8601 (UTC unless it says) or epoch ms."},
    {"name": "until", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Feedback given before this time: ISO 8601 or epoch ms."},
]


def _json_body(schema: dict[str, Any], *, required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _integer(bounds: tuple[int, int], **extra: Any) -> dict[str, Any]:
    low, high = bounds
    return {"type": "integer", "minimum": low, "maximum": high, **extra}


_HISTORY_ID = {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}  # a Redis stream id
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
# Pinning: a session may pin the active version, the canary's, or one an admin marked pinnable.
_PINNABLE = {"type": "boolean", "description": "An admin let sessions pin this version (PUT .../pinnable); the "
                                              "active version and the canary's may be pinned regardless."}
_PINNABLE_ANSWER = {"type": "object", "required": ["name", "version", "pinnable"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "pinnable": _PINNABLE}}
_NOT_PINNABLE = _error("model_version names a version that is neither active, the canary's, nor marked pinnable "
                       "(model_version_not_pinnable).")


# The options' schemas come from core.options (each field's type, default, range, choices, pattern), which
# validates them: the document cannot drift from it. Only prose is written here, and a field needs none.
_OPTION_PROSE = {
    "crop": "Must not exceed resize.",
    "model": "The model the session runs (GET /v1/models lists them); absent or null: the server's default. "
             "Choosing a model starts resize, crop, interpolation, mean and std from its defaults, except those "
             "given in the same change.",
    "model_version": "Pins the session to this version of its model (see GET /v1/models); absent or null: the "
                     "active version.",
}
# As query text a list of numbers is written comma-separated.
_OVERRIDE_PROSE = {"mean": "three comma-separated numbers", "std": "three comma-separated positive numbers"}


def _option_value(spec: FieldSpec, *, nullable: bool) -> dict[str, Any]:
    """The JSON schema of one option's value (`nullable`: where JSON null is accepted)."""
    schema: dict[str, Any]
    if spec.choices is not None:
        schema = {"enum": [*spec.choices, *([None] if nullable else [])]}
    elif spec.kind == "numbers":
        schema = {"type": "array", "items": {"type": "number"}, "minItems": spec.length, "maxItems": spec.length}
    else:
        schema = {"type": [spec.kind, "null"] if nullable else spec.kind}
    if spec.range is not None:
        schema["minimum"], schema["maximum"] = spec.range
    if spec.pattern is not None:
        schema["pattern"] = spec.pattern
    return schema


def options_schema(specs: Iterable[FieldSpec], prose: Mapping[str, str] = _OPTION_PROSE) -> dict[str, Any]:
    """The Options object: every field of `specs` with its constraints and default, plus any prose."""
    properties = {}
    for spec in specs:
        schema = _option_value(spec, nullable=spec.nullable)
        if spec.default is not None:
            schema["default"] = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        if spec.name in prose:
            schema["description"] = prose[spec.name]
        properties[spec.name] = schema
    return {"type": "object", "additionalProperties": False, "properties": properties}


def option_overrides(specs: Iterable[FieldSpec],
                     prose: Mapping[str, str] = _OVERRIDE_PROSE) -> list[dict[str, Any]]:
    """The query parameters that override each option for one request, as Options.with_query parses them."""
    parameters = []
    for spec in specs:
        if spec.kind == "numbers":
            schema = {"type": "string", "description": prose.get(spec.name, f"{spec.length} comma-separated numbers")}
        else:
            schema = _option_value(spec, nullable=False)  # query text has no null
        parameters.append({"name": spec.name, "in": "query", "required": False, "schema": schema,
                           "description": "Overrides the session's option for this request only."})
    return parameters


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                               "message": {"type": "string"}},
            }
        },
    },
    "Options": options_schema(describe_fields()),
    "Login": {
        "type": "object",
        "required": ["token", "session_id", "expires_at", "options"],
        "properties": {
            "token": {"type": "string"},
            "session_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "expires_at": {"type": "string", "format": "date-time"},
            "options": _ref("Options"),
        },
    },
    "Session": {
        "type": "object",
        "required": ["session_id", "created_at", "expires_at", "options", "predictions"],
        "properties": {
            "session_id": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": "string", "format": "date-time"},
            "options": _ref("Options"),
            "predictions": {"type": "integer", "minimum": 0},
        },
    },
    "OptionsResponse": {"type": "object", "required": ["options"], "properties": {"options": _ref("Options")}},
    "ClassScore": {
        "type": "object",
        "required": ["class_index", "label", "score"],
        "properties": {
            "class_index": {"type": "integer", "minimum": 0},
            "label": {"type": "string"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
    },
    "Feedback": {
        "type": "object",
        "description": "The label the session says is right, replacing any earlier feedback on the item.",
        "required": ["class_index", "label", "comment", "created_at"],
        "properties": {
            "class_index": {"type": "integer", "minimum": 0},
            "label": {"type": "string"},
            "comment": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "FeedbackRequest": {
        "type": "object",
        "required": ["label"],
        "additionalProperties": False,
        "properties": {
            "label": {"oneOf": [{"type": "integer", "minimum": 0},
                                {"type": "string", "description": "A label name, case-insensitive."}]},
            "comment": {"type": ["string", "null"],
                        "description": "At most feedback.max_comment_bytes (2000) bytes in UTF-8."},
        },
    },
    "CapturedImage": {
        "type": "object",
        "description": "The image as sent, kept where capture is on (GET /v1/history/{id}/image).",
        "required": ["sha256", "content_type", "size"],
        "properties": {"sha256": _SHA256, "content_type": {"type": "string"},
                       "size": {"type": "integer", "minimum": 1}},
    },
    "Quality": {
        "type": "object",
        "required": ["count", "agreement"],
        "properties": {
            "count": {"type": "integer", "minimum": 0,
                      "description": "Feedback on this version's predictions: as `feedback`, from the sessions it "
                                     "was assigned to (the number to promote a canary on); as `pinned_feedback`, "
                                     "from sessions that pinned it themselves."},
            "agreement": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                          "description": "The share of that feedback whose label is the prediction's top-1; "
                                         "null without feedback."},
        },
    },
    "HistoryItem": {
        "type": "object",
        "required": ["id", "created_at", "predicted_class", "label", "top_k", "options", "model", "image",
                     "feedback"],
        "properties": {
            "id": _HISTORY_ID,
            "created_at": {"type": "string", "format": "date-time"},
            "predicted_class": {"type": "integer", "minimum": 0},
            "label": {"type": "string"},
            "top_k": {"type": "array", "items": _ref("ClassScore"), "minItems": 1},
            "options": _ref("Options"),
            "model": {"type": "object", "required": ["name", "version"],
                      "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
            "image": {"oneOf": [_ref("CapturedImage"), {"type": "null"}]},
            "feedback": {"oneOf": [_ref("Feedback"), {"type": "null"}]},
        },
    },
    "Prediction": {
        "allOf": [_ref("HistoryItem")],
        "type": "object",
        "required": ["timing_ms"],
        "properties": {"timing_ms": {"type": "object", "additionalProperties": {"type": "number"}}},
    },
    "HistoryPage": {
        "type": "object",
        "required": ["items", "next"],
        "properties": {
            "items": {"type": "array", "items": _ref("HistoryItem")},
            "next": {"type": ["string", "null"]},
        },
    },
    "PreprocessedTensor": {
        "type": "object",
        "required": ["dtype", "byte_order", "shape", "data", "options"],
        "properties": {
            "dtype": {"const": "float32"},
            "byte_order": {"const": "little"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 3, "maxItems": 3,
                      "description": "(3, crop, crop): channels, height, width."},
            "data": {"type": "string", "contentEncoding": "base64",
                     "description": "The tensor's bytes in C order, base64-encoded."},
            "options": _ref("Options"),
        },
    },
    "ModelVersion": {
        "type": "object",
        "required": ["version", "sha256", "size", "uploaded_at", "activated_at", "active"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string", "pattern": MODEL_VERSION.pattern},
            "sha256": _SHA256,
            "size": {"type": "integer", "minimum": 1, "description": "Bytes of the state_dict file."},
            "uploaded_at": {"type": "string", "format": "date-time"},
            "activated_at": {"type": ["string", "null"], "format": "date-time",
                             "description": "The last activation; null if never activated."},
            "active": {"type": "boolean"},
            "pinnable": _PINNABLE,
            "feedback": _ref("Quality"),
            "pinned_feedback": _ref("Quality"),
        },
    },
    "ConfiguredWeights": {
        "type": "object",
        "description": "The weights named in the config, active again on every replica (a rollback).",
        "required": ["version", "sha256", "configured", "activated_at", "active"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "sha256": _SHA256,
            "configured": {"const": True},
            "activated_at": {"type": "string", "format": "date-time"},
            "active": {"const": True},
        },
    },
    "Canary": {
        "type": "object",
        "description": "A version serving a share of the sessions (by each session's canary slot); the "
                       "others keep the baseline, the active version.",
        "required": ["version", "traffic_percent", "baseline", "started_at"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "traffic_percent": _integer(TRAFFIC_PERCENT),
            "baseline": {"type": "string", "description": "The version the other sessions keep."},
            "started_at": {"type": "string", "format": "date-time"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["default", "models"],
        "properties": {"default": {"type": "string", "description": "The model a session runs unless it "
                                                                    "chooses one (the `model` option)."},
                       "models": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "default", "format", "classes", "input", "output", "preprocess", "loaded",
                         "active_version", "serving_version", "canary", "configured", "versions"],
            "properties": {
                "name": {"type": "string"},
                "default": {"type": "boolean"},
                "format": {"enum": ["torchvision", "onnx", "torchscript"]},
                "architecture": {"type": ["string", "null"]},
                "classes": {"type": "integer", "minimum": 1},
                "input": {"type": "object", "required": ["layout", "size"],
                          "properties": {"layout": {"enum": ["NCHW", "NHWC"]},
                                         "size": {"type": ["integer", "null"],
                                                  "description": "The one side the model takes; null: any."}}},
                "output": {"enum": ["logits", "probabilities"]},
                "preprocess": {"type": "object", "description": "The options a session choosing this model starts "
                                                                "from (resize, crop, interpolation, mean, std)."},
                "description": {"type": "string"},
                "loaded": {"type": "boolean", "description": "Whether the answering process holds a version of it "
                                                             "on its runtime now."},
                "configured": {"type": "object", "description": "The weights named in the config.",
                               "required": ["version", "sha256", "pinnable", "feedback", "pinned_feedback"],
                               "properties": {"version": {"type": "string"}, "sha256": _SHA256,
                                              "pinnable": _PINNABLE, "feedback": _ref("Quality"),
                                              "pinned_feedback": _ref("Quality")}},
                "active_version": {"type": ["string", "null"],
                                   "description": "null: no version was activated; the configured weights serve."},
                "serving_version": {"type": "string", "description": "What the answering replica runs now."},
                "canary": {"oneOf": [_ref("Canary"), {"type": "null"}]},
                "versions": {"type": "array", "items": _ref("ModelVersion")},
            },
        }}},
    },
    "PlainPrediction": {
        "type": "object",
        "required": ["predicted_class"],
        "properties": {"predicted_class": {"type": "integer", "minimum": 0}},
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    # The Open Inference Protocol (KServe V2): its own shapes, as its clients expect them.
    "OipError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "OipServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}},
    },
    "OipTensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                       "shape": {"type": "array", "items": {"type": "integer", "minimum": -1},
                                 "description": "-1 marks a variable dimension."}},
    },
    "OipModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                       "platform": {"type": "string"},
                       "inputs": {"type": "array", "items": _ref("OipTensorMetadata")},
                       "outputs": {"type": "array", "items": _ref("OipTensorMetadata")}},
    },
    "OipTensor": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"}, "datatype": {"enum": ["BYTES", "FP32"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
            "data": {"type": "array", "description": "Row-major values (JSON form); BYTES inputs as base64 text."},
        },
    },
    "OipInferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": _ref("OipTensor"), "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"const": "probabilities"}, "parameters": {
                    "type": "object", "properties": {"classification": {"type": "integer", "minimum": 1},
                                                     "binary_data": {"type": "boolean"}}}}}},
        },
    },
    "OipInferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string"}, "outputs": {"type": "array", "items": _ref("OipTensor")}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {"status": {"enum": ["ready", "not_ready"]},
                       "checks": {"type": "object", "additionalProperties": {"type": "string"}}},
    },
}

_IMAGE_CONTENT = {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES}
_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["image"],
                       "properties": {"image": {"type": "string", "format": "binary"}}}
        },
        **_IMAGE_CONTENT,
    },
}

_OPTION_OVERRIDES = option_overrides(describe_fields())

def _oip_error(description: str) -> dict[str, Any]:
    return _json(_ref("OipError"), description)


_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def _oip_paths() -> dict[str, Any]:
    """The Open Inference Protocol's REST routes; each model route also takes /versions/{version}."""
    unknown = {"404": _oip_error("Unknown model or version.")}
    metadata = {"get": {"summary": "Model metadata: its inputs and outputs (-1: variable).",
                        "responses": {"200": _json(_ref("OipModelMetadata"), "Metadata."), **unknown}}}
    ready = {"get": {"summary": "Model readiness.",
                     "responses": {"200": _json({"type": "object", "required": ["ready"], "properties": {
                         "name": {"type": "string"}, "ready": {"const": True}}}, "Ready."),
                                   "503": _json({"type": "object", "required": ["ready"], "properties": {
                                       "name": {"type": "string"}, "ready": {"const": False}}},
                                       "Not ready: the server is shutting down."), **unknown}}}
    infer = {"post": {
        "summary": "Infer (Open Inference Protocol): BYTES images under the session's options, or an FP32 "
                   "preprocessed tensor; with a token each image is recorded in the session's history.",
        "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                        "description": "Binary tensor data extension: the JSON header's length; the tensors' "
                                       "bytes follow it."}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("OipInferRequest")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "Outputs: JSON, or with binary outputs a JSON header of "
                                             "Inference-Header-Content-Length bytes followed by the tensors.",
                              "content": {"application/json": {"schema": _ref("OipInferResponse")},
                                          "application/octet-stream": {}}},
                      "400": _oip_error("Malformed request, unknown input, wrong datatype or shape."),
                      "401": _oip_error("Missing (where anonymous inference is off), invalid, expired or "
                                        "revoked token."),
                      "403": _oip_error("The session's pinned model_version is not pinnable."),
                      "404": _oip_error("Unknown model or version."),
                      "409": _oip_error("The session's pinned model_version was removed."),
                      "415": _oip_error("Compressed body."),
                      "422": _oip_error("A BYTES element is not a readable image."),
                      "429": _oip_error("Over the session's rate limit; see Retry-After."),
                      "500": _oip_error("The model failed."),
                      "503": _oip_error("Queue full or session store unavailable; see Retry-After.")},
    }}
    paths: dict[str, Any] = {
        "/v2": {"get": {"summary": "Server metadata and the protocol extensions served.",
                        "responses": {"200": _json(_ref("OipServerMetadata"), "Metadata.")}}},
        "/v2/health/live": {"get": {"summary": "Liveness.", "responses": {"200": _json(
            {"type": "object", "required": ["live"], "properties": {"live": {"const": True}}}, "Alive.")}}},
        "/v2/health/ready": {"get": {"summary": "Readiness: model loaded and store answering.",
                                     "responses": {"200": _json({"type": "object", "required": ["ready"],
                                                                 "properties": {"ready": {"type": "boolean"}}},
                                                                "Ready."),
                                                   "503": _json({"type": "object", "required": ["ready"]},
                                                                "Not ready.")}}},
    }
    for suffix, item in (("", metadata), ("/ready", ready), ("/infer", infer)):
        paths[f"/v2/models/{{model}}{suffix}"] = {
            method: {**operation, "parameters": [_MODEL, *operation.get("parameters", [])]}
            for method, operation in item.items()}
        paths[f"/v2/models/{{model}}/versions/{{version}}{suffix}"] = {
            method: {**operation, "parameters": [_MODEL, _VERSION, *operation.get("parameters", [])]}
            for method, operation in item.items()}
    return paths


_HISTORY_ID_PARAMETER = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_AUTH_ERRORS = {"401": _error("Missing, invalid, expired or revoked token."),
                "503": _error("The session store is unavailable.")}
# What a route with a JSON body may answer about the body itself (BaseHandler.json_object).
_JSON_BODY_ERRORS = {"400": _error("Malformed JSON, or not an object."), "415": _error("The body is not JSON.")}
Security = list[dict[str, list[str]]]  # OpenAPI: any one of the listed credential sets
_BEARER: Security = [{"bearer": []}]
_ADMIN: Security = [{"adminApiKey": []}]
_ADMIN_ERRORS = {"401": _error("Missing or wrong admin API key."),
                 "403": _error("The admin API is off (auth.admin_api_keys is empty)."),
                 "404": _error("Another model name, or no such version."),
                 "503": _error("The store is unavailable.")}
_VERSION_PARAMETERS = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "The served model's name (GET /v1/models)."},
    {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "pattern": MODEL_VERSION.pattern}},
]


def _document_malformed_requests(paths: dict[str, Any]) -> None:
    """Any request can be malformed at the HTTP layer (a bad Content-Length, a header that does not
    parse): every operation documents the 400 the server then answers. That answer comes before the
    route is known, so under /v2 it may have the /v1 error shape instead of the protocol's."""
    for path, item in paths.items():
        for operation in item.values():
            responses = operation["responses"]
            if not path.startswith("/v2"):
                responses.setdefault("400", _error("Malformed HTTP request."))
                continue
            description = responses.get("400", {}).get("description", "Malformed request.")
            responses["400"] = _json({"oneOf": [_ref("OipError"), _ref("Error")]},
                                     f"{description} A request that is not valid HTTP gets the /v1 error shape.")


def _prose() -> dict[str, Any]:
    """What is written by hand for each route: summaries, parameters, bodies and answers, by route and
    method. Which routes and methods there are, and their security, come from the route table."""
    paths: dict[str, Any] = {
        "/v1/sessions": {"post": {
            "summary": "Log in: create a session and get its token.",
            "requestBody": _json_body({"type": "object", "properties": {"options": _ref("Options")}}, required=False),
            "responses": {"201": _json(_ref("Login"), "Session created."),
                          **_JSON_BODY_ERRORS,
                          "401": _error("API key missing or wrong (where API keys are configured)."),
                          "403": _NOT_PINNABLE,
                          "422": _error("Invalid options."),
                          "503": _error("The session store is unavailable.")},
        }},
        "/v1/session": {
            "get": {"summary": "The current session.",
                    "responses": {"200": _json(_ref("Session"), "The session."), **_AUTH_ERRORS}},
            "delete": {"summary": "Log out; the token stops working. With erase=true the session's history, "
                                  "feedback, captured images and Idempotency-Keys are erased too (an image another "
                                  "session also sent stays for that one); the token is revoked last, so after a 503 "
                                  "retrying the same request finishes the erase.",
                       "parameters": [{"name": "erase", "in": "query", "required": False,
                                       "schema": {"enum": ["true", "false"], "default": "false"}}],
                       "responses": {"204": {"description": "Logged out (and erased)."},
                                     "400": _error("erase is neither true nor false."), **_AUTH_ERRORS}},
        },
        "/v1/session/options": {
            "get": {"summary": "The session's options.",
                    "responses": {"200": _json(_ref("OptionsResponse"), "Options."), **_AUTH_ERRORS}},
            "patch": {
                "summary": "Merge the given options into the session's options.",
                "requestBody": _json_body(_ref("Options"), required=True),
                "responses": {"200": _json(_ref("OptionsResponse"), "The merged options."),
                              **_JSON_BODY_ERRORS,
                              "403": _NOT_PINNABLE,
                              "422": _error("Unknown option or bad value; the message names it."),
                              **_AUTH_ERRORS},
            },
        },
        "/v1/predict": {"post": {
            "summary": "Classify one image under the session's options and record it in the history.",
            "parameters": _OPTION_OVERRIDES,
            "requestBody": _IMAGE_BODY,
            "responses": {"200": _json(_ref("Prediction"), "Classified and recorded."),
                          "400": _error("Malformed multipart body or no 'image' field."),
                          "413": _error("The body is over http.max_body_bytes."),
                          "415": _error("Unsupported Content-Type."),
                          "422": _error("Not a readable image, too many pixels, or bad option override."),
                          "403": _NOT_PINNABLE,
                          "409": _error("The session's pinned model_version was removed."),
                          "500": _error("The model failed on this image."),
                          "401": _AUTH_ERRORS["401"],
                          "429": _RATE_LIMITED,
                          "503": _error("Queue full or session store unavailable; see Retry-After.")},
        }},
        "/v1/preprocess": {"post": {
            "summary": "The tensor the model would see for this image under the session's options "
                       "(nothing is classified or recorded).",
            "parameters": _OPTION_OVERRIDES,
            "requestBody": _IMAGE_BODY,
            "responses": {"200": {"description": "The float32 (3, crop, crop) tensor: NumPy .npy by default, "
                                                 "JSON with a base64 payload for `Accept: application/json`.",
                                  "content": {"application/x-npy": {"schema": {"type": "string",
                                                                               "format": "binary"}},
                                              "application/json": {"schema": _ref("PreprocessedTensor")}}},
                          "400": _error("Malformed multipart body or no 'image' field."),
                          "413": _error("The body is over http.max_body_bytes."),
                          "415": _error("Unsupported Content-Type."),
                          "422": _error("Not a readable image, too many pixels, or bad option override."),
                          "401": _AUTH_ERRORS["401"],
                          "429": _RATE_LIMITED,
                          "503": _error("Queue full or session store unavailable; see Retry-After.")},
        }},
        "/v1/stream": {"get": {
            "summary": "WebSocket predict stream (upgrade). Authenticate with `Authorization: Bearer <token>` on "
                       "the upgrade or a first text frame {\"token\": \"<token>\"}; then send images as binary "
                       "frames, each optionally preceded by a text frame {\"ref\": ..., \"options\": {...}}; "
                       "one JSON frame comes back per image, in completion order: {\"type\": \"result\", "
                       "\"ref\", \"seq\", \"result\": Prediction} or {\"type\": \"error\", \"ref\", \"seq\", "
                       "\"status\", \"error\": {\"code\", \"message\"}}. A missing or bad token closes the socket "
                       "with code 1008 and the error code as the reason. See docs/streaming.md.",
            "responses": {"101": {"description": "Switching to the WebSocket protocol."},
                          "400": {"description": "Not a WebSocket upgrade request."},
                          "403": {"description": "Cross-origin upgrade from an origin not in http.cors_origins."}},
        }},
        "/v1/history": {"get": {
            "summary": "The session's predictions, newest first.",
            "parameters": [
                {"name": "limit", "in": "query", "required": False,
                 "schema": _integer((1, MAX_PAGE), default=DEFAULT_PAGE)},
                {"name": "before", "in": "query", "required": False,
                 "schema": _HISTORY_ID,
                 "description": "The `next` of the previous page."},
            ],
            "responses": {"200": _json(_ref("HistoryPage"), "One page."),
                          "400": _error("Bad limit or before."), **_AUTH_ERRORS},
        }},
        "/v1/history/{id}": {"get": {
            "summary": "One history item.",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("HistoryItem"), "The item."),
                          "404": _error("No such item in this session."), **_AUTH_ERRORS},
        }},
        "/v1/history/{id}/image": {"get": {
            "summary": "The image of one of the session's predictions, byte for byte as sent, where capture is on "
                       "(capture.enabled) and its retention has not ended.",
            "parameters": [_HISTORY_ID_PARAMETER],
            "responses": {"200": {"description": "The image, with the media type its bytes have.",
                                  "content": _IMAGE_CONTENT},
                          "404": _error("No such item in this session (history_item_not_found), or its image was "
                                        "not captured or is past its retention (image_not_found)."),
                          **_AUTH_ERRORS},
        }},
        "/v1/history/{id}/feedback": {
            "put": {
                "summary": "Say which label is right for one of the session's predictions (a class index or a "
                           "label name); a repeat replaces the earlier feedback.",
                "parameters": [_HISTORY_ID_PARAMETER],
                "requestBody": _json_body(_ref("FeedbackRequest"), required=True),
                "responses": {"200": _json(_ref("HistoryItem"), "The item, with its feedback."),
                              **_JSON_BODY_ERRORS,
                              "404": _error("No such item in this session."),
                              "409": _error("The session gave feedback on history.max_entries predictions already "
                                            "(feedback_limit_reached)."),
                              "422": _error("Unknown label, index out of range, or comment too long."),
                              "429": _error("Over sessions.rate_limit_per_minute (rate_limited), or over "
                                            "feedback.daily_limit for its API key or address "
                                            "(feedback_rate_limited); see Retry-After."),
                              **_AUTH_ERRORS},
            },
            "delete": {
                "summary": "Withdraw the feedback on one of the session's predictions.",
                "parameters": [_HISTORY_ID_PARAMETER],
                "responses": {"204": {"description": "No feedback on the item any more."},
                              "404": _error("No such item in this session."), **_AUTH_ERRORS},
            },
        },
        "/v1/feedback": {"delete": {
            "summary": "Purge feedback: every record given in a time range, or one session's (by the name the "
                       "export gives it), or one session's in a time range. See docs/api.md#purging-feedback.",
            "parameters": [
                *_FEEDBACK_TIME_RANGE,
                {"name": "session", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                 "description": "The session's name as the export's `session` field gives it."},
            ],
            "responses": {"200": _json({"type": "object", "required": ["deleted"],
                                        "properties": {"deleted": {"type": "integer", "minimum": 0}}},
                                       "How many records were removed."),
                          "400": _error("A bad or unknown parameter, or none (invalid_parameter)."),
                          **{code: _ADMIN_ERRORS[code] for code in ("401", "403", "503")}},
        }},
        "/v1/feedback/export": {"get": {
            "summary": "The training export: every piece of feedback with its prediction, model version, options and "
                       "captured image, oldest feedback first, streamed as a WebDataset tar (members <key>.json, "
                       "<key>.cls and <key>.<ext>) or as JSON lines. See docs/api.md#the-training-export.",
            "parameters": [
                *_FEEDBACK_TIME_RANGE,
                {"name": "model", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": MODEL_NAME.pattern},
                 "description": "Only feedback on predictions of this model."},
                {"name": "model_version", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": MODEL_VERSION.pattern},
                 "description": "Only feedback on predictions of this model version."},
                {"name": "format", "in": "query", "required": False,
                 "schema": {"enum": ["tar", "jsonl"], "default": "tar"}},
            ],
            "responses": {"200": {"description": "The export, streamed.",
                                  "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                                              "application/x-ndjson": {"schema": {"type": "string"}}}},
                          "400": _error("A bad or unknown parameter (invalid_parameter)."),
                          **{code: _ADMIN_ERRORS[code] for code in ("401", "403", "503")}},
        }},
        "/v1/models": {"get": {
            "summary": "Every served model (the default first): its format, classes, input, preprocessing "
                       "defaults, and its versions with their hash, size and activation time.",
            "responses": {"200": _json(_ref("ModelList"), "Versions."), **_AUTH_ERRORS},
        }},
        "/v1/models/{name}": {
            "put": {
                "summary": "Add a model: the body is the model's folder (model.toml, its labels, its file) as a tar "
                           "archive, gzip-compressed or not (`tar -C folder -czf - .`), checked against "
                           "X-Content-SHA256. The folder is unpacked (regular files and folders only, within "
                           "models.max_archive_members and models.max_archive_bytes), its manifest read, its file "
                           "checked as a published version is, exported behind the accuracy guard, moved into the "
                           "model repository and served at once, on every replica.",
                "parameters": [_VERSION_PARAMETERS[0],
                               {"name": "X-Content-SHA256", "in": "header", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}],
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"201": _json({"type": "object", "required": ["name", "default", "classes", "versions"],
                                            "description": "The model as GET /v1/models lists it."}, "Added."),
                              "400": _error("Missing or wrong checksum, empty body, bad model name."),
                              "409": _error("A model of that name is served already (model_exists)."),
                              "413": _error("Over models.max_upload_bytes."),
                              "422": _error("Not a safe tar archive of files and folders within the limits "
                                            "(invalid_archive), a manifest that cannot be served (invalid_model, "
                                            "its sentence), or a file that differs from the manifest, e.g. its "
                                            "class count (invalid_weights)."),
                              **_ADMIN_ERRORS},
            },
            "delete": {
                "summary": "Delete a model added over HTTP, on every replica, with its folder and its versions' files; "
                           "sessions that chose it get 409 model_not_served from then on.",
                "parameters": [_VERSION_PARAMETERS[0]],
                "responses": {"204": {"description": "Deleted."}, **_ADMIN_ERRORS,
                              "404": _error("No served model has this name (model_not_found)."),
                              "409": _error("The model is [model]'s or the default one (model_not_deletable).")},
            },
        },
        "/v1/models/{name}/labels": {"get": {
            "summary": "The class labels of the version serving everyone, index i naming class i: what a "
                       "correction's label (PUT /v1/history/{id}/feedback) takes. Answers a matching "
                       "If-None-Match with 304.",
            "parameters": [_VERSION_PARAMETERS[0]],
            "responses": {"200": _json({"type": "object", "required": ["name", "version", "labels"], "properties": {
                "name": {"type": "string"}, "version": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}}}}, "Labels."),
                "304": {"description": "Not modified (If-None-Match)."},
                "404": _error("No served model has this name (model_not_found)."), **_AUTH_ERRORS},
        }},
        "/v1/models/{name}/versions/{version}": {
            "put": {
                "summary": "Publish a version: the body is the model's kind of file (a PyTorch state_dict from "
                           "torch.save for a torchvision model, an ONNX file, or a TorchScript file), checked "
                           "against X-Content-SHA256, loaded, checked against the model's class count and input "
                           "and run once on a fixed input before it is stored. Not active until activated.",
                "parameters": [*_VERSION_PARAMETERS,
                               {"name": "X-Content-SHA256", "in": "header", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}],
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"201": _json(_ref("ModelVersion"), "Stored and validated."),
                              "400": _error("Missing or wrong checksum, empty body, bad version name."),
                              "409": _error("The version exists already (versions are immutable)."),
                              "413": _error("Over models.max_upload_bytes."),
                              "422": _error("Not a file of the model's kind, another class count or input shape "
                                            "than the model's (the message says which), or it fails the test "
                                            "forward (invalid_weights)."),
                              **_ADMIN_ERRORS},
            },
            "delete": {
                "summary": "Remove a version that is not active; sessions pinned to it get 409 from then on.",
                "parameters": _VERSION_PARAMETERS,
                "responses": {"204": {"description": "Removed."},
                              "409": _error("The version is active."), **_ADMIN_ERRORS},
            },
        },
        "/v1/models/{name}/versions/{version}:activate": {"post": {
            "summary": "Serve this version to new requests, on every replica (Redis pub/sub); requests in "
                       "flight finish on the weights they started with. The configured weights' version "
                       "rolls back to them. With traffic_percent below 100, a canary: the version serves that "
                       "share of the sessions (each keeps its version) and the others keep the active one; an "
                       "activation at 100 ends it. A session's pinned model_version wins over both.",
            "parameters": _VERSION_PARAMETERS,
            "requestBody": _json_body({"type": "object", "additionalProperties": False,
                                       "properties": {"traffic_percent": _integer(TRAFFIC_PERCENT, default=100)}},
                                      required=False),
            "responses": {"200": _json({"oneOf": [_ref("ModelVersion"), _ref("ConfiguredWeights"), _ref("Canary")]},
                                       "Active: a published version, the configured weights again, or a canary."),
                          **_JSON_BODY_ERRORS,
                          "409": _error("The version's file is missing from the store, or a canary of the "
                                        "active version."),
                          "422": _error("The stored file no longer loads (invalid_weights), or traffic_percent is "
                                        "not an integer from 1 to 100 (invalid_traffic_percent)."), **_ADMIN_ERRORS},
        }},
        "/v1/models/{name}/versions/{version}/pinnable": {
            "put": {
                "summary": "Let sessions pin this version (published, or the configured weights'); the active "
                           "version and the canary's may always be pinned.",
                "parameters": _VERSION_PARAMETERS,
                "responses": {"200": _json(_PINNABLE_ANSWER, "Pinnable."), **_ADMIN_ERRORS},
            },
            "delete": {
                "summary": "No longer let sessions pin this version: sessions pinned to it are refused "
                           "(403 model_version_not_pinnable) unless it is active or the canary's.",
                "parameters": _VERSION_PARAMETERS,
                "responses": {"200": _json(_PINNABLE_ANSWER, "Not pinnable."), **_ADMIN_ERRORS},
            },
        },
        "/healthz": {"get": {"summary": "Liveness.",
                             "responses": {"200": _json(_ref("Health"), "Alive.")}}},
        "/readyz": {"get": {"summary": "Readiness: model loaded and store answering.",
                            "responses": {"200": _json(_ref("Readiness"), "Ready."),
                                          "503": _json(_ref("Readiness"), "Not ready; checks say why.")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format).",
                             "responses": {"200": {"description": "Metrics.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document.",
                                  "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                                        "content": {"application/json": {}}}}}},
    }
    paths.update(_oip_paths())
    paths["/predict"] = {"post": {
        "summary": "Session-less classification, as in the simple Flask example.",
        "requestBody": _IMAGE_BODY,
        "responses": {"200": _json(_ref("PlainPrediction"), "The top-1 class index."),
                      "400": _error("Malformed multipart body or no 'image' field."),
                      "413": _error("Body too large."),
                      "415": _error("Unsupported Content-Type."),
                      "422": _error("Not a readable image."),
                      "503": _error("Queue full.")},
    }}
    return paths


def security(policy: Policy, *, anonymous: bool) -> Security:
    """The OpenAPI security a route's auth_policy means (`{}`: no credential needed)."""
    by_policy: dict[Policy, Security] = {
        Policy.PUBLIC: [{}],
        Policy.SESSION: _BEARER,
        Policy.STREAM: _BEARER,
        Policy.OPTIONAL_SESSION: [{}, *_BEARER] if anonymous else _BEARER,
        Policy.ADMIN: _ADMIN,
        Policy.SESSION_OR_ADMIN: [*_BEARER, *_ADMIN],
    }
    return by_policy[policy]


# Credentials a route checks beyond its policy: login takes an API key where auth.api_keys is set.
_ALSO_ACCEPTS: dict[str, Security] = {"/v1/sessions": [{"apiKey": []}]}
# Routed always, documented only where http.legacy_predict is on (else it answers 404).
_LEGACY_ROUTES = {"/predict"}
_METHODS = ("get", "post", "put", "patch", "delete")


def _methods(handler: type[tornado.web.RequestHandler]) -> list[str]:
    return [method for method in _METHODS
            if getattr(handler, method) is not getattr(tornado.web.RequestHandler, method)]


def _undescribed(handler: type[tornado.web.RequestHandler]) -> dict[str, Any]:
    """A route without prose here still appears, with its handler's first docstring line."""
    summary = (handler.__doc__ or handler.__name__).strip().splitlines()[0]
    return {"summary": summary, "responses": {"200": {"description": "Not described yet."},
                                              "default": _error("An error.")}}


def openapi_document(routes: Iterable[tuple[str, type[tornado.web.RequestHandler]]], *,
                     legacy_predict: bool = True) -> dict[str, Any]:
    """The document for `routes`, (template, handler) as the app routes them: each route's methods and
    security come from its handler and its auth_policy, the rest from the prose above."""
    prose = _prose()
    paths: dict[str, Any] = {}
    for template, handler in routes:
        if template in _LEGACY_ROUTES and not legacy_predict:
            continue
        described = prose.get(template, {})
        policy = getattr(handler, "auth_policy", Policy.SESSION)
        required = security(policy, anonymous=legacy_predict) + _ALSO_ACCEPTS.get(template, [])
        paths[template] = {method: {**(described.get(method) or _undescribed(handler)), "security": required}
                           for method in _methods(handler)}
    _document_malformed_requests(paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Session-aware inference server", "version": SERVER_VERSION,
                 "description": "Image classification with sessions: log in once, predict with your "
                                "own options, read your history back."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The token from POST /v1/sessions."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "Authorization",
                           "description": "'ApiKey <key>', where auth.api_keys is configured."},
                "adminApiKey": {"type": "apiKey", "in": "header", "name": "Authorization",
                                "description": "'ApiKey <key>' with a key listed in auth.admin_api_keys."},
            },
        },
    }
