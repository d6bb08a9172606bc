"""The transports a serving process runs: each is one module here with a `for_server(server)` factory,
listed once in server.server.TRANSPORTS."""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    async def start(self) -> str:
        """Start taking requests; return where, for the server's "ready on" log line."""
        ...

    async def stop(self, grace: float) -> None:
        """Take no new requests, give those in flight up to `grace` seconds, then close."""
        ...
