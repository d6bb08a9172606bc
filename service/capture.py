"""Captured images: where capture is on, every image a session predicts is kept, once per session and
content hash, so that the session can read it back and training can use it with its feedback.

Each session keeps its own copies, in a folder named by its session_ref: `capture.store_dir` as
`<ref>/<sha256>`, 0700 folders and 0600 files (core.files). Nothing a session is told
depends on what other sessions sent: an image another session sent is written, fsynced and counted
against the disk and the quota exactly like a new one. Only the image is kept, not whatever follows
it in the upload (`image_length`), and a session keeps at most `capture.max_session_bytes`.

Files are written atomically (a temporary dot-file renamed into place), on this module's one thread,
never on the IOLoop; at most `capture.max_queue` images per process are being captured at once, and
past that an image is not captured ("queue_full"), so predicts do not wait behind a pile of fsyncs.
Redis (sessions.captures) knows which session holds which image and when it last sent it.

A 200 means recorded: the copy is recorded in Redis and its file written before the history entry
names it. Where it is not captured (the disk short or failing, the quota or the queue full, an image
whose end cannot be found) the prediction is still recorded, with `image: null`, and
`on_skipped(reason)` is told. The item never names an image that is not there.

Deleting races with keeping: a session may send an image again while its copy is being deleted. So
a file to delete is first moved aside, Redis is asked again, and it is moved back if the session now
holds it again. Files Redis does not know at all (a keep whose record was lost, a write cut short by a
crash) go with the sweep once they are older than the retention. The sweep never follows a link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, TypeVarTuple

from core import images
from core.clock import now_ms
from core.errors import NotFound, ServiceError
from core.files import private_dir, write_atomically
from core.session import Session
from inference.runner import ImageSource

log = logging.getLogger("inference.capture")
_Args = TypeVarTuple("_Args")
_Result = TypeVar("_Result")

DAY_MS = 24 * 3600 * 1000
_SWEEP_BATCH = 500
_HEX = frozenset("0123456789abcdef")
_WARN_EVERY_SECONDS = 60.0  # a full disk fails every capture: one log line a minute, the metric counts them all

class LowDisk(OSError):
    """The store's file system is short of capture.min_free_disk_bytes: the image is not captured, so
    that capture cannot fill the disk that Redis, the logs and the models may share."""


def content_type(data: bytes) -> str:
    """The image's media type from its first bytes (what it is, whatever the request said)."""
    image_format = images.sniff(data)
    return image_format.media_type if image_format else "application/octet-stream"


# -- where an image ends ------------------------------------------------------------------------------
# Decoders stop at the end of the image and ignore what follows, so an upload may carry anything after a
# valid image. Capture keeps only the image: its container walked to its end marker (PNG's IEND, JPEG's
# EOI, GIF's trailer) or to the length its header gives (WebP's RIFF size, BMP's pixel rows).

def image_length(data: bytes) -> int | None:
    """How many bytes from the start of `data` the image itself takes; None where its structure cannot
    be walked to its end (a truncated or malformed file, another format)."""
    image_format = images.sniff(data)
    if image_format is None:
        return None
    try:
        end = _ENDS[image_format.media_type](data)
    except (IndexError, struct.error):
        return None
    return end if end is not None and 0 < end <= len(data) else None


def _webp_end(data: bytes) -> int | None:
    size: int = struct.unpack_from("<I", data, 4)[0]  # the RIFF chunk's size, padded to even
    return 8 + size + (size & 1)


def _png_end(data: bytes) -> int | None:
    position = 8
    while position + 12 <= len(data):
        length: int
        kind: bytes
        length, kind = struct.unpack_from(">I4s", data, position)
        position += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return position
    return None


def _jpeg_end(data: bytes) -> int | None:
    """Marker segments by their lengths; after each start of scan, the entropy-coded data up to the
    next marker (0xFF followed by neither a stuffed 0x00 nor a restart marker)."""
    position, size = 2, len(data)
    while position < size:
        if data[position] != 0xFF:
            return None
        while position < size and data[position] == 0xFF:  # fill bytes
            position += 1
        marker = data[position]
        position += 1
        if marker == 0xD9:  # end of image
            return position
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            continue
        length = int.from_bytes(data[position:position + 2], "big")
        if length < 2:
            return None
        position += length
        if marker == 0xDA:  # start of scan
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= size:
                    return None
                following = data[position + 1]
                if following != 0x00 and not 0xD0 <= following <= 0xD7:
                    break
                position += 2
    return None


def _gif_end(data: bytes) -> int | None:
    position = 13
    if data[10] & 0x80:  # global colour table
        position += 3 << ((data[10] & 7) + 1)
    while position < len(data):
        block = data[position]
        if block == 0x3B:  # trailer
            return position + 1
        if block == 0x21:  # extension: introducer, label, sub-blocks
            position += 2
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            flags = data[position + 9]
            position += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:
            return None
        while True:
            length = data[position]
            position += 1 + length
            if length == 0:
                break
    return None


