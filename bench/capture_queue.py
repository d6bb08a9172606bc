"""What capture costs a predict:  .venv/bin/python -m bench.capture_queue [--quick]

Runs our server (a real one: `python -m server`, its embedded Redis) twice, with capture off and with
capture on, and drives each with N concurrent sessions, each sending distinct images (every request a
new SHA-256, so every captured image is a new file: a write and an fsync on the serving process's one
capture thread). Reports, per run, the predict latency (p50, p99, from the client) and the capture
queue's wait (`inference_capture_queue_wait_seconds`, read from /metrics before and after the
measured window: p50 and p99 to the histogram's bucket, and the mean), the images not captured by
reason (`queue_full` past `capture.max_queue`), and writes them to --out as
capture-run-<date>-<cpu>.json (capture-smoke-… with --quick).

The load generator is this process (asyncio + httpx) on the same machine as the server: it takes CPU
from the server, the same in both runs. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.servers import PYTHON, REPO, ServerSpec, start_server, stop_server

_BUCKET = re.compile(r'^inference_capture_queue_wait_seconds_bucket\{le="([^"]+)"\} (\S+)$')
_SKIPPED = re.compile(r'^inference_capture_skipped_total\{reason="([^"]+)"\} (\S+)$')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.capture_queue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="check that it works: 4 sessions, 5 s per run, "
                        "ONNX Runtime (no runtime trial), under 2 minutes")
    parser.add_argument("--sessions", type=int, help="concurrent sessions, one request in flight each "
                        "(default 16, --quick 4)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 30, --quick 5)")
    parser.add_argument("--warmup", type=float, help="seconds of load before measuring (default 5, --quick 1)")
    parser.add_argument("--processes", type=int, default=0, help="server.processes (default 0: one per core)")
    parser.add_argument("--max-queue", type=int, help="capture.max_queue (default: config.toml's)")
    parser.add_argument("--image-side", type=int, default=640, help="side of the JPEG sent, pixels (default 640)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.sessions = args.sessions or (4 if args.quick else 16)
    args.duration = args.duration or (5.0 if args.quick else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 5.0)
    return args


def base_jpeg(side: int) -> bytes:
    """A photo-like JPEG (noise over a gradient) of `side` pixels square, made once."""
    rng = random.Random(0)
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    noise = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buffer = io.BytesIO()
    Image.blend(image, noise, 0.3).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def distinct(jpeg: bytes, number: int) -> bytes:
    """The same picture with a comment segment naming `number`: another SHA-256, the same decode."""
    comment = f"capture-bench {number}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def scrape(client: httpx.Client) -> tuple[dict[float, float], float, float, dict[str, float]]:
    """The queue-wait histogram's cumulative buckets, its sum and count, and the skipped images by reason."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    skipped: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if match := _BUCKET.match(line):
            buckets[math.inf if match[1] == "+Inf" else float(match[1])] = float(match[2])
        elif line.startswith("inference_capture_queue_wait_seconds_sum "):
            total = float(line.split()[1])
        elif line.startswith("inference_capture_queue_wait_seconds_count "):
            count = float(line.split()[1])
        elif match := _SKIPPED.match(line):
            skipped[match[1]] = float(match[2])
    return buckets, total, count, skipped


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile `q` (cumulative counts), None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    return next(bound for bound in bounds if buckets[bound] >= rank)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def drive(base_url: str, sessions: int, jpeg: bytes, warmup: float, duration: float,
                on_measure: Any) -> tuple[list[float], int, int]:
    """`sessions` loops, each its own session sending a distinct image per request. Returns the measured
    window's latencies (s), its error count, and how many requests it sent."""
    latencies: list[float] = []
    errors = sent = 0
    counter = iter(range(10**9))
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        tokens = []
        for _ in range(sessions):
            response = await client.post("/v1/sessions")
            response.raise_for_status()
            tokens.append(response.json()["token"])
        start = time.monotonic()
        measure_from, measure_until = start + warmup, start + warmup + duration

        async def session_loop(token: str) -> None:
            nonlocal errors, sent
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
            while (now := time.monotonic()) < measure_until:
                body = distinct(jpeg, next(counter))
                began = time.perf_counter()
                response = await client.post("/v1/predict", headers=headers, content=body)
                took = time.perf_counter() - began
                if now >= measure_from:
                    sent += 1
                    latencies.append(took)
                    errors += response.status_code != 200

        async def mark() -> None:  # scrapes off the loop, so that the sessions' requests go on meanwhile
            await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
            await asyncio.to_thread(on_measure, "start")
            await asyncio.sleep(max(0.0, measure_until - time.monotonic()))
            await asyncio.to_thread(on_measure, "end")

        await asyncio.gather(mark(), *(session_loop(token) for token in tokens))
    return latencies, errors, sent


