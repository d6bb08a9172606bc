"""The training export: every piece of feedback, with its prediction and captured image, as a
WebDataset tar (or JSON lines), streamed.

The export reads the feedback index in pages of `feedback.export_page_size` records, oldest
feedback first, each page strictly after the last one's last score (a cursor that feedback added or
removed meanwhile cannot shift), and hands out each item's bytes as soon as they are built, so its
memory is one page of records and one image whatever the export's size. A tar member is its 512-byte header
(tarfile.TarInfo.tobuf) and its data padded to 512 bytes; the archive ends with two zero blocks.

Each item is a group of members sharing one key, `<session ref>-<history id>` (no dots, as
WebDataset splits a name at its first dot):
    <key>.json     the record (docs/api.md#the-training-export); its `image.file` names the image member
    <key>.cls      the corrected class index, as decimal text
    <key>.<ext>    the captured image as it was sent (its format's extension, core.images), where there is one
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from core import images
from core.errors import BadRequest, quoted, quoted_names
from core.options import MODEL_NAME, MODEL_VERSION
from service.capture import Captures

MEDIA_TYPES = {"tar": "application/x-tar", "jsonl": "application/x-ndjson"}
FORMATS = tuple(MEDIA_TYPES)
PARAMETERS = ("since", "until", "model", "model_version", "format")
_EPOCH_MS = re.compile(r"[0-9]{1,15}")
_BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)


class FeedbackPages(Protocol):
    """What the export needs of sessions.feedback.FeedbackStore."""

    async def page(self, since_ms: int | float, until_ms: int | float, *, after: float | None,
                   limit: int) -> tuple[list[dict[str, Any]], float | None]: ...


@dataclass(frozen=True)
class ExportQuery:
    since_ms: float = float("-inf")  # feedback given at or after this time
    until_ms: float = float("inf")  # ... and before this one
    model_version: str | None = None  # only feedback on this version's predictions
    format: str = "tar"
    model: str | None = None  # only feedback on this model's predictions


def parse_time(text: str, name: str) -> int:
    """Milliseconds since the epoch from epoch milliseconds or an ISO 8601 time (UTC unless it says)."""
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 time such as 2026-01-31T12:00:00Z, or milliseconds since "
                         f"the epoch; got {quoted(text)}.", code="invalid_parameter") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def parse_query(arguments: Mapping[str, str]) -> ExportQuery:
    """The export's query parameters, checked (400 `invalid_parameter` naming the bad one)."""
    unknown = sorted(set(arguments) - set(PARAMETERS))
    if unknown:
        raise BadRequest(f"Unknown parameter(s) {quoted_names(unknown)}; the export takes {', '.join(PARAMETERS)}.",
                         code="invalid_parameter")
    since = parse_time(arguments["since"], "since") if arguments.get("since") else float("-inf")
    until = parse_time(arguments["until"], "until") if arguments.get("until") else float("inf")
    if since >= until:
        raise BadRequest("since must be before until.", code="invalid_parameter")
    version = arguments.get("model_version") or None
    if version is not None and not MODEL_VERSION.match(version):
        raise BadRequest(f"model_version {quoted(version)} is not a version name.", code="invalid_parameter")
    model = arguments.get("model") or None
    if model is not None and not MODEL_NAME.match(model):
        raise BadRequest(f"model {quoted(model)} is not a model name.", code="invalid_parameter")
    export_format = arguments.get("format") or "tar"
    if export_format not in FORMATS:
        raise BadRequest(f"format must be {' or '.join(FORMATS)}, got {quoted(export_format)}.",
                         code="invalid_parameter")
    return ExportQuery(since, until, version, export_format, model)


def item_key(record: dict[str, Any]) -> str:
    return f"{record['session']}-{record['history_id']}"


def tar_member(name: str, data: bytes, mtime: float) -> bytes:
    """One regular file of a tar archive: header, data, padding."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    padding = -len(data) % _BLOCK
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * padding


class FeedbackExport:
    def __init__(self, records: FeedbackPages, captures: Captures, *, page_size: int):
        self.records, self.captures, self.page_size = records, captures, page_size

    async def stream(self, query: ExportQuery) -> AsyncIterator[bytes]:
        """The export's bytes, one item at a time (the caller writes and flushes each)."""
        cursor: float | None = None  # the last page's last score: no two records share one
        while True:
            records, cursor = await self.records.page(query.since_ms, query.until_ms, after=cursor,
                                                      limit=self.page_size)
            for record in records:
                if query.model is not None and record["model"]["name"] != query.model:
                    continue
                if query.model_version is None or record["model"]["version"] == query.model_version:
                    yield await self._item(record, query.format)
            if cursor is None:
                break
        if query.format == "tar":
            yield END_OF_ARCHIVE

    async def _item(self, record: dict[str, Any], export_format: str) -> bytes:
        key = item_key(record)
        image = record.get("image")
        if export_format == "jsonl":  # no image bytes: `file` is null
            return _json({"key": key, **record, "image": {**image, "file": None} if image else None}) + b"\n"
        data = await self.captures.load(image)  # None: not captured, or past its retention
        file = f"{key}.{images.extension(image['content_type'])}" if image and data is not None else None
        mtime = datetime.fromisoformat(record["feedback"]["created_at"]).timestamp()
        described = {**image, "file": file} if image else None
        parts = [tar_member(f"{key}.json", _json({"key": key, **record, "image": described}), mtime),
                 tar_member(f"{key}.cls", str(record["feedback"]["class_index"]).encode(), mtime)]
        if file is not None and data is not None:
            parts.append(tar_member(file, data, mtime))
        return b"".join(parts)


# Characters JSON allows raw in a string but that line readers split on (Python's str.splitlines, and
# JavaScript before ES2019 reads the last two as line ends): escaped, so that one record is one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json(value: Any) -> bytes:
    """Compact JSON, as UTF-8 (not \\u-escaped), with no character a line reader takes for a line end."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS).encode()
