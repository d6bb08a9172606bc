"""Sessions: log in (after service.auth admitted the caller), read and change options, log out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.errors import BadOptions
from core.options import PREPROCESSING, Options
from core.session import Session
from sessions.store import SessionStore
from sessions.tokens import TokenSigner

if TYPE_CHECKING:
    from service.capture import Captures
    from service.feedback import FeedbackService
    from service.models import Models


class SessionService:
    def __init__(self, store: SessionStore, signer: TokenSigner, models: Models, *,
                 feedback: FeedbackService | None = None, captures: Captures | None = None,
                 on_erased: Callable[[], None] | None = None):
        """`on_erased()` is told of each erase once it is complete (the embedded Redis then rewrites
        its files, so that the erased data leaves the disk)."""
        self.store, self.signer, self.models = store, signer, models
        self.feedback, self.captures = feedback, captures
        self.on_erased = on_erased

    async def login(self, changes: Any, owner: str | None = None) -> tuple[str, Session]:
        """A new session with the chosen (or default) model's default options merged with `changes`, and its
        signed token. `owner`: who logged in, as service.auth.Authenticator.admit_login charged it."""
        options = self.models.initial_options(changes)
        await self._check_version(options, changes)
        session = await self.store.create(options, owner)
        return self.signer.issue(session.id), session

    async def update_options(self, session: Session, changes: Any) -> Options:
        """The session's options with `changes` applied; a change of model starts the preprocessing options
        from that model's defaults (service.models), written with the changes as one update."""
        options = self.models.options_for(session.options, changes)
        await self._check_version(options, changes)
        if options.model != session.options.model:  # the new model's defaults, and no pin of the old one's
            values = options.to_dict()
            changes = {**{name: values[name] for name in PREPROCESSING}, "model_version": None, **changes}
        return await self.store.update_options(session.id, changes)

    async def logout(self, session: Session, *, erase: bool = False) -> None:
        """End the session (its token is refused from now on, its history and idempotency keys are
        gone). With `erase`, its feedback and captured images go too (an image another session sent
        stays for that one); feedback otherwise stays, as training data that names the session only
        by a hash.

        An erase revokes the token last: each step may be repeated, so when one fails (503) the token
        still works and a retry finishes the job. The session is marked first, so that a predict or a
        feedback racing the erase refuses itself rather than leave data behind it."""
        if not erase:
            await self.store.delete(session)
            return
        await self.store.begin_erase(session.id)
        if self.feedback is not None:
            await self.feedback.erase(session.id)
        if self.captures is not None:
            await self.captures.erase(session.id)
        await self.store.delete(session, erase=True)
        if self.on_erased is not None:
            self.on_erased()

    async def _check_version(self, options: Options, changes: Any) -> None:
        """Refuse pinning a version the options' model does not have (422), or one an admin did not make
        pinnable (403 model_version_not_pinnable)."""
        version = options.model_version
        if version is not None and isinstance(changes, dict) and "model_version" in changes \
                and not await self.models.catalogue_for(options).may_pin(version):
            model = self.models.catalogue_for(options).name
            raise BadOptions("model_version", f"No version {version!r} of the model {model!r}; see GET /v1/models.")
