"""Metrics and request logs."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import httpx
import pytest

from server.observability import JsonFormatter
from sessions.tokens import TokenSigner
from tests.conftest import CAT_JPEG, TEST_SECRET, login, wait_for


def scrape(client: httpx.Client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metric(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix))


def test_metrics_move_with_traffic(client: httpx.Client) -> None:
    before = scrape(client)
    auth = login(client)
    for _ in range(3):
        response = client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert response.status_code == 200
    client.get("/v1/session", headers={"Authorization": "Bearer x.y.z"})
    after = scrape(client)
    ok = 'inference_http_requests_total{method="POST",route="/v1/predict",status="200"}'
    assert after.get(ok, 0) - before.get(ok, 0) == 3
    unauthorized = 'inference_http_requests_total{method="GET",route="/v1/session",status="401"}'
    assert after.get(unauthorized, 0) - before.get(unauthorized, 0) == 1
    forwards = "inference_model_forward_seconds_count"
    assert metric(after, forwards) - metric(before, forwards) >= 3
    assert after['inference_batch_size_bucket{le="1.0"}'] >= 3
    assert metric(after, 'inference_http_request_duration_seconds_count{route="/v1/predict"}') >= 3
    assert "inference_active_sessions" in after  # counted in the background (test_hostile_requests)
    assert "inference_queue_depth" in after and "inference_store_errors_total" in after


def test_store_errors_are_counted(serve) -> None:
    from tests.conftest import make_config

    with serve(make_config("redis://127.0.0.1:1/0", redis={"connect_timeout_seconds": 0.3})) as server, \
            server.client() as client:
        client.post("/v1/sessions")
        assert scrape(client)["inference_store_errors_total"] == 1


def test_json_request_log_lines(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inference.access")
    response = client.post("/v1/sessions")
    session_id = response.json()["session_id"]
    client.get("/v1/session", headers={"Authorization": f"Bearer {response.json()['token']}",
                                       "X-Request-ID": "json-log-1"})
    # Tornado logs a request after it has sent the response, so the line can land just after the reply.
    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", None) == "json-log-1"]

    assert wait_for(logged, timeout=5)
    record = logged()[0]
    line = json.loads(JsonFormatter().format(record))
    assert line["route"] == "/v1/session" and line["status"] == 200 and line["method"] == "GET"
    # The session's ref, the name the feedback export gives it: not a plain hash anyone can recompute.
    ref = TokenSigner([TEST_SECRET], 60).session_ref(session_id)
    assert line["session"] == ref and session_id not in json.dumps(line)
    assert hashlib.sha256(session_id.encode()).hexdigest()[:12] not in json.dumps(line)
    assert line["duration_ms"] >= 0 and line["level"] == "info"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["ts"])


def test_health_probes_are_logged_at_debug_and_other_requests_at_info(client: httpx.Client,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="inference.access")
    paths = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v1/models"]
    for path in paths:
        assert client.get(path, headers={"X-Request-ID": f"probe-log{path}"}).status_code < 500  # 401 for /v1/models

    def levels() -> dict[str, int]:  # by path, the access line's third word
        return {path: r.levelno for r in caplog.records if r.name == "inference.access"
                and (path := r.getMessage().split()[2]) in paths}

    assert wait_for(lambda: len(levels()) == len(paths), timeout=5)
    assert levels() == {"/healthz": logging.DEBUG, "/readyz": logging.DEBUG, "/v2/health/live": logging.DEBUG,
                        "/v2/health/ready": logging.DEBUG, "/v1/models": logging.INFO}
