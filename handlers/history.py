"""History routes: the session's predictions, newest first, paged by id."""

from __future__ import annotations

from handlers.base import BaseHandler
from service import history


class HistoryHandler(BaseHandler):
    """GET /v1/history?limit=N&before=<id>"""

    async def get(self) -> None:
        limit = history.page_size(self.get_query_argument("limit", None))
        before = self.get_query_argument("before", None) or None
        items, next_id = await history.page(self.store, self.current_session, limit, before)
        self.write_json({"items": items, "next": next_id})


class HistoryItemHandler(BaseHandler):
    """GET /v1/history/<id>"""

    async def get(self, history_id: str) -> None:
        self.write_json(await history.item(self.store, self.current_session, history_id))
