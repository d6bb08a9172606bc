"""handlers/openapi.py derives its routes, methods and security from the route table and each route's
auth_policy; only prose is written by hand. A route added without prose still appears, secured."""

from __future__ import annotations

import pytest

from handlers.base import BaseHandler
from handlers.openapi import openapi_document, security
from server.app import ROUTES, route_template
from service.auth import Policy

pytestmark = pytest.mark.unit

TABLE = [(route_template(pattern), handler) for pattern, handler in ROUTES]


class UndescribedHandler(BaseHandler):
    """Reads something new, for admins."""

    auth_policy = Policy.ADMIN

    async def get(self) -> None: ...

    async def delete(self) -> None: ...


def test_a_route_added_without_prose_appears_with_its_methods_and_security() -> None:
    paths = openapi_document([*TABLE, ("/v1/undescribed/{name}", UndescribedHandler)])["paths"]
    item = paths["/v1/undescribed/{name}"]
    assert set(item) == {"get", "delete"}
    for operation in item.values():
        assert operation["security"] == [{"adminApiKey": []}]
        assert operation["summary"] == "Reads something new, for admins."
        assert "400" in operation["responses"]  # a malformed request is documented for every operation


def test_each_operation_has_the_security_of_its_routes_policy() -> None:
    for anonymous in (True, False):
        paths = openapi_document(TABLE, legacy_predict=anonymous)["paths"]
        for template, handler in TABLE:
            if template not in paths:
                assert template == "/predict" and not anonymous
                continue
            for operation in paths[template].values():
                assert operation["security"][:len(security(handler.auth_policy, anonymous=anonymous))] == \
                    security(handler.auth_policy, anonymous=anonymous), template


def test_a_public_route_needs_no_credential_and_a_token_optional_one_only_where_anonymous_is_on() -> None:
    assert security(Policy.PUBLIC, anonymous=False) == [{}]
    assert security(Policy.OPTIONAL_SESSION, anonymous=True) == [{}, {"bearer": []}]
    assert security(Policy.OPTIONAL_SESSION, anonymous=False) == [{"bearer": []}]
