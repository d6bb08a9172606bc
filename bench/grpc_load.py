"""A small closed-loop gRPC load client for the Open Inference Protocol's ModelInfer (asyncio, grpcio).

    python -m bench.grpc_load --target 127.0.0.1:8001 --image cat.jpg --concurrency 16 \
        --window-start T0 --window-end T1 [--tokens FILE]

C workers, each with its own channel (one HTTP/2 connection, like wrk's one connection per thread)
and, with --tokens, its own session (line i of the file); each sends the next request as soon as the
previous answer arrives. Counted like bench/wrk/post_body.lua: only answers inside the window
[T0, T1] (time.monotonic()), latency = request sent -> answer read. It prints the same BENCH_JSON
line as the wrk script, plus its own CPU time in the window (`client_cpu_pct`, % of one core): on a
2-core machine a Python client takes CPU from the server, so the number says how much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import struct
import time
from pathlib import Path

import grpc
from grpc import aio

from handlers.oip_grpc import grpc_predict_v2_pb2 as pb
from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc

MODEL = "efficientnet_lite0"


def build_request(image: bytes, model: str, top_k: int) -> pb.ModelInferRequest:
    """One BYTES image in raw_input_contents (as tritonclient.grpc sends it), asking for top-k strings."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    output = request.outputs.add(name="probabilities")
    output.parameters["classification"].int64_param = top_k
    return request


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], p: float) -> float:
    if not values:
        return -1.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]  # as the wrk script picks it


async def run(args: argparse.Namespace) -> dict[str, object]:
    request = build_request(Path(args.image).read_bytes(), args.model, args.top_k)
    tokens = [line for line in Path(args.tokens).read_text().splitlines() if line] if args.tokens else []
    latencies: list[float] = []
    counts = {"bad": 0, "late": 0, "requests": 0, "errors": 0}
    cpu: dict[str, float] = {}

    async def worker(index: int) -> None:
        metadata = (("authorization", f"Bearer {tokens[index % len(tokens)]}"),) if tokens else ()
        async with aio.insecure_channel(args.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while time.monotonic() < args.window_end:
                sent = time.monotonic()
                try:
                    await infer(request, metadata=metadata, timeout=120)
                    ok = True
                except grpc.RpcError:
                    ok = False
                    counts["errors"] += 1
                done = time.monotonic()
                counts["requests"] += 1
                if args.window_start <= done <= args.window_end:
                    if ok:
                        latencies.append(done - sent)
                    else:
                        counts["bad"] += 1
                elif done > args.window_end:
                    counts["late"] += 1

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, args.window_start - time.monotonic()))
        cpu["start"] = cpu_seconds()
        await asyncio.sleep(max(0.0, args.window_end - time.monotonic()))
        cpu["end"] = cpu_seconds()

    marks = asyncio.create_task(cpu_marks())
    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(args.concurrency))),
                           timeout=max(1.0, args.window_end - time.monotonic()) + 130)
    await marks
    window = args.window_end - args.window_start
    client_cpu = cpu.get("end", 0.0) - cpu.get("start", 0.0)
    return {
        "ok": len(latencies), "bad_status": counts["bad"], "late": counts["late"], "window_s": window,
        "p50_ms": percentile(latencies, 50) * 1000, "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "max_ms": max(latencies, default=-0.001) * 1000,
        "wrk_requests": counts["requests"],
        "wrk_errors": {"connect": 0, "read": 0, "write": 0, "status": counts["errors"], "timeout": 0},
        "threads": args.concurrency, "client_cpu_s": round(client_cpu, 3),
        "client_cpu_pct": round(100 * client_cpu / window, 1) if window > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port of the gRPC server (127.0.0.1 only)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--tokens", help="file of session tokens, one a line; worker i uses line i")
    parser.add_argument("--window-start", type=float, required=True, help="time.monotonic() seconds")
    parser.add_argument("--window-end", type=float, required=True)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.target.startswith(("127.0.0.1:", "localhost:")):
        parser.error("load goes only to a server on this machine (127.0.0.1)")
    print("BENCH_JSON " + json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
