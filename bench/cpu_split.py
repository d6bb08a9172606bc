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
edges; then the server's own pipeline (its decoder and the runtime it serves on) runs in-process
(2 threads x 1 intra-op thread, 3 s).

With py-spy installed (`pip install py-spy`; `--no-profile` turns it off), py-spy samples the serving
processes' Python threads during the window from its own process (it never stops them), and each
thread's measured CPU is split in proportion to its on-CPU samples by what the stack was doing:
in the event loops HTTP parse and write, auth and token checks, the Redis client, JSON, logging,
metrics, the hand-off to the runner and the asyncio loop itself; in the runner threads decode and
resize/crop against forward. CPU of threads py-spy cannot see (a runtime's own native threads) is
shown as such, and py-spy's own CPU as a row of its own. At c16 the server is saturated, so this is
the cost per request at the highest rate it reaches, next to the in-process limit.

`--free-store` also runs `bench.free_store`: the same server with both per-predict Redis calls
answered from memory, to show what the server would reach if they cost nothing.
Writes bench/results/cpu_split.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen, pipelines
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
PROFILER = "profiler (py-spy, its own process)"
ROLES = (RUNNER_THREADS, EVENT_LOOPS, SUPERVISOR, REDIS, LOAD_GENERATOR)

# What a sampled stack was doing: the first frame from the leaf whose file matches a part, in this
# order per role (so JSON encoding inside the session store counts as JSON, a hash inside the token
# check as auth). Paths as py-spy prints them: relative to their sys.path entry.
EVENT_LOOP_PARTS = (
    ("logging", ("/logging/",)),
    ("JSON encode/decode", ("/json/",)),
    ("metrics (prometheus_client)", ("/prometheus_client/", "/server/observability.py")),
    ("Redis round trips (redis-py client, session store)", ("/redis/", "/sessions/store.py",
                                                          "/sessions/model_registry.py")),
    ("auth / token verify", ("/sessions/tokens.py", "/service/auth.py")),
    ("HTTP parse and write (Tornado, handlers)", ("/tornado/", "/handlers/", "/multipart")),
    ("hand-off to the runner", ("/inference/runner.py", "/inference/batching.py", "/concurrent/futures/")),
    ("use case (service/)", ("/service/",)),
    # redis-py reads and writes through asyncio's streams; the runner's results wake the loop through its
    # self-pipe (call_soon_threadsafe): both are socket work inside asyncio's own files.
    ("asyncio socket I/O (Redis client's streams, wake-ups from the runner)",
     ("/asyncio/selector_events.py", "/asyncio/streams.py")),
    ("asyncio loop (scheduling, epoll)", ("/asyncio/", "/selectors.py")),
)
RUNNER_PARTS = (
    ("decode + resize/crop", ("/inference/imaging.py", "/PIL/", "/simplejpeg")),
    ("forward", ("/inference/model.py", "/inference/backends/", "/inference/pixels.py",
                 "/onnxruntime/", "/openvino/")),
    ("runner queue and futures", ("/inference/runner.py", "/inference/batching.py", "/concurrent/futures/",
                                  "/threading.py", "/queue.py")),
)
OTHER = "other"
IDLE = "idle"
# Leaf frames of a thread that waits (py-spy samples some waits as running): their samples carry no CPU.
WAITS = (("/selectors.py", "select"), ("/threading.py", "wait"), ("/queue.py", "get"))
UNSAMPLED_NATIVE = "native threads of the runtime (forward; no Python frame)"
UNSAMPLED = "no sample (too little CPU to catch)"

VARIANTS = {
    "ours": [PYTHON, "-m", "server", "--port", "{port}"],
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
    parser.add_argument("--no-profile", action="store_true", help="no py-spy split of the event loops and runners")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--cache-dir", type=Path, default=onnx_cache_dir(load_config()),
                        help="the exported model's cache (default: the one `python -m server` uses)")
    parser.add_argument("--runtime", default="auto",
                        help="model.runtime of the server (default auto, as config.toml; or onnxruntime, openvino)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def cpu_by_role(server: RunningServer, wrk: psutil.Process, profiler: psutil.Process | None = None, *,
                threads_out: dict[int, tuple[str, float]] | None = None) -> dict[str, float]:
    """CPU seconds so far of every thread of the server's tree, of its Redis, of wrk and of the profiler,
    by role; `threads_out` gets each serving thread's (role, seconds) by thread id."""
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
                role = REDIS
            elif thread.id != proc.pid:
                role = RUNNER_THREADS
            else:
                role = SUPERVISOR if proc.pid == root and supervised else EVENT_LOOPS
            totals[role] += seconds
            if threads_out is not None and role in (RUNNER_THREADS, EVENT_LOOPS):
                threads_out[thread.id] = (role, seconds)
    for role, proc in ((LOAD_GENERATOR, wrk), (PROFILER, profiler)):
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                totals[role] = times.user + times.system
    return totals


def start_profiler(server: RunningServer, rate: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording the server's process tree for `seconds` (raw collapsed stacks, per thread),
    from its own process and without pausing the server; None where py-spy is not installed."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PYTHON).parent))
    if spy is None:
        return None
    command = [spy, "record", "--pid", str(server.process.pid), "--subprocesses", "--nonblocking", "--threads",
               "--rate", str(rate), "--duration", str(max(1, round(seconds))), "--format", "raw", "--output",
               str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def classify(frames: list[str], parts: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """The part the first frame from the leaf belongs to ("func (path:line)" as py-spy writes it); IDLE
    where the leaf is a wait."""
    leaf = frames[-1] if frames else ""
    if any(path in leaf and f"{function} (" in leaf for path, function in WAITS):
        return IDLE
    for frame in reversed(frames):
        path = "/" + frame.rsplit(" (", 1)[-1]
        for name, fragments in parts:
            if any(fragment in path for fragment in fragments):
                return name
    return OTHER


def samples_by_thread(raw: Path) -> dict[int, Counter[tuple[str, str]]]:
    """Thread id (the OS's, as psutil has it) -> Counter of what its on-CPU samples were doing, as
    (event loop part, runner part): which applies follows from the thread's role."""
    found: dict[int, Counter[tuple[str, str]]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        match = re.search(r"thread \((\d+)\)", stack)
        if not match or not count.isdigit():
            continue
        frames = stack.split(";")
        parts = classify(frames, EVENT_LOOP_PARTS), classify(frames, RUNNER_PARTS)
        found.setdefault(int(match.group(1)), Counter())[parts] += int(count)
    return found


def split_by_part(threads_before: dict[int, tuple[str, float]], threads_after: dict[int, tuple[str, float]],
                  samples: dict[int, Counter[tuple[str, str]]], images: int) -> dict[str, dict[str, float]]:
    """Role -> part -> ms of CPU per image: each thread's measured CPU in the window, split by its samples."""
    split: dict[str, dict[str, float]] = {EVENT_LOOPS: {}, RUNNER_THREADS: {}}
    for tid, (role, seconds) in threads_after.items():
        spent = (seconds - threads_before.get(tid, (role, 0.0))[1]) * 1000 / images
        counts = samples.get(tid)
        if not counts:
            part = UNSAMPLED_NATIVE if role == RUNNER_THREADS else UNSAMPLED
            split[role][part] = split[role].get(part, 0.0) + spent
            continue
        busy = Counter({parts: n for parts, n in counts.items() if IDLE not in parts}) or counts
        total = sum(busy.values())
        for (event_part, runner_part), n in busy.items():
            part = event_part if role == EVENT_LOOPS else runner_part
            split[role][part] = split[role].get(part, 0.0) + spent * n / total
    return {role: dict(sorted(parts.items(), key=lambda item: -item[1])) for role, parts in split.items()}


def measure(server: RunningServer, body: loadgen.Body, concurrency: int, tokens: Path,
            warmup: float, duration: float, profile_rate: int | None = None, work: Path | None = None) -> Row:
    """One wrk point with the CPU of each role read at the measured window's edges; with `profile_rate`,
    py-spy samples the window and the event loops' and runners' CPU is split by what they were doing."""
    wait_idle(server)
    process, window = loadgen.start_wrk(server.base_url, "/v1/predict", body, concurrency, warmup, duration, tokens)
    threads_before: dict[int, tuple[str, float]] = {}
    threads_after: dict[int, tuple[str, float]] = {}
    try:
        wrk = psutil.Process(process.pid)
        sleep_until(window.start)
        before = cpu_by_role(server, wrk, threads_out=threads_before)
        sleep_until(window.end)
        after = cpu_by_role(server, wrk, threads_out=threads_after)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    result = loadgen.finish_wrk(process, timeout=warmup + duration + 60)
    ok = int(result["ok"])
    per_image = {role: (after[role] - before[role]) * 1000 / ok if ok else float("nan") for role in ROLES}
    total = sum(per_image.values())
    row: Row = {"img_s": ok / result["window_s"], "p50_ms": result["p50_ms"], "errors": result["bad_status"],
                "cpu_ms_per_image": per_image, "cpu_ms_per_image_total": total,
                "runner_share": per_image[RUNNER_THREADS] / total if ok else float("nan")}
    if profile_rate and ok:
        # A second window of the same load, sampled by py-spy: its samples split the first (clean)
        # window's per-thread CPU, since py-spy itself takes CPU from the 2 cores the server runs on.
        samples, profiled = profile_window(server, body, concurrency, tokens, warmup, duration, profile_rate,
                                           work or Path("."))
        row["profiled_window"] = profiled
        if samples:
            row["cpu_ms_per_image_by_part"] = split_by_part(threads_before, threads_after, samples, ok)
            row["profile_samples"] = sum(sum(c.values()) for c in samples.values())
        else:
            row["profile_error"] = profiled.get("error", "py-spy took no sample")
    return row


def profile_window(server: RunningServer, body: loadgen.Body, concurrency: int, tokens: Path, warmup: float,
                   duration: float, rate: int, work: Path) -> tuple[dict[int, Counter[tuple[str, str]]], Row]:
    """The same load again with py-spy sampling the window: (samples by thread, what that window cost)."""
    wait_idle(server)
    raw = work / f"py-spy-{time.monotonic_ns()}.txt"
    process, window = loadgen.start_wrk(server.base_url, "/v1/predict", body, concurrency, warmup, duration, tokens)
    spy = None
    try:
        wrk = psutil.Process(process.pid)
        sleep_until(window.start)
        spy = start_profiler(server, rate, duration, raw)
        profiler = psutil.Process(spy.pid) if spy else None
        before = cpu_by_role(server, wrk, profiler)
        sleep_until(window.end)
        after = cpu_by_role(server, wrk, profiler)
        if spy:
            spy.wait(timeout=duration + 30)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        if spy:
            spy.kill()
        raise
    result = loadgen.finish_wrk(process, timeout=warmup + duration + 60)
    ok = int(result["ok"])
    cost: Row = {"img_s": ok / result["window_s"],
                 "profiler_cpu_ms_per_image": (after[PROFILER] - before[PROFILER]) * 1000 / ok if ok else None}
    if spy is None:
        return {}, {**cost, "error": "py-spy is not installed (pip install py-spy)"}
    if not raw.is_file():
        return {}, {**cost, "error": f"py-spy wrote nothing (exit {spy.returncode}); it needs ptrace rights"}
    return samples_by_thread(raw), cost


def run_variant(name: str, images: dict[str, Path], args: argparse.Namespace, work: Path) -> list[Row]:
    data_dir = work / f"{name}-data"
    data_dir.mkdir()
    env = {"INFERENCE_SERVER_DATA_DIR": str(data_dir), "INFERENCE_REDIS_URL": "embedded",
           "INFERENCE_MODEL_RUNTIME": args.runtime, "INFERENCE_MODEL_MAX_QUEUE": "256",
           "INFERENCE_SESSIONS_LOGIN_RATE_LIMIT_PER_MINUTE": "0",  # one login per connection, all from 127.0.0.1
           "INFERENCE_MODEL_CACHE_DIR": str(args.cache_dir)}  # bench.run's ours, access log included
    spec = ServerSpec(name, VARIANTS[name], env, "/v1/predict", tuple(args.payloads), "/readyz", sessions=True,
                      data_dir=data_dir)
    print(f"[{name}] starting (the first start exports the model, ~20 s) ...", flush=True)
    server = start_server(spec, work)
    served = pipelines.served_runtime(args.cache_dir, args.runtime)  # e.g. "openvino fp32"
    pipeline = f"server+{served.replace(' ', '-')}" if args.runtime != "torch" else "seed+torch-fp32"
    print(f"[{name}] serving on {served}; the in-process pipeline after each point: {pipeline}", flush=True)
    rows = []
    try:
        tokens = loadgen.create_tokens(server.base_url, max(args.concurrency), work / f"{name}.tokens")
        for image, path in images.items():
            bodies = loadgen.make_bodies(path, work)
            for payload in spec.payloads:
                for concurrency in args.concurrency:
                    row = measure(server, bodies[payload], concurrency, tokens, args.warmup, args.duration,
                                  None if args.no_profile else args.profile_rate, work)
                    # The in-process pipeline right after, with the server idle: the machine's speed drifts.
                    inprocess = inprocess_rows([path], args.cache_dir, 2, 1, 3.0, "--only", pipeline,
                                               "--warmup", "0.5", timeout=300)[0]
                    row.update(server=name, runtime=served, image=image, payload=payload, concurrency=concurrency,
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
    for role, parts in row.get("cpu_ms_per_image_by_part", {}).items():
        spent = sum(parts.values())
        print(f"    {role} by part (py-spy, {row['profile_samples']} samples in a second window at "
              f"{row['profiled_window']['img_s']:.1f} img/s, py-spy itself "
              f"{row['profiled_window']['profiler_cpu_ms_per_image'] or 0:.2f} ms CPU per image):")
        for part, ms in parts.items():
            print(f"        {part:<72} {ms:6.2f} ms  {ms / spent if spent else 0:6.1%}")
    if "profile_error" in row:
        print(f"    no split by part: {row['profile_error']}")
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
        variants = ["ours", "free-store"] if args.free_store else ["ours"]
        rows = [row for name in variants for row in run_variant(name, images, args, work)]
    out = args.out / "cpu_split.json"
    out.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
