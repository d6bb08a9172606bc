"""History routes: the session's predictions, newest first, paged by id."""

from __future__ import annotations

from handlers.base import BaseHandler
from sessions.errors import BadRequest

MAX_PAGE = 100
DEFAULT_PAGE = 20


class HistoryHandler(BaseHandler):
    """GET /v1/history?limit=N&before=<id>"""

    async def get(self) -> None:
        limit = self._limit()
        before = self.get_query_argument("before", None) or None
        items, next_id = await self.store.history(self.current_session.id, limit=limit, before=before)
        self.write_json({"items": items, "next": next_id})

    def _limit(self) -> int:
        text = self.get_query_argument("limit", str(DEFAULT_PAGE))
        if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_PAGE}, got {text!r}.",
                             code="invalid_parameter")
        return int(text)


class HistoryItemHandler(BaseHandler):
    """GET /v1/history/<id>"""

    async def get(self, history_id: str) -> None:
        self.write_json(await self.store.history_item(self.current_session.id, history_id))
