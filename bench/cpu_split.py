"""Where each image's CPU goes in our server, against what the in-process pipeline spends on it.

    .venv/bin/python -m bench.cpu_split [--free-store] [--images coffee 12mp] [--concurrency 4 16]

On a machine whose cores are all busy, img/s is the cores divided by the CPU one image costs. The
in-process limit spends only the pipeline's CPU (decode, preprocess, forward); our server adds its
event loops (HTTP, tokens, the Redis client, JSON, metrics, logs), Redis and the load generator.
So the runner threads' share of all the CPU spent in a window is the most of the limit the server
can reach with that overhead (if its pipeline costs what it does in-process), and being one
window's split, it does not move with the machine's speed the way two img/s measured a minute
apart do. The table shows what each part costs.

Per point: wrk drives `POST /v1/predict` (--payloads, one session per connection) while the CPU time
of every thread of the server's process tree, of its Redis and of wrk is read at the window's
edges; then the fast pipeline runs in-process (2 threads x 1 intra-op thread, 3 s).

`--free-store` also runs `bench.free_store`: the same server with both per-predict Redis calls
answered from memory, to show what the server would reach if they cost nothing.
Writes bench/results/cpu_split.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen
from bench.run import COFFEE, PYTHON, REPO, inprocess_rows, make_images, sleep_until
from bench.servers import RunningServer, ServerSpec, start_server, stop_server, wait_idle
from server.config import load_config
from server.runtime import onnx_cache_dir

Row = dict[str, Any]

RUNNER_THREADS = "runner threads (decode, preprocess, forward)"
EVENT_LOOPS = "event loops (HTTP, tokens, Redis client, JSON, logs)"
SUPERVISOR = "supervisor process"
REDIS = "redis-server"
LOAD_GENERATOR = "load generator (wrk)"
ROLES = (RUNNER_THREADS, EVENT_LOOPS, SUPERVISOR, REDIS, LOAD_GENERATOR)

VARIANTS = {
    "ours-onnx": [PYTHON, "-m", "server", "--port", "{port}"],
    "free-store": [PYTHON, "-m", "bench.free_store", "--port", "{port}"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", choices=("coffee", "12mp"), default=["coffee"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--payloads", nargs="+", choices=("raw", "multipart"), default=["raw"])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--free-store", action="store_true", help="also run bench.free_store (Redis calls free)")
    parser.add_argument("--cache-dir", type=Path, default=onnx_cache_dir(load_config()),
                        help="the exported model's cache (default: the one `python -m server` uses)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def cpu_by_role(server: RunningServer, wrk: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of every thread of the server's tree, of its Redis and of wrk, by role."""
    totals = dict.fromkeys(ROLES, 0.0)
    procs = server.tree()
    root = server.process.pid
    names = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            names[proc.pid] = proc.name()
    # With several serving processes the root only supervises them; alone, it serves.
    supervised = any(pid != root and not name.startswith("redis") for pid, name in names.items())
    for proc in procs:
        try:
            threads = proc.threads()
        except psutil.Error:
            continue
        for thread in threads:
            seconds = thread.user_time + thread.system_time
            if names.get(proc.pid, "").startswith("redis"):
                totals[REDIS] += seconds
            elif thread.id != proc.pid:
                totals[RUNNER_THREADS] += seconds
            else:
                totals[SUPERVISOR if proc.pid == root and supervised else EVENT_LOOPS] += seconds
    with contextlib.suppress(psutil.Error):
        times = wrk.cpu_times()
        totals[LOAD_GENERATOR] = times.user + times.system
    return totals


