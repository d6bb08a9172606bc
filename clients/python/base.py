"""State and settings common to `Client` and `AsyncClient`; neither does any I/O here."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import httpx

from clients.python import protocol
from clients.python.errors import AuthError


def _version() -> str:
    # The client installed on its own (clients/python/pyproject.toml), else inside the server's install.
    for distribution in ("session-inference-client", "session-inference-server"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return "0+unknown"


USER_AGENT = f"inference-client-python/{_version()}"


class BaseClient:
    """Holds the session token, the retry policy and the settings for the underlying httpx client.

    `token` may be given to reuse a session made elsewhere; such a session belongs to whoever made
    it, so leaving a `with` block logs out only a session that this client's `login()` opened.
    `timeout` (seconds, or an `httpx.Timeout`) is on by default so a stalled server cannot hang a
    caller; `retries`/`backoff` feed `protocol.RetryPolicy`; `transport` is for tests and proxies.
    """

    def __init__(
        self,
        base_url: str = protocol.DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        concurrency: int = 4,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must not be negative")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url
        self.token = token
        self.concurrency = concurrency
        self.policy = protocol.RetryPolicy(retries=retries, backoff=backoff)
        self._owns_session = False
        self._http = self._open({
            "base_url": base_url,
            "timeout": timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            "headers": {"User-Agent": USER_AGENT},
            "transport": transport,
        })

    def _open(self, settings: dict[str, Any]) -> Any:
        """The httpx client (sync or async) that the subclass sends with."""
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "logged in" if self.token else "no session"
        return f"{type(self).__name__}({self.base_url!r}, {state})"

    def _logged_in(self, result: dict[str, Any]) -> dict[str, Any]:
        self.token = result["token"]
        self._owns_session = True
        return result

    def _logged_out(self) -> None:
        self.token = None
        self._owns_session = False

    @staticmethod
    def _already_logged_out(error: AuthError) -> bool:
        # A retried DELETE whose first try did land is refused as revoked: the goal is reached.
        return error.code == "session_revoked"
