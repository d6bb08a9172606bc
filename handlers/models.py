"""Models and their versions: training jobs publish weights, an operator activates them, anyone logged in
lists them.

    GET    /v1/models                                      every model: its manifest, versions, canary
    PUT    /v1/models/<name>                               add a model: its folder as a tar archive (admin)
    DELETE /v1/models/<name>                               delete a model added so (admin)
    GET    /v1/models/<name>/labels                        the class labels (what feedback's label takes)
    PUT    /v1/models/<name>/versions/<version>            upload a state_dict, ONNX or TorchScript file (admin)
    DELETE /v1/models/<name>/versions/<version>            remove a version that is not active (admin)
    POST   /v1/models/<name>/versions/<version>:activate   serve it from now on, on every replica (admin);
                                                           {"traffic_percent": N < 100}: to N% of sessions
    PUT    /v1/models/<name>/versions/<version>/pinnable   let sessions pin it (admin)
    DELETE /v1/models/<name>/versions/<version>/pinnable   no longer (admin)

Admin routes take `Authorization: ApiKey <key>` with a key whose hash is in `auth.admin_api_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import IO

import tornado.web

from core.errors import BadRequest
from handlers.base import BaseHandler
from handlers.uploads import UploadHandler
from service.auth import Policy
from service.canary import parse_traffic_percent
from service.catalogue import ModelCatalogue

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
CHECKSUM_HEADER = "X-Content-SHA256"


class ModelsHandler(BaseHandler):
    """GET /v1/models: with a session token (to choose a version to pin) or an admin key."""

    auth_policy = Policy.SESSION_OR_ADMIN

    async def get(self) -> None:
        self.write_json(await self.models.listing())


class LabelsHandler(BaseHandler):
    """GET /v1/models/<name>/labels: the names a correction can use, for a client's label search.
    Tornado's ETag answers a repeat with 304."""

    auth_policy = Policy.SESSION_OR_ADMIN

    async def get(self, name: str) -> None:
        self.write_json(self.models.catalogue(name).labels())


class VersionRoute(BaseHandler):
    """A route that names a model and one of its versions."""

    def catalogue(self, name: str, version: str) -> ModelCatalogue:
        """The model's catalogue (404 `model_not_found`), once the version's name is checked (400)."""
        catalogue = self.models.catalogue(name)
        catalogue.check_version(version)
        return catalogue


