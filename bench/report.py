"""Turning raw results into ratios, the verdict, results.md and chart.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]
PRIMARY = "ours-onnx"  # the configuration the targets are about (falls back to ours-torch)


def primary_server(points: list[Row]) -> str:
    names = {p["server"] for p in points}
    return PRIMARY if PRIMARY in names else "ours-torch"


def limits(inprocess: list[Row]) -> dict[str, Row]:
    """Per image: the in-process row (seed or fast pipeline, any layout) with the highest img/s."""
    best: dict[str, Row] = {}
    for row in inprocess:
        if row["pipeline"] in ("seed", "fast") and row["img_s"] > best.get(row["image"], {}).get("img_s", -1):
            best[row["image"]] = row
    return best


def single_image_latency(inprocess: list[Row], image: str, pipeline: str) -> float:
    """The lowest p50 over thread layouts of `pipeline` on `image` (ms)."""
    values = [r["p50_ms"] for r in inprocess if r["image"] == image and r["pipeline"] == pipeline]
    return min(values) if values else math.nan


def find(points: list[Row], server: str, image: str, payload: str, c: int) -> Row | None:
    for p in points:
        if (p["server"], p["image"], p["payload"], p["concurrency"]) == (server, image, payload, c):
            return p
    return None


def add_ratios(points: list[Row], inprocess: list[Row]) -> None:
    best = limits(inprocess)
    ours = primary_server(points)
    for p in points:
        limit = best.get(p["image"])
        p["ratio_to_limit"] = p["img_s"] / limit["img_s"] if limit and limit["img_s"] else None
        after = p.get("limit_after")  # the limit measured again right after this point (bench.run)
        p["ratio_to_limit_after"] = p["img_s"] / after["img_s"] if after and after["img_s"] else None
        # Protocol rows (oip-rest, oip-grpc) compare with /v1/predict's raw body: the same image bytes.
        fallback = "raw" if p["payload"].startswith("oip") else "multipart"
        ref = find(points, ours, p["image"], p["payload"], p["concurrency"]) or find(
            points, ours, p["image"], fallback, p["concurrency"])
        p["ratio_to_ours"] = p["img_s"] / ref["img_s"] if ref and ref["img_s"] else None


# ---------------------------------------------------------------- verdict


def _check(target: str, ok: bool | None, detail: str) -> Row:
    return {"target": target, "pass": ok, "detail": detail}


def _all(values: list[bool]) -> bool | None:
    return all(values) if values else None


def _ratio_vs_peer(points: list[Row], peer: str, factor: float, label: str) -> Row:
    ours = primary_server(points)
    ratios, notes = [], []
    for p in points:
        if p["server"] != peer:
            continue
        mine = find(points, ours, p["image"], p["payload"], p["concurrency"])
        if mine and p["img_s"] > 0:
            ratio = mine["img_s"] / p["img_s"]
            ratios.append(ratio >= factor)
            notes.append(f"{p['image']} c{p['concurrency']}: {ratio:.2f}x")
    return _check(f"throughput >= {factor:g} x {label} (multipart, every image and c)", _all(ratios),
                  ", ".join(notes) or "no data")


def verdict(points: list[Row], inprocess: list[Row]) -> list[Row]:
    ours = primary_server(points)
    mine = [p for p in points if p["server"] == ours]
    best = limits(inprocess)
    checks = []

    # Where the point has a limit measured right after it, that one counts: the machine's speed
    # drifts over the minutes between the run-start limit and the point (both ratios are shown).
    oks, notes = [], []
    for p in mine:
        if p["concurrency"] in (4, 16) and p["image"] in best:
            after = p.get("ratio_to_limit_after")
            ratio = after if after is not None else p["ratio_to_limit"]
            oks.append(ratio >= 0.9)
            notes.append(f"{p['image']} {p['payload']} c{p['concurrency']}: {ratio:.2f}"
                         + (f" (run-start limit: {p['ratio_to_limit']:.2f})" if after is not None else ""))
    checks.append(_check("c4 and c16 >= 0.9 x best in-process pipeline (the limit measured right after the "
                         "point where it was)", _all(oks), ", ".join(notes) or "no data"))

    checks.append(_ratio_vs_peer(points, "litserve-torch", 2.0, "LitServe-torch"))
    checks.append(_ratio_vs_peer(points, "litserve-onnx", 1.0, "LitServe-onnx"))
    checks.append(_ratio_vs_peer(points, "flask", 3.0, "Flask"))

    oks, notes = [], []
    for p in mine:
        if p["concurrency"] == 1 and p["image"] in best:
            start = single_image_latency(inprocess, p["image"], best[p["image"]]["pipeline"])
            ref = p["limit_after"]["p50_ms"] if p.get("limit_after") else start
            oks.append(p["p50_ms"] <= ref + 3.0)
            notes.append(f"{p['image']} {p['payload']}: {p['p50_ms']:.1f} vs {ref:.1f}+3 ms"
                         + (f" (run-start: {start:.1f})" if p.get("limit_after") else ""))
    checks.append(_check("c1 p50 <= in-process single-image p50 + 3 ms (measured right after the point where "
                         "it was)", _all(oks), ", ".join(notes) or "no data"))

    oks, notes, inconclusive = [], [], []
    for p in mine:
        flask = find(points, "flask", p["image"], "multipart", p["concurrency"])
        if p["concurrency"] in (16, 64) and flask:
            # No Flask response inside the window: every one took longer, so the window is a lower bound.
            flask_p99 = flask["p99_ms"] if flask["ok"] else flask["window_s"] * 1000
            bound = "" if flask["ok"] else " (flask answered nothing in the window: its p99 >= window)"
            ratio = p["p99_ms"] / flask_p99 if p["ok"] else math.inf
            passed = ratio <= 0.5 and p["errors"] == 0
            inconclusive.append(not passed and not flask["ok"] and p["errors"] == 0)  # bound too loose
            oks.append(passed)
            notes.append(f"{p['image']} {p['payload']} c{p['concurrency']}: p99 {ratio:.2f}x flask{bound}, "
                         f"{p['errors']} errors")
    failed = any(not ok and not unsure for ok, unsure in zip(oks, inconclusive, strict=True))
    outcome = False if failed else (None if any(inconclusive) else _all(oks))
    checks.append(_check("c16 and c64 p99 <= 0.5 x Flask's, no errors (N/A: a point is undecided because Flask "
                         "answered nothing in the window; use a longer --duration)", outcome,
                         "; ".join(notes) or "no data"))

    ours_rss = max((p["peak_rss_mb"] for p in mine), default=0)
    oks, notes = [], []
    for peer in ("litserve-torch", "litserve-onnx"):
        peer_rss = max((p["peak_rss_mb"] for p in points if p["server"] == peer), default=0)
        if peer_rss and ours_rss:
            oks.append(ours_rss <= 0.7 * peer_rss)
            notes.append(f"ours {ours_rss:.0f} MB vs {peer} {peer_rss:.0f} MB ({ours_rss / peer_rss:.2f}x)")
    checks.append(_check("peak RSS <= 0.7 x LitServe's (ours includes its embedded redis-server)", _all(oks),
                         "; ".join(notes) or "no data"))

    cmds = [p["redis_cmds_per_predict"] for p in mine if p.get("redis_cmds_per_predict") is not None]
    reads = [p["redis_reads_per_predict"] for p in mine if p.get("redis_reads_per_predict") is not None]
    worst_cmds, worst_reads = max(cmds, default=None), max(reads, default=None)
    measure = worst_reads if worst_reads is not None else worst_cmds
    checks.append(_check(
        "<= 2 Redis round trips per predict (measured as Redis read events per predict, INFO stats "
        "total_reads_processed; commands per predict from INFO commandstats shown too: a pipeline or a "
        "script counts every command inside it, so commands over-count round trips)",
        None if measure is None else measure <= 2.0 + 0.05,
        "no data" if measure is None else
        f"worst {_fmt(worst_reads, 2)} reads/predict, {_fmt(worst_cmds, 2)} commands/predict "
        "(per-command breakdown in results.json)"))
    return checks


# ---------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value < 0:  # wrk script: no response in the window
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _redis(point: Row) -> str:
    cmds = point.get("redis_cmds_per_predict")
    if cmds is None:
        return "-"
    return f"{cmds:.2f} ({_fmt(point.get('redis_reads_per_predict'), 2)})"


def markdown(results: Row) -> str:
    info = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"{info['cpu_model']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}, litserve {info.get('litserve') or 'n/a'}. "
        f"Load generator: {results['load_generator']}. Warm-up {results['settings']['warmup_s']} s, "
        f"measured {results['settings']['duration_s']} s per point"
        f"{' (--quick)' if results['settings']['quick'] else ''}.",
        "",
        "## In-process limit (no HTTP)",
        "",
        "| pipeline | image | threads x intra-op | img/s | p50 ms |",
        "|---|---|---|---:|---:|",
    ]
    for r in results["inprocess"]:
        lines.append(f"| {r['label']} | {r['image']} | {r['threads']}x{r['intra_op_threads']} | "
                     f"{_fmt(r['img_s'])} | {_fmt(r['p50_ms'])} |")
    sources = sorted({r["onnx_model"] for r in results["inprocess"] if r.get("onnx_model")})
    if sources:
        lines += ["", f"In-process ONNX model: {', '.join(sources)}."]
    lines += ["", "x limit: img/s over the run-start in-process limit; in brackets, over the limit measured again "
              "right after the point (where it was), which the verdict uses."]
    for image in results["images"]:
        lines += ["", f"## {image} ({results['images'][image]['description']})", "",
                  "| server | payload | c | img/s | p50 ms | p95 ms | p99 ms | errors | RSS MB "
                  "| redis cmds (reads)/predict | x limit | x ours |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in (p for p in results["points"] if p["image"] == image):
            lines.append(
                f"| {p['server']} | {p['payload']} | {p['concurrency']} | {_fmt(p['img_s'])} | {_fmt(p['p50_ms'])} | "
                f"{_fmt(p['p95_ms'])} | {_fmt(p['p99_ms'])} | {p['errors']} | {_fmt(p['peak_rss_mb'], 0)} | "
                f"{_redis(p)} | {_limit_cell(p)} | "
                f"{_fmt(p['ratio_to_ours'], 2)} |")
    lines += oip_section(results)
    lines += ["", "## Verdict", ""]
    for check in results["verdict"]:
        mark = {True: "PASS", False: "FAIL", None: "N/A"}[check["pass"]]
        lines.append(f"- **{mark}** {check['target']}: {check['detail']}")
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _limit_cell(point: Row) -> str:
    after = point.get("ratio_to_limit_after")
    return _fmt(point["ratio_to_limit"], 2) + (f" ({after:.2f})" if after is not None else "")


def _versus(point: Row | None, reference: Row | None) -> list[str]:
    """img/s, its ratio to the reference's img/s, and p50 ms, as table cells."""
    if point is None:
        return ["-", "-", "-"]
    ratio = point["img_s"] / reference["img_s"] if reference and reference["img_s"] else None
    return [_fmt(point["img_s"]), _fmt(ratio, 2), _fmt(point["p50_ms"])]


