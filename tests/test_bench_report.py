"""The benchmark's arithmetic (bench/report.py) on made-up rows: which pipeline sets the limit, which
runtime LitServe is given, and how the issue's targets read the points. No server, no model."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.pipelines import ONNXRUNTIME, OPENVINO_FP32

Row = dict[str, Any]


def pipeline(decoder: str | None, runtime: str, image: str, img_s: float, passed: bool) -> Row:
    return {"pipeline": f"{decoder or 'forward'}+{runtime}", "decoder": decoder, "runtime": runtime,
            "label": f"{decoder} + {runtime}", "image": image, "threads": 2, "intra_op_threads": 1,
            "img_s": img_s, "p50_ms": 10.0, "guard": {"passed": passed, "worst": {"why": "moved"}}}


INPROCESS = [
    pipeline(None, "openvino-bf16", "-", 900.0, passed=False),  # forward only never sets the limit
    pipeline("server", "openvino-bf16", "coffee", 400.0, passed=False),  # fastest, but fails the guard
    pipeline("server", "openvino-fp32", "coffee", 300.0, passed=True),
    pipeline("server", "onnxruntime-fp32", "coffee", 250.0, passed=True),
    pipeline("server", "openvino-fp32", "cat_12mp", 50.0, passed=True),
    pipeline("pillow-float", "onnxruntime-fp32", "cat_12mp", 55.0, passed=True),
]


def point(server: str, image: str, c: int, img_s: float, payload: str = "multipart", errors: int = 0,
          p99_ms: float = 100.0, rss: float = 500.0) -> Row:
    return {"server": server, "image": image, "payload": payload, "concurrency": c, "img_s": img_s, "ok": 100,
            "window_s": 10.0, "p50_ms": 10.0, "p99_ms": p99_ms, "errors": errors, "peak_rss_mb": rss}


def test_the_limit_is_the_fastest_pipeline_whose_runtime_passes_the_guard() -> None:
    limits = report.limits(INPROCESS)
    assert {image: row["pipeline"] for image, row in limits.items()} == {
        "coffee": "server+openvino-fp32", "cat_12mp": "pillow-float+onnxruntime-fp32"}
    assert report.best_runtime(INPROCESS) == OPENVINO_FP32
    assert report.best_runtime([pipeline("server", "openvino-bf16", "coffee", 1.0, passed=False)]) == ONNXRUNTIME


def test_targets_pass_and_fail_on_their_own_ratios() -> None:
    points = [point("ours", "coffee", 4, 250.0), point("ours", "coffee", 16, 240.0, payload="raw"),
              point("ours", "coffee", 64, 240.0, p99_ms=100.0, rss=300.0),
              point("litserve-best", "coffee", 4, 260.0, rss=1000.0),
              point("litserve-torch", "coffee", 4, 90.0, rss=1000.0),
              point("flask", "coffee", 64, 20.0, p99_ms=1000.0)]
    report.add_ratios(points, INPROCESS)
    stream = {"window": 8, "rows": {"coffee": {"stream": {"img_per_s": 280.0}, "post": {"img_per_s": 200.0}}}}
    by_target = report.verdict(points, INPROCESS, stream)
    throughput, same_runtime, torch_eager, ws, p99, rss = by_target
    assert throughput["pass"] is False  # c16: 240 / 300 = 0.80 < 0.85
    assert "c16 worst 0.80x" in throughput["measured"]
    assert same_runtime["pass"] is False and same_runtime["measured"] == "worst 0.96x"  # 250 / 260
    assert torch_eager["pass"] is True  # 250 / 90 = 2.78
    assert ws["pass"] is True  # 280 / 300 = 0.93
    assert p99["pass"] is True  # 100 / 1000
    assert rss["pass"] is True and rss["measured"] == "worst 0.50x"  # ours' peak over its points, 500 / 1000
