"""Turning raw results into ratios, the verdict, results.md, chart.png and bench/RESULTS.md's benchmark section.

python -m bench.report bench/results/run-<date>-<cpu>.json --markdown   rewrites that section from the file."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import pipelines

Row = dict[str, Any]
PRIMARY = "ours"  # the configuration the targets are about: the default config (model.runtime = auto)
# Our server in the peers' thread layout on LitServe-best's pipeline: the row the serving comparisons use.
MATCHED = "ours-matched"
FALLBACKS = ("ours-onnx", "ours-torch")  # what the targets use when a run measured no `ours`
SAME_RUNTIME_PEER = "litserve-best"  # LitServe on the runtime of the best in-process pipeline
TORCH_PEER = "litserve-torch"


def primary_server(points: list[Row]) -> str:
    names = {p["server"] for p in points}
    return next((name for name in (PRIMARY, *FALLBACKS) if name in names), PRIMARY)


def passes_guard(row: Row) -> bool:
    """The row's runtime passed the server's accuracy guard (inference.selection.guard)."""
    return bool(row.get("guard") and row["guard"].get("passed")) and not row.get("error")


def guard_mark(row: Row) -> str:
    if row.get("error"):
        return f"unavailable: {row['error']}"
    if not row.get("guard"):
        return "-"
    return "passes the guard" if row["guard"]["passed"] else f"FAILS the guard ({row['guard']['worst'].get('why')})"


def limits(inprocess: list[Row]) -> dict[str, Row]:
    """Per image: the end-to-end in-process row (any decoder x runtime, any layout) with the highest img/s
    among those whose runtime passes the accuracy guard."""
    best: dict[str, Row] = {}
    for row in inprocess:
        if row.get("decoder") and passes_guard(row) and row["img_s"] > best.get(row["image"], {}).get("img_s", -1):
            best[row["image"]] = row
    return best


def best_runtime(inprocess: list[Row]) -> pipelines.Runtime:
    """The runtime of the best passing pipeline, on the first image measured (the small photo in
    bench.run; on the 12 MP one decoding dominates); ONNX Runtime FP32 when nothing passed."""
    best = limits(inprocess)
    images = [row["image"] for row in inprocess if row["image"] in best]
    if not images:
        return pipelines.ONNXRUNTIME
    return pipelines.runtime_by_key(best[images[0]]["runtime"])


def single_image_latency(inprocess: list[Row], image: str, pipeline: str) -> float:
    """The lowest p50 over thread layouts of `pipeline` on `image` (ms)."""
    values = [r["p50_ms"] for r in inprocess if r["image"] == image and r["pipeline"] == pipeline]
    return min(values) if values else math.nan


def describe(value: Row) -> str:
    """A recorded thread layout or pipeline (bench.run's `servers`), in words."""
    if "processes" in value:
        runners = value["runner_threads"]  # a count, or in words ("a thread per request")
        if isinstance(runners, int):
            runners = f"{runners} runner thread{'s' if runners != 1 else ''}"
        return (f"{value['processes']} process{'es' if value['processes'] != 1 else ''} x {runners} x "
                f"{value['intra_op_threads']} intra-op")
    return f"{value['decoder']} decoder + {value['runtime']} {value['precision']}"


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


@dataclass(frozen=True)
class Coverage:
    """What a run set out to measure. Every target covers all of it: a point, limit or row it needs and
    the run lacks makes the target "not measured", which counts as not met."""

    images: tuple[str, ...]
    concurrencies: tuple[int, ...]


def coverage(results: Row) -> Coverage:
    return Coverage(tuple(results["images"]), tuple(results["settings"]["concurrencies"]))


class _Tally:
    """One target's measurements: FAIL if any measured one fails, else NOT MEASURED if anything it needs is
    missing (or nothing was measured), else PASS."""

    def __init__(self) -> None:
        self.oks: list[bool] = []
        self.notes: list[str] = []
        self.missing: list[str] = []

    def measured(self, ok: bool, note: str) -> None:
        self.oks.append(ok)
        self.notes.append(note)

    def lacks(self, what: str) -> None:
        self.missing.append(what)

    def check(self, target: str, compares: str, measured: str, sep: str = ", ") -> Row:
        outcome = False if not all(self.oks) else (True if self.oks and not self.missing else None)
        detail = sep.join(self.notes)
        if self.missing or not self.oks:
            detail += ("; " if detail else "") + "not measured: " + (", ".join(self.missing) or "no data")
        return {"target": target, "compares": compares, "pass": outcome, "measured": measured, "detail": detail,
                "not_measured": self.missing}


def _worst(ratios: list[float], digits: int = 2, suffix: str = "x") -> str:
    return f"worst {min(ratios):.{digits}f}{suffix}" if ratios else "-"


def _like_for_like(tally: _Tally, servers: Row, mine: str, peer: str, same: tuple[str, ...]) -> None:
    """A serving comparison counts only between rows recorded with the same `same` (layout, pipeline)."""
    for key in same:
        ours, theirs = servers.get(mine, {}).get(key), servers.get(peer, {}).get(key)
        if ours is None or theirs is None:
            tally.lacks(f"the {key} of {mine if ours is None else peer} (not recorded)")
        elif ours != theirs:
            tally.lacks(f"a like-for-like {key} ({mine}: {describe(ours)}; {peer}: {describe(theirs)})")


def _ratio_vs_peer(points: list[Row], cover: Coverage, mine: str, peer: str, factor: float, label: str,
                   compares: str, servers: Row | None = None, same: tuple[str, ...] = ()) -> Row:
    """`mine` over `peer` in img/s, multipart, at every image and concurrency of the run."""
    tally, ratios = _Tally(), []
    if servers is not None:
        _like_for_like(tally, servers, mine, peer, same)
    for image in cover.images:
        for c in cover.concurrencies:
            ours, theirs = find(points, mine, image, "multipart", c), find(points, peer, image, "multipart", c)
            if ours is None or theirs is None:
                tally.lacks(f"{mine if ours is None else peer} {image} c{c}")
            elif theirs["img_s"] <= 0:
                tally.lacks(f"{peer} {image} c{c} (no response in the window)")
            else:
                ratio = ours["img_s"] / theirs["img_s"]
                ratios.append(ratio)
                tally.measured(ratio >= factor, f"{image} c{c}: {ratio:.2f}x")
    return tally.check(f"throughput >= {factor:g} x {label} (multipart, every image and c)", compares,
                       _worst(ratios))


def _limit_ratio(p: Row) -> float:
    """The point's img/s over the limit measured right after it where it was, else the run-start one."""
    after = p.get("ratio_to_limit_after")
    return after if after is not None else p["ratio_to_limit"]


THROUGHPUT_FACTORS = {4: 0.8, 16: 0.85}  # concurrency -> the least share of the in-process limit
OUR_PAYLOADS = ("raw", "multipart")  # what /v1/predict is driven with (bench.run); each target covers both


def verdict(points: list[Row], inprocess: list[Row], stream: Row | None, cover: Coverage,
            servers: Row | None = None) -> list[Row]:
    """The issue's targets, each with its measured ratio (the worst over the points it covers), what it
    compares, and what it lacks. `servers`: each server's recorded layout and pipeline (bench.run)."""
    servers = servers or {}
    ours = primary_server(points)
    mine = [p for p in points if p["server"] == ours]
    best = limits(inprocess)
    checks = []

    # Where the point has a limit measured right after it, that one counts: the machine's speed
    # drifts over the minutes between the run-start limit and the point (both ratios are shown).
    # Every concurrency measured is below model.max_queue, so no point may have an error.
    tally, worst = _Tally(), {c: [] for c in THROUGHPUT_FACTORS}
    for image in cover.images:
        if image not in best:
            tally.lacks(f"the in-process limit for {image} (no pipeline passed the guard)")
            continue
        for payload in OUR_PAYLOADS:
            for c, factor in THROUGHPUT_FACTORS.items():
                p = find(points, ours, image, payload, c)
                if p is None:
                    tally.lacks(f"{ours} {image} {payload} c{c}")
                    continue
                ratio = _limit_ratio(p)
                worst[c].append(ratio)
                tally.measured(ratio >= factor, f"{image} {payload} c{c}: {ratio:.2f}" + (
                    f" (run-start limit: {p['ratio_to_limit']:.2f})" if p.get("ratio_to_limit_after") is not None
                    else ""))
    errors = sum(p["errors"] for p in mine)
    if mine:
        tally.measured(errors == 0, f"{errors} errors over all {len(mine)} points of {ours}")
    checks.append(tally.check(
        "throughput at c16 >= 0.85 x and at c4 >= 0.8 x the best in-process pipeline (both photos and payloads, "
        "sessions and history on, the limit measured right after the point where it was), no errors below the "
        "queue bound",
        f"serving overhead: {ours} as config.toml sets it up against the best guarded pipeline with no serving "
        "(any decoder, runtime and thread layout in one process; includes auto's choice of runtime)",
        " ".join(f"c{c} {_worst(ratios)}," for c, ratios in worst.items()) + f" {errors} errors" if mine else "-"))

    checks.append(_ratio_vs_peer(
        points, cover, MATCHED, SAME_RUNTIME_PEER, 1.0, "LitServe on the same pipeline",
        f"serving overhead: {MATCHED} and {SAME_RUNTIME_PEER} in the same thread layout on the same pipeline "
        "(the server's decoder, the best guarded runtime and precision); ours keeps sessions and history, "
        "LitServe neither", servers, ("layout", "pipeline")))
    checks.append(_ratio_vs_peer(
        points, cover, MATCHED, TORCH_PEER, 2.5, "LitServe on the seed pipeline (torch eager)",
        f"pipeline and serving: {MATCHED} against {TORCH_PEER} (PIL + torchvision + torch eager) in the same "
        "thread layout", servers, ("layout",)))

    tally, ratios = _Tally(), []
    rows = (stream or {}).get("rows") or {}
    for image in cover.images:
        if image not in rows or image not in best:
            tally.lacks(f"the {'stream' if image not in rows else 'in-process limit'} for {image}")
            continue
        row = rows[image]
        ratio = row["stream"]["img_per_s"] / best[image]["img_s"]
        ratios.append(ratio)
        tally.measured(ratio >= 0.9, f"{image}: {row['stream']['img_per_s']:.1f} img/s over the limit "
                       f"{best[image]['img_s']:.1f} = {ratio:.2f}x (POST from the same client: "
                       f"{row['post']['img_per_s']:.1f} img/s)")
    checks.append(tally.check(
        f"WebSocket stream >= 0.9 x the in-process limit (one client, {(stream or {}).get('window', 8)} images "
        "in flight)", "the stream's serving overhead: one server process and one client against the best "
        "pipeline with no serving", _worst(ratios), sep="; "))

    tally, ratios = _Tally(), []
    for image in cover.images:
        flask = find(points, "flask", image, "multipart", 64)
        if flask is None:
            tally.lacks(f"flask {image} multipart c64")
            continue
        for payload in OUR_PAYLOADS:
            p = find(points, ours, image, payload, 64)
            if p is None:
                tally.lacks(f"{ours} {image} {payload} c64")
                continue
            # No Flask response inside the window: every one took longer, so the window is a lower bound.
            flask_p99 = flask["p99_ms"] if flask["ok"] else flask["window_s"] * 1000
            ratio = p["p99_ms"] / flask_p99 if p["ok"] else math.inf
            passed = ratio <= 0.5 and p["errors"] == 0
            ratios.append(ratio)
            if not passed and not flask["ok"] and p["errors"] == 0:  # the bound is too loose to decide
                tally.lacks(f"{image} {payload}: Flask answered nothing in the window (use a longer --duration)")
            else:
                tally.measured(passed, f"{image} {payload}: p99 {ratio:.2f}x flask"
                               + ("" if flask["ok"] else " (flask answered nothing in the window: its p99 >= "
                                  "window)") + f", {p['errors']} errors")
    checks.append(tally.check("p99 at c64 <= 0.5 x Flask's, no errors",
                              f"{ours} as config.toml sets it up against the seed app as it is (Flask, PIL + "
                              "torchvision + torch eager, a thread per request)",
                              f"worst {max(ratios):.2f}x" if ratios else "-", sep="; "))

    tally, ratios = _Tally(), []
    matched_rss = max((p["peak_rss_mb"] for p in points if p["server"] == MATCHED), default=0)
    for peer in (SAME_RUNTIME_PEER, TORCH_PEER):
        _like_for_like(tally, servers, MATCHED, peer, ("layout",))
        peer_rss = max((p["peak_rss_mb"] for p in points if p["server"] == peer), default=0)
        if not (peer_rss and matched_rss):
            tally.lacks(f"the peak RSS of {MATCHED if not matched_rss else peer}")
            continue
        ratios.append(matched_rss / peer_rss)
        tally.measured(matched_rss <= 0.7 * peer_rss, f"{MATCHED} {matched_rss:.0f} MB vs {peer} {peer_rss:.0f} MB "
                       f"({matched_rss / peer_rss:.2f}x)")
    checks.append(tally.check(f"peak RSS <= 0.7 x LitServe's ({MATCHED} includes its embedded redis-server)",
                              "memory of serving: the whole process tree of each, in the same thread layout",
                              f"worst {max(ratios):.2f}x" if ratios else "-", sep="; "))
    return checks


def other_checks(points: list[Row], inprocess: list[Row], cover: Coverage) -> list[Row]:
    """Earlier issues' targets, still measured: against Flask, single-image latency, Redis round trips."""
    ours = primary_server(points)
    mine = [p for p in points if p["server"] == ours]
    best = limits(inprocess)
    checks = [_ratio_vs_peer(points, cover, ours, "flask", 3.0, "Flask",
                             f"{ours} as config.toml sets it up against the seed app as it is")]
    if any(p["server"] == "litserve-onnx" for p in points):
        checks.append(_ratio_vs_peer(points, cover, ours, "litserve-onnx", 1.0,
                                     "LitServe on ONNX Runtime with the seed decode",
                                     f"{ours} as config.toml sets it up against LitServe's default layout"))

    tally = _Tally()
    for image in cover.images:
        if image not in best:
            tally.lacks(f"the in-process limit for {image}")
            continue
        for payload in OUR_PAYLOADS:
            p = find(points, ours, image, payload, 1)
            if p is None:
                tally.lacks(f"{ours} {image} {payload} c1")
                continue
            start = single_image_latency(inprocess, image, best[image]["pipeline"])
            ref = p["limit_after"]["p50_ms"] if p.get("limit_after") else start
            tally.measured(p["p50_ms"] <= ref + 3.0, f"{image} {payload}: {p['p50_ms']:.1f} vs {ref:.1f}+3 ms"
                           + (f" (run-start: {start:.1f})" if p.get("limit_after") else ""))
    checks.append(tally.check("c1 p50 <= in-process single-image p50 + 3 ms (measured right after the point where "
                              "it was)", "the latency serving adds to one image", "-"))

    cmds = [p["redis_cmds_per_predict"] for p in mine if p.get("redis_cmds_per_predict") is not None]
    reads = [p["redis_reads_per_predict"] for p in mine if p.get("redis_reads_per_predict") is not None]
    worst_cmds, worst_reads = max(cmds, default=None), max(reads, default=None)
    tally = _Tally()
    if worst_reads is None:
        tally.lacks(f"Redis read events per predict of {ours}")
    else:
        tally.measured(worst_reads <= 2.0 + 0.05, f"worst {fmt(worst_reads, 2)} reads/predict, "
                       f"{fmt(worst_cmds, 2)} commands/predict (per-command breakdown in results.json)")
    checks.append(tally.check(
        "<= 2 Redis round trips per predict (measured as Redis read events per predict, INFO stats "
        "total_reads_processed; commands per predict from INFO commandstats shown too: a pipeline or a "
        "script counts every command inside it, so commands over-count round trips)",
        "the session store's cost per predict", "-"))
    return checks


# ---------------------------------------------------------------- markdown


def fmt(value: Any, digits: int = 1) -> str:
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
    return f"{cmds:.2f} ({fmt(point.get('redis_reads_per_predict'), 2)})"


def markdown(results: Row) -> str:
    info = results["machine"]
    units = "AMX" if info.get("amx") else ("AVX512-BF16" if info.get("bf16") else "no BF16 units")
    lines = [
        "# Benchmark results",
        "",
        f"- **CPU**: {info['cpu_model']} (lscpu), {info['cores']} cores, {units}",
        f"- **When**: {info.get('date', '-')}, commit `{info.get('commit', '-')}`",
        f"- **Software**: Python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}, "
        f"openvino {info.get('openvino') or 'n/a'}, litserve {info.get('litserve') or 'n/a'}",
        f"- **How**: load generator {results['load_generator']}; warm-up {results['settings']['warmup_s']} s, "
        f"measured {results['settings']['duration_s']} s per point"
        f"{' (--quick: a smoke run, not a measurement)' if results['settings']['quick'] else ''}",
    ]
    lines += targets_table(results)
    lines += inprocess_section(results)
    lines += ["", "x limit: img/s over the run-start in-process limit; in brackets, over the limit measured again "
              "right after the point (where it was), which the targets use."]
    for image in results["images"]:
        lines += ["", f"## {image} ({results['images'][image]['description']})", "",
                  "| server | payload | c | img/s | p50 ms | p95 ms | p99 ms | errors | RSS MB "
                  "| redis cmds (reads)/predict | x limit | x ours |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in (p for p in results["points"] if p["image"] == image):
            lines.append(
                f"| {p['server']} | {p['payload']} | {p['concurrency']} | {fmt(p['img_s'])} | {fmt(p['p50_ms'])} | "
                f"{fmt(p['p95_ms'])} | {fmt(p['p99_ms'])} | {p['errors']} | {fmt(p['peak_rss_mb'], 0)} | "
                f"{_redis(p)} | {_limit_cell(p)} | "
                f"{fmt(p['ratio_to_ours'], 2)} |")
    lines += peers_section(results)
    lines += stream_section(results)
    lines += oip_section(results)
    lines += ["", "## Targets in detail", ""]
    for check in results["verdict"]:
        lines.append(f"- **{MARKS[check['pass']]}** {check['target']}: {check['detail']}")
    lines += ["", "## Other checks", ""]
    for check in results.get("other_checks", []):
        lines.append(f"- **{MARKS[check['pass']]}** {check['target']}: {check['detail']}")
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


# A target without its measurement is not met: it is never PASS (bench/README.md).
MARKS = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}


def targets_table(results: Row) -> list[str]:
    ours = primary_server(results["points"])
    served = results.get("servers", {}).get(ours, {}).get("runtime")
    lines = ["", f"## Targets ({ours}{f', served on {served}' if served else ''})", "",
             "| target | what it compares | measured | result |", "|---|---|---|---|"]
    for check in results["verdict"]:
        lines.append(f"| {check['target']} | {check['compares']} | {check['measured']} | "
                     f"**{MARKS[check['pass']]}** |")
    lines += ["", f"{met(results['verdict'])}; a target not measured is not met."]
    return lines


def inprocess_section(results: Row) -> list[str]:
    """Every pipeline and forward-only row, the guard's verdict on its runtime, and the limit per image."""
    lines = ["", "## In-process limit (no HTTP)", "",
             "Every runtime x decoder this CPU offers; only pipelines whose runtime passes the server's accuracy "
             "guard (inference.selection) may set the limit: the best of them per image, over both thread layouts.",
             "", "| pipeline | image | threads x intra-op | img/s | p50 ms | CPU ms/img | accuracy guard |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in results["inprocess"]:
        lines.append(f"| {r['label']} | {r['image']} | {r['threads']}x{r['intra_op_threads']} | "
                     f"{fmt(r['img_s'])} | {fmt(r['p50_ms'])} | {fmt(r.get('cpu_ms_per_image'), 2)} | "
                     f"{guard_mark(r)} |")
    lines.append("")
    for image, row in limits(results["inprocess"]).items():
        lines.append(f"- **limit for {image}**: {fmt(row['img_s'])} img/s, {row['label']} "
                     f"({row['threads']}x{row['intra_op_threads']})")
    return lines


def peers_section(results: Row) -> list[str]:
    """Ours in the peers' layout (multipart, the peers' body) against LitServe on the same pipeline and on
    the seed's; the row the targets use."""
    points = results["points"]
    ours = MATCHED
    peers = [peer for peer in (SAME_RUNTIME_PEER, TORCH_PEER) if any(p["server"] == peer for p in points)]
    if not peers:
        return []
    runtimes = {name: info.get("runtime") for name, info in results.get("servers", {}).items()}
    header = " | ".join(f"{peer} img/s | x" for peer in peers)
    lines = ["", "## Ours against LitServe", "",
             f"Multipart, the same bytes. {SAME_RUNTIME_PEER}: LitServe with the server's decoder on "
             f"{runtimes.get(SAME_RUNTIME_PEER) or 'the best runtime'}; {TORCH_PEER}: the seed pipeline on torch "
             f"eager; all three in the same thread layout; x = {ours} img/s / the peer's.", "",
             f"| image | c | {ours} img/s | {header} |", "|---|---:|---:|" + "---:|---:|" * len(peers)]
    for image in results["images"]:
        for c in sorted({p["concurrency"] for p in points if p["image"] == image}):
            mine = find(points, ours, image, "multipart", c)
            cells = []
            for peer in peers:
                theirs = find(points, peer, image, "multipart", c)
                ratio = mine["img_s"] / theirs["img_s"] if mine and theirs and theirs["img_s"] else None
                cells += [fmt(theirs["img_s"]) if theirs else "-", fmt(ratio, 2)]
            lines.append(f"| {image} | {c} | {fmt(mine['img_s']) if mine else '-'} | {' | '.join(cells)} |")
    return lines


def stream_section(results: Row) -> list[str]:
    stream = results.get("stream")
    if not stream:
        return []
    best = limits(results["inprocess"])
    lines = ["", "## WebSocket stream (bench.stream)", "",
             f"{stream['server']}, served on {stream.get('runtime', '-')}; {stream['client']}. One client, "
             f"{stream.get('window', '-')} images in flight either way.", "",
             "| image | stream img/s | x limit | POST img/s | stream / POST | client CPU ms/img stream / POST |",
             "|---|---:|---:|---:|---:|---:|"]
    for image, row in stream["rows"].items():
        limit = best.get(image, {}).get("img_s")
        lines.append(f"| {image} | {fmt(row['stream']['img_per_s'])} | "
                     f"{fmt(row['stream']['img_per_s'] / limit if limit else None, 2)} | "
                     f"{fmt(row['post']['img_per_s'])} | {fmt(row['ratio_stream_over_post'], 2)} | "
                     f"{fmt(row['stream']['client_cpu_ms_per_image'], 2)} / "
                     f"{fmt(row['post']['client_cpu_ms_per_image'], 2)} |")
    return lines


def _limit_cell(point: Row) -> str:
    after = point.get("ratio_to_limit_after")
    return fmt(point["ratio_to_limit"], 2) + (f" ({after:.2f})" if after is not None else "")


def _versus(point: Row | None, reference: Row | None) -> list[str]:
    """img/s, its ratio to the reference's img/s, and p50 ms, as table cells."""
    if point is None:
        return ["-", "-", "-"]
    ratio = point["img_s"] / reference["img_s"] if reference and reference["img_s"] else None
    return [fmt(point["img_s"]), fmt(ratio, 2), fmt(point["p50_ms"])]


def oip_section(results: Row) -> list[str]:
    """Open Inference Protocol rows next to our raw POST /v1/predict at the same image and c."""
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
            lines.append(f"| {image} | {c} | {fmt(v1['img_s']) if v1 else '-'} | "
                         f"{' | '.join(_versus(rest, v1))} | {' | '.join(_versus(grpc, v1))} | "
                         f"{fmt(grpc.get('client_cpu_pct')) if grpc else '-'} |")
    return lines


def verdict_text(checks: list[Row]) -> str:
    return "\n".join(f"  {MARKS[c['pass']]}  {c['target']}\n        {c.get('measured', '-')}: {c['detail']}"
                     for c in checks)


def met(checks: list[Row]) -> str:
    """How many targets are met: a target not measured is not met."""
    return f"{sum(c['pass'] is True for c in checks)} of {len(checks)} met"


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
# ---------------------------------------------------------------- bench/RESULTS.md


REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"
RESULTS_DIR = REPO / "bench" / "results"
BEGIN = "<!-- bench.report: begin"  # the generated section of RESULTS.md runs from this line ...
END = "<!-- bench.report: end -->"  # ... to this one


def evaluate(results: Row) -> Row:
    """`results` with its ratios, targets and other checks computed again from its raw rows, so that what
    RESULTS.md shows follows from the measurements by today's arithmetic, whatever a file says it concluded."""
    results = json.loads(json.dumps(results))
    cover = coverage(results)
    add_ratios(results["points"], results["inprocess"])
    results["verdict"] = verdict(results["points"], results["inprocess"], results.get("stream"), cover,
                                 results.get("servers") or {})
    results["other_checks"] = other_checks(results["points"], results["inprocess"], cover)
    return results


def guard_changes(recorded: Row | None) -> list[str]:
    """What of the accuracy guard differs between a result's record of it and the guard today."""
    from bench.pipelines import guard_identity

    if not recorded:
        return ["the result records no guard"]
    today = guard_identity()
    return [key for key in sorted(set(today) | set(recorded)) if today.get(key) != recorded.get(key)]


EN_DASH = "\u2013"


def _subsection(lines: list[str]) -> list[str]:
    """results.md's sections one heading level down, for RESULTS.md."""
    return ["#" + line if line.startswith("## ") else line for line in lines]


def _span(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}{EN_DASH}{high}"


def _ratios(points: list[Row], server: str, payload: str, reference: str, ref_payload: str) -> list[float]:
    """img/s of `server` over `reference`'s at the same image and concurrency."""
    found = []
    for p in points:
        if p["server"] == server and p["payload"] == payload:
            ref = find(points, reference, p["image"], ref_payload, p["concurrency"])
            if ref and ref["img_s"]:
                found.append(p["img_s"] / ref["img_s"])
    return found


def placeholder_section() -> str:
    return "\n".join([
        f"{BEGIN}: no results file -->",
        "## Full benchmark (`bench.run`)",
        "",
        "No full run's results file is committed yet. `python -m bench.run` writes "
        "`bench/results/run-<date>-<cpu>.json`; commit it, then `python -m bench.report "
        "bench/results/run-<date>-<cpu>.json --markdown` writes this section from it.",
        END])


def results_section(results: Row, source: str) -> str:
    """RESULTS.md's benchmark section: every table, figure and verdict from the results file at `source`."""
    results = evaluate(results)
    info, points, settings = results["machine"], results["points"], results["settings"]
    servers = results.get("servers") or {}
    ours = primary_server(points)
    images = list(results["images"])
    units = "AMX" if info.get("amx") else ("AVX512-BF16" if info.get("bf16") else "no BF16 units")
    guard = results.get("guard") or {}
    changed = guard_changes(guard)
    lines = [
        f"{BEGIN}, generated from {source} -->",
        "## Full benchmark (`bench.run`)",
        "",
        f"Generated by `python -m bench.report {source} --markdown` from the results file "
        f"[`{Path(source).name}`](results/{Path(source).name}); edit nothing between the markers, regenerate.",
        "",
        f"- **Machine**: {info['cpu_model']} (lscpu \"Model name\"), {info['cores']} cores, {units}",
        f"- **When**: {info.get('date', '-')}, commit `{info.get('commit', '-')}`",
        f"- **How**: `python -m bench.run`, {results['load_generator']}; {fmt(settings['warmup_s'])} s of warm-up, "
        f"{fmt(settings['duration_s'])} s measured per point"
        + ("" if settings.get("full") else " (**not a full run**: shortened or a subset)"),
        f"- **Runtime**: {ours} (`model.runtime = auto`) served on {servers.get(ours, {}).get('runtime', '-')}",
        f"- **Accuracy guard**: selection version {guard.get('selection_version', '-')}, tolerance "
        + ", ".join(f"{k.upper()} {v:g}" for k, v in (guard.get("tolerance") or {}).items())
        + f", at least {guard.get('top5_overlap', '-')} of the top 5",
    ]
    if changed:
        lines += ["", f"**This result predates a change of the accuracy guard** (changed since: {', '.join(changed)}): "
                  "its guard verdicts, and so its limit and litserve-best's runtime, are the old guard's."]
    lines += ["", "### Servers", "", "| server | thread layout | pipeline | payloads |", "|---|---|---|---|"]
    for name, server in servers.items():
        payloads = sorted({p["payload"] for p in points if p["server"] == name})
        lines.append(f"| {name} | {describe(server['layout']) if server.get('layout') else '-'} | "
                     f"{describe(server['pipeline']) if server.get('pipeline') else '-'} | {', '.join(payloads)} |")
    lines += _subsection(targets_table(results))
    lines += ["", "### In-process (img/s, no HTTP)", "",
              "| pipeline | threads x intra-op | " + " | ".join(images) + " | accuracy guard |",
              "|---|---|" + "---:|" * len(images) + "---|"]
    rows: dict[tuple[str, str], dict[str, Row]] = {}
    for row in results["inprocess"]:
        rows.setdefault((row["label"], f"{row['threads']}x{row['intra_op_threads']}"), {})[row["image"]] = row
    for (label, threads), by_image in rows.items():
        first = next(iter(by_image.values()))
        cells = [fmt(by_image[image]["img_s"]) if image in by_image else "" for image in images]
        if "-" in by_image:  # forward only: one zero image, shown in the first column
            cells[0] = fmt(by_image["-"]["img_s"])
        lines.append(f"| {label} | {threads} | {' | '.join(cells)} | {guard_mark(first)} |")
    lines.append("")
    for image, row in limits(results["inprocess"]).items():
        lines.append(f"- **limit for {image}**: {fmt(row['img_s'])} img/s, {row['label']} "
                     f"({row['threads']}x{row['intra_op_threads']})")
    concurrencies = settings["concurrencies"]
    lines += ["", "### Throughput (img/s; at c64 the p99 in ms in brackets)", "",
              "| server | payload | " + " | ".join(f"{image} c{c}" for image in images for c in concurrencies)
              + " | errors | peak RSS MB |", "|---|---|" + "---:|" * (len(images) * len(concurrencies) + 2)]
    for name, payload in dict.fromkeys((p["server"], p["payload"]) for p in points):
        cells = []
        for image in images:
            for c in concurrencies:
                p = find(points, name, image, payload, c)
                cells.append("-" if p is None else fmt(p["img_s"]) + (f" ({fmt(p['p99_ms'], 0)})" if c == 64 else ""))
        mine = [p for p in points if (p["server"], p["payload"]) == (name, payload)]
        lines.append(f"| {name} | {payload} | {' | '.join(cells)} | {sum(p['errors'] for p in mine)} | "
                     f"{fmt(max(p['peak_rss_mb'] for p in mine), 0)} |")
    lines += ["", "### Derived figures", ""]
    for image in images:
        for c in sorted({p["concurrency"] for p in points if p["server"] == ours and p["image"] == image}):
            at = [_limit_ratio(p) for p in points if (p["server"], p["image"], p["concurrency"]) == (ours, image, c)
                  and p.get("ratio_to_limit") is not None]
            if at:
                lines.append(f"- {ours} over the in-process limit, {image} c{c}: {_span(at)}")
    for payload, label in (("oip-rest", "OIP REST"), ("oip-grpc", "OIP gRPC")):
        spread = _ratios(points, "ours-oip", payload, ours, "raw")
        if spread:
            lines.append(f"- {label} over {ours}'s raw `/v1/predict`: {_span(spread)}x")
    for peer in (SAME_RUNTIME_PEER, TORCH_PEER):
        spread = _ratios(points, MATCHED, "multipart", peer, "multipart")
        if spread:
            lines.append(f"- {MATCHED} over {peer}: {_span(spread)}x")
    reads = [p["redis_reads_per_predict"] for p in points if p.get("redis_reads_per_predict") is not None]
    cmds = [p["redis_cmds_per_predict"] for p in points if p.get("redis_cmds_per_predict") is not None]
    if reads:
        lines.append(f"- Redis round trips (read events) per predict: {_span(reads)}; commands: {_span(cmds)}")
    lines += ["", "### Targets in detail", ""]
    lines += [f"- **{MARKS[c['pass']]}** {c['target']}: {c['detail']}" for c in results["verdict"]]
    lines += ["", "### Other checks", ""]
    lines += [f"- **{MARKS[c['pass']]}** {c['target']}: {c['detail']}" for c in results["other_checks"]]
    lines += _subsection(stream_section(results))
    if results.get("notes"):
        lines += ["", "### Notes", ""] + [f"- {note}" for note in results["notes"]]
    lines.append(END)
    return "\n".join(lines)


def section_of(text: str) -> str:
    """The generated section of RESULTS.md's `text`, markers included."""
    lines = text.split("\n")
    begin = next(i for i, line in enumerate(lines) if line.startswith(BEGIN))
    end = next(i for i, line in enumerate(lines) if line == END and i > begin)
    return "\n".join(lines[begin:end + 1])


def expected_section(results_dir: Path = RESULTS_DIR) -> str:
    """What RESULTS.md's section must be: generated from the newest full run's results file committed."""
    runs = sorted(results_dir.glob("run-*.json"))
    if not runs:
        return placeholder_section()
    return results_section(json.loads(runs[-1].read_text()), runs[-1].relative_to(REPO).as_posix())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="The report of one bench.run "
                                     "results file: results.md on stdout, or bench/RESULTS.md's section.")
    parser.add_argument("results", type=Path, help="a results file bench.run wrote, e.g. bench/results/run-*.json")
    parser.add_argument("--markdown", action="store_true", help="write bench/RESULTS.md's benchmark section")
    parser.add_argument("--chart", type=Path, help="also draw the chart into this PNG")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if args.chart:
        chart(results, args.chart)
    if not args.markdown:
        print(markdown(evaluate(results)), end="")
        return 0
    source = args.results.resolve()
    text = RESULTS_MD.read_text()
    section = results_section(results, source.relative_to(REPO).as_posix() if source.is_relative_to(REPO)
                              else str(args.results))
    RESULTS_MD.write_text(text.replace(section_of(text), section))
    print(f"wrote the benchmark section of {RESULTS_MD} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
