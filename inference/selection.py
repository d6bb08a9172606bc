"""Choosing the runtime for the CPU this runs on (`model.runtime = "auto"`), behind an accuracy guard.

No runtime is fastest everywhere: OpenVINO in BF16 nearly doubles the forwards of a Xeon with AMX,
while on a CPU without matrix units ONNX Runtime in FP32 may lead. So at the first start on a given
CPU model with given weights, each candidate (runtime x precision) is compiled with the server's own
thread layout, checked against the reference on the photos in `inference/guard/` under several option
sets, and timed for a few seconds. The fastest that passes the guard is kept; the choice and every
figure behind it are cached as JSON next to the exported graph, so later starts (and the other serving
processes) read it instead of measuring again. A pool of one candidate (the config names it) is
guarded but not timed, and when no candidate passes the server refuses to start.

The reference is independent of the export it guards: torch FP32's probabilities on the guard's cases,
computed when the graph is exported (by the process that has torch, `inference.torch_model`) and
stored beside it (`reference_path`), so that an export error shows as a difference. The guard, for
every photo and option set and each path a request may take through the runtime (the workers'
compilation, the one for a forward alone, the float tensors' graph): the same top-1 as the reference,
at least 4 of its top 5, and every probability within GUARD_TOLERANCE of it (1e-3 in FP32, 0.03 in BF16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from core.files import write_atomically
from core.options import CROP_RANGE, INTERPOLATIONS, Options
from inference import backends, imaging
from inference.model import AccuracyGuardFailed, Backend, ModelLoadError, softmax
from inference.pixels import PIXEL_GRAPH_VERSION, PixelBatch

log = logging.getLogger(__name__)

GUARD_TOLERANCE = {"fp32": 1e-3, "bf16": 0.03}
GUARD_TOP5_OVERLAP = 4
GUARD_DIR = Path(__file__).with_name("guard")


def guard_options(defaults: Options | None = None, input_size: int | None = None) -> dict[str, Options]:
    """The option sets the guard runs each photo under, from a model's own preprocessing defaults: those
    defaults, every other interpolation, grayscale, and a smaller crop (unless the model takes one size)."""
    defaults = defaults or Options()
    variants = {"default": defaults}
    for interpolation in INTERPOLATIONS:
        if interpolation != defaults.interpolation:
            variants[interpolation] = dataclasses.replace(defaults, interpolation=interpolation)
    variants["grayscale"] = dataclasses.replace(defaults, color="grayscale")
    if input_size is None:
        crop = max(CROP_RANGE[0], defaults.crop * 5 // 7)
        variants[f"crop{crop}"] = dataclasses.replace(defaults, crop=crop,
                                                      resize=max(crop, defaults.resize * crop // defaults.crop))
    return variants


#: The option sets of a model with the default preprocessing ([model]'s).
GUARD_OPTIONS = guard_options()
# Bump when the trial changes what it measures: cached choices are keyed by it.
SELECTION_VERSION = "4"
# Bump when what the reference holds changes, or how guard_options makes its sets: reference files are
# named by it.
REFERENCE_VERSION = "fp32-options-2"
_GUARD_MAX_PIXELS = 40_000_000
_TRIAL_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}"


@dataclass
class Trial:
    """What one candidate measured: the images per second it served, and the guard's verdict."""

    runtime: str
    precision: str
    images_per_second: float = 0.0  # decode, preprocess and forward, `workers` at once
    passed: bool = False
    worst: dict[str, Any] = field(default_factory=dict)  # the case furthest from the reference
    error: str = ""  # why it could not run at all


