"""Does micro-batching pay on this machine? Measured without HTTP, on the server's own runner.

    .venv/bin/python -m bench.batching --device cuda          # a GPU machine, ~2 min
    .venv/bin/python -m bench.batching --device cpu --runtime onnxruntime

1. Forward only: the backend on a zero batch of N images (N = --batch-sizes), images/s per N.
2. The runner as the server uses it (decode, preprocess and forward on its own thread pool):
   --concurrency callers each predict the photo in a loop, once per `model.max_batch_size` in
   --max-batch-sizes (1 = off); img/s, p50/p99 latency and the mean batch the forwards got.

Prints both tables and writes bench/results/batching-<device>.json. The default model, loaded with
torch; `--runtime onnxruntime` exports it to --cache-dir first unless it is there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import COFFEE, REPO
from core.options import Options
from inference.torch_model import load_model
from server.config import Config, load_config
from server.runtime import build_backend, build_runner, configured, onnx_cache_dir, serve_loaded

Row = dict[str, Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (model.device)")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="model.workers (default: cores)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--max-batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--delay-ms", type=float, default=2.0, help="model.max_batch_delay_ms")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per runner point")
    parser.add_argument("--image", type=Path, default=COFFEE)
    parser.add_argument("--cache-dir", type=Path, default=onnx_cache_dir(load_config()))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace, max_batch_size: int) -> Config:
    config = Config()
    model = config.model
    model.runtime, model.device, model.workers = args.runtime, args.device, args.workers
    model.intra_op_threads, model.idle_intra_op_threads = 1, 0
    model.max_batch_size, model.max_batch_delay_ms = max_batch_size, args.delay_ms
    model.max_queue, model.cache_dir = 4096, str(args.cache_dir)
    return config


def forward_rows(args: argparse.Namespace, backend: Any) -> list[Row]:
    rows = []
    for size in args.batch_sizes:
        batch = np.zeros((size, 3, 224, 224), np.float32)
        for _ in range(3):  # warm-up: kernels chosen, memory allocated
            backend.forward(batch)
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < args.duration / 2:
            backend.forward(batch)  # returns NumPy: the device work is finished
            count += 1
        rows.append({"batch": size, "forwards_s": count / elapsed, "img_s": count * size / elapsed,
                     "ms_per_forward": elapsed / count * 1000})
        print(f"    batch {size:3d}: {rows[-1]['img_s']:8.1f} img/s, {rows[-1]['ms_per_forward']:7.2f} ms per forward",
              flush=True)
    return rows


async def drive(runner: Any, served: Any, image: bytes, concurrency: int, warmup: float, duration: float) -> Row:
    """`concurrency` callers predicting in a loop; only answers inside the measured window count."""
    latencies: list[float] = []
    batches: list[float] = []
    start = time.perf_counter() + warmup
    end = start + duration

    async def caller() -> None:
        while (sent := time.perf_counter()) < end:
            prediction = await runner.predict(served, image, Options())
            if sent >= start:
                latencies.append(time.perf_counter() - sent)
                batches.append(prediction.timing_ms.get("batch_size", 1))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    latencies.sort()
    return {"img_s": len(latencies) / duration, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "mean_batch": statistics.fmean(batches)}


async def runner_rows(args: argparse.Namespace, model: Any, image: bytes) -> list[Row]:
    """One event loop for every point: a batching runner keeps its queue on the loop it started on."""
    rows = []
    served = serve_loaded(config_for(args, 1), model)  # the model and its runtime do not depend on batching
    for max_batch in args.max_batch_sizes:
        runner = build_runner(config_for(args, max_batch))
        try:
            for concurrency in args.concurrency:
                row = await drive(runner, served, image, concurrency, 1.0, args.duration)
                row.update(max_batch_size=max_batch, concurrency=concurrency)
                rows.append(row)
                print(f"    max_batch_size {max_batch:3d}, c{concurrency:<3d}: {row['img_s']:8.1f} img/s, "
                      f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, mean batch {row['mean_batch']:5.1f}",
                      flush=True)
        finally:
            runner.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = load_model("efficientnet_lite0", "default")
    info: Row = {"device": args.device, "runtime": args.runtime, "workers": args.workers,
                 "delay_ms": args.delay_ms, "image": args.image.name, "cores": os.cpu_count()}
    if args.device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(f"[batching] {info}", flush=True)
    print("[forward only]", flush=True)
    forwards = forward_rows(args, build_backend(config_for(args, 1), configured(config_for(args, 1)), model))
    print(f"[runner: decode + preprocess + forward, {args.workers} workers]", flush=True)
    runs = asyncio.run(runner_rows(args, model, args.image.read_bytes()))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"batching-{args.device.replace(':', '')}.json"
    out.write_text(json.dumps({"info": info, "forward": forwards, "runner": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
