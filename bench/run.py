"""One command for the whole benchmark:  .venv/bin/python -m bench.run [--quick] [--out bench/results]

In-process limit (subprocesses of bench.inprocess: every runtime x decoder on this machine, the best
one that passes the accuracy guard is the limit), then each server under test started in its own
process group, driven with wrk at each concurrency, stopped; then the WebSocket stream (bench.stream).
Writes results.json, results.md and chart.png into --out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, pipelines, report
from bench.servers import (
    PYTHON,
    REPO,
    RssSampler,
    RunningServer,
    ServerSpec,
    free_port,
    start_server,
    stop_server,
    wait_idle,
)

Row = dict[str, Any]
RESULTS_DIR = REPO / "bench" / "results"
COFFEE = REPO / "tests" / "data" / "coffee.jpg"
CAT = REPO / "tests" / "data" / "cat.jpg"


DEFAULT_CONCURRENCIES = (1, 4, 16, 64)
DEFAULT_SERVERS = ("ours", "ours-matched", "ours-torch", "ours-oip", "flask", "litserve-torch", "litserve-best")


@dataclass
class Settings:
    duration: float
    warmup: float
    concurrencies: list[int]
    servers: list[str]
    redis_url: str | None
    quick: bool
    stream: bool
    inprocess_duration: float

    @property
    def full(self) -> bool:
        """The run RESULTS.md is generated from: every default, nothing shortened or left out."""
        return (not self.quick and self.stream and self.duration == 10.0 and self.warmup == 3.0
                and self.inprocess_duration == 5.0 and self.concurrencies == list(DEFAULT_CONCURRENCIES)
                and self.servers == list(DEFAULT_SERVERS))


# ---------------------------------------------------------------- setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: ~3 s points, no ours-torch row")
    parser.add_argument("--redis-url", help="Redis for our server (default: its embedded Redis)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (default 10, --quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per point (default 3, --quick 1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCIES))
    parser.add_argument("--servers", nargs="+", help="subset of: ours ours-torch ours-oip flask litserve-torch "
                        "litserve-best, or (not in the default set) ours-onnx, litserve-onnx and the layouts "
                        "ours-onnx-1proc and ours-onnx-2x1 "
                        "(default: all; --quick drops ours-torch). ours: the default config (model.runtime = "
                        "auto); litserve-best: LitServe on the runtime of the best in-process pipeline; ours-oip: "
                        "the Open Inference Protocol, REST binary (wrk) and gRPC (bench.grpc_load), compared "
                        "with ours' raw /v1/predict")
    parser.add_argument("--no-stream", action="store_true", help="skip the WebSocket stream (bench.stream)")
    parser.add_argument("--inprocess-duration", type=float, help="seconds per in-process measurement (default 5, "
                        "--quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where run-<date>-<cpu>.json (a full run, "
                        "committed) or smoke-<date>-<cpu>.json (any other, git-ignored) and its .md and .png go")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    default_servers = list(DEFAULT_SERVERS)
    if args.quick:
        default_servers.remove("ours-torch")
    return Settings(
        duration=args.duration or (3.0 if args.quick else 10.0),
        warmup=args.warmup or (1.0 if args.quick else 3.0),
        concurrencies=sorted(set(args.concurrency)),
        servers=args.servers or default_servers,
        redis_url=args.redis_url,
        quick=args.quick,
        stream=not args.no_stream,
        inprocess_duration=args.inprocess_duration or (2.0 if args.quick else 5.0),
    )


def make_images(work: Path) -> dict[str, Path]:
    """coffee.jpg as is, and a 12 MP (4032x3024) JPEG made from cat.jpg (upscaled + light noise, q90)."""
    import numpy as np
    from PIL import Image

    big = work / "cat_12mp.jpg"
    pixels = np.asarray(Image.open(CAT).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC), np.int16)
    # Upscaling alone gives a smooth ~0.8 MB file; grain like a real photo's brings it to ~3.6 MB.
    noise = np.random.default_rng(0).normal(0.0, 9.0, pixels.shape)
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(big, quality=90)
    return {"coffee": COFFEE, "cat_12mp": big}


def describe(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return f"{image.size[0]}x{image.size[1]} JPEG, {path.stat().st_size / 1e6:.2f} MB"


def lscpu_model() -> str:
    """lscpu's "Model name" line (what RESULTS.md names the machine by); /proc/cpuinfo without lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    from inference.selection import cpu_model

    return cpu_model()[0]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return (out.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def machine_info(load_generator: str, date: str) -> Row:
    from inference.selection import cpu_model, has_bf16

    cpu = lscpu_model()
    flags = cpu_model()[1]

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"cpu_model": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "bf16": has_bf16(flags), "amx": "amx_bf16" in flags,
            "date": date, "commit": git_commit(),
            "platform": platform.platform(), "torch": version("torch"), "onnxruntime": version("onnxruntime"),
            "openvino": version("openvino"), "simplejpeg": version("simplejpeg"),
            "litserve": version("litserve"), "flask": version("flask"), "tornado": version("tornado"),
            "load_generator": load_generator}


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).splitlines()[0].strip()


