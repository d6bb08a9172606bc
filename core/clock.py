"""Time as the API writes it: milliseconds since the epoch, and ISO 8601 UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def iso(ms: int | float) -> str:
    """Milliseconds since the epoch as an ISO 8601 UTC timestamp."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> int:
    return int(time.time() * 1000)
