"""The in-process limit: images/s with no HTTP, for one thread layout per process.

Run as a subprocess by bench.run (torch's thread count is process-wide, so each layout gets a fresh
process):  python -m bench.inprocess --threads 2 --intra 1 --cache-dir DIR --duration 5 IMAGE...
It prints one JSON list of rows on stdout.

Every runtime this CPU offers (bench.pipelines.runtimes_here) runs end to end with the decoders
`pipelines.combinations` pairs it with, and forward only on a zero image. Each runtime is first held
to the accuracy guard the server applies (inference.selection.guard against the FP32 reference, on
the guard's photos and option sets): only pipelines whose runtime passes may set the limit, the
others are still measured and marked.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import pipelines
from bench.pipelines import Runtime

Work = Callable[[], Any]
Row = dict[str, Any]


def measure(work: Work, threads: int, duration: float, warmup: float) -> dict[str, float]:
    """Call `work` from `threads` threads for `duration` s (after `warmup` s); img/s, p50 latency, and
    the process's CPU per image inside the window (what one image costs when nothing else runs)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start_barrier = threading.Barrier(threads + 1)
    bounds: dict[str, float] = {}

    def loop(index: int) -> None:
        start_barrier.wait()
        while (now := time.perf_counter()) < bounds["end"]:
            work()
            if now >= bounds["start"]:
                latencies[index].append(time.perf_counter() - now)

    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    t0 = time.perf_counter()
    bounds.update(start=t0 + warmup, end=t0 + warmup + duration)
    start_barrier.wait()
    time.sleep(max(0.0, bounds["start"] - time.perf_counter()))
    cpu_start = _process_cpu_s()
    time.sleep(max(0.0, bounds["end"] - time.perf_counter()))
    cpu_s = _process_cpu_s() - cpu_start
    for thread in pool:
        thread.join(timeout=warmup + duration + 120)
    flat = [x for per_thread in latencies for x in per_thread]
    return {
        "img_s": len(flat) / duration,
        "p50_ms": statistics.median(flat) * 1000 if flat else float("nan"),
        "count": len(flat),
        "cpu_ms_per_image": cpu_s * 1000 / len(flat) if flat else float("nan"),
    }


def server_process_settings() -> None:
    """The server's own process settings (server.malloc), so that the limit runs the pipeline the
    way the server does."""
    from server.config import load_config
    from server.malloc import keep_freed_memory

    keep_freed_memory(load_config().server.malloc_keep_mb)


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Workload:
    pipeline: str  # "<decoder>+<runtime key>", or "forward+<runtime key>"
    decoder: str | None  # None: forward only
    runtime: Runtime
    image: str  # the image's stem, "-" for forward only
    work: Work


def pipeline_key(decoder: str | None, runtime: Runtime) -> str:
    return f"{decoder or 'forward'}+{runtime.key}"


def label(decoder: str | None, runtime: Runtime) -> str:
    if decoder is None:
        return f"forward only: {runtime.label}" + (" (uint8 input)" if runtime.takes_pixels else "")
    return f"{decoder} decode + {runtime.label}"


def workloads(images: list[Path], backends: dict[Runtime, Any], only: set[str] | None) -> list[Workload]:
    """Every (decoder, runtime) pipeline per image and every runtime forward only, narrowed to `only`
    (pipeline keys) when given."""
    import numpy as np

    found: list[Workload] = []
    for runtime, backend in backends.items():
        forward = backend.forward
        zeros = pipelines.zero_pixels() if runtime.takes_pixels else np.zeros((1, 3, 224, 224), dtype=np.float32)
        found.append(Workload(pipeline_key(None, runtime), None, runtime, "-", lambda f=forward, z=zeros: f(z)))
    decode: dict[str, Callable[[bytes], Any]] = {
        "pillow-float": lambda data: pipelines.pillow_float_preprocess(data)[None],
        "server": pipelines.server_prepare,
    }
    if any(runtime.runtime == "torch" for runtime in backends):
        transform = pipelines.seed_transform()
        decode["seed"] = lambda data: pipelines.seed_preprocess(data, transform)[None]
    for decoder, runtime in pipelines.combinations(list(backends)):
        forward = backends[runtime].forward
        for path in images:
            data = path.read_bytes()
            found.append(Workload(pipeline_key(decoder, runtime), decoder, runtime, path.stem,
                                  lambda f=forward, d=data, prep=decode[decoder]: f(prep(d))))
    return [w for w in found if only is None or w.pipeline in only]


def guard_runtimes(backends: dict[Runtime, Any], onnx_path: Path) -> dict[Runtime, Row]:
    """The server's accuracy guard on each runtime: every guard photo and option set against the FP32
    reference, within the tolerance for its precision."""
    from inference import selection

    cases = selection.guard_cases()
    reference = selection.reference_probabilities(onnx_path, cases)
    verdicts = {}
    for runtime, backend in backends.items():
        passed, worst = selection.guard(backend, cases, reference, selection.GUARD_TOLERANCE[runtime.precision])
        verdicts[runtime] = {"passed": passed, "tolerance": selection.GUARD_TOLERANCE[runtime.precision],
                             "worst": worst}
    return verdicts


def build_backends(runtimes: list[Runtime], onnx_path: Path, threads: int,
                   intra: int) -> tuple[dict[Runtime, Any], dict[Runtime, str]]:
    """The backends that build here, and why the others did not (a runtime missing or failing to compile)."""
    backends, errors = {}, {}
    for runtime in runtimes:
        try:
            backends[runtime] = pipelines.make_backend(runtime, onnx_path, threads=threads, intra=intra)
        except Exception as exc:  # reported as a row: the run goes on with the others
            errors[runtime] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            print(f"{runtime.label} unavailable: {errors[runtime]}", file=sys.stderr)
    return backends, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--cache-dir", type=Path, required=True, help="the server's export cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intra", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--only", nargs="+", help="just these pipelines (e.g. server+openvino-bf16), no guard")
    args = parser.parse_args(argv)
    server_process_settings()
    only = set(args.only) if args.only else None
    runtimes = pipelines.runtimes_here()
    if only is not None:
        runtimes = [r for r in runtimes if any(key.endswith(f"+{r.key}") for key in only)]
    onnx_path = pipelines.exported_model(args.cache_dir)
    backends, errors = build_backends(runtimes, onnx_path, args.threads, args.intra)
    verdicts = guard_runtimes(backends, onnx_path) if only is None else {}
    layout = {"threads": args.threads, "intra_op_threads": args.intra}
    rows: list[Row] = [{"pipeline": pipeline_key(None, runtime), "decoder": None, "runtime": runtime.key,
                        "label": label(None, runtime), "image": "-", **layout, "img_s": 0.0, "count": 0,
                        "p50_ms": None, "error": error} for runtime, error in errors.items()]
    for item in workloads(args.images, backends, only):
        stats = measure(item.work, args.threads, args.duration, args.warmup)
        rows.append({"pipeline": item.pipeline, "decoder": item.decoder, "runtime": item.runtime.key,
                     "label": label(item.decoder, item.runtime), "image": item.image, **layout, **stats,
                     "guard": verdicts.get(item.runtime)})
    print(json.dumps(rows, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
