"""WebSocket stream against POST: the same images through one Python client, in one run.

    python -m bench.stream [--images 120] [--window 8] [--rounds 3] [--out bench/results]
                           [--runtime auto] [--photo NAME=PATH ...] [--cache-dir DIR]

Starts our server (`python -m server`, model.runtime --runtime (default auto: what the server picks on
this CPU), embedded Redis, 2 workers x 1 thread,
`http.stream_max_in_flight` = window) on 127.0.0.1, logs in once, warms up, then alternates rounds
of the two ways to send `--images` photos, each with `window` images outstanding:

- POST: `Client.predict_many(images, concurrency=window)`, raw JPEG bodies on keep-alive connections
  (httpx, one thread per request in flight);
- stream: `Client.predict_stream(images)`, one WebSocket, `window` images in flight.

Both record every image in the session's history. It reports images/s for each (median over the
rounds), the ratio stream ÷ POST, and the client's own CPU seconds per image (the load generator
shares the machine with the server, and a cheaper client leaves more CPU to the server: part of
what the ratio measures). Writes `stream.json` into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.pipelines import served_runtime
from bench.servers import REPO, ServerSpec, start_server, stop_server, wait_idle
from clients.python import Client

IMAGES = {"coffee": REPO / "tests" / "data" / "coffee.jpg", "cat": REPO / "tests" / "data" / "cat.jpg"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="images per round and way (default 120)")
    parser.add_argument("--window", type=int, default=8, help="images in flight (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per way, alternating (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--runtime", default="auto", help="model.runtime of the server (default auto)")
    parser.add_argument("--photo", action="append", metavar="NAME=PATH",
                        help="a photo to send (repeat; default coffee.jpg and cat.jpg from tests/data)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "data" / "model-cache",
                        help="the exported model's cache (default: where ./dev serve keeps it)")
    return parser.parse_args(argv)


def photos(args: argparse.Namespace) -> dict[str, Path]:
    if not args.photo:
        return IMAGES
    named = dict(item.split("=", 1) for item in args.photo)
    return {name: Path(path) for name, path in named.items()}


def timed(run: Any) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds spent in `run()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(client: Client, images: list[bytes], window: int) -> dict[str, tuple[float, float]]:
    def post() -> None:
        results = client.predict_many(images)
        assert len(results) == len(images)

    def stream() -> None:
        results = list(client.predict_stream(images))
        assert len(results) == len(images) and all(result.ok for result in results), results[:3]

    assert client.concurrency == window
    return {"post": timed(post), "stream": timed(stream)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as work_dir:
        work = Path(work_dir)
        env = {"INFERENCE_SERVER_DATA_DIR": str(work / "data"), "INFERENCE_REDIS_URL": "embedded",
               "INFERENCE_MODEL_RUNTIME": args.runtime, "INFERENCE_MODEL_WORKERS": "2",
               "INFERENCE_MODEL_INTRA_OP_THREADS": "1", "INFERENCE_MODEL_MAX_QUEUE": "256",
               "INFERENCE_HTTP_STREAM_MAX_IN_FLIGHT": str(args.window),
               "INFERENCE_HISTORY_MAX_ENTRIES": "100000",
               # One process: a stream is one connection, so it stays on one process, while POSTs
               # would spread over several; one process compares the protocols, not the layouts.
               "INFERENCE_SERVER_PROCESSES": "1",
               # The exported graph (and auto's choice) is kept where ./dev serve keeps it, so later runs
               # skip the export; bench.run hands in its own cache.
               "INFERENCE_MODEL_CACHE_DIR": str(args.cache_dir)}
        spec = ServerSpec("ours", [sys.executable, "-m", "server", "--port", "{port}"], env, "/v1/predict",
                          ("raw",), "/readyz", sessions=True, data_dir=work / "data")
        server = start_server(spec, work)
        rows: dict[str, Any] = {}
        served = served_runtime(args.cache_dir, args.runtime)
        try:
            with Client(server.base_url, concurrency=args.window, timeout=120) as client:
                client.login()
                for name, path in photos(args).items():
                    images = [path.read_bytes()] * args.images
                    measure(client, images[: 2 * args.window], args.window)  # warm-up: connections, caches
                    wait_idle(server)
                    rounds = [measure(client, images, args.window) for _ in range(args.rounds)]
                    row: dict[str, Any] = {"images": args.images, "window": args.window, "rounds": args.rounds}
                    for way in ("post", "stream"):
                        walls = [r[way][0] for r in rounds]
                        cpus = [r[way][1] for r in rounds]
                        row[way] = {"img_per_s": round(args.images / statistics.median(walls), 2),
                                    "client_cpu_ms_per_image": round(1000 * statistics.median(cpus) / args.images, 2),
                                    "wall_s": [round(w, 3) for w in walls]}
                    row["ratio_stream_over_post"] = round(row["stream"]["img_per_s"] / row["post"]["img_per_s"], 3)
                    rows[name] = row
        finally:
            stop_server(server)
    result = {"server": f"ours (python -m server --processes 1, 2 workers x 1 thread, embedded Redis, "
                        f"model.runtime = {args.runtime})",
              "runtime": served,
              "window": args.window,
              "client": "clients.python.Client in this process (httpx for POST, websockets for the stream)",
              "images": {name: str(path) for name, path in photos(args).items()}, "rows": rows}
    (args.out / "stream.json").write_text(json.dumps(result, indent=2))
    print("| image | POST img/s | stream img/s | stream ÷ POST | client CPU ms/img POST | stream |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['post']['img_per_s']} | {row['stream']['img_per_s']} | "
              f"{row['ratio_stream_over_post']} | {row['post']['client_cpu_ms_per_image']} | "
              f"{row['stream']['client_cpu_ms_per_image']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