def measure(server: RunningServer, body: loadgen.Body, concurrency: int, tokens: Path,
            warmup: float, duration: float) -> Row:
    """One wrk point with the CPU of each role read at the measured window's edges."""
    wait_idle(server)
    process, window = loadgen.start_wrk(server.base_url, "/v1/predict", body, concurrency, warmup, duration, tokens)
    try:
        wrk = psutil.Process(process.pid)
        sleep_until(window.start)
        before = cpu_by_role(server, wrk)
        sleep_until(window.end)
        after = cpu_by_role(server, wrk)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    result = loadgen.finish_wrk(process, timeout=warmup + duration + 60)
    ok = int(result["ok"])
    per_image = {role: (after[role] - before[role]) * 1000 / ok if ok else float("nan") for role in ROLES}
    total = sum(per_image.values())
    return {"img_s": ok / result["window_s"], "p50_ms": result["p50_ms"], "errors": result["bad_status"],
            "cpu_ms_per_image": per_image, "cpu_ms_per_image_total": total,
            "runner_share": per_image[RUNNER_THREADS] / total if ok else float("nan")}


def run_variant(name: str, images: dict[str, Path], args: argparse.Namespace, work: Path) -> list[Row]:
    data_dir = work / f"{name}-data"
    data_dir.mkdir()
    env = {"INFERENCE_SERVER_DATA_DIR": str(data_dir), "INFERENCE_REDIS_URL": "embedded",
           "INFERENCE_MODEL_RUNTIME": "onnxruntime", "INFERENCE_MODEL_MAX_QUEUE": "256",
           "INFERENCE_MODEL_CACHE_DIR": str(args.cache_dir)}  # bench.run's ours-onnx, access log included
    spec = ServerSpec(name, VARIANTS[name], env, "/v1/predict", tuple(args.payloads), "/readyz", sessions=True,
                      data_dir=data_dir)
    print(f"[{name}] starting (the first start exports the model, ~20 s) ...", flush=True)
    server = start_server(spec, work)
    rows = []
    try:
        tokens = loadgen.create_tokens(server.base_url, max(args.concurrency), work / f"{name}.tokens")
        for image, path in images.items():
            bodies = loadgen.make_bodies(path, work)
            for payload in spec.payloads:
                for concurrency in args.concurrency:
                    row = measure(server, bodies[payload], concurrency, tokens, args.warmup, args.duration)
                    # The in-process pipeline right after, with the server idle: the machine's speed drifts.
                    inprocess = inprocess_rows([path], work / "unused.onnx", args.cache_dir, 2, 1, 3.0,
                                               "--fast-only", "--warmup", "0.5", timeout=300)[0]
                    row.update(server=name, image=image, payload=payload, concurrency=concurrency,
                               inprocess=inprocess)
                    rows.append(row)
                    print_row(row)
    finally:
        stop_server(server)
    return rows


def print_row(row: Row) -> None:
    inprocess = row["inprocess"]
    total = row["cpu_ms_per_image_total"]
    print(f"\n{row['server']} {row['image']} {row['payload']} c{row['concurrency']}: {row['img_s']:.1f} img/s "
          f"(in-process right after: {inprocess['img_s']:.1f}, ratio {row['img_s'] / inprocess['img_s']:.2f}), "
          f"errors {row['errors']}")
    for role, ms in row["cpu_ms_per_image"].items():
        print(f"    {role:<54} {ms:6.2f} ms CPU per image  {ms / total:6.1%}")
    print(f"    {'total':<54} {total:6.2f}")
    print(f"    {'in-process pipeline right after (2 threads x 1)':<54} {inprocess['cpu_ms_per_image']:6.2f}")
    print(f"    ceiling: the runner threads get {row['runner_share']:.1%} of all CPU in the window, so with the "
          f"pipeline costing what it does in-process the server reaches at most {row['runner_share']:.2f} "
          f"of the limit", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cpu-split-") as tmp:
        work = Path(tmp)
        images = {"coffee": COFFEE} if "coffee" in args.images else {}
        if "12mp" in args.images:
            images["cat_12mp"] = make_images(work)["cat_12mp"]
        variants = ["ours-onnx", "free-store"] if args.free_store else ["ours-onnx"]
        rows = [row for name in variants for row in run_variant(name, images, args, work)]
    out = args.out / "cpu_split.json"
    out.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
