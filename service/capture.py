"""Captured images: where capture is on, every image a session predicts is kept, once per content
hash, so that the session can read it back and training can use it with its feedback.

Files live in `capture.store_dir` as `<sha256[:2]>/<sha256>`, written atomically (a temporary file
renamed into place), on this module's own thread, never on the IOLoop. Redis (sessions.captures)
knows which sessions sent which image and when it was last sent: an image goes when its retention
ends, or when the last session that sent it is erased.

A 200 means recorded: the file is written and its holder recorded before the history entry names
it. If the disk fails, the prediction is still recorded, with `image: null` (and an error in the
log): the item never names an image that is not there.

Deleting races with keeping: a session may send an image again while its file is being deleted.
So a file to delete is first moved aside, Redis is asked again, and it is moved back if a session
now holds it; `keep` checks the file after recording its holder and writes it again if it is gone.
Files Redis does not know at all (a keep whose record failed, a write cut short by a crash) go with
the sweep once they are older than the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from inference.runner import ImageSource
from sessions.errors import NotFound, ServiceError
from sessions.store import Session, now_ms

log = logging.getLogger("inference.capture")

DAY_MS = 24 * 3600 * 1000
_SWEEP_BATCH = 500
_HEX = frozenset("0123456789abcdef")
_WARN_EVERY_SECONDS = 60.0  # a full disk fails every capture: one log line a minute, the metric counts them all

# The formats the server reads (inference.imaging.FORMATS), by their first bytes.
_SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
               (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))
#: File extensions by media type (anything else, application/octet-stream: "bin").
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif", "image/bmp": "bmp"}


class LowDisk(OSError):
    """The store's file system is short of capture.min_free_disk_bytes: the image is not captured, so
    that capture cannot fill the disk that Redis, the logs and the models may share."""


def content_type(data: bytes) -> str:
    """The image's media type from its first bytes (what it is, whatever the request said)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for signature, kind in _SIGNATURES if data.startswith(signature)), "application/octet-stream")


class CaptureRefs(Protocol):
    """What this module needs of sessions.captures.CaptureRefs."""

    async def add(self, session_id: str, sha256: str, at_ms: int, keep_until_ms: int) -> bool: ...

    async def release(self, session_id: str, sha256: str) -> bool: ...

    async def session_images(self, session_id: str) -> list[str]: ...

    async def seen_at(self, sha256: str) -> float | None: ...

    async def seen_at_many(self, sha256s: list[str]) -> list[float | None]: ...

    async def older_than(self, cutoff_ms: int, limit: int) -> list[str]: ...

    async def expire(self, sha256: str, cutoff_ms: int) -> bool: ...


class KeptImage:
    """An upload whose bytes the runner reads on its thread, kept for capture afterwards (so that a
    multipart body is not split twice)."""

    def __init__(self, source: ImageSource):
        self.source = source
        self.data: bytes | None = None

    def image_bytes(self) -> bytes:
        if self.data is None:
            self.data = self.source.image_bytes()
        return self.data


@dataclass(frozen=True)
class Captured:
    """A captured image as a history item names it."""

    sha256: str
    content_type: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "content_type": self.content_type, "size": self.size}


