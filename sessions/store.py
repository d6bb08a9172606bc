"""The Redis-backed session store: the only code that knows Redis keys.

Layout, per session, all under one hash tag so a session's keys share a Redis Cluster slot:
    sess:{<id>}            hash: created_at, deadline (ms), predictions, canary_slot, owner, opt:<name> (JSON
                           per option), erasing (set while an erase is under way)
    sess:{<id>}:history    stream: one entry per prediction, newest last, capped with MAXLEN
    sess:{<id>}:idem       hash: Idempotency-Key -> the history id it answered; expires with the session
    sess:{<id>}:revoked    tombstone left by logout for as long as the session could still have been used
                           (not by an erase, which leaves nothing that names the session)
    login:{<owner>}        token bucket of logins for one API key or client address (owner_name)
    canary:slots           sessions ever created: deals each new one its canary slot

Every write is atomic on the server (HSET, HINCRBY, XADD, a Lua script, or WATCH/MULTI), never a
read-modify-write of a blob, so concurrent requests on one session cannot lose each other's work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from core.clock import now_ms
from core.errors import (
    SESSION_NOT_FOUND,
    SESSION_REVOKED,
    BadRequest,
    InvalidToken,
    NotFound,
    RateLimited,
    StoreUnavailable,
    quoted,
)
from core.options import Options
from core.session import Session
from sessions.replies import stream_entries, text_dict
from sessions.tokens import VerifiedToken, new_session_id

log = logging.getLogger(__name__)

HISTORY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_OPTION_PREFIX = "opt:"

# Append a prediction only if the session still exists and is not being erased (a logout may race
# the predict: then the tombstone says so). With an idempotency key (ARGV[4] == '1', the key ARGV[5]),
# a retry that raced the first attempt gets the first's id.
_RECORD_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    if redis.call('EXISTS', KEYS[4]) == 1 then return 'revoked' end
    return false
end
if redis.call('HEXISTS', KEYS[1], 'erasing') == 1 then return 'revoked' end
if ARGV[4] == '1' then
    local first = redis.call('HGET', KEYS[3], ARGV[5])
    if first then return {first, 1} end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '*', 'entry', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'predictions', 1)
redis.call('PEXPIREAT', KEYS[2], ARGV[3])
if ARGV[4] == '1' then
    redis.call('HSET', KEYS[3], ARGV[5], id)
    redis.call('PEXPIREAT', KEYS[3], ARGV[3])
end
return {id, 0}
"""

# A token bucket of `per_minute` tokens a minute, refilled continuously and full when new, kept in two
# fields of the hash `key`: take `cost`, or leave it and say how many milliseconds until there is
# enough. Returns that wait (0: taken) and the tokens there were. The session's rate limit and the
# login limit both use it.
_TAKE_TOKENS = """
local function take_tokens(key, tokens_field, stamp_field, tokens, stamp, per_minute, cost)
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    local per_ms = per_minute / 60000
    tokens = math.min(per_minute, (tokens or per_minute) + math.max(0, now - (stamp or now)) * per_ms)
    if tokens < cost then return math.ceil((cost - tokens) / per_ms), tokens end
    redis.call('HSET', key, tokens_field, tostring(tokens - cost), stamp_field, tostring(now))
    return 0, tokens
end
"""

# Read a session and slide its expiry in one command. An empty answer says whether the session
# was revoked. A request that repeats an idempotency key (ARGV[5]) already answered gets `__replay`
# (the history id) and costs nothing; otherwise `cost` is taken from the session's token bucket
# (ARGV[3] per minute, 0 = unlimited) or the answer is {'rate_limited', ms to wait}.
_TOUCH_SCRIPT = _TAKE_TOKENS + """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
    if redis.call('EXISTS', KEYS[3]) == 1 then return {'revoked'} end
    return {}
end
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
redis.call('PEXPIREAT', KEYS[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[4], ARGV[1])
if ARGV[4] == '1' then
    local first = redis.call('HGET', KEYS[4], ARGV[5])
    if first then
        table.insert(fields, '__replay')
        table.insert(fields, first)
        return fields
    end
end
local cost, per_minute = tonumber(ARGV[2]), tonumber(ARGV[3])
if cost > 0 and per_minute > 0 then
    local tokens, stamp
    for i = 1, #fields, 2 do
        if fields[i] == 'rl_tokens' then tokens = tonumber(fields[i + 1]) end
        if fields[i] == 'rl_stamp' then stamp = tonumber(fields[i + 1]) end
    end
    local wait = take_tokens(KEYS[1], 'rl_tokens', 'rl_stamp', tokens, stamp, per_minute, cost)
    if wait > 0 then return {'rate_limited', tostring(wait)} end
end
return fields
"""

