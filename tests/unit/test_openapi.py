"""handlers/openapi.py derives its routes, methods and security from the route table and each route's
auth_policy, and the option schema from core.options; only prose is written by hand. A route added without
prose still appears, secured; an option added without prose appears with its range or choices."""

from __future__ import annotations

import dataclasses

import pytest

from core.options import CHOICES, INT_RANGES, Options, describe_fields
from handlers.base import BaseHandler
from handlers.openapi import openapi_document, option_overrides, options_schema, security
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


@dataclasses.dataclass(frozen=True)
class WiderOptions(Options):
    """Options with two fields added, and no prose written for them."""

    sharpen: int = 2
    border: str = "reflect"


def test_an_option_added_without_prose_appears_with_its_range_or_choices() -> None:
    specs = describe_fields(WiderOptions, ranges={**INT_RANGES, "sharpen": (0, 9)},
                            choices={**CHOICES, "border": ("reflect", "constant")})
    properties = options_schema(specs)["properties"]
    assert properties["sharpen"] == {"type": "integer", "minimum": 0, "maximum": 9, "default": 2}
    assert properties["border"] == {"enum": ["reflect", "constant"], "default": "reflect"}
    overrides = {parameter["name"]: parameter["schema"] for parameter in option_overrides(specs)}
    assert overrides["sharpen"] == {"type": "integer", "minimum": 0, "maximum": 9}
    assert overrides["border"] == {"enum": ["reflect", "constant"]}


def test_the_document_states_every_option_with_what_validation_accepts() -> None:
    document = openapi_document(TABLE)
    properties = document["components"]["schemas"]["Options"]["properties"]
    assert list(properties) == [field.name for field in dataclasses.fields(Options)]
    for name, (low, high) in INT_RANGES.items():
        assert (properties[name]["minimum"], properties[name]["maximum"]) == (low, high)
    for name, choices in CHOICES.items():
        assert properties[name]["enum"] == list(choices)
    assert properties["model_version"]["type"] == ["string", "null"]  # null unpins
    assert properties["mean"]["default"] == list(Options().mean)
    predict = document["paths"]["/v1/predict"]["post"]["parameters"]
    assert {parameter["name"] for parameter in predict if parameter["in"] == "query"} >= set(properties)
