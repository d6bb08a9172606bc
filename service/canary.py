"""Canary routing, as pure functions: which version a request runs, and the activation body's share.

A canary serves a version to a share of the sessions: a session is assigned by its canary slot (or
a stable hash of its id) and the canary's version, so it keeps one version for as long as the canary
lasts, and the others keep the active version. A session's pinned `model_version` wins over both.
"""

from __future__ import annotations

import hashlib
from typing import Any

from core.clock import iso
from core.errors import ServiceError, quoted, quoted_names
from core.options import Options
from core.session import Session
from sessions.model_registry import Canary


class InvalidTrafficPercent(ServiceError):
    status = 422
    code = "invalid_traffic_percent"


TRAFFIC_PERCENT = (1, 100)


def parse_traffic_percent(body: dict[str, Any]) -> int:
    """The share of sessions an activation serves (100 unless the body says): 422 outside 1..100."""
    unknown = set(body) - {"traffic_percent"}
    low, high = TRAFFIC_PERCENT
    if unknown:
        raise InvalidTrafficPercent(f"Unknown field(s) {quoted_names(unknown)}; the body takes traffic_percent.")
    percent = body.get("traffic_percent", high)
    if isinstance(percent, bool) or not isinstance(percent, int) or not low <= percent <= high:
        raise InvalidTrafficPercent(f"traffic_percent must be an integer from {low} to {high}, got {quoted(percent)}.")
    return percent


def in_canary(session_id: str, canary: Canary, slot: int | None = None) -> bool:
    """Whether the canary serves this session: stable for the session and the canary's version.

    `slot`: the session's canary slot (sessions.store.canary_slot), shifted by a hash of the version so
    that each canary takes other sessions, and exactly its share of any 100 consecutive new ones. A
    session older than slots falls back to a hash of its id and the version."""
    if slot is not None:
        shift = int.from_bytes(hashlib.sha256(canary.version.encode()).digest()[:8], "big")
        return (slot + shift) % 100 < canary.traffic_percent
    digest = hashlib.sha256(f"{session_id}:{canary.version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < canary.traffic_percent


def choose_version(canary: Canary | None, session: Session | None, options: Options) -> str | None:
    """The version a request runs: the session's pinned one, else `canary`'s where the canary serves
    the session, else None (the active version). Anonymous requests (no session) run the active one."""
    if options.model_version is not None:
        return options.model_version
    if canary is not None and session is not None and in_canary(session.id, canary, session.canary_slot):
        return canary.version
    return None


def canary_view(canary: Canary) -> dict[str, Any]:
    return {"version": canary.version, "traffic_percent": canary.traffic_percent, "baseline": canary.baseline,
            "started_at": iso(canary.started_at_ms)}
