"""What the serving processes of `--processes N` share: counts that spread connections evenly
over them, and tell a runner whether the machine has other work.

All processes wait on one shared listening socket, and the kernel wakes each of them for a new
connection: the first to call accept() gets it, and Tornado's own accept loop takes a whole burst.
Clients keep their connections alive for a long time, so an uneven split at connect time stays
uneven: four clients on one process of two leave a core idle. Here a process accepts one
connection per wake-up, and only while it holds no more open connections than the least loaded
of its siblings (the counts live in shared memory); otherwise it steps aside for a moment, and
takes the connection anyway if no sibling did (a sibling may be busy or gone).

The images in flight in each process are shared too: a runner gives a lone request every core
(a wider forward) only when no sibling is working either; otherwise the processes would run more
runtime threads than there are cores, which measured ~20 % slower at 4 clients on 2 cores.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import socket
from collections.abc import Callable
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.iostream

_STEP_ASIDE_SECONDS = 0.002
_MAX_STEPS_ASIDE = 10  # then accept: a connection waits at most ~20 ms for a less loaded process


class SharedCounts:
    """Open connections and images in flight per serving process, in memory shared across fork()
    (create it before forking). Each process writes only its own slot, from its IOLoop thread, so
    no lock is needed; readers may see a count a moment old, which only delays a decision."""

    def __init__(self, processes: int):
        self._connections = multiprocessing.RawArray(ctypes.c_int, processes)
        self._in_flight = multiprocessing.RawArray(ctypes.c_int, processes)

    def add_connection(self, slot: int, delta: int) -> None:
        self._connections[slot] += delta

    def connections(self, slot: int) -> int:
        return self._connections[slot]

    def busier_than_a_sibling(self, slot: int) -> bool:
        return self._connections[slot] > min(self._connections)

    def set_in_flight(self, slot: int, images: int) -> None:
        self._in_flight[slot] = images

    def in_flight_elsewhere(self, slot: int) -> int:
        return sum(self._in_flight) - self._in_flight[slot]

    def reset(self, slot: int) -> None:
        """Forget a process that exited: its connections and work went with it."""
        self._connections[slot] = 0
        self._in_flight[slot] = 0

    def siblings(self, slot: int) -> SiblingView:
        return SiblingView(self, slot)


class SiblingView:
    """One process's view of the others' work: a runner.SiblingLoad."""

    def __init__(self, counts: SharedCounts, slot: int):
        self._counts, self._slot = counts, slot

    def publish(self, in_flight: int) -> None:
        self._counts.set_in_flight(self._slot, in_flight)

    def others(self) -> int:
        return self._counts.in_flight_elsewhere(self._slot)


class BalancedHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer that counts its open connections and accepts as described above."""

    def initialize(self, *args: Any, counts: SharedCounts, slot: int,
                   on_connections: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        """`on_connections` hears this process's count of open connections when it changes."""
        super().initialize(*args, **kwargs)
        self.counts, self.slot = counts, slot
        self._on_connections = on_connections or (lambda _count: None)
        self._accepts: list[_BalancedAccept] = []

    def add_sockets(self, sockets: list[socket.socket]) -> None:
        for listening in sockets:
            accept = _BalancedAccept(self, listening)
            self._accepts.append(accept)
            accept.start()

    def stop(self) -> None:
        """Stop accepting, and close this process's copies of the listening sockets."""
        for accept in self._accepts:
            accept.stop()
        super().stop()

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        self._count_connection(1)
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        self._count_connection(-1)
        super().on_close(server_conn)

    def _count_connection(self, delta: int) -> None:
        self.counts.add_connection(self.slot, delta)
        self._on_connections(self.counts.connections(self.slot))


class _BalancedAccept:
    def __init__(self, server: BalancedHTTPServer, listening: socket.socket):
        self.server, self.listening = server, listening
        self.loop = tornado.ioloop.IOLoop.current()
        self.steps_aside = 0
        self.listening_now = self.stopped = False

    def start(self) -> None:
        if not self.stopped and not self.listening_now:
            self.loop.add_handler(self.listening, self._on_readable, tornado.ioloop.IOLoop.READ)
            self.listening_now = True

    def stop(self) -> None:
        self.stopped = True
        if self.listening_now:
            self.loop.remove_handler(self.listening)
            self.listening_now = False
        self.listening.close()

    def _on_readable(self, _fd: Any, _events: int) -> None:
        if self.server.counts.busier_than_a_sibling(self.server.slot) and self.steps_aside < _MAX_STEPS_ASIDE:
            # Level-triggered: stop listening for a moment, or we would spin on the same event.
            self.steps_aside += 1
            self.loop.remove_handler(self.listening)
            self.listening_now = False
            self.loop.call_later(_STEP_ASIDE_SECONDS, self.start)
            return
        self.steps_aside = 0
        try:
            connection, address = self.listening.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return  # a sibling took it, or the client gave up while queued
        except OSError:
            return  # the socket was closed: shutting down
        adopt_connection(self.server, connection, address)


def adopt_connection(server: tornado.httpserver.HTTPServer, connection: socket.socket, address: Any) -> None:
    """Serve a connection accepted outside the server's own accept loop the way that loop would:
    non-blocking, with the server's buffer limit and read size."""
    connection.setblocking(False)
    stream = tornado.iostream.IOStream(connection, max_buffer_size=server.max_buffer_size,
                                       read_chunk_size=server.read_chunk_size)
    server.handle_stream(stream, address)
