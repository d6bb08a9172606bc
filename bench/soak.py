"""Soak test (not in the quick suite): N clients predict for M minutes at the server's limit, then
report errors, RSS growth of the server's process tree and Redis memory.

    .venv/bin/python -m bench.soak [--clients 8] [--minutes 10] [--out bench/results/soak.json]

Each client has its own session and sends `Idempotency-Key`s; the server is started here on
127.0.0.1 with its embedded Redis and stopped at the end. Every loop is bounded by the duration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import redis

from bench.servers import PYTHON, REPO, ServerSpec, start_server, stop_server

IMAGE = (REPO / "tests" / "data" / "coffee.jpg").read_bytes()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="RSS / Redis memory sampling period")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    return parser.parse_args(argv)


def client_loop(url: str, deadline: float, outcomes: Counter[str], lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        token = http.post("/v1/sessions", json={"options": {"top_k": 1}}).json()["token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
        while time.monotonic() < deadline:
            try:
                response = http.post("/v1/predict", content=IMAGE,
                                     headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] += 1


def redis_used_memory(data_dir: Path) -> int:
    client = redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"))
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    data_dir = work / "data"
    spec = ServerSpec(
        name="ours-soak",
        command=[PYTHON, "-m", "server", "--port", "{port}"],
        env={"INFERENCE_SERVER_DATA_DIR": str(data_dir), "INFERENCE_MODEL_MAX_QUEUE": "256",
             "INFERENCE_SERVER_LOG_LEVEL": "warning"},
        predict_path="/v1/predict", payloads=("raw",), health_path="/readyz", sessions=True, data_dir=data_dir,
    )
    server = start_server(spec, work)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    samples: list[dict[str, float]] = []
    try:
        started = time.monotonic()
        deadline = started + args.minutes * 60
        threads = [threading.Thread(target=client_loop, args=(server.base_url, deadline, outcomes, lock), daemon=True)
                   for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        while time.monotonic() < deadline:
            time.sleep(min(args.sample_seconds, max(0.0, deadline - time.monotonic())))
            with lock:
                done = sum(outcomes.values())
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": server.rss_bytes() / 2**20,
                            "redis_mb": redis_used_memory(data_dir) / 2**20, "requests": done})
            print(f"[soak] {samples[-1]['t']:7.1f}s requests={done} rss={samples[-1]['rss_mb']:.0f} MB "
                  f"redis={samples[-1]['redis_mb']:.1f} MB", file=sys.stderr, flush=True)
        for thread in threads:
            thread.join(60)
    finally:
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)  # the server's log, its Redis data and captures
    elapsed = args.minutes * 60
    total = sum(outcomes.values())
    report = {
        "clients": args.clients, "minutes": args.minutes, "requests": total,
        "img_per_s": round(total / elapsed, 1), "outcomes": dict(outcomes),
        "errors": total - outcomes.get("200", 0),
        # Growth from the first sample (warm) to the last: leaks show here.
        "rss_mb_first": round(samples[0]["rss_mb"], 1) if samples else None,
        "rss_mb_last": round(samples[-1]["rss_mb"], 1) if samples else None,
        "redis_mb_first": round(samples[0]["redis_mb"], 2) if samples else None,
        "redis_mb_last": round(samples[-1]["redis_mb"], 2) if samples else None,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
