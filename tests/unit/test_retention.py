"""The retention loop both sweeps (capture, feedback) run in: a failed sweep is tried again."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import StoreUnavailable
from service.retention import sweep_forever

pytestmark = pytest.mark.unit


def test_a_sweep_that_fails_is_tried_again_and_other_errors_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[int | Exception] = [StoreUnavailable("Redis is down."), 3, 0, KeyError("a bug")]

    async def sweep() -> int:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with caplog.at_level("INFO"), pytest.raises(KeyError):  # not one of `errors`: not hidden
        asyncio.run(sweep_forever(sweep, 0, "test records"))
    assert outcomes == []
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["retention sweep of test records failed: Redis is down.", "retention: removed 3 test records"]
