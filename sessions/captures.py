"""Which session keeps which captured image, in Redis (the files are in capture.store_dir, a folder per
session).

Every session's copies are its own, so that nothing one session is told (whether an image is kept,
for how long, how fast) depends on what another sent. A session is named here by its session_ref
(sessions.tokens), never by its id. Beside the other stores, this is the only code that knows these
keys, all under the hash tag `{captures}` so that each script's keys share a Redis Cluster slot:
    captures:{captures}:sent             sorted set: "<ref>/<sha256>" -> when that session last sent
                                         that image (ms); the retention sweeps through it
    captures:{captures}:session:<ref>    hash: <sha256> -> the image's size, and "bytes" -> their sum
                                         (capture.max_session_bytes); expires with the session's hard
                                         deadline
    captures:{captures}:copies:<sha256>  set: the sessions (refs) holding a copy of that image: the
                                         export names an image by its hash alone

A copy is deleted when its retention ends or its session is erased; the scripts say when, and the
caller deletes the file.

The earlier layout (one shared file per image, `<sha256[:2]>/<sha256>`) named sessions by their ids
(captures:{captures}:session:<id>, :owners:<sha256>, :seen); its keys are read only to erase a session
that sent images before the change (release_legacy).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sessions.replies import members, text_set, texts
from sessions.store import store_errors

_BYTES = "bytes"  # the session hash's total; the other fields are 64-hex image hashes

# A session sent an image: 1 if it holds no copy yet (write one), 0 if it does (only its time moves),
# -1 if a new copy would take the session past its quota (nothing recorded).
_KEEP_SCRIPT = f"""
local held = redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1
if not held then
  local total = tonumber(redis.call('HGET', KEYS[2], '{_BYTES}') or '0')
  local limit = tonumber(ARGV[7])
  if limit > 0 and total + tonumber(ARGV[4]) > limit then return -1 end
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
  redis.call('HINCRBY', KEYS[2], '{_BYTES}', ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
redis.call('PEXPIREAT', KEYS[2], ARGV[6])
if held then return 0 end
return 1
"""

# Forget a session's copy unless the session sent the image again after the cutoff: 1 if it held one
# (delete the file). The session's hash goes with its last image, an image's copies set with its last copy.
_FORGET_SCRIPT = f"""
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) > tonumber(ARGV[4]) then return 0 end
local size = redis.call('HGET', KEYS[2], ARGV[2])
if size then
  redis.call('HDEL', KEYS[2], ARGV[2])
  if redis.call('HINCRBY', KEYS[2], '{_BYTES}', -tonumber(size)) <= 0 then redis.call('DEL', KEYS[2]) end
end
redis.call('SREM', KEYS[3], ARGV[3])
if redis.call('ZREM', KEYS[1], ARGV[1]) + (size and 1 or 0) > 0 then return 1 end
return 0
"""

# The sessions holding a copy of an image, each with when it last sent it: ref, time, ref, time...
_COPIES_SCRIPT = """
local found = {}
for _, ref in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local seen = redis.call('ZSCORE', KEYS[2], ref .. '/' .. ARGV[1])
  if seen then
    found[#found + 1] = ref
    found[#found + 1] = seen
  end
end
return found
"""

# The earlier layout's release: the session lets go of an image; 1 if no session holds it any more (its
# shared file is to be deleted). KEYS: the image's holders, the index of when images were sent, the session's
# images; ARGV: the image, the session id.
_LEGACY_RELEASE_SCRIPT = """
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_BASE = "captures:{captures}"
_ALWAYS = 1 << 62  # a cutoff no time passes: forget whenever sent


def member(ref: str, sha256: str) -> str:
    """How the `sent` index names one session's copy of an image."""
    return f"{ref}/{sha256}"


class CaptureRefs:
    def __init__(self, client: aioredis.Redis | RedisCluster):
        self.redis = client
        self._sent = f"{_BASE}:sent"
        self._keep = client.register_script(_KEEP_SCRIPT)
        self._forget = client.register_script(_FORGET_SCRIPT)
        self._copies = client.register_script(_COPIES_SCRIPT)
        self._legacy_release = client.register_script(_LEGACY_RELEASE_SCRIPT)

    def _keys(self, ref: str, sha256: str) -> list[str]:
        return [self._sent, f"{_BASE}:session:{ref}", f"{_BASE}:copies:{sha256}"]

    @store_errors
    async def add(self, ref: str, sha256: str, size: int, at_ms: int, keep_until_ms: int, max_bytes: int) -> int:
        """Record that the session sent this image: 1 if it held no copy yet, 0 if it did, -1 if a new
        copy would pass `max_bytes` for the session (0: no limit; nothing is recorded then)."""
        return int(await self._keep(keys=self._keys(ref, sha256),
                                    args=[member(ref, sha256), sha256, ref, size, at_ms, keep_until_ms, max_bytes]))

    @store_errors
    async def release(self, ref: str, sha256: str) -> bool:
        """The session lets go of its copy; True if it held one (delete the file)."""
        return bool(await self._forget(keys=self._keys(ref, sha256), args=[member(ref, sha256), sha256, ref, _ALWAYS]))

    @store_errors
    async def expire(self, ref: str, sha256: str, cutoff_ms: int) -> bool:
        """Forget the copy unless the session sent the image again since `cutoff_ms`; True if forgotten
        (delete the file)."""
        return bool(await self._forget(keys=self._keys(ref, sha256),
                                       args=[member(ref, sha256), sha256, ref, cutoff_ms]))

    @store_errors
    async def release_legacy(self, session_id: str) -> list[str]:
        """Let go of every image the session sent under the earlier layout (named by its id): the images
        no session holds any more, whose shared files are to be deleted. Safe to repeat."""
        session_key = f"{_BASE}:session:{session_id}"
        orphans = []
        for sha256 in sorted(text_set(await self.redis.smembers(session_key))):
            if await self._legacy_release(keys=[f"{_BASE}:owners:{sha256}", f"{_BASE}:seen", session_key],
                                          args=[sha256, session_id]):
                orphans.append(sha256)
        return orphans

    @store_errors
    async def session_images(self, ref: str) -> list[str]:
        """The images the session holds a copy of."""
        return sorted(field for field in texts(await self.redis.hkeys(f"{_BASE}:session:{ref}")) if field != _BYTES)

    @store_errors
    async def seen_at(self, ref: str, sha256: str) -> float | None:
        """When the session last sent this image (ms), or None once its copy is forgotten."""
        return await self.redis.zscore(self._sent, member(ref, sha256))

    @store_errors
    async def seen_at_many(self, ref: str, sha256s: list[str]) -> list[float | None]:
        """`seen_at` for each of these images of the session, in one call."""
        return await self.redis.zmscore(self._sent, [member(ref, sha256) for sha256 in sha256s]) if sha256s else []

    @store_errors
    async def copies(self, sha256: str) -> list[tuple[str, float]]:
        """The sessions holding a copy of this image, each with when it last sent it."""
        flat = await self._copies(keys=[f"{_BASE}:copies:{sha256}", self._sent], args=[sha256])
        return [(ref, float(seen)) for ref, seen in zip(flat[::2], flat[1::2], strict=True)]

    @store_errors
    async def older_than(self, cutoff_ms: int, limit: int) -> list[tuple[str, str]]:
        """Copies (ref, sha256) last sent at or before the cutoff, oldest first."""
        due = members(await self.redis.zrangebyscore(self._sent, "-inf", cutoff_ms, start=0, num=limit))
        return [(ref, sha256) for ref, _, sha256 in (copy.partition("/") for copy in due)]
