"""Feedback on predictions in Redis: the records, their index by time, and the counters per version.

Beside the session store and the model registry, this is the only code that knows these keys.
Feedback outlives the session that gave it (it is training data), so it does not live under the
session's hash tag but under the model's, `{<model name>}`, so that each script's keys share a
Redis Cluster slot. A session is named here only by its ref (sessions.tokens.TokenSigner.session_ref,
an HMAC of its id under the server secret), never by its id:
    feedback:{<model>}:records         hash: "<session ref>/<history id>" -> JSON record (service.feedback)
    feedback:{<model>}:index           sorted set: the same members, scored by the feedback's time (ms),
                                       each score its own (see _SCORE), so that a score is a cursor
    feedback:{<model>}:stats           hash: count:<version>, agree:<version> (feedback that agrees
                                       with the prediction's top-1) from sessions the version was
                                       assigned to; pinned_count:<version>, pinned_agree:<version>
                                       from sessions that pinned it themselves (record.pinned). A
                                       version of another model than <model> (the one the keys were
                                       named after, `[model]`'s) is counted as <its model>/<version>
    feedback:{<model>}:session:<ref>   set: the members a session gave, for erasing and purging them and
                                       for its bound; expires with the retention of its newest record
    feedback:{<model>}:daily:<day>:<owner>  feedback given on one UTC day by one API key or client
                                       address (sessions.store.owner_name); expires when the day ends

Each change (set, replace, delete, erase, sweep, purge) updates the record, the index and the counters
in one Lua script, so the counters always add up to the records.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from core.errors import Conflict, RateLimited
from sessions.replies import members, scored_members, text_dict, text_set
from sessions.store import store_errors

DAY_MS = 24 * 3600 * 1000
# Members removed per script call by a sweep or a purge (each call holds Redis that long).
_BATCH = 500
# Feedback of one millisecond gets scores ms, ms + 1/1024, ms + 2/1024...: exact in a double (41 bits of
# milliseconds and 10 of fraction), still the feedback's time to the millisecond, and no two the same,
# so that a page can start strictly after the last score read whatever was added or removed meanwhile.
_SCORE_STEP = 1 / 1024
_NO_BOUND = 10**18  # ms: an open end of a time range, in a script (Lua's tonumber need not read "inf")

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
    local counter = record.model.version
    if record.model.name and record.model.name ~= HOME then counter = record.model.name .. '/' .. counter end
    redis.call('HINCRBY', KEYS[3], prefix .. 'count:' .. counter, -1)
    if record.agrees then redis.call('HINCRBY', KEYS[3], prefix .. 'agree:' .. counter, -1) end
end
"""

# Remove one record (if there) and its member from its session's set; 1 if a record was removed.
_REMOVE_FUNCTION = _UNCOUNT + """
local function remove(member, session_key)
    redis.call('SREM', session_key, member)
    local old = redis.call('HGET', KEYS[1], member)
    if not old then return 0 end
    uncount(old)
    redis.call('HDEL', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
    return 1
end
"""

# Set or replace one record; the counters lose the old record's share and gain the new one's.
# KEYS: records, index, stats, the day's counter of the session's owner, the session's set under its
# newest ref, then its sets under older refs (secret keys rotated since). ARGV: member, record, time (ms),
# "(" time + 1, version, agrees, the set's expiry, the bound per session, the daily limit (0: none), the
# day counter's expiry, the counter prefix of the new record (PINNED_PREFIX or ""), then the same history
# id's members under the older refs.
# Returns {'set', replaced}, {'session_limit', given} or {'daily_limit', 0}.
_SET_SCRIPT = _REMOVE_FUNCTION + """
local replaced = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
for i = 12, #ARGV do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then replaced = true end
end
if not replaced then
    local given = 0
    for i = 5, #KEYS do given = given + redis.call('SCARD', KEYS[i]) end
    if given >= tonumber(ARGV[8]) then return {'session_limit', given} end
end
if tonumber(ARGV[9]) > 0 then
    if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[9]) then return {'daily_limit', 0} end
    redis.call('INCR', KEYS[4])
    redis.call('PEXPIREAT', KEYS[4], ARGV[10])
end
for i = 12, #ARGV do remove(ARGV[i], KEYS[i - 6]) end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then uncount(old) end
redis.call('HINCRBY', KEYS[3], ARGV[11] .. 'count:' .. ARGV[5], 1)
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[3], ARGV[11] .. 'agree:' .. ARGV[5], 1) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local score = tonumber(ARGV[3])
local last = redis.call('ZREVRANGEBYSCORE', KEYS[2], ARGV[4], ARGV[3], 'WITHSCORES', 'LIMIT', 0, 1)
if #last > 0 then score = tonumber(last[2]) + """ + repr(_SCORE_STEP) + """ end
while redis.call('ZCOUNT', KEYS[2], score, score) > 0 do score = score + """ + repr(_SCORE_STEP) + """ end
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('PEXPIREAT', KEYS[5], ARGV[7])
if replaced then return {'set', 1} end
return {'set', 0}
"""

