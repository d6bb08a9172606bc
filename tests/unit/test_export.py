"""service.export: the query's checks, tar members tarfile reads, and an export that holds one page of
records at a time, fetching the next only once the previous items were handed out."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest

from core.errors import BadRequest
from service.capture import Captures
from service.export import FeedbackExport, parse_query, parse_time, tar_member
from sessions.tokens import TokenSigner
from tests.unit.fakes import FakeCaptureRefs, FakeFeedbackRecords

pytestmark = pytest.mark.unit


def test_times_are_epoch_milliseconds_or_iso_8601() -> None:
    assert parse_time("1700000000123", "since") == 1700000000123
    assert parse_time("2023-11-14T22:13:20.123Z", "since") == 1700000000123
    assert parse_time("2023-11-14T23:13:20.123+01:00", "since") == 1700000000123
    assert parse_time("2023-11-14T22:13:20.123", "since") == 1700000000123  # UTC unless it says
    for bad in ("", "soon", "2023-02-30", "-5", "1e9"):
        with pytest.raises(BadRequest, match="since"):
            parse_time(bad, "since")


def test_the_query_is_checked_as_a_whole() -> None:
    query = parse_query({"since": "1000", "until": "2000", "model_version": "v2", "format": "jsonl"})
    assert (query.since_ms, query.until_ms, query.model_version, query.format) == (1000, 2000, "v2", "jsonl")
    assert parse_query({}).format == "tar"
    for bad in ({"since": "2000", "until": "1000"}, {"format": "zip"}, {"model_version": "a b"}, {"limit": "3"}):
        with pytest.raises(BadRequest) as caught:
            parse_query(bad)
        assert caught.value.code == "invalid_parameter"


def test_tar_members_are_read_by_tarfile() -> None:
    archive = tar_member("a-1.json", b'{"x":1}', 1700000000) + tar_member("a-1.cls", b"7", 1700000000)
    with tarfile.open(fileobj=io.BytesIO(archive + b"\0" * 1024), mode="r|") as tar:
        read = [(member.name, tar.extractfile(member).read()) for member in tar]  # type: ignore[union-attr]
    assert read == [("a-1.json", b'{"x":1}'), ("a-1.cls", b"7")]


def record(n: int) -> dict:
    return {"session": "abc", "history_id": f"{n}-0", "predicted_at": "2026-01-01T00:00:00.000Z",
            "prediction": {"class_index": 1, "label": "one", "top_k": []}, "agrees": n % 2 == 0,
            "feedback": {"class_index": n % 10, "label": "x", "comment": None,
                         "created_at": "2026-01-01T00:00:00.000Z"},
            "model": {"name": "fake-net", "version": "v1" if n < 20 else "v2"}, "options": {}, "image": None}


def put(records: FakeFeedbackRecords, item: dict, *, at_ms: int) -> None:
    asyncio.run(records.set([item["session"]], item["history_id"], item, at_ms=at_ms,
                            model=item["model"]["name"], version=item["model"]["version"], agrees=item["agrees"],
                            keep_until_ms=0, owner="o",
                            max_per_session=100, daily_limit=0))


def test_line_breaks_json_leaves_raw_are_escaped_in_both_formats(tmp_path: Path) -> None:
    records = FakeFeedbackRecords()
    comment = "a\x85b\u2028c\u2029d é"
    put(records, {**record(1), "feedback": {**record(1)["feedback"], "comment": comment}}, at_ms=1000)
    captures = Captures(FakeCaptureRefs(), names=TokenSigner(["k"], 60), store_dir=tmp_path, enabled=True,
                        retention_days=1)
    exporter = FeedbackExport(records, captures, page_size=4)

    async def export(export_format: str) -> bytes:
        return b"".join([chunk async for chunk in exporter.stream(parse_query({"format": export_format}))])

    (line,) = export_text = asyncio.run(export("jsonl")).decode().splitlines()
    assert json.loads(line)["feedback"]["comment"] == comment and "d é" in export_text[0]
    with tarfile.open(fileobj=io.BytesIO(asyncio.run(export("tar"))), mode="r|") as tar:
        text = next(tar.extractfile(member).read() for member in tar if member.name.endswith(".json"))  # type: ignore[union-attr]
    assert text.count(b"\\u") == 3 and json.loads(text)["feedback"]["comment"] == comment


def test_the_export_holds_one_page_at_a_time(tmp_path: Path) -> None:
    records = FakeFeedbackRecords()
    for n in range(25):
        put(records, record(n), at_ms=1000 + n)
    captures = Captures(FakeCaptureRefs(), names=TokenSigner(["k"], 60), store_dir=tmp_path, enabled=True,
                        retention_days=1)
    exporter = FeedbackExport(records, captures, page_size=4)

    async def consume(query_text: dict[str, str]) -> tuple[list[bytes], list[int]]:
        chunks, pages_when_handed_out = [], []
        async for chunk in exporter.stream(parse_query(query_text)):
            chunks.append(chunk)
            pages_when_handed_out.append(len(records.pages))
        return chunks, pages_when_handed_out

    chunks, pages = asyncio.run(consume({"format": "jsonl"}))
    assert [json.loads(chunk)["history_id"] for chunk in chunks] == [f"{n}-0" for n in range(25)]
    assert max(records.pages) == 4 and len(records.pages) == 7  # 25 records in pages of 4
    assert pages == [n // 4 + 1 for n in range(25)]  # each item handed out before the next page is read
    records.pages.clear()
    chunks, _ = asyncio.run(consume({"model_version": "v2"}))
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r|") as tar:
        names = [member.name for member in tar]
    assert names == [f"abc-{n}-0.{ext}" for n in range(20, 25) for ext in ("json", "cls")]
