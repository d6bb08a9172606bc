"""A transport is one module and one line (docs/architecture.md): a throwaway one, written here as a
transport module would be, is added to server.server.TRANSPORTS, and the server builds it from its use
cases, starts it with HTTP, counts its requests in the drain and stops it with the grace it gives."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from server import server as server_module
from server.server import Server
from tests.conftest import LoopThread


# -- the throwaway transport: what a module in server/transports/ would hold ------------------------
class ReadinessLineTransport:
    """Answers each line `ready` on a TCP port with `ready true` or `ready false`, from the dataplane's
    readiness use case: the same answer as /readyz and the OIP's health routes."""

    def __init__(self, server: Server):
        self.use_cases = server.use_cases
        self.stopped_with: float | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"line://127.0.0.1:{self.port}"

    async def stop(self, grace: float) -> None:
        self.stopped_with = grace
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        in_flight = self.use_cases.in_flight
        try:
            while line := await reader.readline():
                if line.strip() != b"ready":
                    writer.write(b"error unknown command\n")
                    continue
                in_flight.enter()  # counted like an HTTP request: the server's drain waits for it
                try:
                    readiness = await self.use_cases.dataplane.readiness()
                finally:
                    in_flight.leave()
                writer.write(b"ready true\n" if readiness.ready else b"ready false\n")
                await writer.drain()
        finally:
            writer.close()


def for_server(server: Server) -> ReadinessLineTransport:
    return ReadinessLineTransport(server)


# -- the test --------------------------------------------------------------------------------------
@pytest.fixture
def with_line_transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(server_module, "TRANSPORTS", (*server_module.TRANSPORTS, for_server))  # the one line
    yield


def ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(line)
        return connection.makefile("rb").readline()


def test_a_transport_added_by_one_line_is_started_served_and_stopped(
        with_line_transport: None, serve: Callable[..., Any], loop_thread: LoopThread) -> None:
    with serve() as running:
        server: Server = running.server
        line = [t for t in server.transports if isinstance(t, ReadinessLineTransport)]
        assert len(line) == 1, "the server builds every transport in TRANSPORTS"
        transport = line[0]
        assert ask(transport.port, b"ready\n") == b"ready true\n"
        assert ask(transport.port, b"hello\n") == b"error unknown command\n"
        # HTTP still answers beside it, from the same use cases.
        assert httpx.get(f"{running.url}/readyz", timeout=10).status_code == 200
        loop_thread.run(server.stop(1.5))
        assert transport.stopped_with == 1.5
        with pytest.raises(OSError):
            ask(transport.port, b"ready\n")