# ---------------------------------------------------------------- in-process limit


def export_model(cache_dir: Path) -> Path:
    """The server's own export of the default model, into the cache every run of this harness shares
    (in-process, our servers, the LitServe peers); a child process does the torch part."""
    return pipelines.exported_model(cache_dir)


THREAD_LAYOUTS = ((2, 1), (1, 2))  # (Python threads, intra-op threads) of the in-process limit


def inprocess_rows(images: list[Path], cache_dir: Path, threads: int, intra: int, duration: float,
                   *options: str, timeout: float = 1800) -> list[Row]:
    """One `bench.inprocess` subprocess (one thread layout per process: torch's is process-wide)."""
    command = [PYTHON, "-m", "bench.inprocess", "--cache-dir", str(cache_dir),
               "--threads", str(threads), "--intra", str(intra), "--duration", str(duration), *options,
               *map(str, images)]
    out = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_inprocess(images: dict[str, Path], cache_dir: Path, duration: float) -> list[Row]:
    rows: list[Row] = []
    for threads, intra in THREAD_LAYOUTS:
        print(f"[in-process] {threads} thread(s) x {intra} intra-op: every runtime x decoder, forward only ...",
              flush=True)
        rows += inprocess_rows(list(images.values()), cache_dir, threads, intra, duration)
    for row in rows:
        print(f"    {row['label']:<72} {row['image']:<9} {row['threads']}x{row['intra_op_threads']} "
              f"{row['img_s']:7.1f} img/s  p50 {report.fmt(row['p50_ms']):>6} ms  {report.guard_mark(row)}",
              flush=True)
    return rows


# The limit measured again right after each of our server's points that a target compares with it:
# this machine's speed drifts by 10-20 % within minutes (two identical runs a minute apart: 98 and
# 82 img/s), so a ratio to a limit measured once at the start measures the drift as much as the server.
PAIRED_CONCURRENCIES = (1, 4, 16)
PAIRED_DURATION_S = 3.0


def paired_limit(image: Path, cache_dir: Path, best: dict[str, Row]) -> Row:
    """The pipeline that set `image`'s limit at the start, on `image` in both thread layouts, now: the
    best img/s and the lowest p50."""
    pipeline = best[image.stem]["pipeline"]
    rows = [row for threads, intra in THREAD_LAYOUTS
            for row in inprocess_rows([image], cache_dir, threads, intra, PAIRED_DURATION_S,
                                      "--only", pipeline, "--warmup", "0.5", timeout=300)]
    return {"img_s": max(r["img_s"] for r in rows), "p50_ms": min(r["p50_ms"] for r in rows), "pipeline": pipeline,
            "layouts": {f"{r['threads']}x{r['intra_op_threads']}": round(r["img_s"], 1) for r in rows}}


# ---------------------------------------------------------------- servers


# Our server as config.toml sets it up (ours-onnx: one process per core), and the layouts it is
# compared with: threads in one process (the layout torch uses), and fewer threads per process.
OUR_VARIANTS: dict[str, dict[str, str]] = {
    "ours-onnx-1proc": {"INFERENCE_SERVER_PROCESSES": "1"},
    "ours-onnx-2x1": {"INFERENCE_SERVER_PROCESSES": "2", "INFERENCE_MODEL_WORKERS": "1"},
}


def layout(processes: int, runner_threads: int | str, intra_op_threads: int | str) -> Row:
    """A server's thread layout: processes x runner threads per process (requests computed at once in
    each) x intra-op threads per forward."""
    return {"processes": processes, "runner_threads": runner_threads, "intra_op_threads": intra_op_threads}


