"""Session routes: log in, read the session, change its options, log out."""

from __future__ import annotations

from core.errors import BadRequest, quoted
from handlers.base import BaseHandler
from service.auth import Policy


class LoginHandler(BaseHandler):
    """POST /v1/sessions: public, or gated by an API key where auth.api_keys is set (the login's own
    credential, checked by service.auth with the login rate limit)."""

    auth_policy = Policy.PUBLIC

    async def post(self) -> None:
        owner = await self.auth.admit_login(self.request.headers.get("Authorization", ""), self.client_address)
        body = self.json_object(required=False)
        token, session = await self.sessions.login(body.get("options") or {}, owner)
        self.write_json({
            "token": token,
            "session_id": session.id,
            "expires_at": session.to_dict()["expires_at"],
            "options": session.options.to_dict(),
        }, status=201)


class SessionHandler(BaseHandler):
    """GET /v1/session and DELETE /v1/session[?erase=true] (log out; with erase, forget everything)."""

    async def get(self) -> None:
        self.write_json(self.current_session.to_dict())

    async def delete(self) -> None:
        erase = self.get_query_argument("erase", "false")
        if erase not in ("true", "false"):
            raise BadRequest(f"erase must be true or false, got {quoted(erase)}.", code="invalid_parameter")
        await self.sessions.logout(self.current_session, erase=erase == "true")
        self.no_content()


class OptionsHandler(BaseHandler):
    """GET and PATCH /v1/session/options."""

    async def get(self) -> None:
        self.write_json({"options": self.current_session.options.to_dict()})

    async def patch(self) -> None:
        options = await self.sessions.update_options(self.current_session, self.json_object())
        self.write_json({"options": options.to_dict()})
