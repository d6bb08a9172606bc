"""service.capture: media types from the bytes, one file per content, erase that spares an image another
session holds, retention, and the classifier recording the image it kept (fakes for Redis, a real
folder)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from inference.runner import ModelRunner
from service.capture import DAY_MS, Captures, KeptImage, content_type
from service.classify import Classifier
from sessions.options import Options
from sessions.store import now_ms
from tests.unit.fakes import FakeCaptureRefs, FakeStore, solid_image

pytestmark = pytest.mark.unit


def captures(tmp_path: Path, refs: FakeCaptureRefs, enabled: bool = True) -> Captures:
    return Captures(refs, store_dir=tmp_path, enabled=enabled, retention_days=1)


def files(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in tmp_path.rglob("*") if path.is_file())


@pytest.mark.parametrize(("fmt", "media"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                            ("BMP", "image/bmp"), ("WEBP", "image/webp")])
def test_the_media_type_comes_from_the_bytes(fmt: str, media: str) -> None:
    assert content_type(solid_image(1, fmt=fmt)) == media
    assert content_type(b"not an image") == "application/octet-stream"


def test_kept_image_reads_its_source_once() -> None:
    class Source:
        reads = 0

        def image_bytes(self) -> bytes:
            Source.reads += 1
            return b"abc"

    kept = KeptImage(Source())
    assert kept.image_bytes() == kept.image_bytes() == b"abc" and Source.reads == 1


def test_classify_keeps_the_image_before_recording_the_entry_that_names_it(
        store: FakeStore, runner: ModelRunner, tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    classifier = Classifier(store, runner, captures=captures(tmp_path, refs))
    session = asyncio.run(store.create(Options()))
    image = solid_image(4)
    answer, _ = asyncio.run(classifier.classify(session, image, Options()))
    digest = hashlib.sha256(image).hexdigest()
    assert answer["image"] == {"sha256": digest, "content_type": "image/png", "size": len(image)}
    assert (tmp_path / digest[:2] / digest).read_bytes() == image and refs.owners[digest] == {session.id}
    off = Classifier(store, runner, captures=captures(tmp_path / "off", FakeCaptureRefs(), enabled=False))
    assert asyncio.run(off.classify(session, image, Options()))[0]["image"] is None
    assert not (tmp_path / "off").exists()


def test_a_prediction_that_is_not_recorded_lets_go_of_its_image(store: FakeStore, runner: ModelRunner,
                                                                tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    classifier = Classifier(store, runner, captures=captures(tmp_path, refs))
    session = asyncio.run(store.create(Options()))
    asyncio.run(store.delete(session))  # logged out while the image was classified
    with pytest.raises(Exception, match="logged out"):
        asyncio.run(classifier.classify(session, solid_image(2), Options()))
    assert refs.owners and all(not owners for owners in refs.owners.values())  # it was kept, then let go
    assert files(tmp_path) == [] and refs.seen == {}


def test_erase_deletes_only_images_no_other_session_holds_and_retention_ends_the_rest(tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    kept = captures(tmp_path, refs)

    class S:
        def __init__(self, session_id: str) -> None:
            self.id, self.deadline_ms = session_id, now_ms() + DAY_MS

    shared, own = solid_image(1), solid_image(2)
    asyncio.run(kept.keep(S("a"), shared))  # type: ignore[arg-type]
    asyncio.run(kept.keep(S("a"), own))  # type: ignore[arg-type]
    asyncio.run(kept.keep(S("b"), shared))  # type: ignore[arg-type]
    assert len(files(tmp_path)) == 2
    assert asyncio.run(kept.erase("a")) == 1
    assert files(tmp_path) == [hashlib.sha256(shared).hexdigest()]
    image = {"sha256": hashlib.sha256(shared).hexdigest(), "content_type": "image/png"}
    assert asyncio.run(kept.read(image)) == (shared, "image/png")
    assert asyncio.run(kept.sweep()) == 0
    assert asyncio.run(kept.sweep(now=now_ms() + DAY_MS + 1000)) == 1 and files(tmp_path) == []
    assert asyncio.run(kept.load(image)) is None


class _Session:
    def __init__(self, session_id: str) -> None:
        self.id, self.deadline_ms = session_id, now_ms() + DAY_MS


def test_the_sweep_deletes_old_files_redis_does_not_know_and_spares_the_rest(tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    kept = captures(tmp_path, refs)
    held = solid_image(1)
    asyncio.run(kept.keep(_Session("a"), held))  # type: ignore[arg-type]
    orphan = solid_image(2)
    orphan_sha = hashlib.sha256(orphan).hexdigest()
    (tmp_path / orphan_sha[:2]).mkdir(exist_ok=True)
    (tmp_path / orphan_sha[:2] / orphan_sha).write_bytes(orphan)  # written, then its record failed
    (tmp_path / orphan_sha[:2] / f".{orphan_sha}.x.partial").write_bytes(b"cut short")
    (tmp_path / "not-ours.txt").write_bytes(b"left alone")
    assert asyncio.run(kept.sweep()) == 0 and len(files(tmp_path)) == 4  # all younger than the retention
    # Past the retention for every file; the held image was sent again since, the other files by nobody:
    refs.seen[hashlib.sha256(held).hexdigest()] = now_ms() + DAY_MS
    assert asyncio.run(kept.sweep(now=now_ms() + DAY_MS + 1000)) == 1
    assert files(tmp_path) == sorted([hashlib.sha256(held).hexdigest(), "not-ours.txt"])


def test_an_image_sent_again_while_its_file_is_deleted_stays(tmp_path: Path) -> None:
    class SentAgainDuringTheDelete(FakeCaptureRefs):
        """Retention forgets the image; before the file goes, a session sends it again."""

        async def expire(self, sha256: str, cutoff_ms: int) -> bool:
            forgotten = await super().expire(sha256, cutoff_ms)
            await self.add("b", sha256, now_ms(), now_ms() + DAY_MS)
            return forgotten

    refs = SentAgainDuringTheDelete()
    kept = captures(tmp_path, refs)
    image = solid_image(3)
    asyncio.run(kept.keep(_Session("a"), image))  # type: ignore[arg-type]
    assert asyncio.run(kept.sweep(now=now_ms() + DAY_MS + 1000)) == 0
    assert files(tmp_path) == [hashlib.sha256(image).hexdigest()]  # moved aside, then back
    record = {"sha256": hashlib.sha256(image).hexdigest(), "content_type": "image/png"}
    assert asyncio.run(kept.read(record)) == (image, "image/png")


def test_capture_stops_short_of_filling_the_disk_and_says_so_once_a_minute(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    refs, skipped = FakeCaptureRefs(), []
    roomy = Captures(refs, store_dir=tmp_path, enabled=True, retention_days=1)
    stored = solid_image(4)
    assert asyncio.run(roomy.keep(_Session("a"), stored)) is not None  # type: ignore[arg-type]
    full = Captures(refs, store_dir=tmp_path, enabled=True, retention_days=1, min_free_disk_bytes=1 << 62,
                    on_skipped=skipped.append)
    with caplog.at_level("ERROR", logger="inference.capture"):
        assert asyncio.run(full.keep(_Session("b"), solid_image(5))) is None  # type: ignore[arg-type]
        assert asyncio.run(full.keep(_Session("b"), solid_image(6))) is None  # type: ignore[arg-type]
    assert skipped == ["low_disk", "low_disk"] and files(tmp_path) == [hashlib.sha256(stored).hexdigest()]
    assert len(caplog.records) == 1 and "capture.min_free_disk_bytes" in caplog.text
    # An image already stored costs no disk: it is still captured for another session.
    assert asyncio.run(full.keep(_Session("b"), stored)) is not None  # type: ignore[arg-type]

    (tmp_path / "blocked").write_bytes(b"a file where the store's folder should be")
    broken = Captures(refs, store_dir=tmp_path / "blocked", enabled=True, retention_days=1, on_skipped=skipped.append)
    assert asyncio.run(broken.keep(_Session("c"), solid_image(7))) is None  # type: ignore[arg-type]
    assert skipped[-1] == "disk_error"
