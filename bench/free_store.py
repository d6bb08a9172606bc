"""Our server with its per-predict Redis calls answered from memory: an experiment, never a setup.

    python -m bench.free_store --port N   (the arguments of `python -m server`)

The server's session store is wrapped (FreeStore, handed to the composition root): `touch` goes to
Redis once per session and then returns that session from memory, and `record` only encodes the entry
as the real one does. Everything else (HTTP, tokens, the runner, metrics, logs) is the real server.
`bench.cpu_split --free-store` runs it beside the real one to show what the server would reach if both
round trips cost nothing. It breaks the product's promises (a logout or an options change is not seen,
nothing is recorded), which is why it lives here and not behind a setting.
"""

from __future__ import annotations

import json
from typing import Any

from core.session import Session
from server import cli
from sessions.store import SessionStore
from sessions.tokens import VerifiedToken


class FreeStore:
    """The real store, with `touch` answered from memory after a session's first and `record` encoding only;
    every other call goes to the real one."""

    def __init__(self, store: SessionStore):
        self._store = store
        self._sessions: dict[str, Session] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def touch(self, token: VerifiedToken, **kwargs: Any) -> Session:
        session = self._sessions.get(token.session_id)
        if session is None:
            session = self._sessions[token.session_id] = await self._store.touch(token, **kwargs)
        return session

    async def record(self, session: Session, entry: dict[str, Any],
                     idempotency_key: str | None = None) -> tuple[str, bool]:
        json.dumps(entry, separators=(",", ":"))  # the real record's encoding cost stays
        return "0-1", False


if __name__ == "__main__":
    raise SystemExit(cli.main(wrap_store=FreeStore))  # type: ignore[arg-type]  # a SessionStore by delegation