@dataclass
class Choice:
    runtime: str
    precision: str
    cpu: str
    trials: list[Trial]
    measured_at: str = ""

    def summary(self) -> str:
        def one(trial: Trial) -> str:
            if trial.error:
                return f"{trial.runtime} {trial.precision}: {trial.error}"
            verdict = "" if trial.passed else f", failed the accuracy guard ({trial.worst.get('why', '')})"
            speed = f"{trial.images_per_second:.0f} img/s" if trial.images_per_second else "guarded, not timed"
            return f"{trial.runtime} {trial.precision} {speed}{verdict}"
        return f"{self.runtime} {self.precision} on {self.cpu} ({'; '.join(one(t) for t in self.trials)})"

    @property
    def refused(self) -> bool:
        """No candidate passed the guard: nothing may serve."""
        return not self.runtime

    def refusal(self) -> str:
        """Why nothing may serve, in one sentence: each candidate's worst case against the reference."""
        reasons = "; ".join(f"{t.runtime} {t.precision}: {t.error or t.worst.get('why', '')}" for t in self.trials)
        return (f"No runtime passed the accuracy guard against torch FP32 on this model's export ({reasons}), so "
                "the server does not start; check the export, or set model.runtime = 'torch'.")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Choice:
        return cls(data["runtime"], data["precision"], data["cpu"], [Trial(**t) for t in data["trials"]],
                   data.get("measured_at", ""))


def cpu_model() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux' /proc/cpuinfo; empty elsewhere)."""
    name, flags = "unknown CPU", set[str]()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            if flags and name != "unknown CPU":
                break
    return name, flags


def has_bf16(flags: set[str]) -> bool:
    """Native BF16 arithmetic: AMX tiles or AVX512-BF16. Elsewhere BF16 is emulated, and slower."""
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def candidates(runtime: str, precision: str, flags: set[str]) -> list[Candidate]:
    """What `auto` may pick from (each exported runtime on the CPU, in each of its precisions; BF16 only
    where the CPU has it natively, unless forced), narrowed by what the config forces."""
    pool = [Candidate(spec.name, offered) for spec in backends.SPECS.values() if spec.exported and "cpu" in spec.devices
            for offered in spec.precisions if offered != "bf16" or has_bf16(flags) or precision == "bf16"]
    return [c for c in pool if runtime in ("auto", c.runtime) and precision in ("auto", c.precision)]


def make_backend(candidate: Candidate, path: Path, *, workers: int = 1, intra_op_threads: int = 1,
                 idle_intra_op_threads: int = 0, device: str = "cpu") -> Backend:
    """`candidate`'s runtime on the exported graph at `path`: `workers` forwards at once of
    `intra_op_threads` threads each, and a forward alone on `idle_intra_op_threads`."""
    spec = backends.spec(candidate.runtime)
    if not spec.exported:
        raise ModelLoadError(f"The runtime {candidate.runtime!r} does not run an exported graph.")
    return spec.factory(path, candidate.precision, backends.Layout(workers, intra_op_threads, idle_intra_op_threads,
                                                                   device))


