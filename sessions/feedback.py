"""Feedback on predictions in Redis: the records, their index by time, and the counters per version.

Beside the session store and the model registry, this is the only code that knows these keys.
Feedback outlives the session that gave it (it is training data), so it does not live under the
session's hash tag but under the model's, `{<model name>}`, so that each script's keys share a
Redis Cluster slot:
    feedback:{<model>}:records         hash: "<session id>/<history id>" -> JSON record (service.feedback)
    feedback:{<model>}:index           sorted set: the same members, scored by the feedback's time (ms)
    feedback:{<model>}:stats           hash: count:<version>, agree:<version> (feedback that agrees
                                       with the prediction's top-1) from sessions the version was
                                       assigned to; pinned_count:<version>, pinned_agree:<version>
                                       from sessions that pinned it themselves (record.pinned)
    feedback:{<model>}:session:<id>    set: the members a session gave, for erasing them; expires
                                       with the session's hard deadline

Each change (set, replace, delete, erase) updates the record, the index and the counters in one Lua
script, so the counters always add up to the records.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sessions.store import store_errors

# The counter prefix of feedback from sessions that pinned the version themselves: counted apart, so
# that they cannot move the agreement an operator promotes a canary on.
PINNED_PREFIX = "pinned_"

# Takes a stored record's share out of the counters (KEYS[3]): those it was counted in, by its own
# `pinned` (records from before pins were told apart count as assigned, as they were counted).
_UNCOUNT = """
local function uncount(text)
    local record = cjson.decode(text)
    local prefix = ''
    if record.pinned == true then prefix = '""" + PINNED_PREFIX + """' end
    redis.call('HINCRBY', KEYS[3], prefix .. 'count:' .. record.model.version, -1)
    if record.agrees then redis.call('HINCRBY', KEYS[3], prefix .. 'agree:' .. record.model.version, -1) end
end
"""

# Set or replace one record; the counters lose the old record's share and gain the new one's
# (ARGV[7]: the counter prefix of the new one).
_SET_SCRIPT = _UNCOUNT + """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then uncount(old) end
redis.call('HINCRBY', KEYS[3], ARGV[7] .. 'count:' .. ARGV[4], 1)
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[3], ARGV[7] .. 'agree:' .. ARGV[4], 1) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('PEXPIREAT', KEYS[4], ARGV[6])
if old then return 1 end
return 0
"""

# Remove the records ARGV names (one, or a whole session's): returns how many there were.
_DELETE_SCRIPT = _UNCOUNT + """
local removed = 0
local members = ARGV
if #ARGV == 0 then members = redis.call('SMEMBERS', KEYS[4]) end
for _, member in ipairs(members) do
    local old = redis.call('HGET', KEYS[1], member)
    if old then
        uncount(old)
        redis.call('HDEL', KEYS[1], member)
        redis.call('ZREM', KEYS[2], member)
        removed = removed + 1
    end
    redis.call('SREM', KEYS[4], member)
end
if #ARGV == 0 then redis.call('DEL', KEYS[4]) end
return removed
"""


def member(session_id: str, history_id: str) -> str:
    return f"{session_id}/{history_id}"


class FeedbackStore:
    def __init__(self, client: aioredis.Redis | RedisCluster, model_name: str):
        self.redis = client
        base = f"feedback:{{{model_name}}}"
        self._records, self._index, self._stats = f"{base}:records", f"{base}:index", f"{base}:stats"
        self._session_prefix = f"{base}:session:"
        self._set = client.register_script(_SET_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)

    def _keys(self, session_id: str) -> list[str]:
        return [self._records, self._index, self._stats, self._session_prefix + session_id]

    @store_errors
    async def set(self, session_id: str, history_id: str, record: dict[str, Any], *, at_ms: int,
                  version: str, agrees: bool, keep_until_ms: int, pinned: bool = False) -> bool:
        """Set or replace the feedback on one history item; True if it replaced earlier feedback.
        `keep_until_ms`: the session's hard deadline (its set of members is needed until then);
        `pinned`: the session chose the version itself (the record says so too, as `pinned`)."""
        replaced = await self._set(keys=self._keys(session_id), args=[
            member(session_id, history_id), json.dumps(record, separators=(",", ":")), at_ms, version,
            "1" if agrees else "0", keep_until_ms, PINNED_PREFIX if pinned else ""])
        return bool(replaced)

    @store_errors
    async def get_many(self, session_id: str, history_ids: list[str]) -> list[dict[str, Any] | None]:
        if not history_ids:
            return []
        found = await self.redis.hmget(self._records, [member(session_id, h) for h in history_ids])
        return [json.loads(text) if text else None for text in found]

    @store_errors
    async def delete(self, session_id: str, history_id: str) -> bool:
        return bool(await self._delete(keys=self._keys(session_id), args=[member(session_id, history_id)]))

    @store_errors
    async def erase_session(self, session_id: str) -> int:
        """Remove every record the session gave; how many there were."""
        return int(await self._delete(keys=self._keys(session_id), args=[]))

    @store_errors
    async def stats(self, *, pinned: bool = False) -> dict[str, tuple[int, int]]:
        """version -> (feedback count, how many agree with the prediction), from the sessions it was
        assigned to, or with `pinned` from those that pinned it."""
        fields = await self.redis.hgetall(self._stats)
        stats: dict[str, tuple[int, int]] = {}
        for field, value in fields.items():
            kind, _, version = field.partition(":")
            if kind.startswith(PINNED_PREFIX) != pinned:
                continue
            kind = kind.removeprefix(PINNED_PREFIX)
            count, agree = stats.get(version, (0, 0))
            stats[version] = (int(value), agree) if kind == "count" else (count, int(value))
        return stats

    @store_errors
    async def page(self, since_ms: int | float, until_ms: int | float, *, after: tuple[float, int] | None,
                   limit: int) -> tuple[list[dict[str, Any]], tuple[float, int] | None]:
        """Up to `limit` records with a feedback time in [since_ms, until_ms), oldest first, and the
        cursor for the next page (None after the last). The cursor is (score, how many members at
        that score were read): members that share a millisecond are read in their set order."""
        score, skip = after if after is not None else (since_ms, 0)
        rows = await self.redis.zrangebyscore(self._index, score, f"({until_ms}", start=skip, num=limit,
                                              withscores=True)
        if not rows:
            return [], None
        members = [name for name, _ in rows]
        texts = await self.redis.hmget(self._records, members)
        last = rows[-1][1]
        same = sum(1 for _, s in rows if s == last)
        cursor = (last, same + (skip if last == score else 0))
        records = [json.loads(text) for text in texts if text]  # a record deleted meanwhile is skipped
        return records, cursor if len(rows) == limit else None
