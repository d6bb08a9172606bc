"""Errors that say what to do, on the real server: every 401 says whether logging in again helps (and
where a key comes from when it does not), and a 405 names the methods the route allows."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
import redis
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from websockets.sync.client import connect as ws_connect

from service.auth import api_key_hash
from tests.conftest import TEST_SECRET, error_code, login, make_config

LOG_IN_AGAIN = "log in again: POST /v1/sessions"
SEND_TOKEN = "Authorization: Bearer <token>"
ADMIN_KEY = "error-messages-admin-key"
LOGIN_KEY = "error-messages-login-key"


class _LongAgo(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 30 * 86400


def _expired_token() -> str:
    """A token this server signed a month ago (past sessions.max_lifetime_seconds)."""
    old = URLSafeTimedSerializer([TEST_SECRET], salt="session-token", signer=_LongAgo)
    return str(old.dumps(uuid.uuid4().hex))


def _refusal(response: httpx.Response, code: str) -> str:
    assert response.status_code == 401 and error_code(response) == code, response.text
    return str(response.json()["error"]["message"])


def test_every_401_for_a_session_says_what_to_do(server, client: httpx.Client) -> None:
    def session_refusal(authorization: str | None, code: str) -> str:
        headers = {"Authorization": authorization} if authorization is not None else {}
        return _refusal(client.get("/v1/session", headers=headers), code)

    # Nothing sent, or not a bearer token: send one, from POST /v1/sessions.
    for authorization, code in [(None, "missing_token"), ("Basic abc", "malformed_token")]:
        message = session_refusal(authorization, code)
        assert SEND_TOKEN in message and "POST /v1/sessions" in message, message
    # A token that will never work again: log in again.
    token = client.post("/v1/sessions").json()["token"]
    payload, stamp, signature = token.split(".")
    tampered = f"{payload}.{stamp}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    for authorization, code in [("Bearer not-a-token", "malformed_token"),
                                (f"Bearer {tampered}", "invalid_signature"),
                                (f"Bearer {_expired_token()}", "token_expired")]:
        assert LOG_IN_AGAIN in session_refusal(authorization, code)
    logged_out = login(client)
    assert client.delete("/v1/session", headers=logged_out).status_code == 204
    assert LOG_IN_AGAIN in session_refusal(logged_out["Authorization"], "session_revoked")
    gone = client.post("/v1/sessions").json()
    redis.Redis.from_url(server.config.redis.url).delete(f"sess:{{{gone['session_id']}}}")
    assert LOG_IN_AGAIN in session_refusal(f"Bearer {gone['token']}", "session_not_found")


def test_the_stream_says_where_its_token_comes_from(server) -> None:
    url = server.url.replace("http://", "ws://") + "/v1/stream"
    with ws_connect(url, open_timeout=30) as socket:
        socket.send(json.dumps({"hello": 1}))
        refusal = json.loads(socket.recv(timeout=30))
    assert refusal["error"]["code"] == "missing_token" and "POST /v1/sessions" in refusal["error"]["message"]


def test_401s_for_keys_name_the_setting_that_lets_a_key_in(serve) -> None:
    keys = {"api_keys": [api_key_hash(LOGIN_KEY)], "admin_api_keys": [api_key_hash(ADMIN_KEY)]}
    with serve(make_config(auth={"secret_keys": [TEST_SECRET], **keys})) as running, running.client() as client:
        for headers, code in [({}, "missing_api_key"), ({"Authorization": "ApiKey wrong"}, "invalid_api_key")]:
            login_message = _refusal(client.post("/v1/sessions", headers=headers), code)
            assert "auth.api_keys" in login_message and "log in again" not in login_message, login_message
            admin_message = _refusal(client.get("/v1/feedback/export", headers=headers), code)
            assert "auth.admin_api_keys" in admin_message and "hash-key --admin" in admin_message, admin_message


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/v1/predict", "POST, OPTIONS"),
    ("PUT", "/healthz", "GET, OPTIONS"),
    ("POST", "/v1/history", "GET, OPTIONS"),
    ("BREW", "/v1/session", "GET, DELETE, OPTIONS"),  # a method Tornado itself does not know
])
def test_405_names_the_allowed_methods(client: httpx.Client, method: str, path: str, allowed: str) -> None:
    response = client.request(method, path)  # no credential: the method is refused before it is looked at
    assert response.status_code == 405 and error_code(response) == "method_not_allowed", response.text
    assert response.headers["Allow"] == allowed
    assert allowed in response.json()["error"]["message"]


def test_405_under_v2_keeps_the_oip_error_form(client: httpx.Client) -> None:
    response = client.delete("/v2/health/ready")
    assert response.status_code == 405 and response.headers["Allow"] == "GET, OPTIONS"
    body = response.json()
    assert isinstance(body["error"], str) and "GET, OPTIONS" in body["error"]