def choose(onnx_path: Path, *, runtime: str, precision: str, workers: int, intra_op_threads: int,
           idle_intra_op_threads: int = 0, trial_seconds: float) -> Choice:
    """The cached choice for this CPU, graph, thread layout and libraries, or a new one measured now;
    raises ModelLoadError when no candidate passes the guard (or the guard could not run).

    The measuring runs in a child process, like the export: a server's parent process forks its
    serving processes afterwards, and the runtimes' thread pools do not survive a fork. One process
    measures while the others starting with it wait for its answer."""
    cpu, flags = cpu_model()
    pool = candidates(runtime, precision, flags)
    if not pool:
        raise ModelLoadError(f"No runtime offers model.runtime = {runtime!r} with model.precision = {precision!r}.")
    layout = (workers, intra_op_threads, idle_intra_op_threads)
    path = onnx_path.with_name(f"{onnx_path.stem}.runtime-{_key(cpu, flags, pool, layout)}.json")
    with open(onnx_path.parent / ".selection.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached, failure = _read(path), ""
        if cached is None:
            log.info("checking the runtimes against the accuracy guard on this CPU (once; cached as %s)", path.name)
            failure = _measure_in_child(
                onnx_path, path, runtime=runtime, precision=precision, workers=workers,
                intra_op_threads=intra_op_threads, idle_intra_op_threads=idle_intra_op_threads,
                trial_seconds=trial_seconds if len(pool) > 1 else 0.0)  # a pool of one: guarded, not timed
            cached = _read(path)
    if cached is None:  # no runtime may serve unguarded: the start fails, and the next one tries again
        raise ModelLoadError(f"Checking the runtimes against the accuracy guard failed: {failure.rstrip('.')}.")
    if cached.refused:
        raise ModelLoadError(cached.refusal())
    return cached


def _read(path: Path) -> Choice | None:
    try:
        return Choice.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _measure_in_child(onnx_path: Path, out: Path, *, runtime: str, precision: str, workers: int,
                      intra_op_threads: int, idle_intra_op_threads: int, trial_seconds: float) -> str:
    """Run the trial in a child process that writes `out`; why it failed ("" when it did not)."""
    command = [sys.executable, "-m", "inference.selection", str(onnx_path), str(out), "--runtime", runtime,
               "--precision", precision, "--workers", str(workers), "--intra-op-threads", str(intra_op_threads),
               "--idle-intra-op-threads", str(idle_intra_op_threads), "--trial-seconds", str(trial_seconds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_TRIAL_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return f"it took over {_TRIAL_TIMEOUT_SECONDS} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {done.returncode}"
    return ""


def measure_to_file(onnx_path: Path, out: Path, *, runtime: str, precision: str, workers: int,
                    intra_op_threads: int, idle_intra_op_threads: int = 0, trial_seconds: float) -> Choice:
    """Guard and time the candidates and write the choice to `out` atomically (what the child process does)."""
    cpu, flags = cpu_model()
    choice = measure(onnx_path, candidates(runtime, precision, flags), cpu=cpu, workers=workers,
                     make=lambda candidate: make_backend(candidate, onnx_path, workers=workers,
                                                         intra_op_threads=intra_op_threads,
                                                         idle_intra_op_threads=idle_intra_op_threads),
                     trial_seconds=trial_seconds)
    write_atomically(out, json.dumps(asdict(choice), indent=1))
    return choice


def _key(cpu: str, flags: set[str], pool: list[Candidate], layout: tuple[int, ...]) -> str:
    parts = [cpu, *sorted(flags & {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"}),
             *map(str, pool), ",".join(map(str, layout)), PIXEL_GRAPH_VERSION, SELECTION_VERSION, guard_key()]
    for package in ("onnxruntime", "openvino"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{package}=={metadata.version(package)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def measure(onnx_path: Path, pool: list[Candidate], *, cpu: str, workers: int,
            make: Callable[[Candidate], Backend], trial_seconds: float) -> Choice:
    """Guard every candidate against the export's torch FP32 reference, and time it unless `trial_seconds`
    is 0; the fastest that passes wins. When none passes, the choice names no runtime (`refused`)."""
    cases, reference = reference_cases(onnx_path)
    trials = []
    for candidate in pool:
        trial = Trial(candidate.runtime, candidate.precision)
        try:
            backend = make(candidate)
            trial.passed, trial.worst = guard(backend, cases, reference, GUARD_TOLERANCE[candidate.precision])
            if trial_seconds > 0:  # timed even when it fails the guard: the log and docs say what it would give
                trial.images_per_second = round(throughput(backend, workers, trial_seconds), 1)
        except Exception as exc:  # a runtime that cannot compile here is simply not a candidate
            trial.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        trials.append(trial)
    passing = [t for t in trials if t.passed and not t.error]
    best = max(passing, key=lambda t: t.images_per_second) if passing else Trial("", "")
    return Choice(best.runtime, best.precision, cpu, trials, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


# -- the accuracy guard ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardCase:
    name: str  # "<photo> <option set>"
    batch: PixelBatch
    photo: str = ""  # the file in inference/guard/
    options: Options = field(default_factory=Options)


def guard_cases(option_sets: dict[str, Options] | None = None) -> list[GuardCase]:
    """Each photo in inference/guard/ under each option set (GUARD_OPTIONS unless given: a model's own are
    `guard_options(spec.defaults, spec.input_size)`), preprocessed as the server does."""
    cases = []
    for photo in sorted(GUARD_DIR.glob("*.jpg")):
        data = photo.read_bytes()
        for label, options in (option_sets or GUARD_OPTIONS).items():
            cases.append(_case(photo.name, label, options, data))
    return cases


def _case(photo: str, label: str, options: Options, data: bytes) -> GuardCase:
    return GuardCase(f"{photo} {label}", imaging.prepare(data, options, max_pixels=_GUARD_MAX_PIXELS), photo, options)


@functools.cache  # the photos and libraries do not change while a process runs
def guard_key() -> str:
    """What the guard's cases are made of: the photos, how the option sets are made and the decoders that
    turn them into pixels. A reference computed from other cases is not this guard's reference. (The
    option sets themselves are stored in the reference: a graph's export is keyed by its model's defaults.)"""
    parts = [REFERENCE_VERSION, PIXEL_GRAPH_VERSION]
    parts += [f"{photo.name}:{hashlib.sha256(photo.read_bytes()).hexdigest()}"
              for photo in sorted(GUARD_DIR.glob("*.jpg"))]
    for package in ("pillow", "simplejpeg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{package}=={metadata.version(package)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def reference_path(onnx_path: Path) -> Path:
    """Where the FP32 reference of the graph at `onnx_path` is kept: beside it, named by the guard."""
    return onnx_path.with_name(f"{onnx_path.stem}.reference-{guard_key()}.npz")


def write_reference(onnx_path: Path, cases: list[GuardCase], probabilities: list[np.ndarray]) -> Path:
    """Store `probabilities` (the source model's FP32 answers, one row per case) as the reference of the graph
    at `onnx_path`, with each case's photo and options, so that a reader rebuilds the cases (`reference_cases`)."""
    buffer = io.BytesIO()
    np.savez(buffer, cases=np.array([case.name for case in cases]), photos=np.array([case.photo for case in cases]),
             options=np.array([json.dumps(case.options.to_dict()) for case in cases]),
             probabilities=np.stack(probabilities).astype(np.float32))
    path = reference_path(onnx_path)
    write_atomically(path, buffer.getvalue())
    return path


def reference_cases(onnx_path: Path) -> tuple[list[GuardCase], list[np.ndarray]]:
    """The guard's cases of the graph at `onnx_path` (its model's option sets, as stored with the reference)
    and the reference's probabilities for them: what `check` and `measure` hold a runtime to."""
    path = reference_path(onnx_path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            names, photos, options = stored["cases"].tolist(), stored["photos"].tolist(), stored["options"].tolist()
            probabilities = stored["probabilities"]
        photo_bytes = {photo: (GUARD_DIR / photo).read_bytes() for photo in set(photos)}
        cases = [_case(photo, name.partition(" ")[2], Options().merged(json.loads(text)), photo_bytes[photo])
                 for name, photo, text in zip(names, photos, options, strict=True)]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"The export {onnx_path.name} has no readable FP32 reference "
                             f"({type(exc).__name__}); export it again (delete it from the model cache).") from None
    return cases, list(probabilities)


def reference_probabilities(onnx_path: Path, cases: list[GuardCase]) -> list[np.ndarray]:
    """torch FP32's probabilities for `cases`, as stored beside the graph at `onnx_path` when it was
    exported: the reference every runtime on this graph is held to (read without torch)."""
    path = reference_path(onnx_path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            names, probabilities = stored["cases"].tolist(), stored["probabilities"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"The export {onnx_path.name} has no readable torch FP32 reference "
                             f"({type(exc).__name__}); export it again (delete it from the model cache).") from None
    if names != [case.name for case in cases]:
        raise ModelLoadError(f"The torch FP32 reference beside {onnx_path.name} holds other guard cases; export it "
                             "again (delete it from the model cache).")
    return list(probabilities)


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> tuple[bool, dict[str, Any]]:
    """The guard on one probability row: same top-1, GUARD_TOP5_OVERLAP of the top 5 (all of them for a
    model of fewer classes: its top 5 is every class), within `tolerance`."""
    top5_ref, top5 = set(np.argsort(reference)[-5:]), set(np.argsort(candidate)[-5:])
    required = min(GUARD_TOP5_OVERLAP, len(top5_ref))
    same_top1 = int(reference.argmax()) == int(candidate.argmax())
    overlap = len(top5_ref & top5)
    delta = float(np.abs(reference - candidate).max())
    why = [] if same_top1 else ["top-1 changed"]
    if overlap < required:
        why.append(f"{overlap} of the top 5 kept")
    if delta > tolerance:
        why.append(f"a probability moved {delta:.4f} (tolerance {tolerance:g})")
    return not why, {"max_delta": round(delta, 6), "top5_overlap": overlap, "same_top1": same_top1,
                     "why": ", ".join(why)}


#: Each way a request's batch reaches a runtime: the workers' compilation, the second compilation for
#: a forward alone (model.idle_intra_op_threads), and the original graph for float tensors (the OIP's).
GUARD_PATHS: dict[str, Callable[[Backend, PixelBatch], np.ndarray]] = {
    "": lambda backend, batch: backend.forward(batch),
    "a forward alone": lambda backend, batch: backend.forward(batch, alone=True),
    "a float tensor": lambda backend, batch: backend.forward(batch.to_tensor()),
}


def guard(backend: Backend, cases: list[GuardCase], reference: list[np.ndarray],
          tolerance: float) -> tuple[bool, dict[str, Any]]:
    """Whether `backend` passes on every case through every path, and the worst case (a failing one
    first, else the one with the largest probability change)."""
    results = []
    for case, expected in zip(cases, reference, strict=True):
        for path, forward in GUARD_PATHS.items():
            ok, detail = compare(expected, softmax(forward(backend, case.batch))[0], tolerance)
            name = f"{case.name} ({path})" if path else case.name
            results.append((ok, detail["max_delta"], {**detail, "case": name}))
    passed = all(ok for ok, _, _ in results)
    _, _, worst = min(results, key=lambda result: (result[0], -result[1]))  # failures first, then the largest change
    worst["why"] = f"{worst['why'] or 'passed'} on {worst['case']}"
    return passed, worst


def check(backend: Backend, onnx_path: Path, what: str) -> None:
    """Hold `backend`, serving the graph at `onnx_path`, to the guard against that graph's torch FP32
    reference; raises AccuracyGuardFailed naming `what` (the runtime and the version) and the worst case."""
    cases, reference = reference_cases(onnx_path)
    passed, worst = guard(backend, cases, reference, GUARD_TOLERANCE[backend.precision])
    if not passed:
        raise AccuracyGuardFailed(f"{what} fails the accuracy guard against its torch FP32 reference: {worst['why']}.")


# -- the timing -----------------------------------------------------------------------------------
def throughput(backend: Backend, workers: int, seconds: float) -> float:
    """Images per second through the server's own pipeline (decode, resize and crop, forward) of the
    guard photos in turn, with `workers` threads at once as the runner's workers run under load. The
    whole pipeline, not the forward alone: a runtime's own threads (OpenVINO's spin before they sleep)
    take CPU from the decoding, which a forward timed alone does not show."""
    photos = [photo.read_bytes() for photo in sorted(GUARD_DIR.glob("*.jpg"))]
    options = Options()

    def one(index: int) -> None:
        backend.forward(imaging.prepare(photos[index % len(photos)], options, max_pixels=_GUARD_MAX_PIXELS))

    one(0)  # the first forward allocates and compiles for the shape
    deadline = time.perf_counter() + seconds
    counts = [0] * workers

    def loop(slot: int) -> None:
        while time.perf_counter() < deadline:
            one(counts[slot] + slot)
            counts[slot] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(loop, range(workers)))  # a forward that fails fails the trial
    return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """python -m inference.selection GRAPH OUT [...]: measure the candidates, write the choice to OUT."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m inference.selection")
    parser.add_argument("graph", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runtime", default="auto", choices=backends.runtimes())
    parser.add_argument("--precision", default="auto", choices=backends.precisions())
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--idle-intra-op-threads", type=int, default=0)
    parser.add_argument("--trial-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        choice = measure_to_file(args.graph, args.out, runtime=args.runtime, precision=args.precision,
                                 workers=args.workers, intra_op_threads=args.intra_op_threads,
                                 idle_intra_op_threads=args.idle_intra_op_threads, trial_seconds=args.trial_seconds)
    except ModelLoadError as exc:  # its one sentence is the parent's last line of stderr
        print(exc, file=sys.stderr)
        return 2
    print(choice.refusal() if choice.refused else choice.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
