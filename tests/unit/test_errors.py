"""core/errors.py: the error body is written in one place, and the answers made before any handler
exists (server/balance.py) carry it too."""

from __future__ import annotations

import json

import pytest

from core.errors import error_document, error_json
from server import balance

pytestmark = pytest.mark.unit


def test_the_error_body_has_the_api_shape_and_the_oip_shape() -> None:
    assert json.loads(error_json("not_found", "No such thing.")) == {
        "error": {"code": "not_found", "message": "No such thing."}}
    assert error_document("not_found", "No such thing.", oip=True) == {"error": "No such thing."}


def test_the_prebuilt_malformed_request_answer_carries_the_one_error_body() -> None:
    head, _, body = balance._MALFORMED_ANSWER.partition(b"\r\n\r\n")
    assert json.loads(body) == error_document("malformed_request", "The request is not valid HTTP/1.1.")
    assert b"Content-Length: %d" % len(body) in head