def _bmp_end(data: bytes) -> int | None:
    """The pixel data's offset plus its size: rows padded to 4 bytes, or the header's size for RLE."""
    offset: int
    width: int
    height: int
    bits: int
    compression: int
    image_size: int
    offset, header = struct.unpack_from("<II", data, 10)
    if header == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bits = struct.unpack_from("<HHHH", data, 18)
        compression, image_size = 0, 0
    else:
        width, height, _, bits, compression, image_size = struct.unpack_from("<iiHHII", data, 18)
    if compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
        return offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)
    return offset + image_size


#: Where an image ends, by format (core.images): a format added there needs its walk here.
_ENDS: dict[str, Callable[[bytes], int | None]] = {
    "image/jpeg": _jpeg_end, "image/png": _png_end, "image/webp": _webp_end, "image/gif": _gif_end,
    "image/bmp": _bmp_end,
}


class CaptureRefs(Protocol):
    """What this module needs of sessions.captures.CaptureRefs."""

    async def add(self, ref: str, sha256: str, size: int, at_ms: int, keep_until_ms: int, max_bytes: int) -> int: ...

    async def release(self, ref: str, sha256: str) -> bool: ...

    async def expire(self, ref: str, sha256: str, cutoff_ms: int) -> bool: ...

    async def session_images(self, ref: str) -> list[str]: ...

    async def release_legacy(self, session_id: str) -> list[str]: ...

    async def seen_at(self, ref: str, sha256: str) -> float | None: ...

    async def seen_at_many(self, ref: str, sha256s: list[str]) -> list[float | None]: ...

    async def copies(self, sha256: str) -> list[tuple[str, float]]: ...

    async def older_than(self, cutoff_ms: int, limit: int) -> list[tuple[str, str]]: ...


class SessionNames(Protocol):
    """How a session is named outside its own keys (sessions.tokens.TokenSigner)."""

    def session_ref(self, session_id: str) -> str: ...

    def session_refs(self, session_id: str) -> list[str]: ...


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


