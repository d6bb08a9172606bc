"""service.sessions: logging in, changing options (a pinned version must exist), logging out and erasing."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import BadOptions, InvalidToken, StoreUnavailable
from core.options import Options
from service.auth import Authenticator, AuthSettings, Policy
from service.feedback import FeedbackService
from service.sessions import SessionService
from sessions.tokens import TokenSigner
from tests.unit.fakes import LABELS, FakeFeedbackRecords, FakeStore, FakeVersions, fake_models

pytestmark = pytest.mark.unit


def service(store: FakeStore, signer: TokenSigner, *published: str) -> tuple[SessionService, FakeVersions]:
    versions = FakeVersions(published=published)
    return SessionService(store, signer, fake_models(versions)), versions


def test_login_merges_the_options_into_the_defaults_and_signs_the_session(store: FakeStore,
                                                                         signer: TokenSigner) -> None:
    sessions, versions = service(store, signer)
    token, session = asyncio.run(sessions.login({"top_k": 3, "crop": 200, "interpolation": "bicubic"}))
    assert session.options == Options(top_k=3, crop=200, interpolation="bicubic")
    assert signer.verify(token).session_id == session.id
    assert store.called("create") == [session.options]
    assert versions.checked == []  # nothing pinned, nothing to look up


def test_login_with_no_options_gets_the_defaults(store: FakeStore, signer: TokenSigner) -> None:
    _, session = asyncio.run(service(store, signer)[0].login({}))
    assert session.options == Options()


@pytest.mark.parametrize(("changes", "field"), [
    ({"top_k": 0}, "top_k"),
    ({"crop": 300}, "crop"),  # larger than the default resize
    ({"colour": "rgb"}, "colour"),
    ([1, 2], "options"),
])
def test_login_refuses_bad_options_and_creates_nothing(store: FakeStore, signer: TokenSigner, changes: object,
                                                       field: str) -> None:
    with pytest.raises(BadOptions) as caught:
        asyncio.run(service(store, signer)[0].login(changes))
    assert caught.value.field == field and caught.value.status == 422
    assert store.calls == []


def test_login_refuses_pinning_an_unknown_version(store: FakeStore, signer: TokenSigner) -> None:
    sessions, versions = service(store, signer, "v2")
    with pytest.raises(BadOptions) as caught:
        asyncio.run(sessions.login({"model_version": "v9"}))
    assert caught.value.field == "model_version" and caught.value.code == "invalid_options"
    assert versions.checked == ["v9"] and store.calls == []
    _, session = asyncio.run(sessions.login({"model_version": "v2"}))
    assert session.options.model_version == "v2"


def test_login_with_a_null_version_looks_nothing_up(store: FakeStore, signer: TokenSigner) -> None:
    sessions, versions = service(store, signer)
    for unpinned in (None, ""):
        _, session = asyncio.run(sessions.login({"model_version": unpinned}))
        assert session.options.model_version is None
    assert versions.checked == []


def test_update_options_merges_and_refuses_an_unknown_version(store: FakeStore, signer: TokenSigner) -> None:
    sessions, _ = service(store, signer, "v2")
    _, session = asyncio.run(sessions.login({"top_k": 3}))
    updated = asyncio.run(sessions.update_options(session, {"model_version": "v2", "color": "grayscale"}))
    assert updated == Options(top_k=3, model_version="v2", color="grayscale")
    with pytest.raises(BadOptions):
        asyncio.run(sessions.update_options(session, {"model_version": "v9", "top_k": 1}))
    assert store.sessions[session.id].options == updated  # nothing of a refused change is kept
    assert asyncio.run(sessions.update_options(session, {"model_version": None})).model_version is None


def test_logout_revokes_the_token(store: FakeStore, signer: TokenSigner) -> None:
    sessions, _ = service(store, signer)
    token, session = asyncio.run(sessions.login({}))
    auth = Authenticator(signer, store, AuthSettings())  # type: ignore[arg-type]
    assert asyncio.run(auth.authenticate(Policy.SESSION, f"Bearer {token}")).session is not None
    asyncio.run(sessions.logout(session))
    with pytest.raises(InvalidToken) as caught:
        asyncio.run(auth.authenticate(Policy.SESSION, f"Bearer {token}"))
    assert caught.value.code == "session_revoked"


def test_an_erase_revokes_last_so_a_retry_after_a_failure_finishes_it(store: FakeStore, signer: TokenSigner) -> None:
    records, erased = FakeFeedbackRecords(), []
    feedback = FeedbackService(store, records, labels=lambda model: LABELS, signer=signer)  # type: ignore[arg-type]
    sessions = SessionService(store, signer, fake_models(), feedback=feedback,  # type: ignore[arg-type]
                              on_erased=lambda: erased.append(1))
    token, session = asyncio.run(sessions.login({}))
    auth = Authenticator(signer, store, AuthSettings())  # type: ignore[arg-type]
    original, failures = records.erase_session, []

    async def fails_once(session_id: str) -> int:
        if not failures:
            failures.append(session_id)
            raise StoreUnavailable("The session store is unavailable; retry shortly.")
        return await original(session_id)

    records.erase_session = fails_once  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        asyncio.run(sessions.logout(session, erase=True))
    assert erased == []
    # The token still works (the retry needs it), but nothing more is recorded for the session.
    assert asyncio.run(auth.authenticate(Policy.SESSION, f"Bearer {token}")).session is not None
    with pytest.raises(InvalidToken):
        asyncio.run(store.record(session, {"predicted_class": 2}))
    assert not asyncio.run(store.alive(session.id))

    asyncio.run(sessions.logout(session, erase=True))
    assert erased == [1]
    with pytest.raises(InvalidToken) as caught:
        asyncio.run(auth.authenticate(Policy.SESSION, f"Bearer {token}"))
    assert caught.value.code == "session_not_found"  # an erase leaves no tombstone naming the session
    assert store.called("begin_erase") == [session.id] * 2 and store.called("delete") == [session.id]
