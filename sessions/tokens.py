"""Session tokens: an itsdangerous signature over the session id, checked with a max age.

The signature proves the server issued the token; the session store then proves it is still
live (logout deletes the session, so a valid signature alone is not enough).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from core.errors import LOG_IN_AGAIN, InvalidToken

_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")
_SESSION_ID_SHAPE = re.compile(r"^[0-9a-f]{32}$")
_BAD_SIGNATURE = f"The token's signature is not valid (another server's, or signed with a retired key); {LOG_IN_AGAIN}."


def new_session_id() -> str:
    """128 random bits, hex."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class VerifiedToken:
    session_id: str
    issued_at: float  # Unix seconds; the session's hard deadline is issued_at + max lifetime


def _ref(key: bytes, session_id: str) -> str:
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()[:16]


class TokenSigner:
    def __init__(self, secret_keys: list[str], max_age_seconds: int):
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        # Config lists keys newest first; itsdangerous wants the signing (newest) key last.
        self._serializer = URLSafeTimedSerializer(list(reversed(secret_keys)), salt="session-token")
        self.max_age_seconds = max_age_seconds
        # One derived key per secret, newest first: naming sessions never uses a signing key as it is.
        self._ref_keys = [hmac.new(key.encode(), b"session-ref", hashlib.sha256).digest() for key in secret_keys]

    def session_ref(self, session_id: str) -> str:
        """How a session is named anywhere outside its own keys (the export, the access log, shared
        indexes): 16 hex digits of an HMAC of its id under the newest secret key. Without the secret
        it cannot be linked to the id, and a plain hash of the id in one place cannot be matched to it
        in another."""
        return _ref(self._ref_keys[0], session_id)

    def session_refs(self, session_id: str) -> list[str]:
        """The session's name under every configured secret key, newest first: data recorded before a
        key rotation is still found under the name it was recorded with."""
        return [_ref(key, session_id) for key in self._ref_keys]

    def issue(self, session_id: str) -> str:
        return self._serializer.dumps(session_id)

    def verify(self, token: str) -> VerifiedToken:
        if not _TOKEN_SHAPE.match(token):
            raise InvalidToken(f"The bearer token is malformed; {LOG_IN_AGAIN}.", code="malformed_token")
        verified = self._check_signature(token)
        age = time.time() - verified.issued_at
        if age > self.max_age_seconds:
            raise InvalidToken(f"The token has expired; {LOG_IN_AGAIN}.", code="token_expired")
        if age < -60:
            raise InvalidToken(_BAD_SIGNATURE, code="invalid_signature")
        return verified

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one signer per app; bounded, and tokens are immutable
    def _check_signature(self, token: str) -> VerifiedToken:
        """The HMAC check, remembered per token string: a client sends the same token on every
        request, and the same string always has the same answer (age is checked by the caller)."""
        try:
            session_id, signed_at = self._serializer.loads(token, return_timestamp=True)
        except BadSignature:
            raise InvalidToken(_BAD_SIGNATURE, code="invalid_signature") from None
        if not isinstance(session_id, str) or not _SESSION_ID_SHAPE.match(session_id):
            raise InvalidToken(f"The bearer token is malformed; {LOG_IN_AGAIN}.", code="malformed_token")
        return VerifiedToken(session_id=session_id, issued_at=signed_at.timestamp())
