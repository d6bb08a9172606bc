"""service.history: the page size's bounds, and paging newest first."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import BadRequest, NotFound
from core.options import Options
from service import history
from service.feedback import FeedbackService
from sessions.tokens import TokenSigner
from tests.unit.fakes import LABELS, FakeFeedbackRecords, FakeStore

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("text", "size"), [(None, history.DEFAULT_PAGE), ("1", 1), ("20", 20), ("007", 7),
                                            (str(history.MAX_PAGE), history.MAX_PAGE)])
def test_page_size_within_bounds(text: str | None, size: int) -> None:
    assert history.page_size(text) == size


@pytest.mark.parametrize("text", ["0", str(history.MAX_PAGE + 1), "-1", "", " 5", "5.0", "ten", "1e2", "+5"])
def test_page_size_outside_bounds_is_a_400(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        history.page_size(text)
    assert caught.value.code == "invalid_parameter" and caught.value.status == 400


@pytest.mark.parametrize("text", ["\u00b2", "0" * 5000 + "5"])  # a superscript two; past int()'s 4300 digits
def test_page_size_of_digits_int_refuses_is_a_400(text: str) -> None:
    with pytest.raises(BadRequest):
        history.page_size(text)


def test_pages_run_newest_first_and_items_are_found_by_id(store: FakeStore, signer: TokenSigner) -> None:
    feedback = FeedbackService(store, FakeFeedbackRecords(), labels=lambda model: LABELS, signer=signer)
    session = asyncio.run(store.create(Options()))
    pages = history.History(store, feedback, captures=None)  # type: ignore[arg-type]  # no image is read here
    ids = [asyncio.run(store.record(session, {"n": n}))[0] for n in range(3)]
    first, cursor = asyncio.run(pages.page(session, 2, None))
    assert [item["n"] for item in first] == [2, 1] and cursor == ids[1]
    rest, cursor = asyncio.run(pages.page(session, 2, cursor))
    assert [item["n"] for item in rest] == [0] and cursor is None
    # Items recorded before capture existed read as not captured; none has feedback yet.
    assert asyncio.run(pages.item(session, ids[0])) == {"id": ids[0], "n": 0, "image": None,
                                                                            "feedback": None}
    with pytest.raises(NotFound) as caught:
        asyncio.run(pages.item(session, "1-0"))
    assert caught.value.code == "history_item_not_found"
