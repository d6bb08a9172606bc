"""Retention sweeps, run in one serving process: the capture store's and the feedback's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.errors import ServiceError

log = logging.getLogger("inference.retention")


async def sweep_forever(sweep: Callable[[], Awaitable[int]], interval_seconds: float, what: str, *,
                        errors: tuple[type[Exception], ...] = (ServiceError,)) -> None:
    """`sweep()` now and every interval, logging how many `what` it removed; one that fails with `errors`
    (Redis or the disk down) is tried again next time."""
    while True:
        try:
            removed = await sweep()
            if removed:
                log.info("retention: removed %d %s", removed, what)
        except errors as exc:
            log.warning("retention sweep of %s failed: %s", what, exc)
        await asyncio.sleep(interval_seconds)
