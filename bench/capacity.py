"""Redis capacity: memory per session and Redis CPU per predict, measured on a private Redis.

    .venv/bin/python -m bench.capacity [--sessions 200] [--predicts 5000]

Memory: sessions with 0, 100 and `history.max_entries` (1000) real-sized history entries, measured
with MEMORY USAGE on every key of a session. CPU: the two scripts a predict runs (touch, record),
timed by Redis itself (INFO commandstats, usec per call), so the load generator does not count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time

import redis

from bench.servers import free_port
from core.clock import iso, now_ms
from core.options import Options
from server.embedded_redis import redis_server_binary
from sessions.store import SessionStore, connect
from sessions.tokens import TokenSigner

SIGNER = TokenSigner(["capacity-measurement-key"], max_age_seconds=3600)


def entry() -> dict:
    """A history entry of the size the server records (top 5, default options)."""
    top = [{"class_index": 281 + i, "label": f"label number {i}", "score": 0.123456} for i in range(5)]
    return {"created_at": iso(now_ms()), "predicted_class": 281, "label": "tabby", "top_k": top,
            "options": Options().to_dict(), "model": {"name": "efficientnet_lite0", "version": "imagenet-579344248a93"}}


def session_bytes(client: redis.Redis, session_id: str) -> int:
    return sum(client.memory_usage(key) or 0 for key in client.keys(f"sess:{{{session_id}}}*"))


async def measure(url: str, sessions: int, predicts: int) -> dict:
    store = SessionStore(connect(url, 2, 5), ttl_seconds=3600, max_lifetime_seconds=7 * 86400,
                         history_max_entries=1000)
    plain = redis.Redis.from_url(url)
    memory = {}
    for entries in (0, 100, 1000):
        sizes = []
        for _ in range(max(3, sessions // 20)):
            session = await store.create(Options())
            for _ in range(entries):
                await store.record(session, entry())
            sizes.append(session_bytes(plain, session.id))
        memory[entries] = round(sum(sizes) / len(sizes))
    session = await store.create(Options())
    token = SIGNER.verify(SIGNER.issue(session.id))
    plain.config_resetstat()
    started = time.perf_counter()
    for _ in range(predicts):
        live = await store.touch(token, cost=1, idempotency_key=None)
        await store.record(live, entry())
    elapsed = time.perf_counter() - started
    stats = plain.info("commandstats")
    await store.close()
    evalsha = stats.get("cmdstat_evalsha", {})
    usec_per_predict = evalsha.get("usec", 0) / max(1, predicts)
    return {"bytes_per_session": memory, "redis_usec_per_predict": round(usec_per_predict, 1),
            "client_round_trip_ms": round(elapsed / predicts * 1000, 3),
            "predicts_per_second_per_redis_core": round(1e6 / usec_per_predict) if usec_per_predict else None}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--predicts", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        process = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                    folder, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            result = asyncio.run(measure(f"redis://127.0.0.1:{port}/0", args.sessions, args.predicts))
        finally:
            process.terminate()
            process.wait(10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
