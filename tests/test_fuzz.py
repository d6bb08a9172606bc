"""Requests generated from the OpenAPI document (schemathesis): whatever a client sends, valid or
not, the server answers without a 5xx, with a documented status, content type and body schema.

Each example logs in afresh (a generated DELETE /v1/session must not end the next example's
session); the number of examples per operation is bounded so the suite stays quick.
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.serialization import serialize_binary

from handlers.openapi import openapi_document
from server.app import ROUTES, route_template

schema = schemathesis.openapi.from_dict(openapi_document([(route_template(p), h) for p, h in ROUTES]))


@schemathesis.serializer("image/bmp")  # the other image types have serializers built in
def _bmp(_context: schemathesis.SerializationContext, value: object) -> dict[str, bytes]:
    return {"data": serialize_binary(value)}


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.url


@schema.parametrize()
# CI runs a fixed sequence of examples (a red main must mean a real regression); elsewhere each run
# explores new ones.
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("CI") == "true")
def test_generated_requests_get_documented_answers_and_no_5xx(case, base_url: str) -> None:
    token = httpx.post(f"{base_url}/v1/sessions", timeout=30).json()["token"]
    headers = {"Authorization": f"Bearer {token}"} if case.operation.path != "/v1/sessions" else {}
    case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)
