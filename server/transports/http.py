"""HTTP (and the WebSocket stream) over Tornado: the application of server/app.py on the listening sockets."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import tornado.web

from server.app import http_server, make_app
from server.balance import GuardedHTTPServer, SharedCounts
from server.config import Config

if TYPE_CHECKING:
    from server.server import Server


class HttpTransport:
    def __init__(self, app: tornado.web.Application, config: Config, sockets: list[socket.socket], *,
                 drain: Callable[[float], Awaitable[None]], on_connections: Callable[[int], None],
                 counts: SharedCounts | None = None, slot: int = 0):
        """`drain`: the server's wait for the requests in flight; `on_connections`: told the number of open
        connections; `counts` and `slot`: this is process `slot`
        of several sharing the sockets (see server.balance)."""
        self.app, self.config, self.sockets, self._drain = app, config, sockets, drain
        self.server: GuardedHTTPServer = http_server(app, config, on_connections, counts, slot)
        self.port: int = sockets[0].getsockname()[1]

    async def start(self) -> str:
        self.server.add_sockets(self.sockets)
        return f"http://{self.config.server.host}:{self.port}"

    async def stop(self, grace: float) -> None:
        _serve_backlog(self.server, self.sockets)
        self.server.stop()
        await self._drain(grace)
        await self.server.close_all_connections()


def for_server(server: Server) -> HttpTransport:
    return HttpTransport(make_app(server.config, server.use_cases), server.config, server.sockets,
                         drain=server.drain, on_connections=server.use_cases.metrics.open_connections.set,
                         counts=server.counts, slot=server.slot)


def _serve_backlog(server: GuardedHTTPServer, sockets: list[socket.socket]) -> None:
    """Take the connections the kernel has already completed for the listening sockets.

    Their clients were told "connected" and have sent their requests; closing the sockets would
    reset them. Handed to the server, they are answered like every request in flight. (With
    --processes, a sibling may take some of them: it serves them the same way.)
    """
    for listening in sockets:
        while True:
            try:
                connection, address = listening.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            server.adopt(connection, address)