# Create a session: its fields and its expiry in one atomic step.
_CREATE_SCRIPT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
"""

# Log out: drop the session, its history and its idempotency keys, and (unless ARGV[1] == 'erase')
# leave a tombstone that lives exactly as long as the session key would have (its remaining idle
# time): after that the token reads as expired anyway, so no key outlives what it protects.
_DELETE_SCRIPT = """
local remaining = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
if remaining > 0 and ARGV[1] ~= 'erase' then redis.call('SET', KEYS[3], 1, 'PX', remaining) end
return 1
"""

# An erase begins: mark the session (if it still exists) so that nothing more is recorded for it.
_BEGIN_ERASE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'erasing', '1')
return 1
"""

# Take one login from a token bucket of ARGV[1] per minute (full when new); the key expires once the
# bucket would be full again. Returns 0, or the milliseconds until a login is allowed.
_LOGIN_SCRIPT = _TAKE_TOKENS + """
local per_minute = tonumber(ARGV[1])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local wait, tokens = take_tokens(KEYS[1], 'tokens', 'stamp', tonumber(bucket[1]), tonumber(bucket[2]), per_minute, 1)
if wait > 0 then return wait end
redis.call('PEXPIRE', KEYS[1], math.ceil((per_minute - tokens + 1) * 60000 / per_minute))
return 0
"""

# Write options only if nobody changed them since they were read (compare-and-set on a version
# counter): the new values were validated against what was read, crop <= resize included.
_SET_OPTIONS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if (redis.call('HGET', KEYS[1], 'options_version') or '0') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'options_version', 1)
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


P = ParamSpec("P")
R = TypeVar("R")


#: The count of sessions ever created, which deals each new session its canary slot.
CANARY_SLOTS_KEY = "canary:slots"
# Coprime to 100: any 100 consecutive sessions get each slot 0..99 once, spread rather than in order.
_SLOT_STRIDE = 37


def canary_slot(number: int) -> int:
    """The slot of the `number`th session: a canary at p percent takes exactly p of any 100 consecutive
    new sessions, where a hash of random ids would take p only on average."""
    return number * _SLOT_STRIDE % 100


def owner_name(who: str) -> str:
    """How Redis names an API key or client address (`who`, as service.auth charges logins to it)."""
    return hashlib.sha256(who.encode()).hexdigest()[:32]


STORE_UNAVAILABLE_MESSAGE = "The session store is unavailable; retry shortly."


