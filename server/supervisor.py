"""The fork-and-restart supervisor: `server.processes` serving processes share the listening sockets;
one that crashes is restarted within a RestartBudget, a crash loop stops the server."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import time
from collections.abc import Callable

from inference.model import ModelLoadError
from server.balance import SharedCounts
from server.config import Config
from server.observability import forget_process_metrics, share_metrics_across_processes
from server.server import StoreWrapper, serve

log = logging.getLogger("inference.server")
EXIT_MODEL_LOAD_FAILED = 3  # a child that cannot load the model is not restarted: it would fail again
_POLL_SECONDS = 0.05  # while a restart waits out its pause: how soon a stop or another exit is seen


class RestartBudget:
    """How many crashed serving processes the supervisor restarts, and after what pause.

    At most `max_restarts` restarts (of any slot) per sliding `window` seconds: crashes spread over
    days (an OOM kill now and then) are all restarted, a crash loop stops the server. Each slot's
    pause doubles from `first_pause` up to `max_pause` while it keeps crashing, and starts over once
    it has run a whole window without crashing."""

    def __init__(self, max_restarts: int, window: float, first_pause: float = 0.5, max_pause: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_restarts, self.window = max_restarts, window
        self.first_pause, self.max_pause = first_pause, max_pause
        self.clock = clock
        self._restarts: collections.deque[float] = collections.deque()  # when, within the window
        self._last: dict[int, tuple[float, float]] = {}  # slot -> (last crash, its pause)

    @property
    def recent(self) -> int:
        """Restarts within the window up to now."""
        self._forget(self.clock())
        return len(self._restarts)

    def pause(self, slot: int) -> float | None:
        """A process of `slot` crashed: the seconds to wait before starting another, or None when the
        budget is spent (the server should stop)."""
        now = self.clock()
        self._forget(now)
        if len(self._restarts) >= self.max_restarts:
            return None
        self._restarts.append(now)
        last = self._last.get(slot)
        pause = self.first_pause if last is None or now - last[0] >= self.window else min(last[1] * 2, self.max_pause)
        self._last[slot] = (now, pause)
        return pause

    def _forget(self, now: float) -> None:
        while self._restarts and now - self._restarts[0] >= self.window:
            self._restarts.popleft()


def supervise(config: Config, sockets: list[socket.socket], redis_url: str, store_text: str,
              wrap_store: StoreWrapper | None = None) -> int:
    """Fork `config.serving_processes` children that share the listening sockets; each loads the model once.

    The parent only forwards SIGTERM/SIGINT, restarts a child that crashes (within a RestartBudget),
    so a load balancer in front sees one port, and logs one "ready" line once every child serves (each
    tells it so on a pipe). Forking happens before any model or event loop exists.
    """
    children: dict[int, int] = {}  # pid -> slot
    stopping = False
    counts = SharedCounts(config.serving_processes)  # shared with the children: made before fork
    metrics_dir = config.data_path / "metrics"  # every child's metrics, so that any one reports all
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counts of an earlier run would add up
    metrics_dir.mkdir(parents=True)
    ready = ReadyLine(config.serving_processes)
    ready_read, ready_write = os.pipe()
    os.set_blocking(ready_read, False)
    os.set_blocking(ready_write, False)  # a child never waits on the parent to say it is ready

    def start(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            # Until serve() installs its own handlers, a stop ends a child still loading its model
            # cleanly: it has nothing to drain yet.
            signal.signal(signal.SIGTERM, _exit_at_once)
            signal.signal(signal.SIGINT, _exit_at_once)
            code = 1
            try:
                share_metrics_across_processes(metrics_dir)
                os.close(ready_read)

                def tell_ready(line: str) -> None:
                    with contextlib.suppress(OSError):  # one write under PIPE_BUF: whole or not at all
                        os.write(ready_write, f"{slot} {os.getpid()} {line}".encode()[:select.PIPE_BUF - 1] + b"\n")

                code = asyncio.run(serve(config, sockets, redis_url, store_text, counts, slot, wrap_store,
                                         on_ready=tell_ready))
            except ModelLoadError as exc:
                log.error("%s", exc)
                code = EXIT_MODEL_LOAD_FAILED
            finally:
                os._exit(code)
        children[pid] = slot
        if stopping:  # the stop came while forking: forward() did not see this one
            os.kill(pid, signal.SIGTERM)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(config.serving_processes):
        start(slot)
    budget = RestartBudget(config.server.max_restarts, config.server.restart_window_seconds)
    pending: dict[int, float] = {}  # slot -> when its next process starts (a crashed one's pause)
    failed = False
    while True:
        if stopping:
            pending.clear()
        for slot, due in list(pending.items()):
            if due <= time.monotonic():
                del pending[slot]
                start(slot)
        if not children and not pending:
            break
        try:
            # Poll, so that a stop, another exit, the end of a pause or a child's "ready" is seen
            # within _POLL_SECONDS.
            pid, status = os.waitpid(-1, os.WNOHANG) if children else (0, 0)
        except ChildProcessError:
            break
        if pid == 0:
            if select.select([ready_read], [], [], _POLL_SECONDS)[0]:
                with contextlib.suppress(BlockingIOError):
                    ready.read(os.read(ready_read, 1 << 16))
            continue
        crashed_slot = children.pop(pid, None)
        forget_process_metrics(metrics_dir, pid)
        code = os.waitstatus_to_exitcode(status)
        if crashed_slot is None or stopping:
            failed |= code != 0
            continue
        if code not in (0, EXIT_MODEL_LOAD_FAILED):
            counts.reset(crashed_slot)  # the crashed process's connections and work are gone with it
            pause = budget.pause(crashed_slot)
            if pause is not None:
                log.warning("worker process %d exited with %d; starting another in %.1fs (restart %d of at most "
                            "%d per %gs)", pid, code, pause, budget.recent, budget.max_restarts, budget.window)
                pending[crashed_slot] = time.monotonic() + pause
                continue
            log.error("worker process %d exited with %d after %d restarts within %gs (server.max_restarts per "
                      "server.restart_window_seconds); stopping the server rather than crash-looping", pid, code,
                      budget.recent, budget.window)
        failed = True
        forward(signal.SIGTERM, None)
    os.close(ready_read)
    os.close(ready_write)
    return 1 if failed else 0


class ReadyLine:
    """The supervisor's one "ready" line: logged once every slot's first process has said it serves
    (`slot pid line` on the pipe); a process that replaces a crashed one gets a short line of its own."""

    def __init__(self, processes: int):
        self.processes = processes
        self._pids: dict[int, int] = {}  # slot -> pid of its process that said ready
        self._announced = False
        self._partial = b""

    def read(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            slot, pid, line = raw.decode(errors="replace").split(" ", 2)
            self._pids[int(slot)] = int(pid)
            if self._announced:
                log.info("serving process %s ready (slot %s)", pid, slot)
            elif len(self._pids) == self.processes:
                self._announced = True
                log.info("%s processes=%d pids=%s", line, self.processes,
                         ",".join(str(self._pids[s]) for s in sorted(self._pids)))


def _exit_at_once(_signum: int, _frame: object) -> None:
    os._exit(0)