# The thread layout of every server in a serving comparison (ours-matched, litserve-best, litserve-torch):
# one process per core, one request at a time in each, one intra-op thread. It is the layout LitServe can
# run (its workers are processes, each serving one request at a time) and the server can be set to.
SERVING_LAYOUT = layout(len(os.sched_getaffinity(0)), 1, 1)
FLASK_LAYOUT = layout(1, "a thread per request", "torch's default")  # the seed app as it is


def our_layout(env: dict[str, str]) -> Row:
    """The thread layout our server runs with under `env` (config.toml plus these overrides)."""
    from server.config import load_config

    config = load_config(env={**os.environ, **env})
    return layout(config.serving_processes, config.model.workers, config.model.intra_op_threads)


def pipeline(decoder: str, runtime: str, precision: str) -> Row:
    return {"decoder": decoder, "runtime": runtime, "precision": precision}


def payloads_for(name: str) -> tuple[str, ...]:
    if name == "ours-oip":
        return ("oip-rest", "oip-grpc")
    if name == report.MATCHED or not name.startswith("ours"):
        return ("multipart",)  # the peers' body: the serving comparisons drive multipart only
    return report.OUR_PAYLOADS


def our_runtime(name: str, best_runtime: pipelines.Runtime) -> str:
    """model.runtime of one of our rows: ours and ours-oip run the default (auto); ours-matched the runtime
    litserve-best runs."""
    if name == "ours-torch":
        return "torch"
    if name == report.MATCHED:
        return best_runtime.runtime
    return "onnxruntime" if name.startswith("ours-onnx") else "auto"


def server_spec(name: str, settings: Settings, work: Path, best_runtime: pipelines.Runtime) -> ServerSpec:
    if name == "ours" or name.startswith("ours-"):
        data_dir = work / f"{name}-data"
        data_dir.mkdir(exist_ok=True)
        env = {"INFERENCE_SERVER_DATA_DIR": str(data_dir),
               "INFERENCE_REDIS_URL": settings.redis_url or "embedded",
               "INFERENCE_MODEL_RUNTIME": our_runtime(name, best_runtime),
               "INFERENCE_MODEL_MAX_QUEUE": str(MAX_QUEUE),
               # One session per connection: up to 64 logins from 127.0.0.1 at once, over the per-address limit.
               "INFERENCE_SESSIONS_LOGIN_RATE_LIMIT_PER_MINUTE": "0",
               "INFERENCE_MODEL_CACHE_DIR": str(work / "model-cache")}  # reuse the in-process run's export
        env.update(OUR_VARIANTS.get(name, {}))
        if name == report.MATCHED:  # litserve-best's pipeline in SERVING_LAYOUT, no wider lone forwards
            env.update({"INFERENCE_MODEL_PRECISION": best_runtime.precision,
                        "INFERENCE_SERVER_PROCESSES": str(SERVING_LAYOUT["processes"]),
                        "INFERENCE_MODEL_WORKERS": str(SERVING_LAYOUT["runner_threads"]),
                        "INFERENCE_MODEL_INTRA_OP_THREADS": str(SERVING_LAYOUT["intra_op_threads"]),
                        "INFERENCE_MODEL_IDLE_INTRA_OP_THREADS": "0"})
        grpc_port = None
        if name == "ours-oip":  # the ours configuration, driven over the Open Inference Protocol
            grpc_port = free_port()
            env["INFERENCE_GRPC_PORT"] = str(grpc_port)
        return ServerSpec(name, [PYTHON, "-m", "server", "--port", "{port}"], env, "/v1/predict", payloads_for(name),
                          "/readyz", sessions=True, data_dir=data_dir, grpc_port=grpc_port, layout=our_layout(env))
    if name == "flask":
        return ServerSpec(name, [PYTHON, "-m", "bench.peers.flask_app", "--port", "{port}"], {}, "/predict",
                          payloads_for(name), None, layout=FLASK_LAYOUT, pipeline=pipeline("seed", "torch", "fp32"))
    # litserve-torch: the seed pipeline on torch eager; litserve-onnx: the seed decode on ONNX Runtime;
    # litserve-best: the server's decode on the runtime of the best in-process pipeline.
    runtime, decoder = {"litserve-torch": (pipelines.TORCH, "seed"), "litserve-onnx": (pipelines.ONNXRUNTIME, "seed"),
                        "litserve-best": (best_runtime, "server" if best_runtime.takes_pixels else "seed")}[name]
    return ServerSpec(name, [PYTHON, "-m", "bench.peers.litserve_app", "--port", "{port}", "--runtime",
                             runtime.runtime, "--precision", runtime.precision, "--decoder", decoder,
                             "--workers", str(SERVING_LAYOUT["processes"]), "--cache-dir", str(work / "model-cache")],
                      {}, "/predict", payloads_for(name), "/health", layout=SERVING_LAYOUT,
                      pipeline=pipeline(decoder, runtime.runtime, runtime.precision))


