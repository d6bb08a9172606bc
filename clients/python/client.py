"""The synchronous client, on `httpx.Client`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from time import sleep
from types import TracebackType
from typing import Any

import httpx

from clients.python import protocol
from clients.python.base import BaseClient
from clients.python.errors import AuthError, InferenceError
from clients.python.protocol import ImageInput


class Client(BaseClient):
    """A session on the inference server, over one pooled HTTP connection set.

        with Client("http://127.0.0.1:8000") as client:
            client.login()
            result = client.predict("tests/data/cat.jpg")

    Every call retries network failures, 503 and 429 (see `protocol.RetryPolicy`) and raises an
    `errors.InferenceError` subclass for anything else that fails. Safe to share between threads.
    """

    _http: httpx.Client

    def _open(self, settings: dict[str, Any]) -> httpx.Client:
        return httpx.Client(**settings)

    # -- session ----------------------------------------------------------------------------------
    def login(self, api_key: str | None = None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Open a session (with these options, if given) and use its token from now on."""
        return self._logged_in(self._send(protocol.login(api_key, options)))

    def session(self) -> dict[str, Any]:
        return self._send(protocol.session())

    def options(self) -> dict[str, Any]:
        return self._send(protocol.get_options())

    def set_options(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the session's options; returns all of them."""
        return self._send(protocol.set_options(changes))

    def logout(self) -> None:
        """Revoke the session on the server and forget its token."""
        try:
            self._send(protocol.logout())
        except AuthError as error:
            if not self._already_logged_out(error):
                raise
        self._logged_out()

    # -- predictions ------------------------------------------------------------------------------
    def predict(self, image: ImageInput, **overrides: Any) -> dict[str, Any]:
        """Classify one image; keyword arguments override the session's options for this call only."""
        return self._send(protocol.predict(image, overrides))

    def preprocess(self, image: ImageInput, **overrides: Any) -> Any:
        """The float32 (3, crop, crop) NumPy array the model would see for `image` under the session's
        options (keyword arguments override them for this call). Needs NumPy."""
        return self._send(protocol.preprocess(image, overrides))

    def predict_many(self, images: Iterable[ImageInput], **overrides: Any) -> list[dict[str, Any]]:
        """Classify several images, `concurrency` at a time; results come in the order of `images`.
        The first failure is raised, and images not yet sent are not sent."""
        images = list(images)
        if not images:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(images))) as pool:
            futures = [pool.submit(self.predict, image, **overrides) for image in images]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def history(self, limit: int | None = None, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """The session's predictions, newest first, fetched a page at a time as you iterate (all of
        them, or the newest `limit`). Errors surface when iteration reaches the failing page."""
        pager = protocol.HistoryPager(limit, page_size)
        while (call := pager.next_call()) is not None:
            yield from pager.take(self._send(call))

    def history_item(self, history_id: str) -> dict[str, Any]:
        return self._send(protocol.history_item(history_id))

    # -- life cycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        # Logging out is best effort: a failure here must not hide the block's own exception, and an
        # abandoned session expires on the server anyway.
        try:
            if self._owns_session and self.token:
                with contextlib.suppress(InferenceError):
                    self.logout()
        finally:
            self.close()

    # -- transport --------------------------------------------------------------------------------
    def _send(self, call: protocol.Call) -> Any:
        """Send `call`, trying again while the retry policy says so; its shaped result or its error."""
        exchange = protocol.Exchange(call, self.policy, self.token)
        while (wait := exchange.after(self._try(exchange.request))) is not None:
            sleep(wait)
        return exchange.result()

    def _try(self, request: dict[str, Any]) -> protocol.Outcome:
        try:
            return self._http.request(**request)
        except httpx.TransportError as error:
            return error