class Captures:
    def __init__(self, refs: CaptureRefs, *, store_dir: Path, enabled: bool, retention_days: int,
                 min_free_disk_bytes: int = 0, on_skipped: Callable[[str], None] | None = None):
        """`on_skipped(reason)` is told of each image not captured: "low_disk" or "disk_error"."""
        self.refs, self.enabled = refs, enabled
        self.store_dir = store_dir.expanduser().resolve()
        self.retention_ms = retention_days * DAY_MS
        self.min_free_disk_bytes = min_free_disk_bytes
        self.on_skipped = on_skipped
        self._last_warned = -math.inf
        self._io = ThreadPoolExecutor(1, thread_name_prefix="capture")

    def path(self, sha256: str) -> Path:
        return self.store_dir / sha256[:2] / sha256

    # -- keeping ------------------------------------------------------------------------------------
    async def keep(self, session: Session, data: bytes) -> tuple[Captured, bool] | None:
        """Store the image (if not there yet) and record that the session sent it. Returns what the
        history item names, and whether this session had not sent it before (for `undo`); None when
        capture is off, the disk is short of space or failed."""
        if not self.enabled:
            return None
        try:
            captured = await self._off_loop(self._write, data)
            new = await self.refs.add(session.id, captured.sha256, now_ms(), session.deadline_ms)
            # A sweep or an erase may have deleted the file between the write and the record above.
            if not await self._off_loop(self.path(captured.sha256).is_file):
                await self._off_loop(self._write, data)
        except OSError as exc:
            self._not_captured("low_disk" if isinstance(exc, LowDisk) else "disk_error", exc)
            return None
        return captured, new

    def _not_captured(self, reason: str, exc: OSError) -> None:
        if self.on_skipped is not None:
            self.on_skipped(reason)
        now = time.monotonic()
        if now - self._last_warned >= _WARN_EVERY_SECONDS:
            self._last_warned = now
            log.error("could not capture an image (%s); recorded without it. Logged at most once a minute; "
                      "inference_capture_skipped_total counts every one.", exc)

    async def undo(self, session: Session, kept: tuple[Captured, bool] | None) -> None:
        """The prediction was not recorded after all: let go of an image kept only for it."""
        if kept is None or not kept[1]:
            return
        with contextlib.suppress(ServiceError, OSError):
            if await self.refs.release(session.id, kept[0].sha256):
                await self._delete_unless_held(kept[0].sha256)

    def _write(self, data: bytes) -> Captured:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.min_free_disk_bytes:
                free = shutil.disk_usage(path.parent).free
                if free - len(data) < self.min_free_disk_bytes:
                    raise LowDisk(f"{free} bytes free where {self.store_dir} is, under capture.min_free_disk_bytes "
                                  f"({self.min_free_disk_bytes})")
            partial = path.parent / f".{sha256}.{uuid.uuid4().hex}.partial"
            try:
                with partial.open("wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        return Captured(sha256, content_type(data), len(data))

    # -- reading ------------------------------------------------------------------------------------
    async def read(self, image: dict[str, Any] | None) -> tuple[bytes, str]:
        """The bytes and media type of the image a history item names; 404 when it was not captured
        or its retention ended."""
        data = await self.load(image)
        if data is None or image is None:
            raise NotFound("This prediction's image was not captured, or its retention ended.",
                           code="image_not_found")
        return data, image["content_type"]

    async def load(self, image: dict[str, Any] | None) -> bytes | None:
        """The bytes of a captured image still within its retention, else None."""
        if not image:
            return None
        seen = await self.refs.seen_at(image["sha256"])
        if seen is None or seen < now_ms() - self.retention_ms:
            return None
        return await self._off_loop(self._read, image["sha256"])

    def _read(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    # -- erasing and retention ------------------------------------------------------------------------
    async def erase(self, session_id: str) -> int:
        """Let go of every image the session sent; delete those no other session holds. How many
        files were deleted."""
        deleted = 0
        for sha256 in await self.refs.session_images(session_id):
            if await self.refs.release(session_id, sha256):
                deleted += await self._delete_unless_held(sha256)
        return deleted

    async def sweep(self, now: int | None = None) -> int:
        """Delete the images nobody sent within the retention, and files older than it that Redis
        does not know; how many."""
        cutoff = (now_ms() if now is None else now) - self.retention_ms
        deleted = 0
        while True:
            due = await self.refs.older_than(cutoff, _SWEEP_BATCH)
            for sha256 in due:
                if await self.refs.expire(sha256, cutoff):
                    deleted += await self._delete_unless_held(sha256)
            if len(due) < _SWEEP_BATCH:
                break
        return deleted + await self._sweep_unknown_files(cutoff)

    async def _sweep_unknown_files(self, cutoff_ms: int) -> int:
        """Delete files older than the cutoff that no session holds, a folder at a time (so the
        listing held in memory stays small whatever the store's size)."""
        deleted = 0
        for folder in await self._off_loop(self._folders):
            images, leftovers = await self._off_loop(self._old_files, folder, cutoff_ms)
            for path in leftovers:  # partial writes and deletions a crash cut short
                await self._off_loop(self._unlink, path)
            for start in range(0, len(images), _SWEEP_BATCH):
                batch = images[start:start + _SWEEP_BATCH]
                for sha256, seen in zip(batch, await self.refs.seen_at_many(batch), strict=True):
                    if seen is None:
                        deleted += await self._delete_unless_held(sha256)
        return deleted

    def _folders(self) -> list[Path]:
        if not self.store_dir.is_dir():
            return []
        return sorted(entry for entry in self.store_dir.iterdir()
                      if entry.is_dir() and len(entry.name) == 2 and set(entry.name) <= _HEX)

    @staticmethod
    def _old_files(folder: Path, cutoff_ms: int) -> tuple[list[str], list[Path]]:
        """The images (by hash) and the leftover temporary files last written before the cutoff."""
        images: list[str] = []
        leftovers: list[Path] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if not entry.is_file() or entry.stat().st_mtime * 1000 >= cutoff_ms:
                        continue
                except FileNotFoundError:
                    continue
                if entry.name.startswith("."):
                    leftovers.append(Path(entry.path))
                elif len(entry.name) == 64 and set(entry.name) <= _HEX and entry.name.startswith(folder.name):
                    images.append(entry.name)
        return images, leftovers

    async def _delete_unless_held(self, sha256: str) -> int:
        """Delete an image Redis said nobody holds, unless a session sent it again meanwhile: 1 if
        deleted. Moved aside first, so a keep that checks for the file after recording sees it gone
        and writes it again, or this sees the record and moves it back."""
        path = self.path(sha256)
        aside = path.parent / f".{sha256}.{uuid.uuid4().hex}.deleting"
        try:
            await self._off_loop(os.replace, path, aside)
        except FileNotFoundError:
            return 0
        try:
            held = await self.refs.seen_at(sha256) is not None
        except ServiceError:
            held = True  # cannot tell: keep it; retention comes round again
        if held:
            await self._off_loop(os.replace, aside, path)
            return 0
        await self._off_loop(self._unlink, aside)
        return 1

    async def sweep_forever(self, interval_seconds: float) -> None:
        """Retention, in one serving process: a sweep now and every interval."""
        while True:
            try:
                deleted = await self.sweep()
                if deleted:
                    log.info("capture retention: deleted %d images", deleted)
            except (ServiceError, OSError) as exc:  # Redis or the disk down: try again next time
                log.warning("capture retention sweep failed: %s", exc)
            await asyncio.sleep(interval_seconds)

    @staticmethod
    def _unlink(path: Path) -> None:
        path.unlink(missing_ok=True)

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def close(self) -> None:
        self._io.shutdown(wait=False)
