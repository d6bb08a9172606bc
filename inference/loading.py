"""Runtimes built on first use and released when too many are loaded.

A server with a model repository serves every model at once, but a process need not hold every
model's runtime (tens to hundreds of MB each): a `LazyBackend` knows its runtime's name and precision
before it is built, builds it on its first forward, and counts in its process's `LoadedBackends`, which
releases the least recently used past `max_loaded`. A released backend is rebuilt on its next forward;
a forward already running on it keeps its own reference, so releasing never breaks a request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from inference.model import Backend
from inference.pixels import PixelBatch


class LoadedBackends:
    """The built backends of one process, least recently used first; at most `max_loaded` stay built."""

    def __init__(self, max_loaded: int):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._order: OrderedDict[int, LazyBackend] = OrderedDict()

    def used(self, backend: LazyBackend) -> None:
        """`backend` was just used (and is built): it becomes the most recent; the least recent past
        `max_loaded` are released."""
        with self._lock:
            self._order[id(backend)] = backend
            self._order.move_to_end(id(backend))
            evicted = []
            while len(self._order) > self.max_loaded:
                _, oldest = self._order.popitem(last=False)
                evicted.append(oldest)
        for oldest in evicted:  # outside the lock: a release waits for a build in progress
            oldest.release()

    def forget(self, backend: LazyBackend) -> None:
        with self._lock:
            self._order.pop(id(backend), None)

    def names(self) -> list[str]:
        """What is built now, least recently used first (for logs and tests)."""
        with self._lock:
            return [backend.label for backend in self._order.values()]

    def __contains__(self, backend: object) -> bool:
        with self._lock:
            return id(backend) in self._order


class LazyBackend:
    """A Backend whose runtime is built by `build` on the first forward, counted in `loaded`."""

    def __init__(self, name: str, precision: str, build: Callable[[], Backend], loaded: LoadedBackends, *,
                 label: str = "", built: Backend | None = None):
        self.name, self.precision, self.label = name, precision, label or name
        self._build, self._loaded = build, loaded
        self._lock = threading.Lock()
        self._backend = built
        if built is not None:
            loaded.used(self)

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def get(self) -> Backend:
        """The built runtime, building it now if it is not (again)."""
        with self._lock:
            backend = self._backend
            if backend is None:
                backend = self._backend = self._build()
        self._loaded.used(self)
        return backend

    def forward(self, batch: np.ndarray | PixelBatch, *, alone: bool = False) -> np.ndarray:
        return self.get().forward(batch, alone=alone)

    def release(self) -> None:
        """Drop the runtime (its memory goes once the forwards running on it finish); rebuilt when next used."""
        with self._lock:  # forgotten under the lock: a rebuild meanwhile counts itself after this
            self._backend = None
            self._loaded.forget(self)
