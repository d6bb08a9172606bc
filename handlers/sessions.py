"""Session routes: log in, read the session, change its options, log out."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from handlers.base import BaseHandler
from sessions.errors import BadOptions, InvalidToken
from sessions.options import Options


def api_key_hash(key: str) -> str:
    """The form in which auth.api_keys stores a key: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def presented_api_key(handler: BaseHandler, *, missing: str) -> str:
    """The key of an `Authorization: ApiKey <key>` header (401 `missing_api_key` without one)."""
    scheme, _, key = handler.request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "apikey" or not key.strip():
        raise InvalidToken(missing, code="missing_api_key")
    return key.strip()


def check_api_key(key: str, allowed: list[str], *, invalid: str) -> None:
    """401 `invalid_api_key` unless the key's hash is one of `allowed`. Compared against every entry
    in constant time, so the time taken does not tell which one matched."""
    presented = api_key_hash(key)
    matches = [hmac.compare_digest(presented, stored) for stored in allowed]
    if not any(matches):
        raise InvalidToken(invalid, code="invalid_api_key")


async def check_model_version(handler: BaseHandler, changes: Any) -> None:
    """Refuse pinning a version that does not exist, when options are set (PATCH or login)."""
    version = changes.get("model_version") if isinstance(changes, dict) else None
    if isinstance(version, str) and version and not await handler.model_versions.exists(version):
        raise BadOptions("model_version", f"No model version {version!r}; see GET /v1/models.")


class LoginHandler(BaseHandler):
    """POST /v1/sessions: public, or gated by an API key where auth.api_keys is set."""

    public = True

    async def post(self) -> None:
        await self._take_login()
        body = self.json_object(required=False)
        options = Options().merged(body.get("options") or {})
        await check_model_version(self, body.get("options"))
        session = await self.store.create(options)
        self.write_json({
            "token": self.signer.issue(session.id),
            "session_id": session.id,
            "expires_at": session.to_dict()["expires_at"],
            "options": options.to_dict(),
        }, status=201)

    async def _take_login(self) -> None:
        """Check the API key (where keys are configured) and charge the login rate limit: per valid key,
        else per client address, so that wrong keys are throttled too and a fresh login never
        escapes a session's rate limit for long."""
        per_minute = self.config.sessions.login_rate_limit_per_minute
        address = f"address:{self.request.remote_ip}"
        if not self.config.auth.api_keys:  # none configured: anyone may log in
            await self.store.take_login(address, per_minute)
            return
        key = presented_api_key(self, missing="Logging in needs an 'Authorization: ApiKey <key>' header.")
        try:
            check_api_key(key, self.config.auth.api_keys, invalid="The API key is not valid.")
        except InvalidToken:
            await self.store.take_login(address, per_minute)
            raise
        await self.store.take_login(api_key_hash(key), per_minute)


class SessionHandler(BaseHandler):
    """GET /v1/session and DELETE /v1/session (log out)."""

    async def get(self) -> None:
        self.write_json(self.current_session.to_dict())

    async def delete(self) -> None:
        await self.store.delete(self.current_session)
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()


class OptionsHandler(BaseHandler):
    """GET and PATCH /v1/session/options."""

    async def get(self) -> None:
        self.write_json({"options": self.current_session.options.to_dict()})

    async def patch(self) -> None:
        changes = self.json_object()
        await check_model_version(self, changes)
        options = await self.store.update_options(self.current_session.id, changes)
        self.write_json({"options": options.to_dict()})
