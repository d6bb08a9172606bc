"""Our server with its per-predict Redis calls answered from memory: an experiment, never a setup.

    python -m bench.free_store --port N   (the arguments of `python -m server`)

`SessionStore.touch` goes to Redis once per session and then returns that session from memory, and
`SessionStore.record` only encodes the entry as the real one does. Everything else (HTTP, tokens,
the runner, metrics, logs) is the real server. `bench.cpu_split --free-store` runs it beside the
real one to show what the server would reach if both round trips cost nothing. It breaks the
product's promises (a logout or an options change is not seen, nothing is recorded), which is why
it lives here and not behind a setting.
"""

from __future__ import annotations

import json
from typing import Any

from core.session import Session
from server import cli
from sessions.store import SessionStore
from sessions.tokens import VerifiedToken

_real_touch = SessionStore.touch
_sessions: dict[str, Session] = {}


async def _touch_once(self: SessionStore, token: VerifiedToken, **kwargs: Any) -> Session:
    session = _sessions.get(token.session_id)
    if session is None:
        session = _sessions[token.session_id] = await _real_touch(self, token, **kwargs)
    return session


async def _record_nowhere(self: SessionStore, session: Session, entry: dict[str, Any],
                          idempotency_key: str | None = None) -> tuple[str, bool]:
    json.dumps(entry, separators=(",", ":"))  # the real record's encoding cost stays
    return "0-1", False


if __name__ == "__main__":
    SessionStore.touch = _touch_once  # type: ignore[method-assign]
    SessionStore.record = _record_nowhere  # type: ignore[method-assign]
    raise SystemExit(cli.main())
