"""The feedback routes for admins: the training export, GET /v1/feedback/export, streamed item by
item; and DELETE /v1/feedback, a purge by time and/or session."""

from __future__ import annotations

from handlers.base import BaseHandler
from service import export
from service.auth import Policy
from service.feedback import parse_purge


class FeedbackPurgeHandler(BaseHandler):
    """DELETE /v1/feedback?since=&until=&session=<session ref> -> {"deleted": n}"""

    auth_policy = Policy.ADMIN

    async def delete(self) -> None:
        query = parse_purge({name: self.get_query_argument(name) for name in self.request.query_arguments})
        self.write_json({"deleted": await self.feedback.purge(query)})


class FeedbackExportHandler(BaseHandler):
    """GET /v1/feedback/export?since=&until=&model_version=&format=tar|jsonl

    Each item is written and flushed before the next is built: the answer streams (chunked), and a
    client that reads slowly holds the export back instead of making the server buffer it. An error
    once the answer has begun can only cut it short (a tar without its end blocks)."""

    auth_policy = Policy.ADMIN

    async def get(self) -> None:
        query = export.parse_query({name: self.get_query_argument(name) for name in self.request.query_arguments})
        self.set_header("Content-Type", export.MEDIA_TYPES[query.format])
        self.set_header("Content-Disposition", f'attachment; filename="feedback.{query.format}"')
        async for chunk in self.feedback_export.stream(query):
            self.write(chunk)
            await self.flush()
        self.finish()
