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

Every serving process, one or several, also guards its connections (GuardedHTTPServer): past
`http.max_connections` open ones a new connection is answered with a short 503 and closed, and a
write the peer does not take within `http.write_timeout_seconds` drops its connection, so a client
that never reads cannot make the server hold its answers. A connection is counted from accept to
the close of its socket, WebSocket streams included (they leave Tornado's HTTP bookkeeping at the
upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.iostream

from core.errors import error_json

log = logging.getLogger("inference.http")

_STEP_ASIDE_SECONDS = 0.002
_MAX_STEPS_ASIDE = 10  # then accept: a connection waits at most ~20 ms for a less loaded process
_REFUSED_LOG_SECONDS = 10.0  # refusals past the cap are logged at most this often, with their count
_DRAIN_ON_REFUSAL_BYTES = 64 * 1024


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


class GuardedHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer with a cap on its open connections and a deadline on writes that make no progress (see above).

    Connections come in through `adopt`: from Tornado's accept loop, or from an accept made
    elsewhere (the shutdown backlog, server/cli.py)."""

    # Tornado's `initialize` is the constructor of its Configurable classes (HTTPServer(...) calls it), and
    # a subclass's constructor takes arguments of its own; mypy exempts __init__ from the override check but
    # cannot know that `initialize` is one.
    def initialize(self, *args: Any, max_connections: int, write_timeout: float,  # type: ignore[override]
                   on_connections: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        """`on_connections` hears this process's count of open connections when it changes."""
        super().initialize(*args, **kwargs)
        if self.ssl_options is not None:
            raise ValueError("GuardedHTTPServer serves plain HTTP; terminate TLS in front of it")
        self.max_connections, self.write_timeout = max_connections, write_timeout
        self.open_connections = 0
        self._on_connections = on_connections or (lambda _count: None)
        self._refused = 0
        self._refused_logged_at = -_REFUSED_LOG_SECONDS

    def _handle_connection(self, connection: socket.socket, address: Any) -> None:
        # TCPServer's accept callback: its own version wraps the socket in a plain IOStream.
        self.adopt(connection, address)

    def adopt(self, connection: socket.socket, address: Any) -> None:
        """Serve an accepted connection, or refuse it when this process is at its cap."""
        connection.setblocking(False)
        if self.open_connections >= self.max_connections:
            self._refuse(connection)
            return
        stream = _GuardedIOStream(connection, on_close=lambda: self._count_connection(-1),
                                  write_timeout=self.write_timeout, max_buffer_size=self.max_buffer_size,
                                  read_chunk_size=self.read_chunk_size)
        self._count_connection(1)
        self.handle_stream(stream, address)

    def _refuse(self, connection: socket.socket) -> None:
        refuse_connection(connection, self.max_connections)
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSED_LOG_SECONDS:
            log.warning("refused %d connection(s): %d open, the limit (http.max_connections)",
                        self._refused, self.open_connections)
            self._refused, self._refused_logged_at = 0, now

    def _count_connection(self, delta: int) -> None:
        self.open_connections += delta
        self._on_connections(self.open_connections)


class BalancedHTTPServer(GuardedHTTPServer):
    """A GuardedHTTPServer that shares its count of open connections and accepts as described above."""

    # A constructor with arguments of its own, as GuardedHTTPServer.initialize says.
    def initialize(self, *args: Any, counts: SharedCounts, slot: int, **kwargs: Any) -> None:  # type: ignore[override]
        self.counts, self.slot = counts, slot
        super().initialize(*args, **kwargs)
        self._accepts: list[_BalancedAccept] = []

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for listening in sockets:
            accept = _BalancedAccept(self, listening)
            self._accepts.append(accept)
            accept.start()

    def stop(self) -> None:
        """Stop accepting, and close this process's copies of the listening sockets."""
        for accept in self._accepts:
            accept.stop()
        super().stop()

    def _count_connection(self, delta: int) -> None:
        self.counts.add_connection(self.slot, delta)
        super()._count_connection(delta)


# A request that is not valid HTTP/1.1 (a garbage Content-Length, a header that does not parse) is
# answered by Tornado itself with these bytes, before any handler exists; clients get the JSON error
# every other answer carries instead (the route is unknown, so it has the /v1 shape).
_TORNADO_MALFORMED_ANSWER = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_MALFORMED_BODY = error_json("malformed_request", "The request is not valid HTTP/1.1.").encode()
_MALFORMED_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=UTF-8\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_MALFORMED_BODY) + _MALFORMED_BODY)


class _GuardedIOStream(tornado.iostream.IOStream):
    """An IOStream that reports its close, and drops its connection when a write makes no progress
    for the write timeout (a slow reader keeps its connection; one that stopped reading does not).

    Tornado reads a connection's next request only once the previous response is flushed, and a
    WebSocket stream stops reading while its writes are pending (handlers/stream.py), so the
    writes waiting here belong to one answer at a time."""

    def __init__(self, connection: socket.socket, *, on_close: Callable[[], None], write_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._on_close, self._write_timeout = on_close, write_timeout

    def write(self, data: bytes | memoryview) -> asyncio.Future[None]:
        if data == _TORNADO_MALFORMED_ANSWER:
            data = _MALFORMED_ANSWER
        future = super().write(data)
        if not future.done():  # the socket's buffer is full: the peer has to read for this to finish
            self._arm_write_timer(future)
        return future

    def _arm_write_timer(self, future: asyncio.Future[None]) -> None:
        written = self._total_write_done_index
        timer = self.io_loop.call_later(self._write_timeout, self._write_timed_out, future, written)
        future.add_done_callback(lambda _done: self.io_loop.remove_timeout(timer))

    def _write_timed_out(self, future: asyncio.Future[None], written: int) -> None:
        if future.done() or self.closed():
            return
        if self._total_write_done_index > written:  # the peer reads, only slowly: give it another period
            self._arm_write_timer(future)
            return
        log.info("dropped a connection that did not read its answer within %g s (http.write_timeout_seconds)",
                 self._write_timeout)
        # An abortive close (reset): the kernel drops what it still holds for the peer, too.
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close_fd(self) -> None:
        # Called once, when the stream closes (by either side, or at a timeout).
        super().close_fd()
        self._on_close()


def refuse_connection(connection: socket.socket, limit: int) -> None:
    """Answer a connection over the cap with a 503 `too_many_connections` and close it, without
    blocking: the answer fits in a fresh socket's send buffer. What the client already sent is read
    first, so that the close is a FIN rather than a reset, which could discard the answer."""
    body = error_json("too_many_connections", f"This server process has {limit} open connections, its limit "
                      "(http.max_connections); retry shortly.")
    answer = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=UTF-8\r\n"
              f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}")
    with contextlib.suppress(OSError):
        connection.send(answer.encode())
        drained = 0
        while drained < _DRAIN_ON_REFUSAL_BYTES:
            chunk = connection.recv(_DRAIN_ON_REFUSAL_BYTES)
            if not chunk:
                break
            drained += len(chunk)
    connection.close()


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
        self.server.adopt(connection, address)