class NotCaptured(Exception):
    """An image that is not captured, and why (the `reason` label of inference_capture_skipped_total)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _measure(data: bytes) -> tuple[bytes, str]:
    """The image without what follows it, and its SHA-256."""
    length = image_length(data)
    if length is None:
        raise NotCaptured("malformed", "the image's end could not be found")
    image = data[:length]
    return image, hashlib.sha256(image).hexdigest()


class Captures:
    def __init__(self, refs: CaptureRefs, *, names: SessionNames, store_dir: Path, enabled: bool,
                 retention_days: int, min_free_disk_bytes: int = 0, max_session_bytes: int = 0,
                 max_queue: int = 32, on_skipped: Callable[[str], None] | None = None,
                 on_queue_wait: Callable[[float], None] | None = None):
        """`on_skipped(reason)` is told of each image not captured: "low_disk", "disk_error", "quota",
        "queue_full" or "malformed"; `on_queue_wait(seconds)` of how long each job waited for the
        capture thread."""
        self.refs, self.names, self.enabled = refs, names, enabled
        self._ref_length = len(names.session_ref(""))  # how long a session's folder name is
        self.store_dir = store_dir.expanduser().resolve()
        self.retention_ms = retention_days * DAY_MS
        self.min_free_disk_bytes, self.max_session_bytes = min_free_disk_bytes, max_session_bytes
        self.max_queue = max_queue
        self.on_skipped, self.on_queue_wait = on_skipped, on_queue_wait
        self.pending = 0  # images being captured in this process (waiting for or on the capture thread)
        self._last_warned = -math.inf
        self._io = ThreadPoolExecutor(1, thread_name_prefix="capture")

    def path(self, ref: str, sha256: str) -> Path:
        return self.store_dir / ref / sha256

    # -- keeping ------------------------------------------------------------------------------------
    async def keep(self, session: Session, data: bytes) -> tuple[Captured, bool] | None:
        """Keep the session's copy of the image (written unless it holds one already) and record it.
        Returns what the history item names, and whether the session held no copy before (for
        `undo`); None when capture is off or the image is not captured."""
        if not self.enabled:
            return None
        if self.pending >= self.max_queue:
            self._not_captured("queue_full", f"{self.pending} images are being captured (capture.max_queue)")
            return None
        self.pending += 1
        try:
            return await self._keep(session, data)
        except NotCaptured as exc:
            self._not_captured(exc.reason, str(exc))
        except OSError as exc:
            self._not_captured("low_disk" if isinstance(exc, LowDisk) else "disk_error", str(exc))
        finally:
            self.pending -= 1
        return None

    async def _keep(self, session: Session, data: bytes) -> tuple[Captured, bool]:
        image, sha256 = await asyncio.to_thread(_measure, data)  # CPU only: not the capture thread's queue
        ref = self.names.session_ref(session.id)
        new = await self.refs.add(ref, sha256, len(image), now_ms(), session.deadline_ms, self.max_session_bytes)
        if new < 0:
            raise NotCaptured("quota", f"the session's images would pass capture.max_session_bytes "
                                       f"({self.max_session_bytes})")
        try:
            # A new copy is always written and fsynced, whatever other sessions sent; one the session
            # holds is written again only if its file is gone (a crash between the record and the write).
            await self._off_loop(self._write, self.path(ref, sha256), image, new > 0)
        except OSError:
            if new > 0:
                with contextlib.suppress(ServiceError):
                    await self.refs.release(ref, sha256)
            raise
        return Captured(sha256, content_type(image), len(image)), new > 0

    def _not_captured(self, reason: str, detail: str) -> None:
        if self.on_skipped is not None:
            self.on_skipped(reason)
        now = time.monotonic()
        if now - self._last_warned >= _WARN_EVERY_SECONDS:
            self._last_warned = now
            log.error("could not capture an image (%s: %s); recorded without it. Logged at most once a minute; "
                      "inference_capture_skipped_total counts every one.", reason, detail)

    async def undo(self, session: Session, kept: tuple[Captured, bool] | None) -> None:
        """The prediction was not recorded after all: let go of an image kept only for it."""
        if kept is None or not kept[1]:
            return
        ref = self.names.session_ref(session.id)
        with contextlib.suppress(ServiceError, OSError):
            if await self.refs.release(ref, kept[0].sha256):
                await self._delete_unless_held(ref, kept[0].sha256)

    def _write(self, path: Path, data: bytes, new: bool) -> None:
        if not new and path.is_file():
            return
        private_dir(self.store_dir)
        private_dir(path.parent)
        if self.min_free_disk_bytes:
            free = shutil.disk_usage(path.parent).free
            if free - len(data) < self.min_free_disk_bytes:
                raise LowDisk(f"{free} bytes free where {self.store_dir} is, under capture.min_free_disk_bytes "
                              f"({self.min_free_disk_bytes})")
        write_atomically(path, data, private=True)

    # -- reading ------------------------------------------------------------------------------------
    async def read(self, session_id: str, image: dict[str, Any] | None) -> tuple[bytes, str]:
        """The bytes and media type of the image one of the session's history items names; 404 when it
        was not captured or the session's copy is past its retention."""
        data = None
        if image:
            for ref in self.names.session_refs(session_id):  # copies kept before a key rotation too
                data = await self._load_copy(ref, image["sha256"], await self.refs.seen_at(ref, image["sha256"]))
                if data is not None:
                    break
        if data is None or image is None:
            raise NotFound("This prediction's image was not captured, or its retention ended.",
                           code="image_not_found")
        return data, image["content_type"]

    async def load(self, image: dict[str, Any] | None) -> bytes | None:
        """The bytes of an image some session holds a copy of within its retention, else None (the
        export, which names an image by its hash alone: every copy has the same bytes)."""
        if not image:
            return None
        for ref, seen in sorted(await self.refs.copies(image["sha256"]), key=lambda copy: -copy[1]):
            data = await self._load_copy(ref, image["sha256"], seen)
            if data is not None:
                return data
        return None

    async def _load_copy(self, ref: str, sha256: str, seen: float | None) -> bytes | None:
        if seen is None or seen < now_ms() - self.retention_ms:
            return None
        return await self._off_loop(self._read, self.path(ref, sha256))

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd, "rb") as file:
            return file.read()

    # -- erasing and retention ------------------------------------------------------------------------
    async def erase(self, session_id: str) -> int:
        """Delete the session's copies and their records (under every name it had: a key rotation
        renames it); how many images were deleted. A retry after a failure part-way finishes the job."""
        deleted = 0
        for ref in self.names.session_refs(session_id):
            for sha256 in await self.refs.session_images(ref):
                await self.refs.release(ref, sha256)
            deleted += await self._off_loop(self._remove_folder, self.store_dir / ref)
        # Images it sent under the earlier layout: a shared file each, deleted once no session holds it.
        for sha256 in await self.refs.release_legacy(session_id):
            deleted += await self._off_loop(self._remove_legacy_file, self.store_dir / sha256[:2] / sha256)
        return deleted

    @staticmethod
    def _remove_legacy_file(path: Path) -> int:
        """Delete one file of the earlier layout; never through a link. 1 if it was there."""
        if path.parent.is_symlink() or not path.is_file() or path.is_symlink():
            return 0
        path.unlink(missing_ok=True)
        return 1

    @staticmethod
    def _remove_folder(folder: Path) -> int:
        """Delete a session's folder and what is in it (its images, temporary files); never through a
        link. How many images it held."""
        if not folder.is_dir() or folder.is_symlink():
            return 0
        images = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    images += _is_sha256(entry.name)
                    Path(entry.path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: something not ours is in it
            folder.rmdir()
        return images

    async def sweep(self, now: int | None = None) -> int:
        """Delete the copies their sessions did not send within the retention, and files older than it
        that Redis does not know; how many."""
        cutoff = (now_ms() if now is None else now) - self.retention_ms
        deleted = 0
        while True:
            due = await self.refs.older_than(cutoff, _SWEEP_BATCH)
            for ref, sha256 in due:
                if await self.refs.expire(ref, sha256, cutoff):
                    deleted += await self._delete_unless_held(ref, sha256)
            if len(due) < _SWEEP_BATCH:
                break
        return deleted + await self._sweep_unknown_files(cutoff)

    async def _sweep_unknown_files(self, cutoff_ms: int) -> int:
        """Delete files older than the cutoff that Redis does not know, a folder at a time (so the
        listing held in memory stays small whatever the store's size); then the folder, if that left it
        empty and nothing was written in it within the retention."""
        deleted = 0
        for folder in await self._off_loop(self._folders):
            images, leftovers = await self._off_loop(self._old_files, folder, cutoff_ms)
            for path in leftovers:  # partial writes and deletions a crash cut short
                await self._off_loop(self._unlink, path)
            for start in range(0, len(images), _SWEEP_BATCH):
                batch = images[start:start + _SWEEP_BATCH]
                for sha256, seen in zip(batch, await self.refs.seen_at_many(folder.name, batch), strict=True):
                    if seen is None:
                        deleted += await self._delete_unless_held(folder.name, sha256)
            await self._off_loop(self._remove_if_idle, folder, cutoff_ms)
        return deleted

    def _folders(self) -> list[Path]:
        """The sessions' folders (and the 2-digit folders of the earlier, shared layout, whose files
        Redis no longer knows): real folders only, never a link to one."""
        if not self.store_dir.is_dir():
            return []
        with os.scandir(self.store_dir) as entries:
            return sorted(Path(entry.path) for entry in entries
                          if entry.is_dir(follow_symlinks=False) and len(entry.name) in (2, self._ref_length)
                          and set(entry.name) <= _HEX)

    @staticmethod
    def _old_files(folder: Path, cutoff_ms: int) -> tuple[list[str], list[Path]]:
        """The images (by hash) and the leftover temporary files last written before the cutoff;
        regular files only (a link is not followed, nor deleted)."""
        images: list[str] = []
        leftovers: list[Path] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False) \
                            or entry.stat(follow_symlinks=False).st_mtime * 1000 >= cutoff_ms:
                        continue
                except FileNotFoundError:
                    continue
                if entry.name.startswith("."):
                    leftovers.append(Path(entry.path))
                elif _is_sha256(entry.name):
                    images.append(entry.name)
        return images, leftovers

    @staticmethod
    def _remove_if_idle(folder: Path, cutoff_ms: int) -> None:
        with contextlib.suppress(OSError):  # not empty, or gone
            if folder.lstat().st_mtime * 1000 < cutoff_ms:
                folder.rmdir()

    async def _delete_unless_held(self, ref: str, sha256: str) -> int:
        """Delete a copy Redis said the session no longer holds, unless it sent the image again
        meanwhile: 1 if deleted. Moved aside first, so a keep that writes it again is not undone, or
        this sees the record and moves it back."""
        path = self.path(ref, sha256)
        aside = path.parent / f".{sha256}.{uuid.uuid4().hex}.deleting"
        if not await self._off_loop(self._move_aside, path, aside):
            return 0
        try:
            held = await self.refs.seen_at(ref, sha256) is not None
        except ServiceError:
            held = True  # cannot tell: keep it; retention comes round again
        if held:
            await self._off_loop(os.replace, aside, path)
            return 0
        await self._off_loop(self._unlink, aside)
        return 1

    @staticmethod
    def _move_aside(path: Path, aside: Path) -> bool:
        """Rename a copy aside, unless it is gone or its folder is a link (never deleted through)."""
        if path.parent.is_symlink():
            return False
        try:
            os.replace(path, aside)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    @staticmethod
    def _unlink(path: Path) -> None:
        path.unlink(missing_ok=True)

    async def _off_loop(self, fn: Callable[[*_Args], _Result], *args: *_Args) -> _Result:
        """Run `fn` on the capture thread, reporting how long it waited there."""
        queued = time.monotonic()

        def timed() -> _Result:
            if self.on_queue_wait is not None:
                self.on_queue_wait(time.monotonic() - queued)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._io, timed)

    def close(self) -> None:
        self._io.shutdown(wait=False)


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX
