"""What the sync and async clients share: building requests, reading responses, deciding retries.

Neither client builds a request or reads a response itself. Each turns a method call into a `Call`
here, runs it through an `Exchange` (which says whether and how long to wait before another try)
and sends the attempts with its own flavour of httpx. So both clients behave the same by
construction, and each holds only the I/O that differs between them.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import math
import os
import random
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from clients.python.errors import AuthError, ConnectionFailed, InferenceError, RateLimited, ServerBusy, error_class

#: What `predict` accepts: a path, the encoded bytes, a binary file object, or a PIL image.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Any

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_PAGE = 100  # the server's largest history page
MAX_WAIT = 30.0  # the longest we wait between tries, whatever Retry-After asks for

# Errors after which the same request may well succeed; anything else (a bad URL, say) will not.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
RETRYABLE_STATUSES = frozenset({429, 503})


# -- requests ------------------------------------------------------------------------------------

def _identity(body: Any) -> Any:
    return body


@dataclass(frozen=True)
class Call:
    """One logical API call: the request to send on every try, and how to shape the JSON answer."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    shape: Callable[[Any], Any] = _identity
    raw: bool = False  # a success's body goes to `shape` as bytes instead of parsed JSON

    def request(self, token: str | None) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client.request` / `httpx.AsyncClient.request`."""
        headers = dict(self.headers)
        if token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {token}"
        args: dict[str, Any] = {"method": self.method, "url": self.path, "headers": headers}
        if self.params:
            args["params"] = dict(self.params)
        if self.json is not None:
            args["json"] = self.json
        if self.content is not None:
            args["content"] = self.content
        return args


def login(api_key: str | None = None, options: Mapping[str, Any] | None = None, model: str | None = None) -> Call:
    """POST /v1/sessions; `model` is the option of that name (the session's model), given apart for clarity."""
    headers = {"Authorization": f"ApiKey {api_key}"} if api_key else {}
    chosen = {**(options or {}), **({"model": model} if model is not None else {})}
    return Call("POST", "/v1/sessions", json={"options": chosen} if chosen else None, headers=headers)


def predict(image: ImageInput, overrides: Mapping[str, Any]) -> Call:
    """The predict call. Its Idempotency-Key is made once here, so every retry of it sends the same
    key and a server that honours it will not record one image twice."""
    body, content_type = encode_image(image)
    return Call("POST", "/v1/predict", params=query_params(overrides), content=body,
                headers={"Content-Type": content_type, "Idempotency-Key": str(uuid.uuid4())})


def preprocess(image: ImageInput, overrides: Mapping[str, Any]) -> Call:
    """The preprocess call: the server's model input for this image, as a NumPy array."""
    body, content_type = encode_image(image)
    return Call("POST", "/v1/preprocess", params=query_params(overrides), content=body,
                headers={"Content-Type": content_type, "Accept": "application/x-npy"}, raw=True, shape=npy_array)


def npy_array(data: bytes) -> Any:
    """A NumPy array from .npy bytes. NumPy is imported here, so only callers of preprocess need it."""
    import numpy

    return numpy.load(io.BytesIO(data), allow_pickle=False)


def models(admin_key: str | None = None) -> Call:
    """GET /v1/models, with the session's token or an admin key: every served model, its versions and canary."""
    return Call("GET", "/v1/models", headers=_admin(admin_key) if admin_key else {})


def labels(name: str, admin_key: str | None = None) -> Call:
    """GET /v1/models/<name>/labels: {"name", "version", "labels"}, index i naming class i (what feedback takes)."""
    return Call("GET", f"/v1/models/{quote(name, safe='')}/labels", headers=_admin(admin_key) if admin_key else {})


def default_model(listing: Mapping[str, Any]) -> str:
    """The name of the model a session without a `model` option runs, from GET /v1/models. A server from
    before several models were served names no default: its one model is it."""
    if listing.get("default"):
        return str(listing["default"])
    served = listing["models"]
    return str(next((model for model in served if model.get("default")), served[0])["name"])


#: A sequence of calls whose next depends on the last answer: the client sends each call the plan yields,
#: sends the answer back in, and the plan's return value is the result (see `Client._follow`).
Plan = Generator[Call, Any, Any]


def model_labels(model: str | None, *, admin_key: str | None = None, logged_in: bool = False) -> Plan:
    """The labels of `model`, or where None of the model in use: the session's `model` option when there
    is a session (an admin key has none), else the server's default model."""
    if model is None:
        if logged_in and not admin_key:
            options = yield get_options()
            model = options.get("model")
        if model is None:
            model = default_model((yield models(admin_key)))
    return (yield labels(model, admin_key))


def publish_version(name: str, version: str, weights: str | os.PathLike[str] | bytes | IO[bytes],
                    admin_key: str) -> Call:
    """PUT a state_dict file (a path, its bytes or a binary file) as a new version, with its SHA-256."""
    if isinstance(weights, bytes | bytearray | memoryview):
        data = bytes(weights)
    elif isinstance(weights, str | os.PathLike):
        data = Path(weights).read_bytes()
    else:
        data = weights.read()
    return Call("PUT", _version_path(name, version), content=data, headers={
        **_admin(admin_key), "Content-Type": "application/octet-stream",
        "X-Content-SHA256": hashlib.sha256(data).hexdigest()})


def add_model(name: str, folder: str | os.PathLike[str] | bytes, admin_key: str) -> Call:
    """PUT a new model: its folder (model.toml, labels, its file) packed as a gzip tar here, or such an
    archive's bytes, with its SHA-256."""
    if isinstance(folder, bytes):
        data = folder
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for path in sorted(Path(folder).iterdir()):  # the folder's contents at the archive's top
                archive.add(path, arcname=path.name)
        data = buffer.getvalue()
    return Call("PUT", _model_path(name), content=data, headers={
        **_admin(admin_key), "Content-Type": "application/gzip", "X-Content-SHA256": hashlib.sha256(data).hexdigest()})


def delete_model(name: str, admin_key: str) -> Call:
    return Call("DELETE", _model_path(name), headers=_admin(admin_key))


def activate_version(name: str, version: str, admin_key: str, traffic_percent: int | None = None) -> Call:
    """Serve `version` to every session, or as a canary to `traffic_percent` (1-100) of sessions."""
    body = None if traffic_percent is None else {"traffic_percent": traffic_percent}
    return Call("POST", _version_path(name, version) + ":activate", json=body, headers=_admin(admin_key))


def remove_version(name: str, version: str, admin_key: str) -> Call:
    return Call("DELETE", _version_path(name, version), headers=_admin(admin_key))


def set_pinnable(name: str, version: str, admin_key: str, pinnable: bool = True) -> Call:
    """Mark `version` pinnable (sessions may then choose it with the model_version option), or unmark it."""
    return Call("PUT" if pinnable else "DELETE", _version_path(name, version) + "/pinnable", headers=_admin(admin_key))


def _model_path(name: str) -> str:
    return f"/v1/models/{quote(name, safe='')}"


def _version_path(name: str, version: str) -> str:
    return f"{_model_path(name)}/versions/{quote(version, safe='')}"


def _admin(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"ApiKey {admin_key}"}


def get_options() -> Call:
    return Call("GET", "/v1/session/options", shape=lambda body: body["options"])


def set_options(changes: Mapping[str, Any]) -> Call:
    return Call("PATCH", "/v1/session/options", json=dict(changes), shape=lambda body: body["options"])


def session() -> Call:
    return Call("GET", "/v1/session")


def history_item(history_id: str) -> Call:
    return Call("GET", _history_path(history_id))


def feedback(history_id: str, label: int | str, comment: str | None = None) -> Call:
    """PUT the corrected label (a class index or a label name) for one of the session's predictions;
    the answer is the history item, carrying the feedback. A repeat replaces the earlier one."""
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise TypeError("label must be a class index (int) or a label name (str)")
    body: dict[str, Any] = {"label": label}
    if comment is not None:
        body["comment"] = comment
    return Call("PUT", _history_path(history_id) + "/feedback", json=body)


def remove_feedback(history_id: str) -> Call:
    return Call("DELETE", _history_path(history_id) + "/feedback")


def history_image(history_id: str) -> Call:
    """The image as it was sent, where the server captured it (capture on); its bytes."""
    return Call("GET", _history_path(history_id) + "/image", headers={"Accept": "image/*"}, raw=True)


#: An export filter's time: an aware datetime, epoch milliseconds, or ISO 8601 text as the server takes it.
ExportTime = datetime | int | str
EXPORT_FORMATS = ("tar", "jsonl")


def feedback_export(admin_key: str, *, since: ExportTime | None = None, until: ExportTime | None = None,
                    model_version: str | None = None, export_format: str = "tar", model: str | None = None) -> Call:
    """GET /v1/feedback/export (admin key): the body, a WebDataset tar or JSON lines, is read as a
    stream by the clients, never whole (`raw`). `model`: only that model's predictions."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format must be one of {', '.join(EXPORT_FORMATS)}, not {export_format!r}")
    params = {name: _export_time(name, value) for name, value in (("since", since), ("until", until))
              if value is not None}
    if model is not None:
        params["model"] = model
    if model_version is not None:
        params["model_version"] = model_version
    if export_format != "tar":
        params["format"] = export_format
    return Call("GET", "/v1/feedback/export", params=params or None,
                headers={**_admin(admin_key), "Accept": "application/x-tar, application/x-ndjson"}, raw=True)


def purge_feedback(admin_key: str, *, since: ExportTime | None = None, until: ExportTime | None = None,
                   session: str | None = None) -> Call:
    """DELETE /v1/feedback (admin key): the feedback given in a time range, or one session's (`session`:
    the export's `session` field), or one session's in a time range; the answer is how many went."""
    params = {name: _export_time(name, value) for name, value in (("since", since), ("until", until))
              if value is not None}
    if session is not None:
        params["session"] = session
    if not params:  # the server refuses it too: a purge of everything is never guessed
        raise ValueError("purge_feedback needs since, until or session")
    return Call("DELETE", "/v1/feedback", params=params, headers=_admin(admin_key), shape=lambda body: body["deleted"])


def _export_time(name: str, value: ExportTime) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # local time or UTC? Guessing would export the wrong hours.
            raise ValueError(f"{name} is a naive datetime: give it a timezone, e.g. datetime.now(UTC)")
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be a datetime, epoch milliseconds (int) or ISO 8601 text")
    return str(value)


@contextmanager
def download_target(destination: str | os.PathLike[str] | IO[bytes]) -> Iterator[IO[bytes]]:
    """The binary file a download is written into. A path gets the bytes only once all of them came:
    they go to a temporary file beside it, renamed over it at the end and removed if the download
    fails, so a cut-off download never leaves a file that looks whole. A file object is written as is."""
    if not isinstance(destination, str | os.PathLike):
        yield destination
        return
    path = Path(destination)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with partial.open("wb") as file:
            yield file
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def download_cut_off(call: Call, written: int, error: Exception) -> ConnectionFailed:
    return ConnectionFailed("connection_failed", f"{call.method} {call.path} stopped after {written} bytes: "
                                                 f"{error or type(error).__name__}")


def _history_path(history_id: str) -> str:
    return f"/v1/history/{quote(history_id, safe='')}"


def logout(erase: bool = False) -> Call:
    """Log out; with `erase`, the server also erases the session's history, feedback and captured images."""
    return Call("DELETE", "/v1/session", params={"erase": "true"} if erase else None)


def query_params(overrides: Mapping[str, Any]) -> dict[str, str]:
    """Per-request option overrides as the server reads them: lists comma-separated, None left out."""
    params: dict[str, str] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            params[name] = ",".join(str(item) for item in value)
        elif isinstance(value, bool):
            params[name] = "true" if value else "false"
        else:
            params[name] = str(value)
    return params


class HistoryPager:
    """Walks `GET /v1/history` page by page, passing each page's `next` back as `before`.

    The clients loop `while (call := pager.next_call()) is not None: ... pager.take(page)`, so
    paging is the same for both and stops at `limit` items (all of them when limit is None).
    """

    def __init__(self, limit: int | None = None, page_size: int | None = None):
        if limit is not None and limit < 0:
            raise ValueError("limit must be 0 or more")
        if page_size is not None and not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be from 1 to {MAX_PAGE}")
        self.remaining = limit
        self.page_size = page_size or min(limit or MAX_PAGE, MAX_PAGE)
        self.before: str | None = None
        self.done = limit == 0

    def next_call(self) -> Call | None:
        if self.done:
            return None
        size = self.page_size if self.remaining is None else min(self.page_size, self.remaining)
        params = {"limit": str(size)}
        if self.before:
            params["before"] = self.before
        return Call("GET", "/v1/history", params=params)

    def take(self, page: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The page's items to yield (trimmed to the limit); remembers where the next page starts."""
        items: list[dict[str, Any]] = list(page["items"])
        if self.remaining is not None:
            items = items[: self.remaining]
            self.remaining -= len(items)
        self.before = page.get("next")
        self.done = not self.before or not items or self.remaining == 0
        return items


# -- images --------------------------------------------------------------------------------------

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_content_type(data: bytes) -> str:
    """The image's media type from its magic bytes: file names and suffixes are not trusted."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    raise ValueError("not a JPEG, PNG, WebP, GIF or BMP image (the formats the server takes)")


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """The bytes to upload and their Content-Type. Read once, so a retry resends the same body."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif _is_pil_image(image):
        data = _pil_to_png(image)
    elif hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("open the image file in binary mode ('rb')")
    else:
        raise TypeError(f"cannot send {type(image).__name__} as an image; "
                        "pass a path, bytes, a binary file or a PIL image")
    return data, sniff_content_type(data)


def _is_pil_image(image: Any) -> bool:
    # Pillow stays optional: if PIL.Image was never imported, `image` cannot be one of its images.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(image, pil.Image)


def _pil_to_png(image: Any) -> bytes:
    # PNG, not JPEG: lossless, so the server sees exactly the pixels the caller has.
    if image.mode not in {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}:
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# -- responses -----------------------------------------------------------------------------------

def read_response(response: httpx.Response) -> Any:
    """The JSON body of a success (None for 204), or the typed error for a failure."""
    if response.is_success:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise InferenceError("invalid_response", "The server's answer is not JSON.",
                                 status=response.status_code,
                                 request_id=response.headers.get("X-Request-ID")) from None
    raise error_from_response(response)


def error_from_response(response: httpx.Response) -> InferenceError:
    """The server's `{"error": {"code", "message"}}` as an exception; any other body (a proxy's HTML
    page, say) still gives a usable one, named after the status."""
    status = response.status_code
    code, message = f"http_{status}", response.reason_phrase or "HTTP error"
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        if text:
            message = text[:200]
    cls = error_class(status)
    kwargs: dict[str, Any] = {"status": status, "request_id": response.headers.get("X-Request-ID")}
    if issubclass(cls, RateLimited | ServerBusy):
        kwargs["retry_after"] = retry_after(response.headers)
    return cls(code, message, **kwargs)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds: either delta-seconds or an HTTP date; None when absent or unreadable."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


# -- retries -------------------------------------------------------------------------------------

Outcome = httpx.Response | httpx.TransportError


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a call again: network failures, 503 and 429 only, never other 4xx (those would
    fail the same way again). The wait doubles from `backoff`, or follows Retry-After, capped at
    `max_wait`, plus up to a quarter of `backoff` of jitter so that clients refused together do
    not all come back at the same instant."""

    retries: int = 3
    backoff: float = 0.25
    max_wait: float = MAX_WAIT

    def wait(self, attempt: int, outcome: Outcome) -> float | None:
        """Seconds to wait after try number `attempt` (0-based) before the next, or None to stop."""
        if attempt >= self.retries:
            return None
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in RETRYABLE_STATUSES:
                return None
            hint = retry_after(outcome.headers)
        elif isinstance(outcome, RETRYABLE_ERRORS):
            hint = None
        else:
            return None
        delay = hint if hint is not None else self.backoff * 2**attempt
        return min(delay, self.max_wait) + random.uniform(0, self.backoff / 4)


class Exchange:
    """One call's life across its tries. The clients drive it in three lines:

        exchange = Exchange(call, policy, token)
        while (wait := exchange.after(send(exchange.request))) is not None:
            sleep(wait)
        return exchange.result()
    """

    def __init__(self, call: Call, policy: RetryPolicy, token: str | None):
        self.call = call
        self.policy = policy
        self.request = call.request(token)
        self.attempts = 0
        self.outcome: Outcome | None = None

    def after(self, outcome: Outcome) -> float | None:
        """Record one try's outcome; the wait before the next try, or None when this one is final."""
        self.outcome = outcome
        wait = self.policy.wait(self.attempts, outcome)
        self.attempts += 1
        return wait

    def response(self) -> httpx.Response:
        """The final try's response where it succeeded (its body still to be read, as a stream), or
        the typed error that `result` raises."""
        if isinstance(self.outcome, httpx.Response) and self.outcome.is_success:
            return self.outcome
        self.result()
        raise AssertionError("result() raises for a failed try")

    def result(self) -> Any:
        """The shaped JSON answer of the final try, or its typed error."""
        outcome = self.outcome
        if outcome is None:
            raise RuntimeError("result() before any try")
        if isinstance(outcome, httpx.TransportError):
            tries = f" after {self.attempts} tries" if self.attempts > 1 else ""
            raise ConnectionFailed("connection_failed",
                                   f"{self.call.method} {self.call.path} got no answer{tries}: "
                                   f"{outcome or type(outcome).__name__}") from outcome
        if self.call.raw and outcome.is_success:
            return self.call.shape(outcome.content)
        body = read_response(outcome)
        return None if body is None else self.call.shape(body)


# -- the WebSocket stream ------------------------------------------------------------------------

STREAM_PATH = "/v1/stream"
POLICY_VIOLATION = 1008
GOING_AWAY = 1001  # the server shuts down after answering the images it read: resume on a new connection
#: How many times one predict_stream resumes after a 1001 close (each resume may try to connect
#: this many times too, with a growing pause) before the close is the caller's error.
MAX_STREAM_RESUMES = 5


def resume_pause(attempt: int) -> float:
    """Seconds to wait before the `attempt`-th (from 0) try to connect for a resume."""
    return min(0.1 * 2 ** attempt, 2.0)


@dataclass(frozen=True)
class StreamResult:
    """One image's outcome on `predict_stream`: `result` (the predict answer) or `error`."""

    ref: Any
    seq: int | None
    result: dict[str, Any] | None = None
    error: InferenceError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> dict[str, Any]:
        """The result, or raise the image's error."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def stream_url(base_url: str) -> str:
    """ws:// (or wss://) address of the stream for an http(s) base URL."""
    url = httpx.URL(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    return str(url.copy_with(scheme=scheme, path=url.path.rstrip("/") + STREAM_PATH, query=None))


def stream_frames(item: Any, index: int, overrides: Mapping[str, Any]) -> tuple[str, bytes]:
    """The JSON header and the image bytes for one item of `predict_stream`. An item is an image, or
    a mapping {"image": ..., "ref": ..., "options": {...}}; the ref defaults to the item's index."""
    options = {name: value for name, value in overrides.items() if value is not None}
    ref: Any = index
    if isinstance(item, Mapping):
        if "image" not in item:
            raise TypeError("a stream item given as a mapping needs an 'image' key")
        ref = item.get("ref", index)
        options.update(item.get("options") or {})
        item = item["image"]
    data, _ = encode_image(item)  # the server sniffs the bytes itself; this checks them early
    header: dict[str, Any] = {"ref": ref}
    if options:
        header["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return json.dumps(header, separators=(",", ":")), data


def stream_frame(text: str | bytes) -> dict[str, Any]:
    """A server frame as a dict; a non-JSON frame is an InferenceError."""
    try:
        frame = json.loads(text)
    except ValueError:
        raise InferenceError("invalid_response", "A stream frame from the server is not JSON.") from None
    if not isinstance(frame, dict) or "type" not in frame:
        raise InferenceError("invalid_response", "A stream frame from the server has no type.")
    return frame


def stream_result(frame: Mapping[str, Any]) -> StreamResult:
    """A result or error frame as a StreamResult (the error typed as the HTTP status would be)."""
    if frame["type"] == "result":
        return StreamResult(frame.get("ref"), frame.get("seq"), result=frame["result"])
    return StreamResult(frame.get("ref"), frame.get("seq"), error=stream_error(frame))


def stream_error(frame: Mapping[str, Any]) -> InferenceError:
    status = int(frame.get("status") or 500)
    error = frame.get("error") or {}
    cls = error_class(status)
    kwargs: dict[str, Any] = {"status": status}
    if issubclass(cls, RateLimited | ServerBusy):
        kwargs["retry_after"] = frame.get("retry_after")
    return cls(str(error.get("code", f"http_{status}")), str(error.get("message", "")), **kwargs)


def stream_closed(code: int | None, reason: str | None, last_error: InferenceError | None) -> InferenceError:
    """The error to raise when the server closed the stream before every result came."""
    if code == POLICY_VIOLATION:
        if isinstance(last_error, AuthError):
            return last_error
        return AuthError(reason or "invalid_token", "The server closed the stream: the token was refused.",
                         status=401)
    return ConnectionFailed("connection_closed", f"The stream closed before every result came (code {code}, "
                                                 f"reason {reason!r}).")


class StreamWindow:
    """Which item to send next and how many results are owed, shared by both clients' loops:

        while True:
            while window.room(): send(window.next_frames())   # until the window is full or images run out
            if window.done: break
            yield window.received(frame)                      # one result per frame read
            if window.refusal: raise window.refusal            # the server closes the stream after it

    `size` is the server's `max_in_flight` (its ready frame), so a well-behaved client never sends
    an image the server would have to leave unread. After a 1001 close, `resume` on the next
    connection sends the images not yet answered again first (each once, in order): an image answered
    before the close is never sent again. A result's `seq` is the item's index in the whole stream.
    """

    def __init__(self, images: Any, overrides: Mapping[str, Any], size: int):
        self._images = iter(images)
        self._overrides = overrides
        self.size = max(1, size)
        self.pending = 0
        self.sent = 0  # items taken from `images`
        self.resumes = 0
        self._exhausted = False
        self._next: Any = None
        # This connection's seq (the server counts from 0 per connection) -> (item index, its frames).
        self._unanswered: dict[int, tuple[int, str, bytes]] = {}
        self._resend: list[tuple[int, str, bytes]] = []  # sent on an earlier connection, unanswered there
        self._seq = 0
        self.refusal: AuthError | None = None

    def room(self) -> bool:
        if self.pending >= self.size:
            return False
        if self._resend:
            return True
        if self._exhausted:
            return False
        try:
            self._next = next(self._images)
        except StopIteration:
            self._exhausted = True
            return False
        return True

    def next_frames(self) -> tuple[str, bytes]:
        if self._resend:
            index, header, data = self._resend.pop(0)
        else:
            index = self.sent
            header, data = stream_frames(self._next, index, self._overrides)
            self.sent += 1
        self._unanswered[self._seq] = (index, header, data)
        self._seq += 1
        self.pending += 1
        return header, data

    @property
    def done(self) -> bool:
        return self._exhausted and self.pending == 0 and not self._resend

    def received(self, frame: Mapping[str, Any]) -> StreamResult:
        result = stream_result(frame)
        if result.seq is not None:  # a frame about one of our images (not about the stream as a whole)
            self.pending -= 1
            sent = self._unanswered.pop(result.seq, None)
            if sent is not None:
                result = replace(result, seq=sent[0])
        if isinstance(result.error, AuthError):
            # A refused token (logged out, expired) ends the stream even when no result is owed any more.
            self.refusal = result.error
        return result

    def may_resume(self, code: int | None) -> bool:
        """Whether a close with `code` is resumed on a new connection: a 1001, within MAX_STREAM_RESUMES."""
        return code == GOING_AWAY and self.resumes < MAX_STREAM_RESUMES

    def resume(self, size: int) -> None:
        """A new connection (its ready frame's max_in_flight: `size`) after a 1001 close: the images sent
        and not answered go again first, in their order; the server counts seq from 0 again."""
        self._resend = sorted([*self._resend, *self._unanswered.values()], key=lambda sent: sent[0])
        self._unanswered.clear()
        self._seq = 0
        self.pending = 0
        self.size = max(1, size)
        self.resumes += 1
