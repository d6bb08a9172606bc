"""Where every credential is decided, whatever transport carried it.

- a session token (`Bearer <token>`): signature and age (TokenSigner), then the live session in the
  store (sliding expiry, revocation, the session's rate limit, an idempotency replay);
- an API key at login (`ApiKey <key>`) where auth.api_keys is set, with the login rate limit;
- an admin API key (`ApiKey <key>`) for the model-version routes;
- no credential at all, for anonymous inference where the server allows it.

A route declares one Policy; `Authenticator.authenticate` resolves it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from core.errors import SEND_TOKEN, Forbidden, InvalidToken
from core.session import Session
from service.client_address import rate_limit_bucket
from sessions.store import SessionStore
from sessions.tokens import TokenSigner, VerifiedToken


class Policy(enum.Enum):
    PUBLIC = "public"  # no credential
    SESSION = "session"  # a session token
    OPTIONAL_SESSION = "optional_session"  # a token when sent; anonymous otherwise, where allowed
    ADMIN = "admin"  # an admin API key
    SESSION_OR_ADMIN = "session_or_admin"  # either: a token, or an admin key
    # A stream: a token with the upgrade (checked now) or in its first frame (checked then, with
    # `verify` and `resume`); refusals are told over the stream, and each message resumes the session.
    STREAM = "stream"


@dataclass(frozen=True)
class AuthSettings:
    api_keys: tuple[str, ...] = ()  # "sha256:<hex>"; empty: anyone may log in
    admin_api_keys: tuple[str, ...] = ()  # empty: the admin routes are off
    anonymous_inference: bool = True  # inference without a session (POST /predict, tokenless OIP)
    login_rate_limit_per_minute: int = 0


@dataclass(frozen=True)
class Principal:
    """Who is calling: a session, an admin key holder, or nobody (public or anonymous)."""

    session: Session | None = None
    admin: bool = False
    token: VerifiedToken | None = None  # Policy.STREAM: the upgrade's token, signature and age checked


def api_key_hash(key: str) -> str:
    """The form in which auth.api_keys and auth.admin_api_keys store a key: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _credential(authorization: str, scheme: str) -> str | None:
    """The value of an `Authorization: <scheme> <value>` header, or None for another scheme."""
    given, _, value = authorization.partition(" ")
    return value.strip() or None if given.lower() == scheme else None


def _scheme(authorization: str) -> str:
    return authorization.partition(" ")[0].lower()


# Where a refused key comes from: logging in again never fixes a key.
_ADMIN_KEY_HOW = "its operator adds one with `python -m server hash-key --admin`"
_LOGIN_KEY_HOW = "ask the server's operator for a key; `python -m server hash-key` adds one"


def _check_api_key(key: str, allowed: tuple[str, ...], *, invalid: str) -> None:
    """401 `invalid_api_key` unless the key's hash is one of `allowed`. Compared against every entry in
    constant time, so the time taken does not tell which one matched."""
    presented = api_key_hash(key)
    matches = [hmac.compare_digest(presented, stored) for stored in allowed]  # every entry, always
    if not any(matches):
        raise InvalidToken(invalid, code="invalid_api_key")


class Authenticator:
    def __init__(self, signer: TokenSigner, store: SessionStore, settings: AuthSettings):
        self.signer, self.store, self.settings = signer, store, settings

    async def authenticate(self, policy: Policy, authorization: str, *, cost: int | Callable[[], int] = 0,
                           idempotency_key: str | None = None) -> Principal:
        """Resolve a route's policy for the credential it was sent (`authorization` in the HTTP header's
        form). `cost` (the session's rate limit) may be a function: it is called after the token's
        signature is checked, so a forged token is refused before a request body is looked at."""
        if policy is Policy.PUBLIC or (policy is Policy.STREAM and not authorization):
            return Principal()
        if policy is Policy.STREAM:
            return Principal(token=self.verify(authorization))
        if policy is Policy.ADMIN or (policy is Policy.SESSION_OR_ADMIN and _scheme(authorization) == "apikey"):
            self.admin(authorization)
            return Principal(admin=True)
        if policy is Policy.OPTIONAL_SESSION and not authorization:
            if not self.settings.anonymous_inference:
                raise InvalidToken(f"This server allows no anonymous inference; {SEND_TOKEN}.", code="missing_token")
            return Principal()
        return Principal(await self.session(authorization, cost=cost, idempotency_key=idempotency_key))

    def verify(self, authorization: str) -> VerifiedToken:
        """`Bearer <token>` -> a token whose signature and age are good (no store access)."""
        if not authorization:
            raise InvalidToken(f"This route needs a session: {SEND_TOKEN}.", code="missing_token")
        token = _credential(authorization, "bearer")
        if token is None:
            raise InvalidToken(f"The Authorization header must be 'Bearer <token>': {SEND_TOKEN}.",
                               code="malformed_token")
        return self.signer.verify(token)

    async def session(self, authorization: str, *, cost: int | Callable[[], int] = 0,
                      idempotency_key: str | None = None) -> Session:
        """A live session for `Bearer <token>`: one store round trip that slides its expiry, checks
        revocation and takes `cost` from its rate limit."""
        verified = self.verify(authorization)
        return await self.resume(verified, cost=cost() if callable(cost) else cost, idempotency_key=idempotency_key)

    async def resume(self, token: VerifiedToken, *, cost: int = 0, idempotency_key: str | None = None) -> Session:
        """The live session of a token already verified (a stream's, for each of its messages)."""
        return await self.store.touch(token, cost=cost, idempotency_key=idempotency_key)

    def admin(self, authorization: str) -> None:
        """`ApiKey <key>` with a key listed (hashed) in auth.admin_api_keys."""
        key = _credential(authorization, "apikey")
        if key is None:
            raise InvalidToken("This route needs 'Authorization: ApiKey <admin key>', a key whose hash is in the "
                               f"server's auth.admin_api_keys ({_ADMIN_KEY_HOW}).", code="missing_api_key")
        if not self.settings.admin_api_keys:
            raise Forbidden("The admin API is off on this server; list key hashes in auth.admin_api_keys.",
                            code="admin_api_disabled")
        _check_api_key(key, self.settings.admin_api_keys,
                       invalid=f"The admin API key is not in the server's auth.admin_api_keys ({_ADMIN_KEY_HOW}).")

    async def admit_login(self, authorization: str, client_address: str) -> str:
        """Check the API key (where keys are configured) and charge the login rate limit: per valid key,
        else per client address, so that wrong keys are throttled too and a fresh login never escapes a
        session's rate limit for long. `client_address` is the request's resolved address
        (service.client_address); an IPv6 client is counted by its /64. Returns who was charged (the new
        session's owner, whose limits its sessions share, such as feedback.daily_limit)."""
        per_minute = self.settings.login_rate_limit_per_minute
        address = f"address:{rate_limit_bucket(client_address)}"
        if not self.settings.api_keys:  # none configured: anyone may log in
            await self.store.take_login(address, per_minute)
            return address
        key = _credential(authorization, "apikey")
        if key is None:
            raise InvalidToken("Logging in needs 'Authorization: ApiKey <key>', a key whose hash is in the server's "
                               f"auth.api_keys ({_LOGIN_KEY_HOW}).", code="missing_api_key")
        try:
            _check_api_key(key, self.settings.api_keys,
                           invalid=f"The API key is not in the server's auth.api_keys ({_LOGIN_KEY_HOW}).")
        except InvalidToken:
            await self.store.take_login(address, per_minute)
            raise
        await self.store.take_login(api_key_hash(key), per_minute)
        return api_key_hash(key)