class StreamedUpload(UploadHandler):
    """An admin's PUT whose body is a file, streamed to a temporary file while it is hashed and checked
    against `X-Content-SHA256` and models.max_upload_bytes; subclasses say where it goes (upload_path) and
    decorate themselves with tornado.web.stream_request_body."""

    auth_policy = Policy.ADMIN
    # Refusals wait for the body's end for any method: this handler streams every body.
    _file: IO[bytes] | None = None
    _path: Path | None = None

    def initialize(self, route_name: str = "unmatched") -> None:
        super().initialize(route_name)
        self._digest = hashlib.sha256()
        self.upload_limit = self.http_settings.max_upload_bytes

    def upload_path(self) -> Path:
        """A fresh temporary file for the body, once the route's names are checked (4xx otherwise)."""
        raise NotImplementedError

    def can_drain(self) -> bool:
        # Only the admin key's holder may send a body past http.max_body_bytes (up to twice the upload
        # limit is drained, then cut): for anyone else a larger one is refused at once.
        limit = self.upload_limit * 2 if self.principal.admin else self.http_settings.max_body_bytes
        return self.declared_length() <= limit

    async def after_auth(self) -> None:
        # The admin key's holder: the upload limits apply from now on; a caller without it keeps
        # http.max_body_bytes and http.body_timeout_seconds.
        if self.request.method != "PUT":
            return
        self.allow_body(self.upload_limit * 2, self.http_settings.upload_timeout_seconds)
        if not self.can_drain():
            self.refuse_oversized()
        path = self.upload_path()
        if not _SHA256_HEX.match(self.request.headers.get(CHECKSUM_HEADER, "")):
            raise BadRequest(f"Send the file's SHA-256 as 64 hex digits in the {CHECKSUM_HEADER} header.",
                             code="missing_checksum")
        self._path = path
        self._file = self._path.open("wb")

    def data_received(self, chunk: bytes) -> None:
        if not self.keeps(chunk) or self._file is None:
            return
        self._digest.update(chunk)
        self._file.write(chunk)  # chunks of ~64 KB to a local file: short enough for the IOLoop

    def on_finish(self) -> None:
        self._discard_upload()
        super().on_finish()

    def on_connection_close(self) -> None:
        self._discard_upload()
        super().on_connection_close()

    def _discard_upload(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)  # published files were renamed away already

    def oversized_message(self) -> str:
        return f"The file is larger than models.max_upload_bytes ({self.upload_limit} bytes)."

    def received_upload(self) -> tuple[Path, str]:
        """The whole body's temporary file and its SHA-256, checked: the refusal deferred, 413, a checksum
        that differs from the header's, an empty body (each a 4xx)."""
        self.raise_refusal()
        assert self._file is not None and self._path is not None
        self._file.close()
        self._file = None
        expected = self.request.headers[CHECKSUM_HEADER].lower()
        if not hmac.compare_digest(self._digest.hexdigest(), expected):
            raise BadRequest(f"The body's SHA-256 is {self._digest.hexdigest()}, not the {expected} that "
                             f"{CHECKSUM_HEADER} says; the upload was damaged or the header is wrong.",
                             code="checksum_mismatch")
        if self._received == 0:
            raise BadRequest("The body is empty; send the model's file.", code="missing_body")
        return self._path, expected


@tornado.web.stream_request_body
class ModelHandler(StreamedUpload):
    """PUT (a new model: its folder as a tar archive, gzip or not) and DELETE of a model added so."""

    def upload_path(self) -> Path:
        return self.models.upload_path(self.path_kwargs["name"])

    async def put(self, name: str) -> None:
        archive, _ = self.received_upload()
        self.write_json(await self.models.add(name, archive), status=201)

    async def delete(self, name: str) -> None:
        if self.refusal:
            raise self.refusal
        await self.models.delete(name)
        self.no_content()


@tornado.web.stream_request_body
class ModelVersionHandler(StreamedUpload, VersionRoute):
    """PUT (upload, streamed to a file in the store while it is hashed) and DELETE of one version."""

    def upload_path(self) -> Path:
        return self.catalogue(self.path_kwargs["name"], self.path_kwargs["version"]).upload_path()

    async def put(self, name: str, version: str) -> None:
        path, sha256 = self.received_upload()
        record = await self.catalogue(name, version).publish(version, path, sha256, self._received)
        self.write_json({"name": name, **record.to_dict(active=False)}, status=201)

    async def delete(self, name: str, version: str) -> None:
        if self.refusal:
            raise self.refusal
        await self.catalogue(name, version).remove(version)
        self.no_content()


class ActivateHandler(VersionRoute):
    """POST /v1/models/<name>/versions/<version>:activate"""

    auth_policy = Policy.ADMIN

    async def post(self, name: str, version: str) -> None:
        catalogue = self.catalogue(name, version)
        traffic_percent = parse_traffic_percent(self.json_object(required=False))
        self.write_json({"name": name, **await catalogue.activate(version, traffic_percent)})


class PinnableHandler(VersionRoute):
    """PUT and DELETE /v1/models/<name>/versions/<version>/pinnable: whether sessions may pin a version
    that is neither active nor the canary's (those two always may be pinned)."""

    auth_policy = Policy.ADMIN

    async def put(self, name: str, version: str) -> None:
        self.write_json(await self.catalogue(name, version).set_pinnable(version, True))

    async def delete(self, name: str, version: str) -> None:
        self.write_json(await self.catalogue(name, version).set_pinnable(version, False))
