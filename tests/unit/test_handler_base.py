"""The handlers' base class, without a server (the routes themselves: tests/test_routes.py)."""

from __future__ import annotations

import pytest

from handlers.base import BaseHandler

pytestmark = pytest.mark.unit


def test_a_handler_that_overrides_prepare_is_refused() -> None:
    with pytest.raises(TypeError, match="overrides prepare"):
        class Sneaky(BaseHandler):
            async def prepare(self) -> None:
                pass
