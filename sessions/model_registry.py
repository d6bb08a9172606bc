"""Model versions in Redis: their metadata, which one is active, and the channel announcing changes.

Beside the session store, this is the only code that knows these Redis keys. Layout, per model
name, under one hash tag so that each script's keys share a Redis Cluster slot:
    model:{<name>}:versions    hash: version -> JSON {sha256, size, uploaded_at} (set once)
    model:{<name>}:activated   hash: version -> last activation time (ms)
    model:{<name>}:active      string: the active version (absent: the weights in the config)
    model:{<name>}:canary      string: JSON {version, traffic_percent, baseline, started_at} of a
                               version serving a share of the sessions (absent: none)
    model:{<name>}:pinnable    set: the versions an admin let sessions pin besides the active one
                               and the canary's (removing a version takes it out)
    model:{<name>}:added       string: when the model was added over HTTP (PUT /v1/models/<name>)
and the pub/sub channel `model-events`, carrying JSON {"event": "activated" | "canary" | "removed" |
"unpinnable" | "added" | "deleted", "name", "version"}; an activation of "" means back to the weights in
the config. An activation ends any canary. Activating, starting a canary, removing or unmarking a
version, adding or deleting a model changes the keys and publishes in one Lua script, so no replica can
see the change without the message being sent. (A model's folder lives in the model repository, which
the replicas share; "added" tells them to read it, "deleted" to stop serving it.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from core.clock import iso
from sessions.replies import optional_text, text_dict, text_set
from sessions.store import store_errors

EVENTS_CHANNEL = "model-events"

_ACTIVATE_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# Back to the weights named in the config: no active version (and no canary), announced as an
# activation of "".
_RESTORE_SCRIPT = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# A canary: ARGV[1] serves a share of the sessions (ARGV[2]: its JSON); ARGV[3] == '1' for the
# configured weights, which are not in the versions hash. 0: no such version.
_CANARY_SCRIPT = """
if ARGV[3] ~= '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

_REMOVE_SCRIPT = """
if redis.call('GET', KEYS[3]) == ARGV[1] then return 'active' end
local canary = redis.call('GET', KEYS[4])
if canary and cjson.decode(canary).version == ARGV[1] then return 'canary' end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 'missing' end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 'removed'
"""

# Whether a session may pin ARGV[1] (ARGV[2] == '1': the configured weights, not in the versions
# hash): 'missing', 'active', 'canary', 'marked' (an admin made it pinnable) or 'not_pinnable'.
_PIN_STATUS_SCRIPT = """
if ARGV[2] ~= '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 'missing' end
local active = redis.call('GET', KEYS[2])
if active == ARGV[1] or (not active and ARGV[2] == '1') then return 'active' end
local canary = redis.call('GET', KEYS[3])
if canary and cjson.decode(canary).version == ARGV[1] then return 'canary' end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return 'marked' end
return 'not_pinnable'
"""

# Mark (ARGV[3] == '1') or unmark ARGV[1] pinnable; 0: no such version. Unmarking is announced, so
# that replicas drop a copy they loaded only for pinned sessions.
_MARK_PINNABLE_SCRIPT = """
if ARGV[2] ~= '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[3] == '1' then
    redis.call('SADD', KEYS[2], ARGV[1])
elseif redis.call('SREM', KEYS[2], ARGV[1]) == 1 then
    redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""


# A model added: ARGV[1] its time; 0 when the name was added already. A model's keys left from an earlier
# model of the same name (KEYS[2..]) are cleared, so the new one starts with no versions.
_ADD_MODEL_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') == false then return 0 end
for index = 2, #KEYS do redis.call('DEL', KEYS[index]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# A model deleted: every key of it, then the announcement.
_DELETE_MODEL_SCRIPT = """
for index = 1, #KEYS do redis.call('DEL', KEYS[index]) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    sha256: str
    size: int
    uploaded_at_ms: int
    activated_at_ms: int | None = None

    def to_dict(self, active: bool = False) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "uploaded_at": iso(self.uploaded_at_ms),
            "activated_at": iso(self.activated_at_ms) if self.activated_at_ms else None,
            "active": active,
        }


