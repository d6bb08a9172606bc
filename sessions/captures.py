"""Who holds which captured image, in Redis (the files themselves are in capture.store_dir).

Beside the other stores, this is the only code that knows these keys, all under the hash tag
`{captures}` so that each script's keys share a Redis Cluster slot:
    captures:{captures}:seen             sorted set: image SHA-256 -> when a session last sent it (ms)
    captures:{captures}:owners:<sha256>  set: the sessions that sent that image
    captures:{captures}:session:<id>     set: the images a session sent; expires with its hard deadline

An image is deleted when its retention ends (`seen` too old), or when the last session that sent
it is erased; the scripts say which, and the caller deletes the file.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sessions.store import store_errors

# A session sent an image: 1 if it had not sent that one before (so that a failed record may undo it).
_ADD_SCRIPT = """
local new = redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PEXPIREAT', KEYS[3], ARGV[4])
return new
"""

# The session lets go of an image: 1 if no session holds it any more (its file is to be deleted).
_RELEASE_SCRIPT = """
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Retention: forget an image unless a session sent it again since the cutoff (1: forgotten).
_EXPIRE_SCRIPT = """
local seen = redis.call('ZSCORE', KEYS[2], ARGV[1])
if seen and tonumber(seen) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

_BASE = "captures:{captures}"


class CaptureRefs:
    def __init__(self, client: aioredis.Redis | RedisCluster):
        self.redis = client
        self._seen = f"{_BASE}:seen"
        self._add = client.register_script(_ADD_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._expire = client.register_script(_EXPIRE_SCRIPT)

    def _keys(self, sha256: str, session_id: str) -> list[str]:
        return [f"{_BASE}:owners:{sha256}", self._seen, f"{_BASE}:session:{session_id}"]

    @store_errors
    async def add(self, session_id: str, sha256: str, at_ms: int, keep_until_ms: int) -> bool:
        """Record that the session sent this image; True if it had not before."""
        return bool(await self._add(keys=self._keys(sha256, session_id), args=[sha256, session_id, at_ms,
                                                                                keep_until_ms]))

    @store_errors
    async def release(self, session_id: str, sha256: str) -> bool:
        """The session no longer holds this image; True if no session does (delete the file)."""
        return bool(await self._release(keys=self._keys(sha256, session_id), args=[sha256, session_id]))

    @store_errors
    async def session_images(self, session_id: str) -> list[str]:
        return sorted(await self.redis.smembers(f"{_BASE}:session:{session_id}"))

    @store_errors
    async def seen_at(self, sha256: str) -> float | None:
        """When a session last sent this image (ms), or None once it is forgotten."""
        return await self.redis.zscore(self._seen, sha256)

    @store_errors
    async def seen_at_many(self, sha256s: list[str]) -> list[float | None]:
        """`seen_at` for each of these images, in one call."""
        return await self.redis.zmscore(self._seen, sha256s) if sha256s else []

    @store_errors
    async def older_than(self, cutoff_ms: int, limit: int) -> list[str]:
        return await self.redis.zrangebyscore(self._seen, "-inf", cutoff_ms, start=0, num=limit)

    @store_errors
    async def expire(self, sha256: str, cutoff_ms: int) -> bool:
        """Forget the image if nobody sent it since `cutoff_ms`; True if forgotten (delete the file)."""
        return bool(await self._expire(keys=self._keys(sha256, "")[:2], args=[sha256, cutoff_ms]))
