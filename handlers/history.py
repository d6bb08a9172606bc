"""History routes: the session's predictions, newest first, paged by id, and the feedback on them."""

from __future__ import annotations

from handlers.base import BaseHandler
from service.history import page_size


class HistoryHandler(BaseHandler):
    """GET /v1/history?limit=N&before=<id>"""

    async def get(self) -> None:
        limit = page_size(self.get_query_argument("limit", None))
        before = self.get_query_argument("before", None) or None
        items, next_id = await self.history.page(self.current_session, limit, before)
        self.write_json({"items": items, "next": next_id})


class HistoryItemHandler(BaseHandler):
    """GET /v1/history/<id>"""

    async def get(self, history_id: str) -> None:
        self.write_json(await self.history.item(self.current_session, history_id))


class HistoryImageHandler(BaseHandler):
    """GET /v1/history/<id>/image: the captured image, byte for byte, to the session that sent it."""

    async def get(self, history_id: str) -> None:
        data, media_type = await self.history.image(self.current_session, history_id)
        self.set_header("Content-Type", media_type)
        self.finish(data)


class FeedbackHandler(BaseHandler):
    """PUT /v1/history/<id>/feedback {"label": <index or name>, "comment": ...}; DELETE removes it."""

    @property
    def rate_limit_cost(self) -> int:  # type: ignore[override]
        """Giving feedback writes to Redis like a predict, and costs what a predict costs."""
        return 1 if self.request.method == "PUT" else 0

    async def put(self, history_id: str) -> None:
        self.write_json(await self.feedback.give(self.current_session, history_id, self.json_object()))

    async def delete(self, history_id: str) -> None:
        await self.feedback.withdraw(self.current_session, history_id)
        self.no_content()
