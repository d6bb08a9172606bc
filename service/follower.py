"""The replica followers: every replica follows activations, canaries and removals over Redis pub/sub,
and re-reads the active version whenever it (re)subscribes, so one that was cut off catches up; likewise
the models added and deleted (ModelsFollower), re-reading the shared model repository on (re)subscribing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from core.errors import ServiceError
from sessions.model_registry import ModelEvent, ModelRegistry

if TYPE_CHECKING:
    from service.catalogue import ModelCatalogue
    from service.models import Models

log = logging.getLogger("inference.weights")
_CLOSE_TIMEOUT_SECONDS = 2.0


class VersionFollower:
    """Keeps one process's catalogue in step with the versions activated, started as canaries, made
    unpinnable or removed anywhere."""

    def __init__(self, catalogue: ModelCatalogue):
        self.catalogue = catalogue
        self._follower: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Serve the active version, then follow activations and removals until close(). A replica
        that starts after an activation so never answers with the older weights; one that starts
        while Redis is down serves the configured weights and catches up once it is back."""
        try:
            await self._catch_up()
        except ServiceError as exc:
            log.warning("could not read the active model version (%s); serving %s until Redis answers",
                        exc.message, self.catalogue.active.model.version)
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        self._closing = True
        await _stop(self._follower)

    async def _follow(self) -> None:
        await _follow_events(self.catalogue.registry, self._catch_up, self._apply, lambda: self._closing,
                             "model versions")

    async def _catch_up(self) -> None:
        await self._follow_canary()
        self.catalogue.pinnable = await self.catalogue.registry.pinnable(self.catalogue.name)
        active = await self.catalogue.registry.active(self.catalogue.name)
        if (active or self.catalogue.base_version) != self.catalogue.active.model.version:
            await self._apply(ModelEvent("activated", self.catalogue.name, active or ""))

    async def _follow_canary(self) -> None:
        """Read the canary (an activation ends it, a canary event starts or changes it) and load its
        version here before any session is sent to it."""
        canary = await self.catalogue.registry.canary(self.catalogue.name)
        if canary is not None:
            try:
                await self.catalogue.hold(canary.version)
            except ServiceError as exc:
                log.error("cannot load %s canary version %s (%s); its sessions keep %s", self.catalogue.name,
                          canary.version, exc.message, self.catalogue.active.model.version)
                canary = None
        self.catalogue.canary = canary

    async def _apply(self, event: ModelEvent) -> None:
        if event.name != self.catalogue.name:
            return
        if event.event in ("activated", "canary"):
            await self._follow_canary()
        if event.event == "removed":
            self.catalogue.loaded.drop(event.version)
            self.catalogue.prepared.pop(event.version, None)
            return
        if event.event == "unpinnable":  # held for pinned sessions only, unless it serves a canary here
            self.catalogue.pinnable.discard(event.version)
            if self.catalogue.canary is None or self.catalogue.canary.version != event.version:
                self.catalogue.loaded.drop(event.version)
            return
        if event.event != "activated" or event.version == self.catalogue.active.model.version:
            return
        if not event.version:  # back to the configured weights, unless something newer was activated
            async with self.catalogue.lock:
                if await self.catalogue.registry.active(self.catalogue.name) is None:
                    self.catalogue.loaded.activate(self.catalogue.base)
            log.info("following activation: now serving %s's configured weights", self.catalogue.name)
            return
        async with self.catalogue.lock:
            record = await self.catalogue.registry.get(self.catalogue.name, event.version)
            if record is None or await self.catalogue.registry.active(self.catalogue.name) != event.version:
                return  # superseded or removed since: the later event will say what to do
            try:
                served = self.catalogue.prepared.pop(event.version, None) or await self.catalogue.load(record)
            except ServiceError as exc:
                log.error("cannot load %s version %s (%s); still serving %s", self.catalogue.name, event.version,
                          exc.message, self.catalogue.active.model.version)
                return
            self.catalogue.loaded.activate(served)
        log.info("following activation: now serving %s version %s", self.catalogue.name, event.version)


class ModelsFollower:
    """Keeps one process's models in step with those added (PUT /v1/models/<name>) and deleted anywhere:
    the folder an addition announces is read from the shared repository; on (re)subscribing, the
    repository's folders are compared with what this process serves."""

    def __init__(self, models: Models, registry: ModelRegistry):
        self.models, self.registry = models, registry
        self._follower: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._follower = asyncio.get_running_loop().create_task(
            _follow_events(self.registry, self.models.catch_up, self._apply, lambda: self._closing, "model additions"))

    async def close(self) -> None:
        self._closing = True
        await _stop(self._follower)

    async def _apply(self, event: ModelEvent) -> None:
        if event.event == "added":
            await self.models.follow_added(event.name)
        elif event.event == "deleted":
            await self.models.follow_deleted(event.name)


async def _follow_events(registry: ModelRegistry, catch_up: Callable[[], Awaitable[None]],
                         apply: Callable[[ModelEvent], Awaitable[None]], closing: Callable[[], bool],
                         what: str) -> None:
    """Apply the registry's events until cancelled, catching up whenever (re)subscribed; Redis trouble is
    logged once and retried with a growing delay (the process keeps serving what it has meanwhile)."""
    delay, failing = 0.25, False
    while True:
        try:
            async for event in registry.events():
                if event.event == "subscribed":
                    await catch_up()  # whatever happened while we were not listening
                else:
                    await apply(event)
                delay, failing = 0.25, False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down or restarted: keep serving, resubscribe later
            if closing():
                return
            if not failing:
                log.warning("not following %s (%s); retrying", what, exc)
            failing = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        # redis-py can turn a cancellation inside a reconnect into a connection error, which the
        # follower's retry loop would take for Redis trouble; the closing flag ends it then, and the wait
        # is bounded either way, so a shutdown never hangs here.
        await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT_SECONDS)