def store_errors(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn a lost, slow or failing Redis into one domain error (503 with Retry-After). Clients get a
    fixed sentence: Redis' own text (addresses, paths, OOM details) goes only to the log."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as exc:
            log.warning("session store call %s failed: %s: %s", method.__qualname__, type(exc).__name__, exc)
            raise StoreUnavailable(STORE_UNAVAILABLE_MESSAGE) from exc

    return wrapper


def _retried_once(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Retry once on a dead connection, for operations that are safe to repeat.

    After a Redis restart every pooled connection is dead and fails once; reads retry on a fresh
    one. Appends (`record`) do not: a reply lost after the script ran would append twice, so their
    caller gets a 503 and retries with its Idempotency-Key instead.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except RedisConnectionError:
            return await method(*args, **kwargs)

    return wrapper


CLUSTER_SCHEME = "redis+cluster://"
SENTINEL_SCHEME = "redis+sentinel://"


def connect(url: str, connect_timeout: float, command_timeout: float) -> aioredis.Redis | RedisCluster:
    """An async client with bounded timeouts, for one of:

    - redis://, rediss://, unix:// (one server);
    - redis+cluster://[:password@]host:port[,host:port...] (Redis Cluster: any reachable nodes, the
      client discovers the rest);
    - redis+sentinel://[:password@]host:port[,host:port...]/service[/db] (Redis Sentinel: the
      client asks the sentinels for the master of `service` and follows it through a failover).
    """
    if url.startswith(CLUSTER_SCHEME):
        password, nodes, _ = _multi_host_url(url, CLUSTER_SCHEME)
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                            password=password, decode_responses=True,
                            socket_connect_timeout=connect_timeout, socket_timeout=command_timeout)
    timeouts = {"socket_connect_timeout": connect_timeout, "socket_timeout": command_timeout}
    if url.startswith(SENTINEL_SCHEME):
        password, nodes, path = _multi_host_url(url, SENTINEL_SCHEME)
        service, _, db = path.partition("/")
        if not service:
            raise ValueError("a redis+sentinel:// URL names the master's service: redis+sentinel://host:port/mymaster")
        sentinel = Sentinel(nodes, sentinel_kwargs=timeouts, socket_connect_timeout=connect_timeout,
                            socket_timeout=command_timeout)
        master: aioredis.Redis = sentinel.master_for(service, password=password, db=int(db or 0),
                                                     decode_responses=True, health_check_interval=30)
        return master
    return aioredis.from_url(url, decode_responses=True, health_check_interval=30, **timeouts)


def _multi_host_url(url: str, scheme: str) -> tuple[str | None, list[tuple[str, int]], str]:
    """`scheme[:password@]h1:p1,h2:p2/path` -> (password, [(host, port)...], path)."""
    location, _, path = url.removeprefix(scheme).partition("/")
    credentials, _, hosts = location.rpartition("@")
    password = unquote(credentials.partition(":")[2]) or None  # "[user]:password@"; none without "@"
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.strip().rpartition(":")
        nodes.append((host or "127.0.0.1", int(port or 6379)))
    return password, nodes, path.strip("/")


class SessionStore:
    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        ttl_seconds: int,
        max_lifetime_seconds: int,
        history_max_entries: int,
        rate_limit_per_minute: int = 0,
    ):
        self.redis = client
        self.rate_limit_per_minute = rate_limit_per_minute
        self.ttl_ms = ttl_seconds * 1000
        self.max_lifetime_ms = max_lifetime_seconds * 1000
        self.history_max_entries = history_max_entries
        self._record = client.register_script(_RECORD_SCRIPT)
        self._touch = client.register_script(_TOUCH_SCRIPT)
        self._create = client.register_script(_CREATE_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)
        self._begin_erase = client.register_script(_BEGIN_ERASE_SCRIPT)
        self._set_options = client.register_script(_SET_OPTIONS_SCRIPT)
        self._login = client.register_script(_LOGIN_SCRIPT)

    @staticmethod
    def _keys(session_id: str) -> tuple[str, str, str]:
        base = f"sess:{{{session_id}}}"
        return base, f"{base}:history", f"{base}:revoked"

    @staticmethod
    def _idempotency_keys(session_id: str) -> str:
        # One hash per session, so that logout and erase find every client-chosen key name.
        return f"sess:{{{session_id}}}:idem"

    def _expiry(self, deadline_ms: int) -> int:
        """Sliding idle expiry, never past the session's hard deadline."""
        return min(now_ms() + self.ttl_ms, deadline_ms)

    @store_errors
    @_retried_once
    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    @store_errors
    async def count_sessions(self, limit: int = 100_000) -> int:
        """Session hashes in Redis, counted with SCAN (non-blocking); stops counting at `limit`."""
        count = 0
        async for _ in self.redis.scan_iter(match="sess:{*}", count=1000, _type="hash"):
            count += 1
            if count >= limit:
                break
        return count

    @store_errors
    @_retried_once
    async def take_login(self, who: str, per_minute: int) -> None:
        """Take one login from the bucket of `who` (an API key's hash or a client address), shared by
        every replica; RateLimited (429) when it is empty. 0 per minute: unlimited."""
        if per_minute <= 0:
            return
        key = "login:{" + owner_name(who) + "}"
        wait_ms = await self._login(keys=[key], args=[per_minute])
        if wait_ms:
            wait = max(1, -(-int(wait_ms) // 1000))
            raise RateLimited(f"Too many logins: the limit is {per_minute} a minute "
                              f"(sessions.login_rate_limit_per_minute); retry in {wait} s.",
                              code="login_rate_limited", retry_after=wait)

    @store_errors
    async def create(self, options: Options, owner: str | None = None) -> Session:
        """A new session; `owner`: who logged in (an API key or client address, see take_login)."""
        session_id = new_session_id()
        created = now_ms()
        deadline = created + self.max_lifetime_ms
        key, _, _ = self._keys(session_id)
        slot = canary_slot(await self.redis.incr(CANARY_SLOTS_KEY))
        owned_by = owner_name(owner) if owner is not None else None
        fields: dict[str, int | str] = {"created_at": created, "deadline": deadline, "predictions": 0,
                                        "canary_slot": slot}
        if owned_by is not None:
            fields["owner"] = owned_by
        fields |= {_OPTION_PREFIX + k: v for k, v in options.to_redis().items()}
        expires = self._expiry(deadline)
        await self._create(keys=[key], args=[expires, *_flatten(fields)])
        return Session(session_id, created, expires, deadline, options, 0, canary_slot=slot, owner=owned_by)

    @store_errors
    @_retried_once
    async def touch(
        self, token: VerifiedToken, *, cost: int = 0, idempotency_key: str | None = None
    ) -> Session:
        """Load a live session, slide its expiry and take `cost` from its rate limit: one round trip.

        The hard deadline comes from the token's signed issue time, so the new expiry is known
        before the session is read.
        """
        expires = self._expiry(int(token.issued_at * 1000) + self.max_lifetime_ms)
        keys = [*self._keys(token.session_id), self._idempotency_keys(token.session_id)]
        reply = await self._touch(
            keys=keys, args=[expires, cost, self.rate_limit_per_minute, "1" if idempotency_key else "0",
                             idempotency_key or ""]
        )
        if reply == ["revoked"]:
            raise InvalidToken(SESSION_REVOKED, code="session_revoked")
        if not reply:
            raise InvalidToken(SESSION_NOT_FOUND, code="session_not_found")
        if reply[0] == "rate_limited":
            wait = max(1, -(-int(reply[1]) // 1000))
            raise RateLimited(f"This session is over its limit of {self.rate_limit_per_minute} requests a "
                              f"minute (predictions, preprocessing and feedback; sessions.rate_limit_per_minute); "
                              f"retry in {wait} s.", retry_after=wait)
        fields = dict(zip(reply[::2], reply[1::2], strict=True))
        return self._session(token.session_id, fields, expires)

    def _session(self, session_id: str, fields: dict[str, str], expires_ms: int) -> Session:
        options = Options.from_redis(
            tuple((k[len(_OPTION_PREFIX) :], v) for k, v in fields.items() if k.startswith(_OPTION_PREFIX))
        )
        return Session(
            id=session_id,
            created_at_ms=int(fields["created_at"]),
            expires_at_ms=expires_ms,
            deadline_ms=int(fields["deadline"]),
            options=options,
            predictions=int(fields.get("predictions", 0)),
            replay_of=fields.get("__replay"),
            canary_slot=int(fields["canary_slot"]) if "canary_slot" in fields else None,
            owner=fields.get("owner"),
        )

    @store_errors
    async def update_options(self, session_id: str, changes: dict[str, Any]) -> Options:
        """Merge `changes` into the session's options, validated against the current values."""
        key, _, _ = self._keys(session_id)
        while True:
            fields = text_dict(await self.redis.hgetall(key))
            if not fields:
                raise InvalidToken(SESSION_NOT_FOUND, code="session_not_found")
            options = self._session(session_id, fields, 0).options.merged(changes)
            stored = {_OPTION_PREFIX + k: v for k, v in options.to_redis().items()}
            written = await self._set_options(keys=[key], args=[fields.get("options_version", "0"),
                                                                *_flatten(stored)])
            if written == 1:
                return options
            if written == -1:
                raise InvalidToken(SESSION_NOT_FOUND, code="session_not_found")
            # Another writer changed the options first: re-read and re-validate.

    @store_errors
    @_retried_once
    async def alive(self, session_id: str) -> bool:
        """Whether the session still exists and takes new data (not logged out, expired, or being erased)."""
        created_at, erasing = await self.redis.hmget(self._keys(session_id)[0], ["created_at", "erasing"])
        return created_at is not None and erasing is None

    @store_errors
    async def begin_erase(self, session_id: str) -> None:
        """Mark the session as being erased: from now on nothing is recorded for it and `alive` is False,
        so that data written while the erase runs refuses itself; its token still works, so a retry of
        an erase that failed part-way can finish it. Repeating it is harmless."""
        await self._begin_erase(keys=[self._keys(session_id)[0]])

    @store_errors
    async def delete(self, session: Session, *, erase: bool = False) -> None:
        """Log out: remove the session, its history and its idempotency keys, and leave a tombstone so
        its token reads as revoked. With `erase`, no tombstone either (it would name the session): the
        token then reads as not found."""
        await self._delete(keys=[*self._keys(session.id), self._idempotency_keys(session.id)],
                           args=["erase" if erase else "logout"])

    @store_errors
    async def record(
        self, session: Session, entry: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        """Append one prediction to the history (atomically, capped). Return its id, and whether
        it is an earlier request's id (a retry with the same idempotency key raced the first)."""
        key, history_key, revoked_key = self._keys(session.id)
        reply = await self._record(
            keys=[key, history_key, self._idempotency_keys(session.id), revoked_key],
            args=[json.dumps(entry, separators=(",", ":")), self.history_max_entries,
                  self._expiry(session.deadline_ms), "1" if idempotency_key else "0", idempotency_key or ""],
        )
        if reply == "revoked":  # a logout or an erase overtook this request while its image was classified
            raise InvalidToken(SESSION_REVOKED, code="session_revoked")
        if reply is None:
            raise InvalidToken(SESSION_NOT_FOUND, code="session_not_found")
        history_id, replayed = reply
        return history_id, bool(replayed)

    @store_errors
    @_retried_once
    async def history(
        self, session_id: str, *, limit: int, before: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; `next` is the id to pass as `before` for the following page, or None."""
        _, history_key, _ = self._keys(session_id)
        if before is not None:
            parsed = parse_history_id(before)
            if parsed is None:
                raise BadRequest(f"before must be a history id such as '1732540000000-0', got {quoted(before)}.",
                                 code="invalid_parameter")
            if parsed == (0, 0):  # nothing is older than the smallest id (and Redis refuses "(0-0")
                return [], None
        start = f"({before}" if before else "+"
        rows = stream_entries(await self.redis.xrevrange(history_key, max=start, min="-", count=limit + 1))
        items = [_entry(history_id, fields) for history_id, fields in rows[:limit]]
        next_id = items[-1]["id"] if len(rows) > limit else None
        return items, next_id

    @store_errors
    @_retried_once
    async def history_item(self, session_id: str, history_id: str) -> dict[str, Any]:
        _, history_key, _ = self._keys(session_id)
        if parse_history_id(history_id) is not None:
            rows = stream_entries(await self.redis.xrange(history_key, min=history_id, max=history_id, count=1))
            if rows:
                return _entry(*rows[0])
        raise NotFound(f"No history item {quoted(history_id)} in this session.", code="history_item_not_found")


def _flatten(fields: dict[str, Any]) -> list[Any]:
    return [part for pair in fields.items() for part in pair]


_MAX_ID_PART = 2**64 - 1


def parse_history_id(text: str) -> tuple[int, int] | None:
    """A Redis stream id as its two unsigned 64-bit numbers, or None (Redis errors on anything else)."""
    if not HISTORY_ID.match(text):
        return None
    milliseconds, sequence = (int(part) for part in text.split("-"))
    return (milliseconds, sequence) if max(milliseconds, sequence) <= _MAX_ID_PART else None


def _entry(history_id: str, fields: dict[str, str]) -> dict[str, Any]:
    return {"id": history_id, **json.loads(fields["entry"])}
