"""What a loaded model costs a serving process: resident memory before and after its runtime is built and
has run, and after it is released (models.max_loaded).

    .venv/bin/python -m bench.model_memory [--out bench/results/model-memory-<cpu>.json]

Each model is exported first (in the model cache, as a server's first start does), then measured in a fresh
torch-free child process, one model per child, so that what one model leaves behind cannot count for
another: RSS (from /proc/self/status) after the export's manifest is read, after the runtime is built and
one forward at the model's default crop ran (the first forward allocates the runtime's buffers), and after
the backend is released and garbage-collected. The runtime and the thread layout are config.toml's, chosen
for this CPU as a server chooses them. The models: `[model]`'s efficientnet_lite0, and a 5-class
squeezenet1_1 made as tests/model_folders.py makes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match[1]) / 1024 if match else float("nan")


def measure(repository: str, name: str, cache_dir: str) -> dict[str, Any]:
    """In this (fresh) process: the model `name` built, run once and released; RSS at each step (MB)."""
    import numpy as np

    from inference.loading import LoadedBackends
    from server.config import load_config
    from server.runtime import build_served

    config = load_config(env={"INFERENCE_MODELS_REPOSITORY_DIR": repository, "INFERENCE_MODEL_CACHE_DIR": cache_dir,
                              "INFERENCE_MODEL_PRECISION": "fp32"})
    spec = config.model_specs()[name]
    loaded = LoadedBackends(config.models.max_loaded)
    served = build_served(config, spec, loaded)
    gc.collect()
    before = rss_mb()
    side = spec.defaults.crop
    batch = np.zeros((1, 3, side, side), dtype=np.float32)
    served.backend.forward(batch)
    built = rss_mb()
    assert "torch" not in sys.modules, "a serving process stays torch-free"
    served.backend.release()  # type: ignore[attr-defined]  # a LazyBackend, as every served model's is
    gc.collect()
    released = rss_mb()
    return {"model": name, "runtime": served.backend.name, "precision": served.backend.precision,
            "classes": len(served.model.labels), "workers": config.model.workers,
            "idle_intra_op_threads": config.model.idle_intra_op_threads,
            "rss_before_mb": round(before, 1), "rss_loaded_mb": round(built, 1), "rss_released_mb": round(released, 1),
            "loaded_cost_mb": round(built - before, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("REPOSITORY", "NAME", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return 0
    from inference.selection import cpu_model
    from server.config import load_config
    from server.runtime import prepare_models
    from tests.model_folders import squeezenet_folder

    cpu, _ = cpu_model()
    with tempfile.TemporaryDirectory(prefix="model-memory-") as scratch:
        repository, cache = Path(scratch) / "models", Path(scratch) / "cache"
        squeezenet_folder(repository / "shapes", ["circle", "square", "star", "triangle", "cross"])
        config = load_config(env={"INFERENCE_MODELS_REPOSITORY_DIR": str(repository),
                                  "INFERENCE_MODEL_CACHE_DIR": str(cache), "INFERENCE_MODEL_PRECISION": "fp32"})
        prepare_models(config, config.model_specs())
        rows = []
        for name in config.model_specs():
            done = subprocess.run([sys.executable, "-m", "bench.model_memory", "--child", str(repository), name,
                                   str(cache)], cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"cpu": cpu, "models": rows}
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    out = args.out or ROOT / "bench" / "results" / f"model-memory-{slug}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']}: {row['runtime']} {row['precision']}, +{row['loaded_cost_mb']} MB loaded "
              f"({row['rss_before_mb']} -> {row['rss_loaded_mb']} MB, {row['rss_released_mb']} MB released)")
    print(f"{cpu}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