MAX_QUEUE = 256  # model.max_queue of our rows: the concurrencies measured stay below it


def ready_line(server: RunningServer) -> str | None:
    match = re.search(r"ready on .*", server.log_tail(20000))
    return match.group(0) if match else None


class RedisStats:
    """INFO commandstats of the Redis our server uses (embedded: the unix socket in its data dir)."""

    def __init__(self, url: str | None, data_dir: Path) -> None:
        import redis

        if url and url != "embedded":
            self.client = redis.Redis.from_url(url)
        else:
            self.client = redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock"))
        self.client.ping()

    def snapshot(self) -> dict[str, int]:
        """Calls per command, plus `_reads`: INFO stats total_reads_processed (client read events)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.info("commandstats")
        pipe.info("stats")
        commandstats, stats = pipe.execute()
        calls = {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in commandstats.items()}
        calls["_reads"] = int(stats.get("total_reads_processed", -1))
        return calls

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Commands run between two snapshots (our own INFO excluded); `_reads` less our own one read."""
        diff = {cmd: after[cmd] - before.get(cmd, 0) for cmd in after if cmd not in ("info", "_reads")}
        result = {cmd: n for cmd, n in diff.items() if n > 0}
        if after["_reads"] >= 0:
            result["_reads"] = after["_reads"] - before["_reads"] - 1
        return result


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def measure_point(server: RunningServer, body: loadgen.Body, concurrency: int, settings: Settings,
                  tokens: Path | None, redis_stats: RedisStats | None) -> Row:
    drained = wait_idle(server)
    with RssSampler(server) as rss:
        if body.grpc:
            process, window = loadgen.start_grpc_load(f"127.0.0.1:{server.spec.grpc_port}", body, concurrency,
                                                      settings.warmup, settings.duration, tokens)
        else:
            process, window = loadgen.start_wrk(server.base_url, server.spec.predict_path, body, concurrency,
                                                settings.warmup, settings.duration, tokens)
        try:
            sleep_until(window.start)
            before = redis_stats.snapshot() if redis_stats else None
            sleep_until(window.end)
            after = redis_stats.snapshot() if redis_stats else None
        except BaseException:
            process.kill()
            process.wait(timeout=10)
            raise
        result = loadgen.finish_wrk(process, timeout=settings.warmup + settings.duration + 60)
    socket_errors = sum(v for k, v in result["wrk_errors"].items() if k != "status")
    ok = int(result["ok"])
    row: Row = {
        "img_s": ok / result["window_s"], "ok": ok, "window_s": result["window_s"],
        "p50_ms": result["p50_ms"], "p95_ms": result["p95_ms"], "p99_ms": result["p99_ms"],
        "max_ms": result["max_ms"], "errors": int(result["bad_status"]) + socket_errors,
        "bad_status": result["bad_status"], "wrk_errors_whole_run": result["wrk_errors"],
        "peak_rss_mb": rss.peak / 2**20, "drain_wait_s": round(drained, 2),
    }
    if "client_cpu_pct" in result:  # the Python gRPC load client's own CPU, % of one core, in the window
        row["client_cpu_pct"] = result["client_cpu_pct"]
    if before is not None and after is not None:
        delta = RedisStats.delta(before, after)
        reads = delta.pop("_reads", None)
        row["redis_commands"] = delta
        row["redis_cmds_per_predict"] = sum(delta.values()) / ok if ok else None
        row["redis_reads_per_predict"] = reads / ok if ok and reads is not None else None
        row["redis_breakdown_per_predict"] = {k: round(v / ok, 3) for k, v in delta.items()} if ok else {}
    return row