@dataclass(frozen=True)
class Canary:
    """A version serving `traffic_percent` of the sessions; the others keep the active version."""

    version: str
    traffic_percent: int
    baseline: str  # the version the other sessions keep ("" : the configured weights)
    started_at_ms: int

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "traffic_percent": self.traffic_percent,
                           "baseline": self.baseline, "started_at": self.started_at_ms})


@dataclass(frozen=True)
class ModelEvent:
    event: str  # "activated" | "canary" | "removed" | "unpinnable" | "added" | "deleted" (published), "subscribed"
    name: str
    version: str


class ModelRegistry:
    def __init__(self, client: aioredis.Redis | RedisCluster):
        self.redis = client
        self._activate = client.register_script(_ACTIVATE_SCRIPT)
        self._remove = client.register_script(_REMOVE_SCRIPT)
        self._restore = client.register_script(_RESTORE_SCRIPT)
        self._canary = client.register_script(_CANARY_SCRIPT)
        self._pin_status = client.register_script(_PIN_STATUS_SCRIPT)
        self._mark_pinnable = client.register_script(_MARK_PINNABLE_SCRIPT)
        self._add_model = client.register_script(_ADD_MODEL_SCRIPT)
        self._delete_model = client.register_script(_DELETE_MODEL_SCRIPT)

    @staticmethod
    def _keys(name: str) -> tuple[str, str, str]:
        base = f"model:{{{name}}}"
        return f"{base}:versions", f"{base}:activated", f"{base}:active"

    @staticmethod
    def _canary_key(name: str) -> str:
        return f"model:{{{name}}}:canary"

    @staticmethod
    def _pinnable_key(name: str) -> str:
        return f"model:{{{name}}}:pinnable"

    @store_errors
    async def add(self, record: VersionRecord) -> bool:
        """Record a new version; False if the name is taken (versions are immutable)."""
        versions, _, _ = self._keys(record.name)
        meta = {"sha256": record.sha256, "size": record.size, "uploaded_at": record.uploaded_at_ms}
        return bool(await self.redis.hsetnx(versions, record.version, json.dumps(meta)))

    @store_errors
    async def get(self, name: str, version: str) -> VersionRecord | None:
        versions, activated, _ = self._keys(name)
        meta = optional_text(await self.redis.hget(versions, version))
        if meta is None:
            return None
        return _record(name, version, meta, optional_text(await self.redis.hget(activated, version)))

    @store_errors
    async def versions(self, name: str) -> tuple[list[VersionRecord], str | None]:
        """Every version of `name` (oldest upload first) and the active one."""
        versions, activated, active = self._keys(name)
        metas = text_dict(await self.redis.hgetall(versions))
        times = text_dict(await self.redis.hgetall(activated))
        records = [_record(name, version, meta, times.get(version)) for version, meta in metas.items()]
        records.sort(key=lambda record: (record.uploaded_at_ms, record.version))
        return records, optional_text(await self.redis.get(active))

    @store_errors
    async def active(self, name: str) -> str | None:
        return optional_text(await self.redis.get(self._keys(name)[2]))

    @store_errors
    async def activate(self, name: str, version: str, at_ms: int) -> bool:
        """Make `version` the active one and tell every replica; False if there is no such version."""
        message = json.dumps({"event": "activated", "name": name, "version": version})
        return bool(await self._activate(keys=[*self._keys(name), self._canary_key(name)],
                                         args=[version, at_ms, EVENTS_CHANNEL, message]))

    @store_errors
    async def restore_configured(self, name: str) -> None:
        """Serve the configured weights again on every replica (the event's version is "")."""
        message = json.dumps({"event": "activated", "name": name, "version": ""})
        await self._restore(keys=[self._keys(name)[2], self._canary_key(name)], args=[EVENTS_CHANNEL, message])

    @store_errors
    async def start_canary(self, name: str, canary: Canary, *, configured: bool) -> bool:
        """Serve `canary.version` to its share of the sessions on every replica; False if there is no
        such version. `configured`: the version is the configured weights'."""
        versions, activated, _ = self._keys(name)
        message = json.dumps({"event": "canary", "name": name, "version": canary.version})
        return bool(await self._canary(keys=[versions, activated, self._canary_key(name)], args=[
            canary.version, canary.to_json(), "1" if configured else "0", canary.started_at_ms, EVENTS_CHANNEL,
            message]))

    @store_errors
    async def canary(self, name: str) -> Canary | None:
        text = await self.redis.get(self._canary_key(name))
        if text is None:
            return None
        data = json.loads(text)
        return Canary(str(data["version"]), int(data["traffic_percent"]), str(data["baseline"]),
                      int(data["started_at"]))

    @store_errors
    async def remove(self, name: str, version: str) -> str:
        """'removed', 'missing', 'active' or 'canary' (the versions serving are not removed)."""
        message = json.dumps({"event": "removed", "name": name, "version": version})
        outcome: str = await self._remove(keys=[*self._keys(name), self._canary_key(name), self._pinnable_key(name)],
                                          args=[version, EVENTS_CHANNEL, message])
        return outcome

    @store_errors
    async def pin_status(self, name: str, version: str, *, configured: bool) -> str:
        """'missing', 'active', 'canary', 'marked' or 'not_pinnable' (sessions may pin the middle three).
        `configured`: the version is the configured weights'."""
        versions, _, active = self._keys(name)
        status: str = await self._pin_status(keys=[versions, active, self._canary_key(name), self._pinnable_key(name)],
                                             args=[version, "1" if configured else "0"])
        return status

    @store_errors
    async def mark_pinnable(self, name: str, version: str, pinnable: bool, *, configured: bool) -> bool:
        """Let sessions pin `version` (or no longer); False if there is no such version."""
        message = json.dumps({"event": "unpinnable", "name": name, "version": version})
        return bool(await self._mark_pinnable(keys=[self._keys(name)[0], self._pinnable_key(name)], args=[
            version, "1" if configured else "0", "1" if pinnable else "0", EVENTS_CHANNEL, message]))

    @store_errors
    async def pinnable(self, name: str) -> set[str]:
        """The versions an admin marked pinnable."""
        return set(text_set(await self.redis.smembers(self._pinnable_key(name))))

    def _model_keys(self, name: str) -> list[str]:
        """Every key of the model `name`, the added mark first."""
        return [f"model:{{{name}}}:added", *self._keys(name), self._canary_key(name), self._pinnable_key(name)]

    @store_errors
    async def add_model(self, name: str, at_ms: int) -> bool:
        """Mark `name` added (its folder is in the repository now) and tell every replica; False if it was
        added already."""
        message = json.dumps({"event": "added", "name": name, "version": ""})
        return bool(await self._add_model(keys=self._model_keys(name), args=[at_ms, EVENTS_CHANNEL, message]))

    @store_errors
    async def delete_model(self, name: str) -> None:
        """Forget `name` with its versions, canary and pins, and tell every replica to stop serving it."""
        message = json.dumps({"event": "deleted", "name": name, "version": ""})
        await self._delete_model(keys=self._model_keys(name), args=[EVENTS_CHANNEL, message])

    async def events(self) -> AsyncIterator[ModelEvent]:
        """Activations and removals as they are published. Ends with an exception when the connection
        is lost (the caller resubscribes, and re-reads the active version to cover what it missed)."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(EVENTS_CHANNEL)
            # Tells the caller it now hears every change, so it can read the current state once.
            yield ModelEvent("subscribed", "", "")
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    data = json.loads(message["data"])
                    yield ModelEvent(str(data["event"]), str(data["name"]), str(data["version"]))
                except (ValueError, KeyError, TypeError):
                    continue  # not ours: ignore
        finally:
            await pubsub.aclose()


def _record(name: str, version: str, meta: str, activated: str | None) -> VersionRecord:
    data = json.loads(meta)
    return VersionRecord(name, version, data["sha256"], int(data["size"]), int(data["uploaded_at"]),
                         int(activated) if activated else None)
