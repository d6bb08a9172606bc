"""service.auth: each Policy for each kind of credential, and the login gate (API keys, rate limit)."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Forbidden, InvalidToken, RateLimited, ServiceError
from core.options import Options
from core.session import Session
from service.auth import Authenticator, AuthSettings, Policy, api_key_hash
from sessions.tokens import TokenSigner
from tests.unit.fakes import FakeStore

pytestmark = pytest.mark.unit

ADMIN_KEY = "admin-key-0123"
LOGIN_KEY = "login-key-0123"


def authenticator(store: FakeStore, signer: TokenSigner, **settings: object) -> Authenticator:
    return Authenticator(signer, store, AuthSettings(**settings))  # type: ignore[arg-type]


def bearer(store: FakeStore, signer: TokenSigner) -> tuple[Session, str]:
    """A live session and its Authorization header."""
    session = asyncio.run(store.create(Options()))
    store.calls.clear()
    return session, f"Bearer {signer.issue(session.id)}"


def refused(error: type[ServiceError], code: str, call: object) -> ServiceError:
    with pytest.raises(error) as caught:
        asyncio.run(call)  # type: ignore[arg-type]
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_public_takes_no_credential_and_reads_no_store(store: FakeStore, signer: TokenSigner) -> None:
    principal = asyncio.run(authenticator(store, signer).authenticate(Policy.PUBLIC, "Bearer whatever"))
    assert principal.session is None and not principal.admin and principal.token is None
    assert store.calls == []


def test_session_resolves_a_live_session_and_charges_its_cost(store: FakeStore, signer: TokenSigner) -> None:
    session, header = bearer(store, signer)
    session_id = session.id
    principal = asyncio.run(authenticator(store, signer).authenticate(Policy.SESSION, header, cost=lambda: 3))
    assert principal.session is not None and principal.session.id == session_id
    assert not principal.admin
    assert store.called("touch") == [3]  # the callable's value, in one store round trip


@pytest.mark.parametrize(("header", "code"), [
    ("", "missing_token"),
    ("Basic dXNlcjpwYXNz", "malformed_token"),
    ("Bearer", "malformed_token"),
    ("Bearer not-a-token", "malformed_token"),
])
def test_session_refuses_a_missing_or_malformed_token(store: FakeStore, signer: TokenSigner, header: str,
                                                      code: str) -> None:
    error = refused(InvalidToken, code, authenticator(store, signer).authenticate(Policy.SESSION, header))
    assert error.status == 401
    assert store.calls == []


def test_session_refuses_a_forged_token_before_pricing_the_request(store: FakeStore, signer: TokenSigner) -> None:
    session, _ = bearer(store, signer)
    forged = TokenSigner(["another-secret-0123456789"], max_age_seconds=3600).issue(session.id)
    priced: list[bool] = []

    def cost() -> int:
        priced.append(True)
        return 1

    refused(InvalidToken, "invalid_signature",
            authenticator(store, signer).authenticate(Policy.SESSION, f"Bearer {forged}", cost=cost))
    assert priced == [] and store.calls == []  # the body is never looked at for a forged token


def test_session_refuses_a_logged_out_or_expired_session(store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer)
    logged_out, revoked = bearer(store, signer)
    gone, expired = bearer(store, signer)
    asyncio.run(store.delete(logged_out))
    store.expire(gone.id)
    refused(InvalidToken, "session_revoked", auth.authenticate(Policy.SESSION, revoked))
    refused(InvalidToken, "session_not_found", auth.authenticate(Policy.SESSION, expired))


def test_session_rate_limit_is_a_429_with_retry_after(signer: TokenSigner) -> None:
    store = FakeStore(rate_limit_per_minute=2)
    _, header = bearer(store, signer)
    auth = authenticator(store, signer)
    asyncio.run(auth.authenticate(Policy.SESSION, header, cost=2))
    error = refused(RateLimited, "rate_limited", auth.authenticate(Policy.SESSION, header, cost=1))
    assert error.status == 429 and int(error.headers["Retry-After"]) >= 1


def test_session_repeating_an_idempotency_key_is_a_replay(store: FakeStore, signer: TokenSigner) -> None:
    _, header = bearer(store, signer)
    auth = authenticator(store, signer)
    session = asyncio.run(auth.authenticate(Policy.SESSION, header, idempotency_key="k-1")).session
    assert session is not None and session.replay_of is None
    history_id, _ = asyncio.run(store.record(session, {"label": "x"}, "k-1"))
    again = asyncio.run(auth.authenticate(Policy.SESSION, header, idempotency_key="k-1")).session
    assert again is not None and again.replay_of == history_id


def test_optional_session_is_anonymous_without_a_header_where_allowed(store: FakeStore, signer: TokenSigner) -> None:
    principal = asyncio.run(authenticator(store, signer).authenticate(Policy.OPTIONAL_SESSION, ""))
    assert principal.session is None and not principal.admin
    assert store.calls == []


def test_optional_session_without_a_header_is_refused_where_anonymous_inference_is_off(
        store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer, anonymous_inference=False)
    refused(InvalidToken, "missing_token", auth.authenticate(Policy.OPTIONAL_SESSION, ""))


def test_optional_session_with_a_token_resolves_the_session(store: FakeStore, signer: TokenSigner) -> None:
    session, header = bearer(store, signer)
    session_id = session.id
    for anonymous in (True, False):
        auth = authenticator(store, signer, anonymous_inference=anonymous)
        principal = asyncio.run(auth.authenticate(Policy.OPTIONAL_SESSION, header))
        assert principal.session is not None and principal.session.id == session_id
    # A token that is sent is checked, never ignored in favour of anonymous inference.
    refused(InvalidToken, "malformed_token", authenticator(store, signer).authenticate(Policy.OPTIONAL_SESSION,
                                                                                       "Bearer junk"))


@pytest.mark.parametrize(("header", "error", "code"), [
    ("", InvalidToken, "missing_api_key"),
    ("Bearer some-token", InvalidToken, "missing_api_key"),
    ("ApiKey ", InvalidToken, "missing_api_key"),
    ("ApiKey wrong-key", InvalidToken, "invalid_api_key"),
    (f"ApiKey {LOGIN_KEY}", InvalidToken, "invalid_api_key"),  # a login key is no admin key
])
def test_admin_refuses_anything_but_a_listed_admin_key(store: FakeStore, signer: TokenSigner, header: str,
                                                       error: type[ServiceError], code: str) -> None:
    auth = authenticator(store, signer, admin_api_keys=(api_key_hash(ADMIN_KEY),), api_keys=(api_key_hash(LOGIN_KEY),))
    assert refused(error, code, auth.authenticate(Policy.ADMIN, header)).status == 401


def test_admin_is_off_without_admin_keys(store: FakeStore, signer: TokenSigner) -> None:
    error = refused(Forbidden, "admin_api_disabled",
                    authenticator(store, signer).authenticate(Policy.ADMIN, f"ApiKey {ADMIN_KEY}"))
    assert error.status == 403


def test_admin_accepts_a_listed_key_with_no_store_access(store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer, admin_api_keys=(api_key_hash("other"), api_key_hash(ADMIN_KEY)))
    for scheme in ("ApiKey", "apikey", "APIKEY"):  # the scheme is case-insensitive
        principal = asyncio.run(auth.authenticate(Policy.ADMIN, f"{scheme} {ADMIN_KEY}"))
        assert principal.admin and principal.session is None
    assert store.calls == []


def test_session_or_admin_takes_either_credential(store: FakeStore, signer: TokenSigner) -> None:
    session, header = bearer(store, signer)
    session_id = session.id
    auth = authenticator(store, signer, admin_api_keys=(api_key_hash(ADMIN_KEY),))
    as_admin = asyncio.run(auth.authenticate(Policy.SESSION_OR_ADMIN, f"ApiKey {ADMIN_KEY}"))
    assert as_admin.admin and as_admin.session is None
    as_session = asyncio.run(auth.authenticate(Policy.SESSION_OR_ADMIN, header))
    assert not as_session.admin and as_session.session is not None and as_session.session.id == session_id
    # A wrong key is refused as a key; it does not fall through to the session check.
    refused(InvalidToken, "invalid_api_key", auth.authenticate(Policy.SESSION_OR_ADMIN, "ApiKey wrong"))
    refused(InvalidToken, "missing_token", auth.authenticate(Policy.SESSION_OR_ADMIN, ""))
    # An ApiKey header without a key is a missing key, not a malformed session token.
    refused(InvalidToken, "missing_api_key", auth.authenticate(Policy.SESSION_OR_ADMIN, "ApiKey "))


def test_stream_without_a_header_defers_the_credential_to_the_first_frame(store: FakeStore,
                                                                          signer: TokenSigner) -> None:
    principal = asyncio.run(authenticator(store, signer).authenticate(Policy.STREAM, ""))
    assert principal.token is None and principal.session is None
    assert store.calls == []


def test_stream_with_a_header_checks_the_token_but_not_the_store(store: FakeStore, signer: TokenSigner) -> None:
    session, header = bearer(store, signer)
    session_id = session.id
    auth = authenticator(store, signer)
    principal = asyncio.run(auth.authenticate(Policy.STREAM, header))
    assert principal.token is not None and principal.token.session_id == session_id
    assert principal.session is None and store.calls == []  # each message resumes the session later
    assert asyncio.run(auth.resume(principal.token, cost=1)).id == session_id
    assert store.called("touch") == [1]
    refused(InvalidToken, "malformed_token", auth.authenticate(Policy.STREAM, "Basic abc"))
    forged = TokenSigner(["another-secret-0123456789"], max_age_seconds=3600).issue(session_id)
    refused(InvalidToken, "invalid_signature", auth.authenticate(Policy.STREAM, f"Bearer {forged}"))


# -- admit_login ------------------------------------------------------------------------------------

def test_login_without_api_keys_is_charged_per_address(store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer, login_rate_limit_per_minute=2)
    for _ in range(2):
        asyncio.run(auth.admit_login("", "10.0.0.1"))
    error = refused(RateLimited, "login_rate_limited", auth.admit_login("ApiKey anything", "10.0.0.1"))
    assert error.status == 429
    asyncio.run(auth.admit_login("", "10.0.0.2"))  # another address has its own bucket
    assert store.called("take_login") == ["address:10.0.0.1"] * 3 + ["address:10.0.0.2"]


def test_login_with_a_valid_key_is_charged_to_the_key(store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer, api_keys=(api_key_hash(LOGIN_KEY), api_key_hash("second-key")),
                         login_rate_limit_per_minute=1)
    asyncio.run(auth.admit_login(f"ApiKey {LOGIN_KEY}", "10.0.0.1"))
    refused(RateLimited, "login_rate_limited", auth.admit_login(f"ApiKey {LOGIN_KEY}", "10.0.0.2"))
    asyncio.run(auth.admit_login("ApiKey second-key", "10.0.0.1"))  # per key, not per address
    assert store.called("take_login") == [api_key_hash(LOGIN_KEY)] * 2 + [api_key_hash("second-key")]


def test_login_with_a_wrong_key_is_refused_and_charged_to_the_address(store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer, api_keys=(api_key_hash(LOGIN_KEY),), login_rate_limit_per_minute=2)
    for _ in range(2):
        refused(InvalidToken, "invalid_api_key", auth.admit_login("ApiKey guess", "10.0.0.1"))
    # Guessing is throttled: the address's bucket is empty, so the next guess is a 429, not a verdict.
    refused(RateLimited, "login_rate_limited", auth.admit_login("ApiKey guess", "10.0.0.1"))
    assert store.called("take_login") == ["address:10.0.0.1"] * 3
    asyncio.run(auth.admit_login(f"ApiKey {LOGIN_KEY}", "10.0.0.1"))  # the key holder is not locked out


def test_login_with_api_keys_needs_an_api_key_header(store: FakeStore, signer: TokenSigner) -> None:
    auth = authenticator(store, signer, api_keys=(api_key_hash(LOGIN_KEY),))
    for header in ("", f"Bearer {LOGIN_KEY}"):
        refused(InvalidToken, "missing_api_key", auth.admit_login(header, "10.0.0.1"))
