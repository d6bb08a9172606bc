"""Test doubles for the service layer: an in-memory session store, a model backend with known logits,
and the few `ModelCatalogue` methods the use cases call (with the versions it holds loaded). No Redis,
no torch, no weights.

Each fake keeps the contract of what it stands for (the errors and their codes, idempotency replays,
the history's cap and order, JSON round trips) and counts the calls a test may want to see.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image

from core.clock import now_ms
from core.errors import (
    SESSION_NOT_FOUND,
    SESSION_REVOKED,
    BadRequest,
    Conflict,
    InvalidToken,
    NotFound,
    RateLimited,
    quoted,
)
from core.options import IMAGENET_MEAN, IMAGENET_STD, Options
from core.session import Session
from inference.model import LoadedModel
from inference.pixels import PixelBatch
from inference.repository import ModelSpec
from inference.runner import ModelRunner, ServedModel
from service.catalogue import ModelCatalogue, VersionNotPinnable
from service.loaded_versions import LoadedVersions
from service.models import Models
from sessions.feedback import DAY_MS
from sessions.model_registry import Canary
from sessions.store import canary_slot, owner_name, parse_history_id
from sessions.tokens import VerifiedToken, new_session_id

CLASSES = 10
LABELS = [f"class-{index}" for index in range(CLASSES)]


@dataclasses.dataclass
class _Stored:
    created_at_ms: int
    deadline_ms: int
    options: Options
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (id, JSON entry), oldest first
    idempotent: dict[str, str] = dataclasses.field(default_factory=dict)  # idempotency key -> history id
    tokens: float | None = None  # the rate limit's bucket; None: full
    predictions: int = 0  # every one recorded, unlike the capped history
    canary_slot: int | None = None
    owner: str | None = None


class FakeStore:
    """`sessions.store.SessionStore`'s methods that service/ calls, in memory.

    Buckets (a session's rate limit, logins) start full and never refill: a test runs in milliseconds,
    where a real bucket refills by a negligible fraction of a token.
    """

    def __init__(self, *, history_max_entries: int = 100, rate_limit_per_minute: int = 0,
                 max_lifetime_seconds: int = 3600):
        self.history_max_entries = history_max_entries
        self.rate_limit_per_minute = rate_limit_per_minute
        self.max_lifetime_ms = max_lifetime_seconds * 1000
        self.sessions: dict[str, _Stored] = {}
        self.created = 0  # sessions ever created: deals the canary slots, as the real store does
        self.revoked: set[str] = set()  # logout's tombstones
        self.erasing: set[str] = set()  # sessions marked by begin_erase
        self.logins: dict[str, float] = {}  # who -> tokens left
        self.calls: list[tuple[str, Any]] = []  # (method, its main argument), in order
        self._last_id = (0, 0)

    def called(self, method: str) -> list[Any]:
        return [argument for name, argument in self.calls if name == method]

    def expire(self, session_id: str) -> None:
        """The session's idle time runs out: gone, with no tombstone."""
        del self.sessions[session_id]

    def _live(self, session_id: str) -> _Stored:
        stored = self.sessions.get(session_id)
        if stored is None:
            if session_id in self.revoked:
                raise InvalidToken(SESSION_REVOKED, code="session_revoked")
            raise InvalidToken(SESSION_NOT_FOUND, code="session_not_found")
        return stored

    def _session(self, session_id: str, stored: _Stored, replay_of: str | None = None) -> Session:
        return Session(session_id, stored.created_at_ms, min(now_ms() + 600_000, stored.deadline_ms),
                       stored.deadline_ms, stored.options, stored.predictions, replay_of, stored.canary_slot,
                       stored.owner)

    def _next_id(self) -> str:
        """A Redis stream id: milliseconds and a sequence, always increasing."""
        milliseconds, sequence = self._last_id
        now = now_ms()
        self._last_id = (now, 0) if now > milliseconds else (milliseconds, sequence + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    async def take_login(self, who: str, per_minute: int) -> None:
        self.calls.append(("take_login", who))
        if per_minute <= 0:
            return
        tokens = self.logins.get(who, float(per_minute))
        if tokens < 1:
            raise RateLimited(f"Too many logins: the limit is {per_minute} a minute; retry in 60 s.",
                              code="login_rate_limited", retry_after=60)
        self.logins[who] = tokens - 1

    async def create(self, options: Options, owner: str | None = None) -> Session:
        self.calls.append(("create", options))
        session_id, created = new_session_id(), now_ms()
        self.created += 1
        stored = _Stored(created, created + self.max_lifetime_ms, options, canary_slot=canary_slot(self.created),
                         owner=owner_name(owner) if owner is not None else None)
        self.sessions[session_id] = stored
        return self._session(session_id, stored)

    async def touch(self, token: VerifiedToken, *, cost: int = 0, idempotency_key: str | None = None) -> Session:
        self.calls.append(("touch", cost))
        stored = self._live(token.session_id)
        if idempotency_key and idempotency_key in stored.idempotent:  # a repeat: its first answer, at no cost
            return self._session(token.session_id, stored, replay_of=stored.idempotent[idempotency_key])
        per_minute = self.rate_limit_per_minute
        if cost > 0 and per_minute > 0:
            tokens = per_minute if stored.tokens is None else stored.tokens
            if tokens < cost:
                wait = max(1, math.ceil((cost - tokens) * 60 / per_minute))
                raise RateLimited(f"This session is over its limit of {per_minute} requests a minute; "
                                  f"retry in {wait} s.", retry_after=wait)
            stored.tokens = tokens - cost
        return self._session(token.session_id, stored)

    async def record(self, session: Session, entry: dict[str, Any],
                     idempotency_key: str | None = None) -> tuple[str, bool]:
        self.calls.append(("record", entry))
        stored = self._live(session.id)
        if session.id in self.erasing:
            raise InvalidToken(SESSION_REVOKED, code="session_revoked")
        if idempotency_key and idempotency_key in stored.idempotent:
            return stored.idempotent[idempotency_key], True
        history_id = self._next_id()
        # Stored as JSON, as the real store does: an entry that does not serialize fails here too.
        stored.history.append((history_id, json.dumps(entry, separators=(",", ":"))))
        del stored.history[:-self.history_max_entries]  # XADD MAXLEN: the oldest go
        stored.predictions += 1
        if idempotency_key:
            stored.idempotent[idempotency_key] = history_id
        return history_id, False

    async def history(self, session_id: str, *, limit: int,
                      before: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        self.calls.append(("history", session_id))
        # The real store's parse: an id past Redis' 64-bit parts is refused like any other bad id.
        bound = parse_history_id(before) if before is not None else None
        if before is not None and bound is None:
            raise BadRequest(f"before must be a history id such as '1732540000000-0', got {quoted(before)}.",
                             code="invalid_parameter")
        stored = self.sessions.get(session_id)
        rows = list(reversed(stored.history)) if stored else []  # a stream of a gone session reads empty
        if bound is not None:
            rows = [row for row in rows if _id_key(row[0]) < bound]
        items = [{"id": history_id, **json.loads(entry)} for history_id, entry in rows[:limit]]
        return items, items[-1]["id"] if len(rows) > limit else None

    async def history_item(self, session_id: str, history_id: str) -> dict[str, Any]:
        self.calls.append(("history_item", history_id))
        stored = self.sessions.get(session_id)
        wanted = parse_history_id(history_id)  # as Redis reads it: "5-01" names the entry "5-1"
        for found, entry in stored.history if stored and wanted is not None else []:
            if _id_key(found) == wanted:
                return {"id": found, **json.loads(entry)}
        raise NotFound(f"No history item {quoted(history_id)} in this session.", code="history_item_not_found")

    async def update_options(self, session_id: str, changes: dict[str, Any]) -> Options:
        self.calls.append(("update_options", changes))
        stored = self.sessions.get(session_id)
        if stored is None:  # the real one reads the hash: a tombstone does not count
            raise InvalidToken(SESSION_NOT_FOUND, code="session_not_found")
        stored.options = stored.options.merged(changes)
        return stored.options

    async def alive(self, session_id: str) -> bool:
        self.calls.append(("alive", session_id))
        return session_id in self.sessions and session_id not in self.erasing

    async def begin_erase(self, session_id: str) -> None:
        self.calls.append(("begin_erase", session_id))
        if session_id in self.sessions:
            self.erasing.add(session_id)

    async def delete(self, session: Session, *, erase: bool = False) -> None:
        """Logout leaves a tombstone; an erase leaves nothing (its token then reads as not found)."""
        self.calls.append(("delete", session.id))
        self.erasing.discard(session.id)
        if self.sessions.pop(session.id, None) is not None and not erase:
            self.revoked.add(session.id)


def _id_key(history_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = history_id.partition("-")
    return int(milliseconds), int(sequence)


class FakeBackend:
    """A `Backend` whose winning class is the image's red level: an image of `solid_image(k)` is class k
    under the default options (ImageNet normalization), by a wide margin. Counts its forwards."""

    name = "fake"
    precision = "fp32"

    def __init__(self, classes: int = CLASSES):
        self.classes = classes
        self.forwards: list[int] = []  # batch sizes, in order

    def forward(self, batch: np.ndarray | PixelBatch, *, alone: bool = False) -> np.ndarray:
        self.forwards.append(len(batch))
        if isinstance(batch, PixelBatch):
            batch = batch.to_tensor()
        red = batch[:, 0].mean(axis=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # 0..1, undoing Normalize
        target = red * (self.classes - 1)
        return (-20.0 * np.abs(np.arange(self.classes)[None, :] - target[:, None])).astype(np.float32)


def solid_image(winner: int, *, fmt: str = "PNG", size: int = 32, classes: int = CLASSES) -> bytes:
    """A tiny one-colour image that FakeBackend classifies as `winner`."""
    red = round(255 * winner / (classes - 1))
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (red, 0, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


def fake_model(version: str = "v1") -> LoadedModel:
    return LoadedModel("fake-net", version, None, list(LABELS), "0" * 64)


def fake_runner() -> ModelRunner:
    """A real ModelRunner (decoding, preprocessing, top-k); the model it runs comes with each call."""
    return ModelRunner(workers=1, max_queue=16, max_image_pixels=1024 * 1024)


class FakeVersions:
    """`service.catalogue.ModelCatalogue`'s `served_for`, `ensure`, `may_pin` and `loaded`, serving
    `fake_model(active)` on `backend`: `published` versions exist and load (on that backend) on `ensure`,
    as the real one loads them; any other (removed, or never published) is refused with a 409. Of those,
    the active one, the canary's and the `pinnable` ones (all published by default) may be pinned;
    another is refused with a 403."""

    name = "fake-net"
    spec = ModelSpec(name="fake-net", format="torchvision", architecture="fake", file="default", labels=LABELS,
                     defaults=Options())

    def __init__(self, backend: FakeBackend | None = None, *, published: tuple[str, ...] = (),
                 canary: Canary | None = None, pinnable: tuple[str, ...] | None = None, active: str = "v1"):
        self.backend = backend or FakeBackend()
        self.loaded = LoadedVersions(ServedModel(fake_model(active), self.backend))
        self.published, self.canary = set(published), canary
        self.pinnable = self.published if pinnable is None else set(pinnable)
        self.ensured: list[str | None] = []
        self.checked: list[str] = []

    # The real catalogue's routing, run on this fake's canary, loaded versions and ensure(): what the
    # unit tests of the use cases exercise is the code that serves.
    active = ModelCatalogue.active
    version_for = ModelCatalogue.version_for
    served_for = ModelCatalogue.served_for

    async def ensure(self, version: str | None) -> None:
        self.ensured.append(version)
        if version is None:
            return
        if not await self.may_pin(version):
            raise Conflict(f"Model version {version!r} was removed (or never published).",
                           code="model_version_removed")
        if not self.loaded.has(version):
            self.loaded.hold(ServedModel(fake_model(version), self.backend))

    async def may_pin(self, version: str) -> bool:
        self.checked.append(version)
        if version == self.active.model.version or (self.canary is not None and version == self.canary.version):
            return True
        if version not in self.published:
            return False
        if version not in self.pinnable:
            raise VersionNotPinnable(f"Model version {version!r} is not pinnable.")
        return True


def fake_models(versions: FakeVersions | None = None) -> Models:
    """The service's Models over one fake catalogue (`versions`, or a fresh FakeVersions): the real option
    rules and routing, on the fake's versions."""
    return Models({FakeVersions.name: versions or FakeVersions()}, FakeVersions.name)  # type: ignore[dict-item]


class FakeFeedbackRecords:
    """`sessions.feedback.FeedbackStore` in memory: records by (session ref, history id), each with a score
    of its own (its time, and its place among the feedback of that millisecond), the counters per version
    kept as the Lua scripts keep them (a replacement moves a record's share), the bound per session and
    the daily count per owner."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[float, str]] = {}  # -> (score, JSON record)
        self.counters: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [count, agree], assigned sessions
        self.pinned_counters: dict[tuple[str, str], list[int]] = {}  # the same from sessions that pinned it
        self.daily: dict[tuple[int, str], int] = {}  # (UTC day, owner) -> feedback given
        self.pages: list[int] = []  # records handed out by each page() call

    def _count(self, record: dict[str, Any], step: int) -> None:
        counters = self.pinned_counters if record.get("pinned") is True else self.counters
        counter = counters.setdefault((record["model"]["name"], record["model"]["version"]), [0, 0])
        counter[0] += step
        counter[1] += step if record["agrees"] else 0

    async def set(self, refs: list[str], history_id: str, record: dict[str, Any], *, at_ms: int, model: str,
                  version: str, agrees: bool, keep_until_ms: int, owner: str, max_per_session: int, daily_limit: int,
                  pinned: bool = False) -> bool:
        assert record["model"] == {"name": model, "version": version} and record["agrees"] == agrees
        assert record.get("pinned", False) == pinned
        replaced = any((ref, history_id) in self.records for ref in refs)
        given = sum(1 for ref, _ in self.records if ref in refs)
        if not replaced and given >= max_per_session:
            raise Conflict(f"This session has given feedback on {given} predictions.", code="feedback_limit_reached")
        day = at_ms // DAY_MS
        if daily_limit > 0:
            if self.daily.get((day, owner), 0) >= daily_limit:
                raise RateLimited(f"Feedback is limited to {daily_limit} a day.", code="feedback_rate_limited",
                                  retry_after=1)
            self.daily[(day, owner)] = self.daily.get((day, owner), 0) + 1
        for ref in refs:
            await self.delete([ref], history_id)
        # As the set script scores it: after the last of its millisecond, and never a score taken.
        same_ms = [taken for taken, _ in self.records.values() if at_ms <= taken < at_ms + 1]
        score = max(same_ms) + 1 / 1024 if same_ms else float(at_ms)
        while any(taken == score for taken, _ in self.records.values()):
            score += 1 / 1024
        self._count(record, 1)
        self.records[(refs[0], history_id)] = (score, json.dumps(record))
        return replaced

    async def get_many(self, refs: list[str], history_ids: list[str]) -> list[dict[str, Any] | None]:
        found = [next((self.records[(ref, h)] for ref in refs if (ref, h) in self.records), None)
                 for h in history_ids]
        return [json.loads(item[1]) if item else None for item in found]

    async def delete(self, refs: list[str], history_id: str) -> bool:
        removed = False
        for ref in refs:
            old = self.records.pop((ref, history_id), None)
            if old is not None:
                self._count(json.loads(old[1]), -1)
                removed = True
        return removed

    async def erase_session(self, refs: list[str]) -> int:
        return await self.purge_session(refs)

    async def purge_session(self, refs: list[str], since_ms: float = float("-inf"),
                            until_ms: float = float("inf")) -> int:
        chosen = [key for key, (score, _) in self.records.items() if key[0] in refs and since_ms <= score < until_ms]
        for ref, history_id in chosen:
            await self.delete([ref], history_id)
        return len(chosen)

    async def purge(self, since_ms: float, until_ms: float) -> int:
        chosen = [key for key, (score, _) in self.records.items() if since_ms <= score < until_ms]
        for ref, history_id in chosen:
            await self.delete([ref], history_id)
        return len(chosen)

    async def stats(self, model: str, *, pinned: bool = False) -> dict[str, tuple[int, int]]:
        counters = self.pinned_counters if pinned else self.counters
        return {version: (count, agree) for (name, version), (count, agree) in counters.items() if name == model}

    async def page(self, since_ms: float, until_ms: float, *, after: float | None,
                   limit: int) -> tuple[list[dict[str, Any]], float | None]:
        low = since_ms if after is None else after
        rows = sorted((score, key) for key, (score, _) in self.records.items()
                      if since_ms <= score < until_ms and (score > low if after is not None else score >= low))
        chosen = rows[:limit]
        self.pages.append(len(chosen))
        records = [json.loads(self.records[key][1]) for _, key in chosen]
        return records, chosen[-1][0] if len(chosen) == limit else None


class FakeCaptureRefs:
    """`sessions.captures.CaptureRefs` in memory: each session's copies (by ref), their sizes, and when
    the session last sent each."""

    def __init__(self) -> None:
        self.sizes: dict[str, dict[str, int]] = {}  # ref -> sha256 -> size
        self.seen: dict[str, int] = {}  # "<ref>/<sha256>" -> ms
        self.legacy_holders: dict[str, set[str]] = {}  # the earlier layout: sha256 -> session ids

    async def add(self, ref: str, sha256: str, size: int, at_ms: int, keep_until_ms: int, max_bytes: int) -> int:
        held = self.sizes.setdefault(ref, {})
        new = sha256 not in held
        if new and max_bytes and sum(held.values()) + size > max_bytes:
            return -1
        held[sha256] = held.get(sha256, size)
        self.seen[f"{ref}/{sha256}"] = at_ms
        return 1 if new else 0

    async def release(self, ref: str, sha256: str) -> bool:
        return await self.expire(ref, sha256, 1 << 62)

    async def expire(self, ref: str, sha256: str, cutoff_ms: int) -> bool:
        member = f"{ref}/{sha256}"
        if self.seen.get(member, 0) > cutoff_ms:
            return False
        held = self.sizes.get(ref, {}).pop(sha256, None) is not None
        if ref in self.sizes and not self.sizes[ref]:
            del self.sizes[ref]
        return (self.seen.pop(member, None) is not None) or held

    async def session_images(self, ref: str) -> list[str]:
        return sorted(self.sizes.get(ref, {}))

    async def release_legacy(self, session_id: str) -> list[str]:
        orphans = []
        for sha256, holders in sorted(self.legacy_holders.items()):
            if session_id in holders:
                holders.discard(session_id)
                if not holders:
                    orphans.append(sha256)
        for sha256 in orphans:
            del self.legacy_holders[sha256]
        return orphans

    async def seen_at(self, ref: str, sha256: str) -> float | None:
        return self.seen.get(f"{ref}/{sha256}")

    async def seen_at_many(self, ref: str, sha256s: list[str]) -> list[float | None]:
        return [self.seen.get(f"{ref}/{sha256}") for sha256 in sha256s]

    async def copies(self, sha256: str) -> list[tuple[str, float]]:
        return [(ref, float(self.seen[f"{ref}/{sha256}"])) for ref, held in self.sizes.items()
                if sha256 in held and f"{ref}/{sha256}" in self.seen]

    async def older_than(self, cutoff_ms: int, limit: int) -> list[tuple[str, str]]:
        due = sorted((member for member, at in self.seen.items() if at <= cutoff_ms), key=self.seen.get)[:limit]
        return [tuple(member.split("/")) for member in due]  # type: ignore[misc]