def run_once(args: argparse.Namespace, work: Path, capture: bool, jpeg: bytes) -> dict[str, Any]:
    name = "capture-on" if capture else "capture-off"
    data_dir = work / f"{name}-data"
    data_dir.mkdir()
    env = {"INFERENCE_SERVER_DATA_DIR": str(data_dir), "INFERENCE_REDIS_URL": "embedded",
           "INFERENCE_SESSIONS_LOGIN_RATE_LIMIT_PER_MINUTE": "0",
           "INFERENCE_MODEL_CACHE_DIR": str(work / "model-cache"),  # one export for both runs
           "INFERENCE_CAPTURE_ENABLED": "true" if capture else "false",
           # The bench measures the queue, not the free-space guard of the machine it runs on.
           "INFERENCE_CAPTURE_MIN_FREE_DISK_BYTES": "0"}
    if args.quick:
        env["INFERENCE_MODEL_RUNTIME"] = "onnxruntime"
    if args.max_queue:
        env["INFERENCE_CAPTURE_MAX_QUEUE"] = str(args.max_queue)
    command = [PYTHON, "-m", "server", "--port", "{port}", "--processes", str(args.processes)]
    spec = ServerSpec(name, command, env, "/v1/predict", ("raw",), "/readyz", sessions=True, data_dir=data_dir)
    server = start_server(spec, work)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as metrics_client:
            marks: dict[str, tuple[dict[float, float], float, float, dict[str, float]]] = {}

            def on_measure(when: str) -> None:
                marks[when] = scrape(metrics_client)  # once at each edge of the measured window

            latencies, errors, sent = asyncio.run(drive(server.base_url, args.sessions, jpeg, args.warmup,
                                                        args.duration, on_measure))
    finally:
        stop_server(server)
    (start_buckets, start_sum, start_count, start_skipped), (end_buckets, end_sum, end_count, end_skipped) = (
        marks["start"], marks["end"])
    waits = {bound: end_buckets[bound] - start_buckets.get(bound, 0.0) for bound in end_buckets}
    count = end_count - start_count

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None or math.isinf(seconds) else round(seconds * 1000, 3)

    return {
        "capture": capture, "sessions": args.sessions, "requests": sent, "errors": errors,
        "img_s": round(sent / args.duration, 2),
        "predict_latency_ms": {"p50": ms(percentile(latencies, 0.5)), "p99": ms(percentile(latencies, 0.99)),
                               "mean": ms(sum(latencies) / len(latencies)) if latencies else None},
        "capture_queue_wait_ms": {"jobs": int(count), "p50_bucket_upper": ms(bucket_quantile(waits, 0.5)),
                                  "p99_bucket_upper": ms(bucket_quantile(waits, 0.99)),
                                  "mean": ms((end_sum - start_sum) / count) if count else None},
        "not_captured": {reason: int(value - start_skipped.get(reason, 0.0))
                         for reason, value in end_skipped.items() if value - start_skipped.get(reason, 0.0)},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.run import machine_info, results_stem  # the machine, date, commit and file name, as bench.run has them

    began, started = time.monotonic(), time.gmtime()
    jpeg = base_jpeg(args.image_side)
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as folder:
        work = Path(folder)
        runs = [run_once(args, work, capture, jpeg) for capture in (False, True)]
    machine = machine_info("python asyncio + httpx", time.strftime("%Y-%m-%d %H:%M UTC", started))
    results = {"machine": machine, "quick": args.quick,
               "settings": {"sessions": args.sessions, "duration_s": args.duration, "warmup_s": args.warmup,
                            "processes": args.processes or "one per core", "max_queue": args.max_queue or "config",
                            "image": f"{args.image_side}x{args.image_side} JPEG, {len(jpeg)} bytes, "
                                     "a distinct comment per request"},
               "runs": runs, "elapsed_s": round(time.monotonic() - began, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    # capture-run-<date>-<cpu>.json is committed; a --quick run's, capture-smoke-..., is not (.gitignore).
    path = args.out / f"capture-{results_stem(not args.quick, started, machine['cpu_model'])}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for run in runs:
        print(f"capture {'on ' if run['capture'] else 'off'}: {run['requests']} predicts ({run['errors']} errors), "
              f"p50 {run['predict_latency_ms']['p50']} ms, p99 {run['predict_latency_ms']['p99']} ms; "
              f"queue wait mean {run['capture_queue_wait_ms']['mean']} ms over {run['capture_queue_wait_ms']['jobs']} "
              f"jobs; not captured {run['not_captured'] or 0}")
    print(f"wrote {path} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
