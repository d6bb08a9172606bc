"""Every route is authenticated, explicitly token-optional or explicitly public, and /openapi.json tells
the truth."""

from __future__ import annotations

import importlib.metadata
import json
import re

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from tornado.websocket import WebSocketHandler
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from core.errors import BadOptions
from core.options import Options
from handlers.base import BaseHandler
from server.app import ROUTES, route_template
from service.auth import Policy
from tests.conftest import CAT_JPEG, COFFEE_JPEG, login, make_config

# Changing these sets is a security decision: a new public or token-optional route is added on purpose.
PUBLIC_ROUTES = {"/v1/sessions", "/predict", "/healthz", "/readyz", "/openapi.json", "/metrics",
                 "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}",
                 "/v2/models/{model}/versions/{version}", "/v2/models/{model}/ready",
                 "/v2/models/{model}/versions/{version}/ready"}
# A token when sent (and then it must be good), anonymous otherwise where anonymous inference is allowed.
TOKEN_OPTIONAL_ROUTES = {"/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"}
# WebSocket routes: a browser cannot send headers on the upgrade, so these authenticate with the
# first frame instead and close with 1008 without a token (checked below and in test_stream.py).
WEBSOCKET_ROUTES = {"/v1/stream"}
METHODS = ("get", "post", "put", "patch", "delete")


def template(pattern: str) -> str:
    return route_template(pattern)


def example_path(pattern: str) -> str:
    return re.sub(r"\{\w+\}", "1-0", template(pattern))


def implemented(handler: type[BaseHandler]) -> list[str]:
    return [m for m in METHODS if getattr(handler, m) is not getattr(BaseHandler, m)]


def test_every_route_is_authenticated_or_explicitly_public(client: httpx.Client) -> None:
    for pattern, handler in ROUTES:
        path = example_path(pattern)
        assert issubclass(handler, BaseHandler)
        assert "prepare" not in vars(handler), f"{handler.__name__} overrides the one prepare()"
        policy = handler.auth_policy
        if policy is Policy.PUBLIC:
            assert template(pattern) in PUBLIC_ROUTES, f"{pattern} is public but not in PUBLIC_ROUTES"
            continue
        if policy is Policy.OPTIONAL_SESSION:
            assert template(pattern) in TOKEN_OPTIONAL_ROUTES, f"{pattern} takes no token but is not listed"
            continue  # checked in test_token_optional_routes_refuse_bad_tokens_and_anonymous_calls_where_off
        if policy is Policy.STREAM:
            assert issubclass(handler, WebSocketHandler) and template(pattern) in WEBSOCKET_ROUTES, pattern
            assert_stream_needs_a_token(client.base_url.copy_with(scheme="ws").join(path))
            continue
        for method in implemented(handler):
            response = client.request(method.upper(), path, content=b"{}",
                                      headers={"Content-Type": "application/json"})
            assert response.status_code == 401, (method, path)
            # Admin routes take an admin API key instead of a session token.
            expected = "missing_api_key" if policy is Policy.ADMIN else "missing_token"
            assert response.json()["error"]["code"] == expected, (method, path)


def assert_stream_needs_a_token(url: httpx.URL) -> None:
    """Without a token, an image sent on the socket is refused: policy-violation close, no result."""
    with ws_connect(str(url), open_timeout=10) as socket:
        socket.send(CAT_JPEG)
        assert json.loads(socket.recv(timeout=10))["error"]["code"] == "missing_token"
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_token_optional_routes_refuse_bad_tokens_and_anonymous_calls_where_off(client: httpx.Client, serve) -> None:
    optional = [(pattern, handler) for pattern, handler in ROUTES if handler.auth_policy is Policy.OPTIONAL_SESSION]
    assert {template(pattern) for pattern, _ in optional} == TOKEN_OPTIONAL_ROUTES
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}
    for pattern, handler in optional:
        for method in implemented(handler):
            path = example_path(pattern)
            # A token that is sent must be good, whatever the anonymous setting.
            forged = client.request(method.upper(), path, json=body, headers={"Authorization": "Bearer x.y.z"})
            assert forged.status_code == 401, (method, path)
            assert set(forged.json()) == {"error"} and isinstance(forged.json()["error"], str)
    with serve(make_config(http={"legacy_predict": False})) as closed, closed.client() as other:
        for pattern, handler in optional:
            for method in implemented(handler):
                refused = other.request(method.upper(), example_path(pattern), json=body)
                assert refused.status_code == 401, (method, pattern)
                assert "anonymous" in refused.json()["error"]


def test_the_app_serves_only_api_routes_and_public_static_files(server) -> None:
    from handlers.web import WebAssetHandler
    from server.app import make_app

    app = make_app(server.config, server.use_cases)
    api = {pattern for pattern, _ in ROUTES}
    for rule in app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.removesuffix("$")
        assert pattern in api or rule.target is WebAssetHandler, pattern


