"""Load generation with wrk: request bodies, session tokens, one measured point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

LUA_SCRIPT = Path(__file__).parent / "wrk" / "post_body.lua"
BOUNDARY = "----benchboundary7MA4YWxkTrZu0gW"


@dataclass(frozen=True)
class Body:
    payload: str  # "raw" or "multipart"
    path: Path
    content_type: str


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
    return {
        "raw": Body("raw", image, "image/jpeg"),
        "multipart": Body("multipart", multipart, f"multipart/form-data; boundary={BOUNDARY}"),
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
        "BENCH_PATH": path,
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
