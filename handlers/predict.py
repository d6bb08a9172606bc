"""Prediction routes: the session-aware `POST /v1/predict` and the plain `POST /predict`."""

from __future__ import annotations

from dataclasses import dataclass

import tornado.web
from tornado.httputil import HTTPFile, HTTPInputError, parse_body_arguments

from core import images
from core.errors import BadRequest, NotFound, UnsupportedMediaType
from core.options import Options
from handlers.uploads import UploadHandler
from service.auth import Policy

IMAGE_TYPES = frozenset(images.MEDIA_TYPES)
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an image of the maximum size
_DRAIN_FACTOR = 4


@tornado.web.stream_request_body
class ImageUploadHandler(UploadHandler):
    """Receives one image, as multipart field `image` or as a raw image body.

    The body is streamed so that an oversized upload is never held in memory: past the limit it is
    drained unread and refused with a JSON 413; a declared length far past it is refused at once.
    """

    _chunks: list[bytes]

    def initialize(self, route_name: str = "unmatched") -> None:
        super().initialize(route_name)
        self._chunks = []  # data_received may run for any method, OPTIONS included
        self.upload_limit = self.http_settings.max_body_bytes + _MULTIPART_OVERHEAD

    async def before_auth(self) -> None:
        self.allow_body(self.upload_limit * _DRAIN_FACTOR)
        if not self.can_drain():
            # Far too large: answer now, without reading. A client that sent `Expect: 100-continue`
            # (curl does for large bodies) reads this 413 before sending a byte of the body.
            self.refuse_oversized()

    def can_drain(self) -> bool:
        return self.declared_length() <= self.upload_limit * _DRAIN_FACTOR

    def data_received(self, chunk: bytes) -> None:
        # Past the limit, or with a refusal pending, chunks are dropped unread.
        if self.keeps(chunk):
            self._chunks.append(chunk)
        else:
            self._chunks = []

    def oversized_message(self) -> str:
        return f"The body is larger than the limit of {self.http_settings.max_body_bytes} bytes."

    def uploaded_image(self) -> ImageUpload:
        """The body as received, for the runner to read the image out of (see ImageUpload)."""
        self.raise_refusal()
        content_type = self.request.headers.get("Content-Type", "")
        if _media_type(content_type) not in IMAGE_TYPES | {"multipart/form-data"}:
            raise UnsupportedMediaType(
                "Send the image as multipart/form-data (field 'image') or as a raw body with Content-Type "
                f"{images.MEDIA_TYPES_SENTENCE}."
            )
        upload = ImageUpload(tuple(self._chunks), content_type)
        self._chunks = []
        return upload

    def options_with_query(self) -> Options:
        """The session's options, with the request's query parameters overriding them."""
        session = self.current_session
        overrides = {name: self.get_query_argument(name) for name in self.request.query_arguments}
        return self.models.query_options(session.options, overrides)


@dataclass(frozen=True)
class ImageUpload:
    """An uploaded body as it arrived: its chunks and its Content-Type.

    The model runner calls `image_bytes` on its own threads, so joining the chunks and splitting a
    multipart body happen there and not on the IOLoop: for a 12 MP photo that is ~3.6 MB copied
    two or three times with the GIL held. A malformed body raises BadRequest from there.
    """

    chunks: tuple[bytes, ...]
    content_type: str

    def image_bytes(self) -> bytes:
        body = b"".join(self.chunks)  # one chunk: that same object, no copy
        if _media_type(self.content_type) == "multipart/form-data":
            return _image_field(self.content_type, body)
        return body


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _image_field(content_type: str, body: bytes) -> bytes:
    files: dict[str, list[HTTPFile]] = {}
    try:
        parse_body_arguments(content_type, body, {}, files)
    except HTTPInputError as exc:
        raise BadRequest(f"The multipart body is malformed ({exc}).", code="malformed_multipart") from None
    images = files.get("image", [])
    if not images:
        raise BadRequest("The multipart body has no file in the field 'image'.", code="missing_image")
    if len(images) > 1:
        raise BadRequest("Send one file in the field 'image'; this request has several.",
                         code="too_many_images")
    return images[0].body


class PredictHandler(ImageUploadHandler):
    """POST /v1/predict: classify under the session's options (query parameters override)."""

    rate_limit_cost = 1
    accepts_idempotency_key = True

    async def post(self) -> None:
        image = self.uploaded_image()
        result, replayed = await self.classifier.classify(self.current_session, image, self.options_with_query(),
                                                          self.idempotency_key)
        if replayed:
            self.set_header("Idempotent-Replayed", "true")
        self.write_json(result)


class PlainPredictHandler(ImageUploadHandler):
    """POST /predict: the session-less form of the simple Flask example, `{"predicted_class": N}`."""

    auth_policy = Policy.PUBLIC

    async def after_auth(self) -> None:
        if not self.auth.settings.anonymous_inference:
            raise NotFound("POST /predict is turned off on this server; use POST /v1/predict.", code="not_found")

    async def post(self) -> None:
        prediction = await self.classifier.classify_anonymous(self.uploaded_image(), top_k=1)
        self.write_json({"predicted_class": prediction.top_k[0].class_index})
