"""Load generation with wrk (and bench.grpc_load for gRPC): request bodies, session tokens, one measured point."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

LUA_SCRIPT = Path(__file__).parent / "wrk" / "post_body.lua"
BOUNDARY = "----benchboundary7MA4YWxkTrZu0gW"
OIP_PATH = "/v2/models/efficientnet_lite0/infer"
OIP_TOP_K = 5  # the classification extension's k: the same top-5 that /v1/predict answers by default


@dataclass(frozen=True)
class Body:
    payload: str  # "raw", "multipart", "oip-rest" (Open Inference Protocol, binary form) or "oip-grpc"
    path: Path
    content_type: str
    request_path: str | None = None  # the route, where it is not the server's predict path
    headers: tuple[tuple[str, str], ...] = ()
    grpc: bool = False  # driven by bench.grpc_load (ModelInfer with `path`'s bytes) instead of wrk


def make_bodies(image: Path, out_dir: Path) -> dict[str, Body]:
    """The raw JPEG body and a multipart body (field `image`, fixed boundary) for one image."""
    data = image.read_bytes()
    multipart = out_dir / f"{image.stem}.multipart"
    multipart.write_bytes(
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    # tritonclient.http's default form: a JSON header, then the BYTES tensor (4-byte little-endian length +
    # the JPEG); the top-5 comes back as classification strings in binary form.
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(data) + 4}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": OIP_TOP_K, "binary_data": True}}],
    }).encode()
    oip = out_dir / f"{image.stem}.oip"
    oip.write_bytes(header + struct.pack("<I", len(data)) + data)
    return {
        "raw": Body("raw", image, "image/jpeg"),
        "multipart": Body("multipart", multipart, f"multipart/form-data; boundary={BOUNDARY}"),
        "oip-rest": Body("oip-rest", oip, "application/octet-stream", OIP_PATH,
                         (("Inference-Header-Content-Length", str(len(header))),)),
        "oip-grpc": Body("oip-grpc", image, "", grpc=True),
    }


def create_tokens(base_url: str, count: int, path: Path) -> Path:
    """Log in `count` times (one session per client connection) and write the tokens, one a line."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        tokens = []
        for _ in range(count):
            response = client.post("/v1/sessions")
            response.raise_for_status()
            tokens.append(response.json()["token"])
    path.write_text("\n".join(tokens) + "\n")
    return path


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


@dataclass(frozen=True)
class Window:
    start: float  # time.monotonic() seconds
    end: float


def start_wrk(url: str, path: str, body: Body, connections: int, warmup: float, duration: float,
              tokens_file: Path | None) -> tuple[subprocess.Popen[str], Window]:
    """Start wrk (one thread per connection) for warmup + duration; the window is the measured part."""
    start = time.monotonic() + 0.5 + warmup  # 0.5 s for wrk to start and connect
    window = Window(start, start + duration)
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(body.path),
        "BENCH_CONTENT_TYPE": body.content_type,
        "BENCH_PATH": body.request_path or path,
        "BENCH_HEADERS": "\n".join(f"{name}: {value}" for name, value in body.headers),
        "BENCH_TOKENS_FILE": str(tokens_file) if tokens_file else "",
        "BENCH_WINDOW_START": f"{window.start:.6f}",
        "BENCH_WINDOW_END": f"{window.end:.6f}",
    }
    total = max(1, round(0.5 + warmup + duration + 0.5))
    command = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{total}s",
               "--timeout", "120s", "-s", str(LUA_SCRIPT), url]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    return process, window


def start_grpc_load(target: str, body: Body, connections: int, warmup: float, duration: float,
                    tokens_file: Path | None) -> tuple[subprocess.Popen[str], Window]:
    """Start bench.grpc_load (its own process, so its CPU is its own) for warmup + duration."""
    start = time.monotonic() + 1.0 + warmup  # 1 s for the interpreter to start and connect
    window = Window(start, start + duration)
    command = [sys.executable, "-m", "bench.grpc_load", "--target", target, "--image", str(body.path),
               "--concurrency", str(connections), "--window-start", f"{window.start:.6f}",
               "--window-end", f"{window.end:.6f}", "--top-k", str(OIP_TOP_K)]
    if tokens_file:
        command += ["--tokens", str(tokens_file)]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return process, window


def finish_wrk(process: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    """Wait for wrk and parse the JSON line its done() prints; kill it if it overruns."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"wrk printed no result (exit {process.returncode}): {output[-500:]}")