def run_server(spec: ServerSpec, images: dict[str, Path], bodies: dict[str, dict[str, loadgen.Body]],
               settings: Settings, work: Path, progress: Iterator[str],
               limit_after: Callable[[Path], Row] | None = None) -> tuple[list[Row], Row]:
    """Start one server, measure all its points, stop it. Returns (points, info about the server).
    `limit_after`: re-measure the in-process limit after each point in PAIRED_CONCURRENCIES (the
    server idles meanwhile), for the ratios the targets use."""
    server = start_server(spec, work)
    try:
        info: Row = {"ready_line": ready_line(server), "port": server.port, "layout": spec.layout,
                     "pipeline": spec.pipeline}
        if "INFERENCE_MODEL_RUNTIME" in spec.env:  # ours: what it serves on (auto's choice for this CPU)
            info["runtime"] = pipelines.served_runtime(work / "model-cache", spec.env["INFERENCE_MODEL_RUNTIME"],
                                                       spec.env.get("INFERENCE_MODEL_PRECISION", "auto"))
            info["pipeline"] = pipeline("server", *info["runtime"].split())
        tokens = None
        if spec.sessions:
            tokens = loadgen.create_tokens(server.base_url, max(settings.concurrencies), work / f"{spec.name}.tokens")
        redis_stats = RedisStats(settings.redis_url, spec.data_dir) if spec.sessions and spec.data_dir else None
        points = []
        for image in images:
            for payload in spec.payloads:
                for c in settings.concurrencies:
                    label = next(progress)
                    print(f"{label} {spec.name} {image} {payload} c{c} ...", end=" ", flush=True)
                    row = measure_point(server, bodies[image][payload], c, settings, tokens, redis_stats)
                    row.update(server=spec.name, image=image, payload=payload, concurrency=c)
                    points.append(row)
                    redis = row.get("redis_cmds_per_predict")
                    print(f"{row['img_s']:.1f} img/s p50 {row['p50_ms']:.0f} p99 {row['p99_ms']:.0f} ms "
                          f"err {row['errors']} rss {row['peak_rss_mb']:.0f} MB"
                          + (f" redis {redis:.2f} cmd/pred, {row['redis_reads_per_predict'] or 0:.2f} reads/pred"
                             if redis is not None else "")
                          + (f" client cpu {row['client_cpu_pct']}%" if "client_cpu_pct" in row else ""), flush=True)
                    if limit_after is not None and c in PAIRED_CONCURRENCIES:
                        row["limit_after"] = limit_after(images[image])
                        print(f"    in-process limit right after: {row['limit_after']['img_s']:.1f} img/s, "
                              f"p50 {row['limit_after']['p50_ms']:.1f} ms", flush=True)
        info["peak_rss_mb"] = max((p["peak_rss_mb"] for p in points), default=None)
        return points, info
    finally:
        stop_server(server)


