"""service.capture: media types and where an image ends, a copy per session whose answer and work do not
depend on other sessions, the quota and the queue, erase, retention that never follows a link, owner-only
files, and the classifier recording the image it kept (fakes for Redis, a real folder)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from core.clock import now_ms
from core.options import Options
from inference.runner import ModelRunner
from service.capture import DAY_MS, Captures, KeptImage, content_type, image_length
from service.classify import Classifier
from sessions.tokens import TokenSigner
from tests.conftest import DATA
from tests.unit.conftest import SECRET
from tests.unit.fakes import FakeCaptureRefs, FakeStore, FakeVersions, fake_models, solid_image

pytestmark = pytest.mark.unit

NAMES = TokenSigner([SECRET], max_age_seconds=3600)


def captures(tmp_path: Path, refs: FakeCaptureRefs, enabled: bool = True, **settings) -> Captures:
    return Captures(refs, names=NAMES, store_dir=tmp_path, enabled=enabled, retention_days=1, **settings)


def files(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in tmp_path.rglob("*") if path.is_file())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Session:
    def __init__(self, session_id: str) -> None:
        self.id, self.deadline_ms = session_id, now_ms() + DAY_MS


def copy_path(tmp_path: Path, session_id: str, data: bytes) -> Path:
    return tmp_path / NAMES.session_ref(session_id) / sha(data)


def keep(kept: Captures, session_id: str, data: bytes):
    return asyncio.run(kept.keep(_Session(session_id), data))  # type: ignore[arg-type]


@pytest.mark.parametrize(("fmt", "media"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                            ("BMP", "image/bmp"), ("WEBP", "image/webp")])
def test_the_media_type_comes_from_the_bytes(fmt: str, media: str) -> None:
    assert content_type(solid_image(1, fmt=fmt)) == media
    assert content_type(b"not an image") == "application/octet-stream"


def encoded(fmt: str, size: tuple[int, int] = (37, 29), mode: str = "RGB", **save) -> bytes:
    rng = random.Random(7)
    image = Image.frombytes(mode, size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * len(mode))))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), colour) for colour in (1, 50, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], comment=b"x" * 300, loop=0)
    return buffer.getvalue()


def jpeg_with_exif_thumbnail() -> bytes:
    # An APP1 segment holding a whole JPEG (its own end marker inside): skipped by its length.
    thumbnail = encoded("JPEG", (8, 8))
    segment = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    image = encoded("JPEG", (40, 30))
    return image[:2] + segment + image[2:]


IMAGES = {
    "png": lambda: encoded("PNG"),
    "jpeg": lambda: encoded("JPEG", quality=90),
    "jpeg progressive": lambda: encoded("JPEG", progressive=True),
    "jpeg restart markers": lambda: encoded("JPEG", restart_marker_blocks=1),
    "jpeg thumbnail": jpeg_with_exif_thumbnail,
    "jpeg photo": lambda: (DATA / "cat.jpg").read_bytes(),
    "gif": lambda: encoded("GIF", mode="L"),
    "gif animated": animated_gif,
    "bmp": lambda: encoded("BMP"),
    "bmp 1-bit": lambda: encoded("BMP", mode="1"),
    "bmp grey": lambda: encoded("BMP", mode="L"),
    "webp": lambda: encoded("WEBP"),
    "webp lossless": lambda: encoded("WEBP", lossless=True),
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_an_image_ends_where_its_container_says_whatever_follows(kind: str) -> None:
    image = IMAGES[kind]()
    Image.open(io.BytesIO(image)).load()  # a real image of its kind
    assert image_length(image) == len(image)
    trailing = random.Random(1).randbytes(4096)
    for after in (trailing, b"\xff\xd9" + trailing, b"\x00" * 9):
        assert image_length(image + after) == len(image)
    assert image_length(image[:len(image) // 2]) is None  # cut short: no end to find


def test_something_that_is_no_image_has_no_length() -> None:
    assert image_length(b"") is None and image_length(b"not an image at all") is None
    assert image_length(b"\x89PNG\r\n\x1a\n" + b"\xff" * 20) is None


def test_kept_image_reads_its_source_once() -> None:
    class Source:
        reads = 0

        def image_bytes(self) -> bytes:
            Source.reads += 1
            return b"abc"

    kept = KeptImage(Source())
    assert kept.image_bytes() == kept.image_bytes() == b"abc" and Source.reads == 1


def test_classify_keeps_the_image_before_recording_the_entry_that_names_it(
        store: FakeStore, runner: ModelRunner, tmp_path: Path, versions: FakeVersions) -> None:
    refs = FakeCaptureRefs()
    classifier = Classifier(store, runner, fake_models(versions), captures=captures(tmp_path, refs))
    session = asyncio.run(store.create(Options()))
    image = solid_image(4)
    answer, _ = asyncio.run(classifier.classify(session, image, Options()))
    assert answer["image"] == {"sha256": sha(image), "content_type": "image/png", "size": len(image)}
    assert copy_path(tmp_path, session.id, image).read_bytes() == image
    assert refs.sizes == {NAMES.session_ref(session.id): {sha(image): len(image)}}
    off = Classifier(store, runner, fake_models(versions),
                     captures=captures(tmp_path / "off", FakeCaptureRefs(), enabled=False))
    assert asyncio.run(off.classify(session, image, Options()))[0]["image"] is None
    assert not (tmp_path / "off").exists()


def test_only_the_image_is_kept_not_what_follows_it(store: FakeStore, runner: ModelRunner, tmp_path: Path,
                                                    versions: FakeVersions) -> None:
    classifier = Classifier(store, runner, fake_models(versions), captures=captures(tmp_path, FakeCaptureRefs()))
    session = asyncio.run(store.create(Options()))
    image = solid_image(4, size=32)
    answer, _ = asyncio.run(classifier.classify(session, image + os.urandom(1 << 20), Options()))
    assert answer["image"] == {"sha256": sha(image), "content_type": "image/png", "size": len(image)}
    assert copy_path(tmp_path, session.id, image).read_bytes() == image
    assert [path.stat().st_size for path in tmp_path.rglob("*") if path.is_file()] == [len(image)]


def test_a_prediction_that_is_not_recorded_lets_go_of_its_image(store: FakeStore, runner: ModelRunner,
                                                                tmp_path: Path, versions: FakeVersions) -> None:
    refs = FakeCaptureRefs()
    classifier = Classifier(store, runner, fake_models(versions), captures=captures(tmp_path, refs))
    session = asyncio.run(store.create(Options()))
    asyncio.run(store.delete(session))  # logged out while the image was classified
    with pytest.raises(Exception, match="logged out"):
        asyncio.run(classifier.classify(session, solid_image(2), Options()))
    assert files(tmp_path) == [] and refs.seen == {} and refs.sizes == {}


def test_each_session_keeps_its_own_copy_and_erase_deletes_only_its_own(tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    kept = captures(tmp_path, refs)
    shared, own = solid_image(1), solid_image(2)
    keep(kept, "a", shared)
    keep(kept, "a", own)
    keep(kept, "b", shared)
    assert copy_path(tmp_path, "a", shared).is_file() and copy_path(tmp_path, "b", shared).is_file()
    assert len(files(tmp_path)) == 3
    assert asyncio.run(kept.erase("a")) == 2
    assert files(tmp_path) == [sha(shared)] and copy_path(tmp_path, "b", shared).is_file()
    assert not (tmp_path / NAMES.session_ref("a")).exists()
    assert asyncio.run(kept.erase("a")) == 0  # again: nothing left, nothing fails
    image = {"sha256": sha(shared), "content_type": "image/png"}
    assert asyncio.run(kept.read("b", image)) == (shared, "image/png")
    with pytest.raises(Exception, match="not captured"):
        asyncio.run(kept.read("a", image))  # erased: its own copy is gone, whoever else sent the image
    assert asyncio.run(kept.load(image)) == shared  # the export: any copy of those bytes
    assert asyncio.run(kept.sweep()) == 0
    assert asyncio.run(kept.sweep(now=now_ms() + DAY_MS + 1000)) == 1 and files(tmp_path) == []
    assert asyncio.run(kept.load(image)) is None and refs.seen == {} and refs.sizes == {}


def test_erase_after_a_key_rotation_finds_the_copies_kept_under_the_old_name(tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    before = captures(tmp_path, refs)
    keep(before, "a", solid_image(1))
    rotated = Captures(refs, names=TokenSigner(["newer-secret-0123456789", SECRET], max_age_seconds=60),
                       store_dir=tmp_path, enabled=True, retention_days=1)
    image = {"sha256": sha(solid_image(1)), "content_type": "image/png"}
    assert asyncio.run(rotated.read("a", image))[0] == solid_image(1)
    assert asyncio.run(rotated.erase("a")) == 1 and files(tmp_path) == [] and refs.sizes == {}


def test_an_image_another_session_sent_costs_the_same_work_as_a_new_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    kept = captures(tmp_path, FakeCaptureRefs())
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    image = solid_image(3)
    work, answers = [], []
    for session_id, data in (("a", image), ("b", image), ("c", solid_image(5))):
        before = len(synced)
        answers.append(keep(kept, session_id, data))
        work.append((len(synced) - before, copy_path(tmp_path, session_id, data).is_file()))
    assert work == [(1, True)] * 3  # the second sender writes and fsyncs its own copy
    assert answers[0] == answers[1] and all(new for _, new in answers)
    before = len(synced)
    assert keep(kept, "a", image)[1] is False and len(synced) == before  # its own image again: no write


def test_short_of_disk_an_image_another_session_sent_is_refused_like_a_new_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    refs, skipped = FakeCaptureRefs(), []
    roomy = captures(tmp_path, refs)
    stored = solid_image(4)
    assert keep(roomy, "a", stored) is not None
    full = captures(tmp_path, refs, min_free_disk_bytes=1 << 62, on_skipped=skipped.append)
    with caplog.at_level("ERROR", logger="inference.capture"):
        assert keep(full, "b", stored) is None  # sent by "a" before: refused all the same
        assert keep(full, "b", solid_image(5)) is None
    assert skipped == ["low_disk", "low_disk"] and files(tmp_path) == [sha(stored)]
    assert len(caplog.records) == 1 and "capture.min_free_disk_bytes" in caplog.text
    assert refs.sizes == {NAMES.session_ref("a"): {sha(stored): len(stored)}}  # nothing recorded for "b"
    assert keep(full, "a", stored) is not None  # the session's own copy costs no disk

    (tmp_path / "blocked").write_bytes(b"a file where the store's folder should be")
    broken = captures(tmp_path / "blocked", refs, on_skipped=skipped.append)
    assert keep(broken, "c", solid_image(7)) is None
    assert skipped[-1] == "disk_error"


def test_a_session_keeps_at_most_its_quota(tmp_path: Path) -> None:
    refs, skipped = FakeCaptureRefs(), []
    first, second, third = solid_image(1), solid_image(2), solid_image(3)
    kept = captures(tmp_path, refs, max_session_bytes=len(first) + len(second), on_skipped=skipped.append)
    assert keep(kept, "a", first) is not None and keep(kept, "a", second) is not None
    assert keep(kept, "a", third) is None and skipped == ["quota"]
    assert keep(kept, "a", first) is not None  # a copy it holds costs nothing more
    assert keep(kept, "b", third) is not None  # another session's quota is its own
    assert asyncio.run(kept.erase("a")) == 2
    assert keep(kept, "a", third) is not None  # erased: room again


def test_past_the_queue_an_image_is_not_captured_and_the_prediction_is_still_recorded(
        store: FakeStore, runner: ModelRunner, tmp_path: Path, versions: FakeVersions) -> None:
    refs, skipped, waits = FakeCaptureRefs(), [], []
    kept = captures(tmp_path, refs, max_queue=1, on_skipped=skipped.append, on_queue_wait=waits.append)
    classifier = Classifier(store, runner, fake_models(versions), captures=kept)
    release = threading.Event()

    async def scenario() -> tuple[dict, dict, list]:
        session = await store.create(Options())
        blocked = asyncio.get_running_loop().run_in_executor(kept._io, release.wait, 30)  # the disk is slow
        first = asyncio.ensure_future(classifier.classify(session, solid_image(1), Options()))
        while kept.pending < 1:  # the first image is being captured, waiting for the thread
            await asyncio.sleep(0.001)
        second, _ = await classifier.classify(session, solid_image(2), Options())
        release.set()
        await blocked
        return (await first)[0], second, (await store.history(session.id, limit=5))[0]

    first, second, history = asyncio.run(scenario())
    assert first["image"] is not None and second["image"] is None and skipped == ["queue_full"]
    assert sorted(item["id"] for item in history) == sorted([first["id"], second["id"]])  # both recorded
    assert waits and waits[0] > 0  # the first image's write waited behind the slow job


def test_the_sweep_deletes_old_files_redis_does_not_know_and_spares_the_rest(tmp_path: Path) -> None:
    refs = FakeCaptureRefs()
    kept = captures(tmp_path, refs)
    held = solid_image(1)
    keep(kept, "a", held)
    orphan = solid_image(2)
    folder = tmp_path / NAMES.session_ref("b")
    folder.mkdir()
    (folder / sha(orphan)).write_bytes(orphan)  # written, then its record failed
    (folder / f".{sha(orphan)}.x.partial").write_bytes(b"cut short")
    legacy = tmp_path / sha(orphan)[:2]  # the earlier shared layout
    legacy.mkdir()
    (legacy / sha(orphan)).write_bytes(orphan)
    (tmp_path / "not-ours.txt").write_bytes(b"left alone")
    assert asyncio.run(kept.sweep()) == 0 and len(files(tmp_path)) == 5  # all younger than the retention
    # Past the retention for every file; the held image was sent again since, the other files by nobody:
    refs.seen[f"{NAMES.session_ref('a')}/{sha(held)}"] = now_ms() + DAY_MS
    assert asyncio.run(kept.sweep(now=now_ms() + DAY_MS + 1000)) == 2
    assert files(tmp_path) == sorted([sha(held), "not-ours.txt"])


def test_the_sweep_never_follows_a_link(tmp_path: Path) -> None:
    store_dir, outside = tmp_path / "store", tmp_path / "outside"
    store_dir.mkdir()
    outside.mkdir()
    old = time.time() - 3 * 24 * 3600
    victims = [outside / ".old-dot-file", outside / ("ab" * 32)]
    for victim in victims:
        victim.write_bytes(b"not the store's")
        os.utime(victim, (old, old))
    (store_dir / "ab").symlink_to(outside)  # named like a folder of the store
    (store_dir / NAMES.session_ref("a")).symlink_to(outside)
    real = store_dir / NAMES.session_ref("b")
    real.mkdir()
    (real / ".dot-link").symlink_to(victims[0])
    (real / ("ab" * 32)).symlink_to(victims[1])
    refs = FakeCaptureRefs()
    refs.seen[f"{NAMES.session_ref('a')}/{'ab' * 32}"] = 0  # Redis names a copy in the linked folder
    kept = captures(store_dir, refs)
    asyncio.run(kept.sweep())
    assert all(victim.read_bytes() == b"not the store's" for victim in victims)
    assert asyncio.run(kept.erase("a")) == 0 and all(victim.exists() for victim in victims)


def test_an_image_sent_again_while_its_file_is_deleted_stays(tmp_path: Path) -> None:
    class SentAgainDuringTheDelete(FakeCaptureRefs):
        """Retention forgets the copy; before the file goes, the session sends the image again."""

        async def expire(self, ref: str, sha256: str, cutoff_ms: int) -> bool:
            forgotten = await super().expire(ref, sha256, cutoff_ms)
            await self.add(ref, sha256, 1, now_ms(), now_ms() + DAY_MS, 0)
            return forgotten

    refs = SentAgainDuringTheDelete()
    kept = captures(tmp_path, refs)
    image = solid_image(3)
    keep(kept, "a", image)
    assert asyncio.run(kept.sweep(now=now_ms() + DAY_MS + 1000)) == 0
    assert files(tmp_path) == [sha(image)]  # moved aside, then back
    record = {"sha256": sha(image), "content_type": "image/png"}
    assert asyncio.run(kept.read("a", record)) == (image, "image/png")


def test_captured_files_and_folders_are_the_owners_only(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        keep(captures(tmp_path / "store", FakeCaptureRefs()), "a", solid_image(1))
    finally:
        os.umask(previous)
    path = copy_path(tmp_path / "store", "a", solid_image(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
