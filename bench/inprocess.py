"""The in-process limit: images/s with no HTTP, for one thread layout per process.

Run as a subprocess by bench.run (torch's thread count is process-wide, so each layout gets a fresh
process):  python -m bench.inprocess --threads 2 --intra 1 --onnx m.onnx --duration 5 IMAGE...
It prints one JSON list of rows on stdout.
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
from pathlib import Path
from typing import Any

from bench import pipelines

Work = Callable[[], Any]


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
    way the server does; nothing on a checkout that predates them."""
    try:
        from server.config import load_config
        from server.malloc import keep_freed_memory
    except ImportError:
        return
    keep_freed_memory(load_config().server.malloc_keep_mb)


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def onnx_runtime(onnx_path: Path, intra: int, cache_dir: Path | None) -> tuple[pipelines.Forward, str]:
    """The server's own OnnxBackend when the repo has one (its export, its session options);
    otherwise an ONNX Runtime session on the benchmark's own export."""
    if cache_dir is not None:
        try:
            from inference.model import OnnxBackend, load_exported

            _, path = load_exported(pipelines.MODEL_NAME, "default", cache_dir)
            backend = OnnxBackend(path, intra_op_threads=intra)
            return backend.forward, "inference.model.OnnxBackend"
        except (ImportError, TypeError) as exc:
            print(f"OnnxBackend unusable ({exc}); using the benchmark's own export", file=sys.stderr)
    return pipelines.onnx_forward(onnx_path, intra), "bench export (TorchScript exporter, opset 17)"


def workloads(images: list[Path], onnx_path: Path, intra: int, cache_dir: Path | None,
              fast_only: bool = False) -> tuple[dict[tuple[str, str], Work], str]:
    """(pipeline, image) -> a zero-argument callable doing one image end to end; and the ONNX source.
    `fast_only`: just the fast pipeline per image (no torch import: a quick re-measure of the limit)."""
    import numpy as np

    onnx_fw, onnx_source = onnx_runtime(onnx_path, intra, cache_dir)
    work: dict[tuple[str, str], Work] = {}
    if not fast_only:
        import torch

        torch.set_num_threads(intra)
        transform = pipelines.seed_transform()
        torch_fw = pipelines.torch_forward(pipelines.load_torch_module())
        zeros = np.zeros((1, 3, 224, 224), dtype=np.float32)
        work[("forward-torch", "-")] = lambda: torch_fw(zeros)
        work[("forward-onnx", "-")] = lambda: onnx_fw(zeros)
    for path in images:
        data = path.read_bytes()
        if not fast_only:
            work[("seed", path.stem)] = lambda d=data: torch_fw(pipelines.seed_preprocess(d, transform)[None])
        work[("fast", path.stem)] = lambda d=data: onnx_fw(pipelines.fast_preprocess(d)[None])
    return work, onnx_source


PIPELINE_LABELS = {
    "seed": "seed: PIL full decode + torchvision + torch eager",
    "fast": "fast: draft decode preprocess + ONNX Runtime",
    "forward-torch": "forward only: torch eager",
    "forward-onnx": "forward only: ONNX Runtime",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--onnx", type=Path, required=True, help="fallback model when the server has no OnnxBackend")
    parser.add_argument("--cache-dir", type=Path, help="OnnxBackend's export cache (omit: always use --onnx)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intra", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--fast-only", action="store_true", help="only the fast pipeline (no torch)")
    args = parser.parse_args(argv)
    server_process_settings()
    rows = []
    work_items, onnx_source = workloads(args.images, args.onnx, args.intra, args.cache_dir, args.fast_only)
    for (pipeline, image), work in work_items.items():
        stats = measure(work, args.threads, args.duration, args.warmup)
        rows.append({"pipeline": pipeline, "label": PIPELINE_LABELS[pipeline], "image": image,
                     "threads": args.threads, "intra_op_threads": args.intra, **stats,
                     "onnx_model": onnx_source if pipeline in ("fast", "forward-onnx") else None})
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
