"""The asynchronous client, on `httpx.AsyncClient`: the same methods as `Client`, awaitable."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import IO, Any

import httpx

from clients.python import protocol
from clients.python.base import USER_AGENT, BaseClient
from clients.python.errors import AuthError, ConnectionFailed, InferenceError
from clients.python.protocol import ImageInput


class AsyncClient(BaseClient):
    """A session on the inference server for asyncio code.

        async with AsyncClient("http://127.0.0.1:8000") as client:
            await client.login()
            results = await client.predict_many(["cat.jpg", "coffee.jpg"])

    Retries and errors are those of `Client` (both use `protocol`).
    """

    _http: httpx.AsyncClient

    def _open(self, settings: dict[str, Any]) -> httpx.AsyncClient:
        return httpx.AsyncClient(**settings)

    # -- session ----------------------------------------------------------------------------------
    async def login(self, api_key: str | None = None, options: Mapping[str, Any] | None = None, *,
              model: str | None = None) -> dict[str, Any]:
        """Open a session (with these options, if given) and use its token from now on. `model` chooses the
        session's model (`models()` lists them; None: the server's default), as `options={"model": ...}` would."""
        return self._logged_in(await self._send(protocol.login(api_key, options, model)))

    async def session(self) -> dict[str, Any]:
        return await self._send(protocol.session())

    async def options(self) -> dict[str, Any]:
        return await self._send(protocol.get_options())

    async def set_options(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the session's options; returns all of them. A `model` other than the session's
        starts resize, crop, interpolation, mean and std from that model's defaults (unless given too)."""
        return await self._send(protocol.set_options(changes))

    async def logout(self, *, erase: bool = False) -> None:
        """Revoke the session on the server and forget its token. With `erase=True` the server also
        erases the session's history, feedback and captured images."""
        try:
            await self._send(protocol.logout(erase))
        except AuthError as error:
            if not self._already_logged_out(error):
                raise
        self._logged_out()

    # -- predictions ------------------------------------------------------------------------------
    async def predict(self, image: ImageInput, *, model: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Classify one image; keyword arguments override the session's options for this call only (`model`:
        another served model for this image, with that model's preprocessing defaults)."""
        # Reading a file or encoding a PIL image blocks: do it off the event loop.
        call = await asyncio.to_thread(protocol.predict, image, {**overrides, "model": model})
        return await self._send(call)

    async def preprocess(self, image: ImageInput, **overrides: Any) -> Any:
        """The float32 (3, crop, crop) NumPy array the model would see for `image` under the session's
        options (keyword arguments override them for this call). Needs NumPy."""
        call = await asyncio.to_thread(protocol.preprocess, image, overrides)
        return await self._send(call)

    async def predict_many(self, images: Iterable[ImageInput], **overrides: Any) -> list[dict[str, Any]]:
        """Classify several images, `concurrency` at a time; results come in the order of `images`.
        The first failure is raised and the calls still pending are cancelled."""
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(image: ImageInput) -> dict[str, Any]:
            async with semaphore:
                return await self.predict(image, **overrides)

        tasks = [asyncio.ensure_future(one(image)) for image in images]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def predict_stream(self, images: Iterable[Any], **overrides: Any) -> AsyncIterator[protocol.StreamResult]:
        """`Client.predict_stream` for asyncio: `async for result in client.predict_stream(images)`, resumed
        after a 1001 close as there."""
        from websockets.asyncio.client import ClientConnection, connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = self._http.timeout.read

        async def open_socket(window: protocol.StreamWindow | None) -> ClientConnection:
            attempts = protocol.MAX_STREAM_RESUMES if window is not None else 1  # a resume waits for a server
            for attempt in range(attempts):
                try:
                    return await connect(protocol.stream_url(self.base_url), additional_headers=headers,
                                         user_agent_header=USER_AGENT, open_timeout=self._http.timeout.connect)
                except (OSError, InvalidHandshake, TimeoutError) as error:
                    if attempt + 1 == attempts:
                        raise ConnectionFailed("connection_failed",
                                               f"GET {protocol.STREAM_PATH} failed: {error}") from error
                    await asyncio.sleep(protocol.resume_pause(attempt))
            raise AssertionError("unreachable")

        window: protocol.StreamWindow | None = None
        while True:
            socket = await open_socket(window)
            last_error: InferenceError | None = None
            async with socket:
                try:
                    ready = protocol.stream_frame(await asyncio.wait_for(socket.recv(), timeout))
                    if ready["type"] != "ready":
                        last_error = protocol.stream_error(ready)
                        await asyncio.wait_for(socket.recv(), timeout)  # the close that follows a refusal
                        raise last_error
                    if window is None:
                        window = protocol.StreamWindow(images, overrides, ready["max_in_flight"])
                    else:
                        window.resume(ready["max_in_flight"])
                    closed_by_server = False
                    while True:
                        # next() may read a file: off the loop
                        while not closed_by_server and await asyncio.to_thread(window.room):
                            header, data = await asyncio.to_thread(window.next_frames)
                            try:
                                await socket.send(header)
                                await socket.send(data)
                            except ConnectionClosed:  # as in Client.predict_stream: read what came first
                                closed_by_server = True
                        if window.done:
                            return
                        result = window.received(
                            protocol.stream_frame(await asyncio.wait_for(socket.recv(), timeout)))
                        last_error = result.error
                        yield result
                        if window.refusal is not None:
                            raise window.refusal
                except ConnectionClosed as closed:
                    code, reason = (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (None, None)
                    if window is None or not window.may_resume(code):
                        raise protocol.stream_closed(code, reason, last_error) from None
                except TimeoutError:
                    raise ConnectionFailed("timeout", f"No stream frame within {timeout} s.") from None

    async def history(self, limit: int | None = None, *, page_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The session's predictions, newest first, fetched a page at a time as you iterate (all of
        them, or the newest `limit`). Errors surface when iteration reaches the failing page."""
        pager = protocol.HistoryPager(limit, page_size)
        while (call := pager.next_call()) is not None:
            for item in pager.take(await self._send(call)):
                yield item

    async def history_item(self, history_id: str) -> dict[str, Any]:
        return await self._send(protocol.history_item(history_id))

    async def feedback(self, history_id: str, label: int | str, comment: str | None = None) -> dict[str, Any]:
        """Correct one of the session's predictions: `label` is a class index or a label name (any
        case). Returns the history item with its `feedback`; a repeat replaces the earlier feedback."""
        return await self._send(protocol.feedback(history_id, label, comment))

    async def remove_feedback(self, history_id: str) -> None:
        await self._send(protocol.remove_feedback(history_id))

    async def history_image(self, history_id: str) -> bytes:
        """The image of a history item as it was sent, where the server captured it (NotFoundError if not)."""
        return await self._send(protocol.history_image(history_id))

    async def export_feedback(self, destination: str | os.PathLike[str] | IO[bytes], *, admin_key: str,
                              since: protocol.ExportTime | None = None, until: protocol.ExportTime | None = None,
                              model_version: str | None = None, export_format: str = "tar",
                        model: str | None = None) -> int:
        """`Client.export_feedback` for asyncio; the file is written on a worker thread, off the loop."""
        exchange = protocol.Exchange(protocol.feedback_export(
            admin_key, since=since, until=until, model_version=model_version, export_format=export_format,
            model=model),
            self.policy, self.token)
        while (wait := exchange.after(await self._try_streamed(exchange.request))) is not None:
            await asyncio.sleep(wait)
        response = exchange.response()
        target = protocol.download_target(destination)
        written = 0
        try:
            out = await asyncio.to_thread(target.__enter__)
            try:
                async for chunk in response.aiter_bytes():
                    await asyncio.to_thread(out.write, chunk)
                    written += len(chunk)
            except BaseException as error:
                await asyncio.to_thread(target.__exit__, type(error), error, error.__traceback__)
                raise
            await asyncio.to_thread(target.__exit__, None, None, None)
        except httpx.TransportError as error:
            raise protocol.download_cut_off(exchange.call, written, error) from error
        finally:
            await response.aclose()
        return written

    # -- model versions (admin calls need a key listed in the server's auth.admin_api_keys) ----------
    async def models(self, admin_key: str | None = None) -> dict[str, Any]:
        """GET /v1/models: {"default": name, "models": [...]}, each served model with its classes, input,
        preprocessing defaults and versions (hash, size, activation time); session token or admin key."""
        return await self._send(protocol.models(admin_key))

    async def labels(self, model: str | None = None, admin_key: str | None = None) -> list[str]:
        """The class labels of `model` (GET /v1/models/<model>/labels), index i naming class i: what
        `feedback` takes for that model's predictions. None: the session's model, else the default one."""
        return (await self.model_labels(model, admin_key))["labels"]

    async def model_labels(self, model: str | None = None, admin_key: str | None = None) -> dict[str, Any]:
        """`labels` with the model's name and version: {"name", "version", "labels"}."""
        return await self._follow(protocol.model_labels(model, admin_key=admin_key, logged_in=bool(self.token)))

    async def publish_version(self, name: str, version: str, weights: Any, *, admin_key: str) -> dict[str, Any]:
        """Upload a state_dict file (path, bytes or binary file) as `version`; its SHA-256 goes along."""
        call = await asyncio.to_thread(protocol.publish_version, name, version, weights, admin_key)
        return await self._send(call)

    async def add_model(self, name: str, folder: str | os.PathLike[str] | bytes, *, admin_key: str) -> dict[str, Any]:
        """Add a model: its folder (model.toml, labels, its file; docs/models.md), packed and uploaded, or such a
        folder's tar archive as bytes. The server checks, exports and serves it on every replica; its listing."""
        return await self._send(protocol.add_model(name, folder, admin_key))

    async def delete_model(self, name: str, *, admin_key: str) -> None:
        """Delete a model added with add_model (its versions too), on every replica."""
        await self._send(protocol.delete_model(name, admin_key))

    async def activate_version(self, name: str, version: str, *, admin_key: str,
                               traffic_percent: int | None = None) -> dict[str, Any]:
        """Serve `version` to every session, or (`traffic_percent` below 100) as a canary to that share
        of sessions while the rest keep the version that served before."""
        return await self._send(protocol.activate_version(name, version, admin_key, traffic_percent))

    async def remove_version(self, name: str, version: str, *, admin_key: str) -> None:
        await self._send(protocol.remove_version(name, version, admin_key))

    async def set_pinnable(self, name: str, version: str, *, admin_key: str, pinnable: bool = True) -> dict[str, Any]:
        """Let sessions pin `version` (the model_version option), or with `pinnable=False` no longer; a
        session may always pin the active version and the canary's."""
        return await self._send(protocol.set_pinnable(name, version, admin_key, pinnable))

    async def purge_feedback(self, *, admin_key: str, since: protocol.ExportTime | None = None,
                       until: protocol.ExportTime | None = None, session: str | None = None) -> int:
        """Delete the feedback given in a time range and/or of one session (the export's `session`
        field); how many records went."""
        return await self._send(protocol.purge_feedback(admin_key, since=since, until=until, session=session))

    # -- life cycle -------------------------------------------------------------------------------
    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Best effort, as in Client.__exit__.
        try:
            if self._owns_session and self.token:
                with contextlib.suppress(InferenceError):
                    await self.logout()
        finally:
            await self.aclose()

    # -- transport --------------------------------------------------------------------------------
    async def _send(self, call: protocol.Call) -> Any:
        """Send `call`, trying again while the retry policy says so; its shaped result or its error."""
        exchange = protocol.Exchange(call, self.policy, self.token)
        while (wait := exchange.after(await self._try(exchange.request))) is not None:
            await asyncio.sleep(wait)
        return exchange.result()

    async def _follow(self, plan: protocol.Plan) -> Any:
        """`Client._follow`, awaiting each call."""
        try:
            call = next(plan)
            while True:
                call = plan.send(await self._send(call))
        except StopIteration as done:
            return done.value

    async def _try(self, request: dict[str, Any]) -> protocol.Outcome:
        try:
            return await self._http.request(**request)
        except httpx.TransportError as error:
            return error

    async def _try_streamed(self, request: dict[str, Any]) -> protocol.Outcome:
        """`_try` for an answer read as a stream: a success is returned unread and open."""
        try:
            response = await self._http.send(self._http.build_request(**request), stream=True)
        except httpx.TransportError as error:
            return error
        if not response.is_success:
            try:
                await response.aread()  # an error's JSON, small
            except httpx.TransportError as error:
                return error
            finally:
                await response.aclose()
        return response
