"""Probes and the API description: public routes."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from handlers.base import BaseHandler
from handlers.openapi import openapi_document
from service.auth import Policy


class LivenessHandler(BaseHandler):
    """GET /healthz: the process and its IOLoop answer."""

    auth_policy = Policy.PUBLIC

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadinessHandler(BaseHandler):
    """GET /readyz: the model is loaded and the session store answers."""

    auth_policy = Policy.PUBLIC

    async def get(self) -> None:
        readiness = await self.dataplane.readiness()
        if not readiness.ready:
            self.set_header("Retry-After", "1")
        self.write_json({"status": "ready" if readiness.ready else "not_ready", "checks": readiness.checks},
                        status=200 if readiness.ready else 503)


class OpenAPIHandler(BaseHandler):
    """GET /openapi.json"""

    auth_policy = Policy.PUBLIC

    def get(self) -> None:
        # The app's own route table, as routed: each API route carries its template as its route_name.
        routes = [(rule.target_kwargs["route_name"], rule.target) for rule in self.application.wildcard_router.rules
                  if "route_name" in rule.target_kwargs]
        self.write_json(openapi_document(routes, legacy_predict=self.http_settings.legacy_predict))


class MetricsHandler(BaseHandler):
    """GET /metrics: Prometheus text format. Public like the probes (scrapers carry no session);
    keep it on an internal network or behind the proxy's allow-list."""

    auth_policy = Policy.PUBLIC

    async def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.use_cases.metrics.exposition())