def oip_section(results: Row) -> list[str]:
    """Open Inference Protocol rows next to ours-onnx's raw POST /v1/predict at the same image and c."""
    points = results["points"]
    protocol = [p for p in points if p["payload"] in ("oip-rest", "oip-grpc")]
    if not protocol:
        return []
    ours = primary_server(points)
    lines = ["", "## Open Inference Protocol vs POST /v1/predict", "",
             f"Same server configuration, sessions and images; x /v1 = img/s / {ours} raw `/v1/predict`. "
             "REST: binary tensor data form (wrk, prebuilt body); gRPC: bench/grpc_load.py (Python asyncio "
             "client, one channel per connection), whose own CPU use is shown (% of one core).", "",
             "| image | c | /v1 raw img/s | OIP REST img/s | x /v1 | REST p50 ms | gRPC img/s | x /v1 "
             "| gRPC p50 ms | gRPC client CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for image in results["images"]:
        for c in sorted({p["concurrency"] for p in protocol if p["image"] == image}):
            v1 = find(points, ours, image, "raw", c)
            rest = next((p for p in protocol if p["image"] == image and p["concurrency"] == c
                         and p["payload"] == "oip-rest"), None)
            grpc = next((p for p in protocol if p["image"] == image and p["concurrency"] == c
                         and p["payload"] == "oip-grpc"), None)
            lines.append(f"| {image} | {c} | {_fmt(v1['img_s']) if v1 else '-'} | "
                         f"{' | '.join(_versus(rest, v1))} | {' | '.join(_versus(grpc, v1))} | "
                         f"{_fmt(grpc.get('client_cpu_pct')) if grpc else '-'} |")
    return lines


def verdict_text(checks: list[Row]) -> str:
    marks = {True: "PASS", False: "FAIL", None: "N/A "}
    return "\n".join(f"  {marks[c['pass']]}  {c['target']}\n        {c['detail']}" for c in checks)


# ---------------------------------------------------------------- chart


def chart(results: Row, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = list(results["images"])
    fig, axes = plt.subplots(len(images), 2, figsize=(12, 4.5 * len(images)), squeeze=False)
    best = limits(results["inprocess"])
    for row, image in enumerate(images):
        throughput, p99 = axes[row]
        series: dict[str, list[Row]] = {}
        for p in results["points"]:
            if p["image"] == image:
                series.setdefault(f"{p['server']} {p['payload']}", []).append(p)
        for label, pts in series.items():
            pts.sort(key=lambda p: p["concurrency"])
            cs = [p["concurrency"] for p in pts]
            throughput.plot(cs, [p["img_s"] for p in pts], marker="o", label=label)
            p99.plot(cs, [p["p99_ms"] if p["p99_ms"] > 0 else math.nan for p in pts], marker="o", label=label)
        if image in best:
            throughput.axhline(best[image]["img_s"], color="grey", linestyle="--",
                               label=f"in-process limit ({best[image]['pipeline']})")
        for ax, title, unit in ((throughput, "throughput", "img/s"), (p99, "p99 latency", "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(unit)
            ax.set_title(f"{image}: {title}")
            ax.grid(True, alpha=0.3)
        p99.set_yscale("log")
        throughput.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
