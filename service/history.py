"""A session's history: its predictions, newest first, paged by id."""

from __future__ import annotations

import re
from typing import Any

from core.errors import BadRequest, quoted
from core.session import Session
from service.capture import Captures
from service.feedback import FeedbackService
from sessions.store import SessionStore

MAX_PAGE = 100
_PAGE_SIZE = re.compile(r"[0-9]{1,3}")
DEFAULT_PAGE = 20


def page_size(text: str | None) -> int:
    """The `limit` of a page, checked (400 `invalid_parameter` outside 1..MAX_PAGE)."""
    text = str(DEFAULT_PAGE) if text is None else text
    # ASCII digits only: str.isdigit() also takes digits int() refuses (a superscript two).
    if not _PAGE_SIZE.fullmatch(text) or not 1 <= int(text) <= MAX_PAGE:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_PAGE}, got {quoted(text)}.",
                         code="invalid_parameter")
    return int(text)


class History:
    """A session's history as the transports read it: pages and items with their feedback, and the
    captured images."""

    def __init__(self, store: SessionStore, feedback: FeedbackService, captures: Captures):
        self.store, self.feedback, self.captures = store, feedback, captures

    async def page(self, session: Session, limit: int, before: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the session's history, each item with its feedback (null where none was given)."""
        items, next_id = await self.store.history(session.id, limit=limit, before=before)
        return await self.feedback.attach(session.id, items), next_id

    async def item(self, session: Session, history_id: str) -> dict[str, Any]:
        return (await self.feedback.attach(session.id, [await self.store.history_item(session.id, history_id)]))[0]

    async def image(self, session: Session, history_id: str) -> tuple[bytes, str]:
        """The captured image of one of the session's items, as sent, and its media type; 404 for another
        session's item, one not captured, or one past its retention."""
        entry = await self.store.history_item(session.id, history_id)
        return await self.captures.read(session.id, entry.get("image"))
