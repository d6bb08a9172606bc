"""The benchmark's arithmetic (bench/report.py) on made-up rows: which pipeline sets the limit, which
runtime LitServe is given, and how the issue's targets read the points. No server, no model."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import pipelines, report
from bench.pipelines import ONNXRUNTIME, OPENVINO_FP32

pytestmark = pytest.mark.unit

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
            "window_s": 10.0, "p50_ms": 10.0, "p95_ms": p99_ms, "p99_ms": p99_ms, "errors": errors, "peak_rss_mb": rss}


def test_the_limit_is_the_fastest_pipeline_whose_runtime_passes_the_guard() -> None:
    limits = report.limits(INPROCESS)
    assert {image: row["pipeline"] for image, row in limits.items()} == {
        "coffee": "server+openvino-fp32", "cat_12mp": "pillow-float+onnxruntime-fp32"}
    assert report.best_runtime(INPROCESS) == OPENVINO_FP32
    assert report.best_runtime([pipeline("server", "openvino-bf16", "coffee", 1.0, passed=False)]) == ONNXRUNTIME


SAME = {"processes": 2, "runner_threads": 1, "intra_op_threads": 1}
SERVERS = {
    "ours": {"layout": {"processes": 2, "runner_threads": 2, "intra_op_threads": 1},
             "pipeline": {"decoder": "server", "runtime": "openvino", "precision": "fp32"}, "runtime": "openvino fp32"},
    "ours-matched": {"layout": SAME, "pipeline": {"decoder": "server", "runtime": "openvino", "precision": "fp32"}},
    "litserve-best": {"layout": SAME, "pipeline": {"decoder": "server", "runtime": "openvino", "precision": "fp32"}},
    "litserve-torch": {"layout": SAME, "pipeline": {"decoder": "seed", "runtime": "torch", "precision": "fp32"}},
    "flask": {"layout": {"processes": 1, "runner_threads": "a thread per request", "intra_op_threads": "torch's"},
              "pipeline": {"decoder": "seed", "runtime": "torch", "precision": "fp32"}},
}
IMAGES = ("coffee", "cat_12mp")
CONCURRENCIES = (1, 4, 16, 64)
LIMIT = {"coffee": 300.0, "cat_12mp": 55.0}


def complete_results() -> Row:
    """A run that measured everything every target needs, and meets every target."""
    points = []
    for image in IMAGES:
        limit = LIMIT[image]
        for c in CONCURRENCIES:
            for payload in report.OUR_PAYLOADS:
                points.append(point("ours", image, c, 0.9 * limit, payload=payload, p99_ms=100.0, rss=400.0))
            points += [point("ours-matched", image, c, 0.9 * limit, rss=400.0),
                       point("litserve-best", image, c, 0.85 * limit, rss=1000.0),
                       point("litserve-torch", image, c, 0.3 * limit, rss=2000.0),
                       point("flask", image, c, 0.2 * limit, p99_ms=1000.0, rss=3000.0)]
    for p in points:
        if p["server"] == "ours":
            p.update(redis_cmds_per_predict=9.0, redis_reads_per_predict=2.0)
            if p["concurrency"] in (1, 4, 16):
                p["limit_after"] = {"img_s": LIMIT[p["image"]], "p50_ms": 10.0}
    stream = {"window": 8, "server": "ours", "client": "one client", "rows": {
        image: {"stream": {"img_per_s": 0.95 * LIMIT[image], "client_cpu_ms_per_image": 1.0},
                "post": {"img_per_s": 0.8 * LIMIT[image], "client_cpu_ms_per_image": 2.0},
                "ratio_stream_over_post": 0.95 / 0.8} for image in IMAGES}}
    return {"machine": {"cpu_model": "Test CPU", "cores": 2, "amx": True, "bf16": True, "date": "2026-12-05 10:00 UTC",
                        "commit": "abc1234", "python": "3.11", "torch": "2", "onnxruntime": "1"},
            "load_generator": "wrk 4.1.0", "guard": pipelines.guard_identity(),
            "settings": {"duration_s": 10.0, "warmup_s": 3.0, "quick": False, "full": True,
                         "concurrencies": list(CONCURRENCIES), "servers": list(SERVERS)},
            "images": {image: {"description": image} for image in IMAGES},
            "inprocess": [pipeline("server", "openvino-fp32", image, LIMIT[image], passed=True) for image in IMAGES],
            "servers": copy.deepcopy(SERVERS), "points": points, "stream": stream, "notes": []}


TARGETS = ("limit", "same-pipeline", "torch", "stream", "p99", "rss")
OTHERS = ("flask", "c1-p50", "redis")


def outcomes(results: Row) -> dict[str, bool | None]:
    evaluated = report.evaluate(results)
    return {**dict(zip(TARGETS, (c["pass"] for c in evaluated["verdict"]), strict=True)),
            **dict(zip(OTHERS, (c["pass"] for c in evaluated["other_checks"]), strict=True))}


def test_a_complete_run_meets_every_target() -> None:
    assert outcomes(complete_results()) == dict.fromkeys(TARGETS + OTHERS, True)


def drop(results: Row, **match: Any) -> None:
    results["points"] = [p for p in results["points"] if any(p.get(k) != v for k, v in match.items())]


def without_limit(results: Row) -> None:
    results["inprocess"] = [r for r in results["inprocess"] if r["image"] != "cat_12mp"]


def failing_guard(results: Row) -> None:
    for row in results["inprocess"]:
        row["guard"]["passed"] = False


def only_c1_and_c64(results: Row) -> None:  # the run measured neither c4 nor c16: ours at 1 img/s read PASS
    results["settings"]["concurrencies"] = [1, 64]
    drop(results, concurrency=4)
    drop(results, concurrency=16)
    for p in results["points"]:
        if p["server"] == "ours":
            p["img_s"] = 1.0


def unlike_layout(results: Row) -> None:
    results["servers"]["litserve-best"]["layout"] = {**SAME, "processes": 4}


def unlike_pipeline(results: Row) -> None:
    results["servers"]["ours-matched"]["pipeline"] = {"decoder": "server", "runtime": "onnxruntime",
                                                      "precision": "fp32"}


def no_layouts(results: Row) -> None:
    results["servers"] = {}


def peer_answered_nothing(results: Row) -> None:
    for p in results["points"]:
        if p["server"] == "litserve-best" and p["concurrency"] == 64:
            p.update(img_s=0.0, ok=0)


def no_stream(results: Row) -> None:
    results["stream"] = None


def stream_of_one_image(results: Row) -> None:
    del results["stream"]["rows"]["cat_12mp"]


def no_redis_stats(results: Row) -> None:
    for p in results["points"]:
        p.pop("redis_reads_per_predict", None)


# What each lack leaves unmeasured (None), or, given as a dict, what it does to which target.
LACKING: dict[str, tuple[Callable[[Row], None], set[str] | dict[str, bool | None]]] = {
    "no limit for one image": (without_limit, {"limit", "stream", "c1-p50"}),
    "no runtime passed the guard": (failing_guard, {"limit", "stream", "c1-p50"}),
    "no c4 or c16 point": (only_c1_and_c64, {"limit": None, "flask": False}),  # 1 img/s is no PASS
    "no c16 point of ours": (lambda r: drop(r, server="ours", concurrency=16), {"limit", "flask"}),
    "no raw payload of ours": (lambda r: drop(r, server="ours", payload="raw"), {"limit", "p99", "c1-p50"}),
    "no c1 point of ours": (lambda r: drop(r, server="ours", concurrency=1), {"c1-p50", "flask"}),
    "no ours at all": (lambda r: drop(r, server="ours"), {"limit", "p99", "flask", "c1-p50", "redis"}),
    "no ours-matched": (lambda r: drop(r, server="ours-matched"), {"same-pipeline", "torch", "rss"}),
    "no litserve-best": (lambda r: drop(r, server="litserve-best"), {"same-pipeline", "rss"}),
    "one litserve-best point missing": (lambda r: drop(r, server="litserve-best", image="cat_12mp", concurrency=4),
                                        {"same-pipeline"}),
    "litserve-best answered nothing at c64": (peer_answered_nothing, {"same-pipeline"}),
    "litserve-best in another layout": (unlike_layout, {"same-pipeline", "rss"}),
    "ours-matched on another pipeline": (unlike_pipeline, {"same-pipeline"}),
    "no layouts recorded": (no_layouts, {"same-pipeline", "torch", "rss"}),
    "no litserve-torch": (lambda r: drop(r, server="litserve-torch"), {"torch", "rss"}),
    "no stream": (no_stream, {"stream"}),
    "a stream of one image": (stream_of_one_image, {"stream"}),
    "no flask": (lambda r: drop(r, server="flask"), {"p99", "flask"}),
    "no flask c64": (lambda r: drop(r, server="flask", concurrency=64), {"p99", "flask"}),
    "no Redis read events": (no_redis_stats, {"redis"}),
}


@pytest.mark.parametrize("lacking", LACKING)
def test_a_target_without_its_measurement_is_not_met(lacking: str) -> None:
    mutate, expected = LACKING[lacking]
    changed = expected if isinstance(expected, dict) else dict.fromkeys(expected)
    results = complete_results()
    mutate(results)
    assert outcomes(results) == {name: changed.get(name, True) for name in TARGETS + OTHERS}
    evaluated = report.evaluate(results)
    rendered = report.markdown(evaluated)
    assert "NOT MEASURED" in rendered and "N/A" not in rendered
    assert report.met(evaluated["verdict"]).startswith(f"{6 - len(set(changed) & set(TARGETS))} of 6")


def test_a_measured_failure_is_a_fail_even_where_something_else_is_missing() -> None:
    results = complete_results()
    drop(results, server="ours", concurrency=16)
    for p in results["points"]:
        if p["server"] == "ours" and p["concurrency"] == 4 and p["image"] == "coffee":
            p["img_s"] = 0.5 * LIMIT["coffee"]
    assert outcomes(results)["limit"] is False


def test_targets_pass_and_fail_on_their_own_ratios() -> None:
    results = complete_results()
    for p in results["points"]:
        if p["server"] == "ours" and p["concurrency"] == 16 and p["image"] == "coffee" and p["payload"] == "raw":
            p["img_s"] = 240.0  # 240 / 300 = 0.80 < 0.85
        if p["server"] == "litserve-best" and p["image"] == "coffee" and p["concurrency"] == 4:
            p["img_s"] = 0.9 * LIMIT["coffee"] / 0.96  # ours-matched / it = 0.96
    throughput, same_pipeline, torch_eager, ws, p99, rss = report.evaluate(results)["verdict"]
    assert throughput["pass"] is False and "c16 worst 0.80x" in throughput["measured"]
    assert same_pipeline["pass"] is False and same_pipeline["measured"] == "worst 0.96x"
    assert torch_eager["pass"] is True and torch_eager["measured"] == "worst 3.00x"
    assert ws["pass"] is True and ws["measured"] == "worst 0.95x"
    assert p99["pass"] is True and p99["measured"] == "worst 0.10x"
    assert rss["pass"] is True and rss["measured"] == "worst 0.40x"  # ours-matched's peak, 400 / 1000


def test_each_target_names_what_it_compares() -> None:
    verdict = report.evaluate(complete_results())["verdict"]
    compares = [check["compares"] for check in verdict]
    assert compares[0].startswith("serving overhead") and "ours as config.toml" in compares[0]
    assert compares[1].startswith("serving overhead") and "same thread layout on the same pipeline" in compares[1]
    assert compares[2].startswith("pipeline")
    assert "the seed app as it is" in compares[4]


# ---------------------------------------------------------------- RESULTS.md


def with_oip(results: Row) -> Row:
    """OIP rows whose ratios to ours' raw /v1/predict run from 0.91 to 1.21."""
    factors = iter([1.21, 0.99, 1.01, 1.0, 1.0, 0.97, 0.96, 0.91])
    for image in IMAGES:
        for c in CONCURRENCIES:
            raw = report.find(results["points"], "ours", image, "raw", c)
            results["points"].append(point("ours-oip", image, c, raw["img_s"] * next(factors), payload="oip-rest"))
    return results