def test_page_has_security_headers_and_cors_is_opt_in(client: httpx.Client, serve) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["Referrer-Policy"] == "no-referrer"
    assert client.get("/static/client/client.js").status_code == 200
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    refused = client.options("/v1/predict", headers=preflight)
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers
    from tests.conftest import make_config

    with serve(make_config(http={"cors_origins": ["https://app.example"]})) as cors, cors.client() as other:
        allowed = other.options("/v1/predict", headers=preflight)
        assert allowed.status_code == 204 and allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
        assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
        # Routes with named path parameters too (found by the fuzz test: it used to be a 500).
        infer = other.options("/v2/models/efficientnet_lite0/versions/1/infer", headers=preflight)
        assert infer.status_code == 204 and "POST" in infer.headers["Access-Control-Allow-Methods"]
        got = other.get("/healthz", headers={"Origin": "https://app.example"})
        assert "X-Request-ID" in got.headers["Access-Control-Expose-Headers"]
        assert "Access-Control-Allow-Origin" not in other.get("/healthz", headers={"Origin": "https://evil.example"}).headers


def test_openapi_lists_exactly_the_routes_and_methods(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {template(pattern) for pattern, _ in ROUTES}
    for pattern, handler in ROUTES:
        assert set(document["paths"][template(pattern)]) == set(implemented(handler)), pattern
    Draft202012Validator.check_schema(document["components"]["schemas"]["Options"])


def test_openapi_states_the_version_and_option_ranges_the_server_enforces(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    # One version: the installed distribution's (pyproject.toml), in /openapi.json and the protocol's /v2.
    version = importlib.metadata.version("session-inference-server")
    assert document["info"]["version"] == client.get("/v2").json()["version"] == version
    options = document["components"]["schemas"]["Options"]["properties"]
    overrides = {p["name"]: p["schema"] for p in document["paths"]["/v1/predict"]["post"]["parameters"]}
    widest = {"resize": options["resize"]["maximum"], "crop": options["crop"]["minimum"]}  # crop <= resize holds
    for name in ("resize", "crop", "top_k"):
        low, high = options[name]["minimum"], options[name]["maximum"]
        assert (overrides[name]["minimum"], overrides[name]["maximum"]) == (low, high), name
        assert options[name]["default"] == getattr(Options(), name), name
        for value in (low, high):
            Options().merged({**widest, name: value})
        for value in (low - 1, high + 1):
            with pytest.raises(BadOptions, match=f"between {low} and {high}"):
                Options().merged({name: value})


@pytest.fixture(scope="module")
def schema_validator(server):
    with server.client() as http:
        document = http.get("/openapi.json").json()
    registry = Registry().with_resource("urn:api", Resource.from_contents(document,
                                                                        default_specification=DRAFT202012))

    def validate(instance, path: str, method: str, status: int) -> None:
        responses = document["paths"][path][method]["responses"]
        assert str(status) in responses, f"{method} {path} answered {status}, undocumented"
        content = responses[str(status)].get("content", {}).get("application/json")
        if content and "schema" in content:
            pointer = content["schema"]["$ref"].removeprefix("#")
            Draft202012Validator({"$ref": f"urn:api#{pointer}"}, registry=registry).validate(instance)

    return validate


def test_real_responses_match_the_documented_schemas(client: httpx.Client, schema_validator) -> None:
    def check(response: httpx.Response, path: str, method: str) -> None:
        body = response.json() if response.content else None
        schema_validator(body, path, method, response.status_code)

    login_response = client.post("/v1/sessions", json={"options": {"top_k": 2}})
    check(login_response, "/v1/sessions", "post")
    auth = {"Authorization": f"Bearer {login_response.json()['token']}"}
    prediction = client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
    check(prediction, "/v1/predict", "post")
    check(client.post("/v1/predict", headers={**auth, "Content-Type": "image/png"}, content=b"x"),
          "/v1/predict", "post")
    check(client.post("/v1/preprocess", headers={**auth, "Content-Type": "image/jpeg", "Accept": "application/json"},
                      content=CAT_JPEG), "/v1/preprocess", "post")
    check(client.get("/v1/session", headers=auth), "/v1/session", "get")
    check(client.get("/v1/models", headers=auth), "/v1/models", "get")
    check(client.get("/v1/session/options", headers=auth), "/v1/session/options", "get")
    check(client.patch("/v1/session/options", headers=auth, json={"top_k": 4}), "/v1/session/options", "patch")
    check(client.patch("/v1/session/options", headers=auth, json={"top_k": 40}), "/v1/session/options", "patch")
    check(client.get("/v1/history", headers=auth), "/v1/history", "get")
    check(client.get("/v1/history", headers=auth, params={"limit": 0}), "/v1/history", "get")
    check(client.get(f"/v1/history/{prediction.json()['id']}", headers=auth), "/v1/history/{id}", "get")
    check(client.get("/v1/history/1-0", headers=auth), "/v1/history/{id}", "get")
    check(client.get("/v1/session", headers={"Authorization": "Bearer x.y.z"}), "/v1/session", "get")
    check(client.post("/predict", files={"image": ("c.jpg", COFFEE_JPEG, "image/jpeg")}), "/predict", "post")
    check(client.get("/healthz"), "/healthz", "get")
    check(client.get("/readyz"), "/readyz", "get")
    assert client.delete("/v1/session", headers=login(client)).status_code == 204
