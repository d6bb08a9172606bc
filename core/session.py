"""A session as every layer sees it: its id, options and counters (sessions.store keeps it in Redis)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from core.clock import iso
from core.options import Options

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(frozen=True)
class Session:
    id: str
    created_at_ms: int
    expires_at_ms: int
    deadline_ms: int
    options: Options
    predictions: int
    # Set when this request repeats an idempotency key already answered: that answer's history id.
    replay_of: str | None = None
    # 0..99, dealt at login from a shared counter (canary_slot): where the session falls in canaries.
    # None for sessions created before slots existed.
    canary_slot: int | None = None
    # Who logged in (owner_name of the API key or client address the login was charged to), for limits
    # shared by that caller's sessions. None for sessions created before owners were kept.
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "created_at": iso(self.created_at_ms),
            "expires_at": iso(self.expires_at_ms),
            "options": self.options.to_dict(),
            "predictions": self.predictions,
        }