# Remove the records ARGV[3..] names whose time is in [ARGV[1], ARGV[2]) (ms). KEYS: records, index,
# stats, then each member's session set. Returns how many were removed.
_REMOVE_SCRIPT = _REMOVE_FUNCTION + """
local removed = 0
local low, high = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do
    local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]))
    if score == nil or (score >= low and score < high) then
        removed = removed + remove(ARGV[i], KEYS[i + 1])
    end
end
return removed
"""


def member(session_ref: str, history_id: str) -> str:
    return f"{session_ref}/{history_id}"


def _bound(ms: int | float) -> str:
    """A time bound as Redis reads it (ZRANGEBYSCORE takes "inf"; the scripts get a finite number)."""
    return repr(float(ms)) if ms in (float("inf"), float("-inf")) else str(ms)


def _script_bound(ms: int | float) -> str:
    return str(max(-_NO_BOUND, min(_NO_BOUND, ms)))


class FeedbackStore:
    def __init__(self, client: aioredis.Redis | RedisCluster, model_name: str):
        self.redis = client
        base = f"feedback:{{{model_name}}}"
        self._records, self._index, self._stats = f"{base}:records", f"{base}:index", f"{base}:stats"
        self._session_prefix, self._daily_prefix = f"{base}:session:", f"{base}:daily:"
        self.model_name = model_name
        # The scripts name the counters of this model's versions as they were before several models were served.
        home = f"local HOME = {json.dumps(model_name)}\n"
        self._set = client.register_script(home + _SET_SCRIPT)
        self._remove = client.register_script(home + _REMOVE_SCRIPT)

    def _session_key(self, ref_or_member: str) -> str:
        return self._session_prefix + ref_or_member.partition("/")[0]

    @store_errors
    async def set(self, refs: list[str], history_id: str, record: dict[str, Any], *, at_ms: int, model: str,
                  version: str, agrees: bool, keep_until_ms: int, owner: str, max_per_session: int, daily_limit: int,
                  pinned: bool = False) -> bool:
        """Set or replace the feedback on one history item under the session's newest ref (`refs`, newest
        first: one under an older ref is replaced); True if it replaced earlier feedback.
        `keep_until_ms`: the record's retention (the session's set lives until then). Refused with 409
        `feedback_limit_reached` when the session already gave `max_per_session`, and with 429
        `feedback_rate_limited` when its owner (an API key or client address) gave `daily_limit` today.
        `pinned`: the session chose the version itself (the record says so too), counted apart."""
        day = at_ms // DAY_MS
        keys = [self._records, self._index, self._stats, f"{self._daily_prefix}{day}:{owner}",
                *(self._session_key(ref) for ref in refs)]
        reply = await self._set(keys=keys, args=[
            member(refs[0], history_id), json.dumps(record, separators=(",", ":"), ensure_ascii=False), at_ms,
            f"({at_ms + 1}", self._counter(model, version), "1" if agrees else "0", keep_until_ms, max_per_session,
            daily_limit,
            (day + 1) * DAY_MS, PINNED_PREFIX if pinned else "", *(member(ref, history_id) for ref in refs[1:])])
        outcome, detail = reply[0], int(reply[1])
        if outcome == "session_limit":
            raise Conflict(f"This session has given feedback on {detail} predictions, the most one session may "
                           "(history.max_entries); withdraw some to give more.", code="feedback_limit_reached")
        if outcome == "daily_limit":
            wait = max(1, -(-((day + 1) * DAY_MS - at_ms) // 1000))
            raise RateLimited(f"Feedback is limited to {daily_limit} a day per API key or client address "
                              f"(feedback.daily_limit); retry in {wait} s.", code="feedback_rate_limited",
                              retry_after=wait)
        return bool(detail)

    @store_errors
    async def get_many(self, refs: list[str], history_ids: list[str]) -> list[dict[str, Any] | None]:
        """The records on these history items, under whichever of the session's refs they were given."""
        if not history_ids:
            return []
        found = await self.redis.hmget(self._records, [member(ref, h) for h in history_ids for ref in refs])
        per_item = [found[i:i + len(refs)] for i in range(0, len(found), len(refs))]
        return [next((json.loads(text) for text in texts if text), None) for texts in per_item]

    async def _remove_members(self, members: list[str], since_ms: int | float = float("-inf"),
                              until_ms: int | float = float("inf")) -> int:
        removed = 0
        for start in range(0, len(members), _BATCH):
            batch = members[start:start + _BATCH]
            removed += int(await self._remove(keys=[self._records, self._index, self._stats,
                                                    *map(self._session_key, batch)],
                                              args=[_script_bound(since_ms), _script_bound(until_ms), *batch]))
        return removed

    @store_errors
    async def delete(self, refs: list[str], history_id: str) -> bool:
        return bool(await self._remove_members([member(ref, history_id) for ref in refs]))

    @store_errors
    async def erase_session(self, refs: list[str]) -> int:
        """Remove every record the session gave, under any of its refs; how many there were."""
        return await self.purge_session(refs)

    @store_errors
    async def purge_session(self, refs: list[str], since_ms: int | float = float("-inf"),
                            until_ms: int | float = float("inf")) -> int:
        """Remove the records given under these refs at a time in [since_ms, until_ms); how many."""
        removed = 0
        for ref in refs:
            given = text_set(await self.redis.smembers(self._session_key(ref)))
            removed += await self._remove_members(sorted(given), since_ms, until_ms)
        return removed

    @store_errors
    async def purge(self, since_ms: int | float, until_ms: int | float) -> int:
        """Remove every record given at a time in [since_ms, until_ms), a batch at a time; how many (the
        retention sweep, and the admin's purge by time)."""
        removed = 0
        while True:
            batch = members(await self.redis.zrangebyscore(self._index, _bound(since_ms), f"({_bound(until_ms)}",
                                                           start=0, num=_BATCH))
            batch_removed = await self._remove_members(batch, since_ms, until_ms)
            removed += batch_removed
            if len(batch) < _BATCH or batch_removed == 0:
                return removed

    @store_errors
    async def stats(self, model: str, *, pinned: bool = False) -> dict[str, tuple[int, int]]:
        """version of `model` -> (feedback count, how many agree with the prediction), from the sessions it
        was assigned to, or with `pinned` from those that pinned it."""
        fields = text_dict(await self.redis.hgetall(self._stats))
        stats: dict[str, tuple[int, int]] = {}
        for field, value in fields.items():
            kind, _, counter = field.partition(":")
            owner, _, version = counter.rpartition("/")
            if kind.startswith(PINNED_PREFIX) != pinned or (owner or self.model_name) != model:
                continue
            kind = kind.removeprefix(PINNED_PREFIX)
            count, agree = stats.get(version, (0, 0))
            stats[version] = (int(value), agree) if kind == "count" else (count, int(value))
        return stats

    def _counter(self, model: str, version: str) -> str:
        """The counters' name of `model`'s `version` (as the scripts' uncount makes it)."""
        return version if model == self.model_name else f"{model}/{version}"

    @store_errors
    async def page(self, since_ms: int | float, until_ms: int | float, *, after: float | None,
                   limit: int) -> tuple[list[dict[str, Any]], float | None]:
        """Up to `limit` records with a feedback time in [since_ms, until_ms), oldest first, and the
        cursor for the next page (None after the last): the last score read. No two records share a
        score, so the next page starts strictly after it, and a record added or removed meanwhile
        cannot make a page skip or repeat another."""
        low = f"({after!r}" if after is not None else _bound(since_ms)
        rows = scored_members(await self.redis.zrangebyscore(self._index, low, f"({_bound(until_ms)}", start=0,
                                                             num=limit, withscores=True))
        if not rows:
            return [], None
        texts = await self.redis.hmget(self._records, [name for name, _ in rows])
        records = [json.loads(text) for text in texts if text]  # a record deleted meanwhile is skipped
        return records, rows[-1][1] if len(rows) == limit else None
