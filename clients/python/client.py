"""The synchronous client, on `httpx.Client`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from time import sleep
from types import TracebackType
from typing import IO, Any

import httpx

from clients.python import protocol
from clients.python.base import USER_AGENT, BaseClient
from clients.python.errors import AuthError, ConnectionFailed, InferenceError
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
    def login(self, api_key: str | None = None, options: Mapping[str, Any] | None = None, *,
              model: str | None = None) -> dict[str, Any]:
        """Open a session (with these options, if given) and use its token from now on. `model` chooses the
        session's model (`models()` lists them; None: the server's default), as `options={"model": ...}` would."""
        return self._logged_in(self._send(protocol.login(api_key, options, model)))

    def session(self) -> dict[str, Any]:
        return self._send(protocol.session())

    def options(self) -> dict[str, Any]:
        return self._send(protocol.get_options())

    def set_options(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the session's options; returns all of them. A `model` other than the session's
        starts resize, crop, interpolation, mean and std from that model's defaults (unless given too)."""
        return self._send(protocol.set_options(changes))

    def logout(self, *, erase: bool = False) -> None:
        """Revoke the session on the server and forget its token. With `erase=True` the server also
        erases the session's history, feedback and captured images."""
        try:
            self._send(protocol.logout(erase))
        except AuthError as error:
            if not self._already_logged_out(error):
                raise
        self._logged_out()

    # -- predictions ------------------------------------------------------------------------------
    def predict(self, image: ImageInput, *, model: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Classify one image; keyword arguments override the session's options for this call only (`model`:
        another served model for this image, with that model's preprocessing defaults)."""
        return self._send(protocol.predict(image, {**overrides, "model": model}))

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

    def predict_stream(self, images: Iterable[Any], **overrides: Any) -> Iterator[protocol.StreamResult]:
        """Classify `images` over one WebSocket (`GET /v1/stream`), yielding a `StreamResult` per image in
        completion order: `.ref` (the item's index, or the "ref" of an item given as
        {"image": ..., "ref": ..., "options": {...}}), `.result` or `.error`. Every result is recorded in
        the history like `predict`. Keyword arguments override options for every image. At most the
        server's `max_in_flight` images are outstanding. A stream the server closes with 1001 (it shuts
        down) resumes on a new connection with the same session, sending again only the images not yet
        answered (at most protocol.MAX_STREAM_RESUMES times). Otherwise not retried: a lost connection
        raises ConnectionFailed and a refused token AuthError; results already yielded stay recorded."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import ClientConnection, connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = self._http.timeout.read

        def open_socket(window: protocol.StreamWindow | None) -> ClientConnection:
            attempts = protocol.MAX_STREAM_RESUMES if window is not None else 1  # a resume waits for a server
            for attempt in range(attempts):
                try:
                    return connect(protocol.stream_url(self.base_url), additional_headers=headers,
                                   user_agent_header=USER_AGENT, open_timeout=self._http.timeout.connect)
                except (OSError, InvalidHandshake, TimeoutError) as error:
                    if attempt + 1 == attempts:
                        raise ConnectionFailed("connection_failed",
                                               f"GET {protocol.STREAM_PATH} failed: {error}") from error
                    sleep(protocol.resume_pause(attempt))
            raise AssertionError("unreachable")

        window: protocol.StreamWindow | None = None
        while True:
            socket = open_socket(window)
            last_error: InferenceError | None = None
            with socket:
                try:
                    ready = protocol.stream_frame(socket.recv(timeout))
                    if ready["type"] != "ready":
                        last_error = protocol.stream_error(ready)
                        socket.recv(timeout)  # the close that follows a refusal
                        raise last_error
                    if window is None:
                        window = protocol.StreamWindow(images, overrides, ready["max_in_flight"])
                    else:
                        window.resume(ready["max_in_flight"])
                    closed_by_server = False
                    while True:
                        while not closed_by_server and window.room():
                            header, data = window.next_frames()
                            try:
                                socket.send(header)
                                socket.send(data)
                            except ConnectionClosed:
                                # What the server sent before closing (a refusal's error frame, say) is
                                # still to be read: recv() gives it, then raises.
                                closed_by_server = True
                        if window.done:
                            return
                        result = window.received(protocol.stream_frame(socket.recv(timeout)))
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

    def history(self, limit: int | None = None, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
        """The session's predictions, newest first, fetched a page at a time as you iterate (all of
        them, or the newest `limit`). Errors surface when iteration reaches the failing page."""
        pager = protocol.HistoryPager(limit, page_size)
        while (call := pager.next_call()) is not None:
            yield from pager.take(self._send(call))

    def history_item(self, history_id: str) -> dict[str, Any]:
        return self._send(protocol.history_item(history_id))

    def feedback(self, history_id: str, label: int | str, comment: str | None = None) -> dict[str, Any]:
        """Correct one of the session's predictions: `label` is a class index or a label name (any
        case). Returns the history item with its `feedback`; a repeat replaces the earlier feedback."""
        return self._send(protocol.feedback(history_id, label, comment))

    def remove_feedback(self, history_id: str) -> None:
        self._send(protocol.remove_feedback(history_id))

    def history_image(self, history_id: str) -> bytes:
        """The image of a history item as it was sent, where the server captured it (NotFoundError if not)."""
        return self._send(protocol.history_image(history_id))

    def export_feedback(self, destination: str | os.PathLike[str] | IO[bytes], *, admin_key: str,
                        since: protocol.ExportTime | None = None, until: protocol.ExportTime | None = None,
                        model_version: str | None = None, export_format: str = "tar",
                        model: str | None = None) -> int:
        """Download the training export (GET /v1/feedback/export, admin key) into `destination`, a
        path or a binary file, as it arrives: never whole in memory. `export_format`: "tar" (a
        WebDataset) or "jsonl". `since`/`until`: aware datetimes, epoch ms or ISO 8601 text. Returns
        the bytes written. Retried like any call until the answer starts; a download cut off midway
        raises ConnectionFailed, and a path is then left as it was."""
        exchange = protocol.Exchange(protocol.feedback_export(
            admin_key, since=since, until=until, model_version=model_version, export_format=export_format,
            model=model),
            self.policy, self.token)
        while (wait := exchange.after(self._try_streamed(exchange.request))) is not None:
            sleep(wait)
        response = exchange.response()
        written = 0
        try:
            with protocol.download_target(destination) as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as error:
            raise protocol.download_cut_off(exchange.call, written, error) from error
        finally:
            response.close()
        return written

    # -- model versions (admin calls need a key listed in the server's auth.admin_api_keys) ----------
    def models(self, admin_key: str | None = None) -> dict[str, Any]:
        """GET /v1/models: {"default": name, "models": [...]}, each served model with its classes, input,
        preprocessing defaults and versions (hash, size, activation time); session token or admin key."""
        return self._send(protocol.models(admin_key))

    def labels(self, model: str | None = None, admin_key: str | None = None) -> list[str]:
        """The class labels of `model` (GET /v1/models/<model>/labels), index i naming class i: what
        `feedback` takes for that model's predictions. None: the session's model, else the default one."""
        return (self.model_labels(model, admin_key))["labels"]

    def model_labels(self, model: str | None = None, admin_key: str | None = None) -> dict[str, Any]:
        """`labels` with the model's name and version: {"name", "version", "labels"}."""
        return self._follow(protocol.model_labels(model, admin_key=admin_key, logged_in=bool(self.token)))

    def publish_version(self, name: str, version: str, weights: Any, *, admin_key: str) -> dict[str, Any]:
        """Upload a state_dict file (path, bytes or binary file) as `version`; its SHA-256 goes along."""
        return self._send(protocol.publish_version(name, version, weights, admin_key))

    def add_model(self, name: str, folder: str | os.PathLike[str] | bytes, *, admin_key: str) -> dict[str, Any]:
        """Add a model: its folder (model.toml, labels, its file; docs/models.md), packed and uploaded, or such a
        folder's tar archive as bytes. The server checks, exports and serves it on every replica; its listing."""
        return self._send(protocol.add_model(name, folder, admin_key))

    def delete_model(self, name: str, *, admin_key: str) -> None:
        """Delete a model added with add_model (its versions too), on every replica."""
        self._send(protocol.delete_model(name, admin_key))

    def activate_version(self, name: str, version: str, *, admin_key: str,
                         traffic_percent: int | None = None) -> dict[str, Any]:
        """Serve `version` to every session, or (`traffic_percent` below 100) as a canary to that share
        of sessions while the rest keep the version that served before."""
        return self._send(protocol.activate_version(name, version, admin_key, traffic_percent))

    def remove_version(self, name: str, version: str, *, admin_key: str) -> None:
        self._send(protocol.remove_version(name, version, admin_key))

    def set_pinnable(self, name: str, version: str, *, admin_key: str, pinnable: bool = True) -> dict[str, Any]:
        """Let sessions pin `version` (the model_version option), or with `pinnable=False` no longer; a
        session may always pin the active version and the canary's."""
        return self._send(protocol.set_pinnable(name, version, admin_key, pinnable))

    def purge_feedback(self, *, admin_key: str, since: protocol.ExportTime | None = None,
                       until: protocol.ExportTime | None = None, session: str | None = None) -> int:
        """Delete the feedback given in a time range and/or of one session (the export's `session`
        field); how many records went."""
        return self._send(protocol.purge_feedback(admin_key, since=since, until=until, session=session))

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

    def _follow(self, plan: protocol.Plan) -> Any:
        """Send each call of `plan` in turn, answering it with the last result; the plan's own result."""
        try:
            call = next(plan)
            while True:
                call = plan.send(self._send(call))
        except StopIteration as done:
            return done.value

    def _try(self, request: dict[str, Any]) -> protocol.Outcome:
        try:
            return self._http.request(**request)
        except httpx.TransportError as error:
            return error

    def _try_streamed(self, request: dict[str, Any]) -> protocol.Outcome:
        """`_try` for an answer read as a stream: a success is returned unread and open."""
        try:
            response = self._http.send(self._http.build_request(**request), stream=True)
        except httpx.TransportError as error:
            return error
        if not response.is_success:
            try:
                response.read()  # an error's JSON, small
            except httpx.TransportError as error:
                return error
            finally:
                response.close()
        return response