def test_the_section_derives_its_ranges_from_its_own_table() -> None:
    section = report.results_section(with_oip(complete_results()), "bench/results/run-x.json")
    assert "- OIP REST over ours's raw `/v1/predict`: 0.91\u20131.21x" in section
    assert ("| ours-oip | oip-rest | 326.7 | 267.3 | 272.7 | 270.0 (100) | 49.5 | 48.0 | 47.5 | 45.0 (100) | 0 | 500 |"
            in section)
    assert "- ours-matched over litserve-torch: 3.00x" in section
    assert "| Test CPU" not in section and "**Machine**: Test CPU" in section
    assert "predates a change of the accuracy guard" not in section


def test_a_result_measured_under_another_guard_says_so() -> None:
    results = complete_results()
    results["guard"]["tolerance"] = {"fp32": 1e-2, "bf16": 0.05}
    section = report.results_section(results, "bench/results/run-x.json")
    assert "**This result predates a change of the accuracy guard** (changed since: tolerance)" in section
    del results["guard"]
    assert "(changed since: the result records no guard)" in report.results_section(results, "bench/results/r.json")


def test_the_markdown_command_rewrites_only_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"# Measured results\n\n{report.placeholder_section()}\n\n## Soak\n\nby hand\n")
    source = tmp_path / "run-2026-12-05-1000-test-cpu.json"
    source.write_text(json.dumps(complete_results()))
    monkeypatch.setattr(report, "RESULTS_MD", results_md)
    assert report.main([str(source), "--markdown"]) == 0
    text = results_md.read_text()
    assert text.startswith("# Measured results\n\n") and text.endswith("\n\n## Soak\n\nby hand\n")
    assert report.section_of(text) == report.results_section(complete_results(), str(source))


def test_results_md_is_what_the_generator_makes_of_the_committed_results_file() -> None:
    """Hand edits between the markers fail here; so does a committed run that RESULTS.md was not generated from."""
    assert report.section_of(report.RESULTS_MD.read_text()) == report.expected_section()