def litserve_importable() -> str | None:
    out = subprocess.run([PYTHON, "-c", "import litserve"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return None if out.returncode == 0 else out.stderr.strip().splitlines()[-1]


def count_points(settings: Settings, images: dict[str, Path]) -> int:
    return sum(len(payloads_for(name)) for name in settings.servers) * len(images) * len(settings.concurrencies)


def progress_labels(total: int) -> Iterator[str]:
    for i in range(1, 10_000):
        yield f"[{i}/{total}]"


def run_all_servers(settings: Settings, images: dict[str, Path], inprocess: list[Row], work: Path,
                    notes: list[str]) -> tuple[list[Row], Row]:
    bodies = {name: loadgen.make_bodies(path, work) for name, path in images.items()}
    limits = report.limits(inprocess)
    best = report.best_runtime(inprocess)
    progress = progress_labels(count_points(settings, images))
    points: list[Row] = []
    servers: Row = {}
    litserve_error = litserve_importable() if any(s.startswith("litserve") for s in settings.servers) else None
    for name in settings.servers:
        if name.startswith("litserve") and litserve_error:
            notes.append(f"{name} skipped: litserve cannot be imported ({litserve_error}).")
            print(f"skip {name}: {litserve_error}", flush=True)
            continue
        spec = server_spec(name, settings, work, best)
        limit_after = functools.partial(paired_limit, cache_dir=work / "model-cache", best=limits) \
            if name == report.PRIMARY else None
        try:
            got, info = run_server(spec, images, bodies, settings, work, progress, limit_after)
        except (RuntimeError, OSError, subprocess.SubprocessError, httpx.HTTPError) as exc:
            first = str(exc).splitlines()[0]
            notes.append(f"{name} failed: {first}")
            print(f"\n{name} FAILED: {exc}", flush=True)
            if name != report.PRIMARY:
                continue
            notes.append(f"{name} fell back to runtime=onnxruntime (as row '{name}').")
            spec.env["INFERENCE_MODEL_RUNTIME"] = "onnxruntime"
            got, info = run_server(spec, images, bodies, settings, work, progress, limit_after)
        if name == "litserve-best":
            info["runtime"] = f"{best.runtime} {best.precision}"
        points += got
        servers[name] = info
    served = servers.get(report.PRIMARY, {}).get("runtime")
    if served and served.replace(" ", "-") != best.key:
        notes.append(f"{report.PRIMARY} served on {served} (model.runtime = auto, which times forwards only), "
                     f"while the best in-process pipeline ran on {best.label}.")
    return points, servers


def run_stream(images: dict[str, Path], work: Path, quick: bool) -> Row | None:
    """bench.stream on the run's photos: one client, one WebSocket, 8 images in flight, against POST with
    the same client; our server on its default runtime with the run's export cache."""
    out = work / "stream"
    command = [PYTHON, "-m", "bench.stream", "--out", str(out), "--window", str(STREAM_WINDOW),
               "--cache-dir", str(work / "model-cache"), "--runtime", "auto",
               *(["--images", "40", "--rounds", "1"] if quick else []),
               *(arg for name, path in images.items() for arg in ("--photo", f"{name}={path}"))]
    print(f"[stream] one client, {STREAM_WINDOW} images in flight: WebSocket against POST ...", flush=True)
    try:
        subprocess.run(command, cwd=REPO, check=True, timeout=1800)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"stream FAILED: {exc}", flush=True)
        return None
    return json.loads((out / "stream.json").read_text())


STREAM_WINDOW = 8  # images in flight on the one WebSocket (the target's)


# ---------------------------------------------------------------- main


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt, so every finally: (server stop) runs."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def results_stem(full: bool, started: time.struct_time, cpu: str) -> str:
    """run-<UTC date and time>-<CPU>: a full run's results, committed; smoke-...: any other run's, ignored."""
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", cpu.lower())).strip("-")
    return f"{'run' if full else 'smoke'}-{time.strftime('%Y-%m-%d-%H%M', started)}-{slug or 'cpu'}"


def write_outputs(results: Row, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(results))
    try:
        report.chart(results, out / f"{stem}.png")
    except Exception as exc:  # the numbers matter more than the picture
        print(f"chart failed: {exc}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if not loadgen.wrk_available():
        print("error: wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    started = time.monotonic()
    started_utc = time.gmtime()
    notes: list[str] = []
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        images = make_images(work)
        print(f"images: {', '.join(f'{k} = {describe(v)}' for k, v in images.items())}", flush=True)
        export_model(work / "model-cache")
        inprocess = run_inprocess(images, work / "model-cache", settings.inprocess_duration)
        points, servers = run_all_servers(settings, images, inprocess, work, notes)
        stream = run_stream(images, work, settings.quick) if settings.stream else None
        if settings.stream and stream is None:
            notes.append("the WebSocket stream (bench.stream) failed; its target is not measured.")
        descriptions = {name: {"description": describe(path), "bytes": path.stat().st_size}
                        for name, path in images.items()}
    report.add_ratios(points, inprocess)
    cover = report.Coverage(tuple(images), tuple(settings.concurrencies))
    checks = report.verdict(points, inprocess, stream, cover, servers)
    others = report.other_checks(points, inprocess, cover)
    generator = f"{wrk_version()}, one thread per connection, Lua script bench/wrk/post_body.lua"
    machine = machine_info(generator, time.strftime("%Y-%m-%d %H:%M UTC", started_utc))
    results = {
        "machine": machine, "load_generator": generator, "guard": pipelines.guard_identity(),
        "settings": {"duration_s": settings.duration, "warmup_s": settings.warmup, "quick": settings.quick,
                     "full": settings.full, "inprocess_duration_s": settings.inprocess_duration,
                     "concurrencies": settings.concurrencies, "servers": settings.servers,
                     "redis_url": settings.redis_url or "embedded", "serving_layout": SERVING_LAYOUT},
        "images": descriptions, "inprocess": inprocess, "limits": report.limits(inprocess),
        "servers": servers, "points": points, "stream": stream, "verdict": checks, "other_checks": others,
        "notes": notes,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    path = write_outputs(results, args.out, results_stem(settings.full, started_utc, machine["cpu_model"]))
    print(f"\nTargets ({report.primary_server(points)}, {report.met(checks)}):\n{report.verdict_text(checks)}")
    print(f"\nOther checks:\n{report.verdict_text(others)}")
    for note in notes:
        print(f"note: {note}")
    print(f"\nwrote {path} and its .md and .png in {results['elapsed_s']:.0f} s")
    if settings.full:
        print(f"commit it, then regenerate bench/RESULTS.md: python -m bench.report {path} --markdown")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
