"""Weights pushed from training: validated, stored, activated on every replica.

A version's file lives in `models.store_dir` (in a multi-host deployment, a volume the replicas
share) as `<name>/<version>.<sha256 prefix>.pt`; its metadata and the active version live in Redis
(`sessions.model_registry`). Activation is a reference swap in the runner: requests admitted before
it finish on the weights they started with. Every replica follows activations and removals over
Redis pub/sub, and re-reads the active version whenever it (re)subscribes, so one that was cut off
catches up.

A canary serves a version to a share of the sessions: a session is assigned by its canary slot (or
a stable hash of its id) and the canary's version, so it keeps one version for as long as the canary
lasts, and the others keep the active version. A session's pinned `model_version` wins over both,
but a session may pin only what an admin allows: the active version, the canary's, or one marked
pinnable; a pin that stops being allowed is refused at its next use.

Loading and checking weights run on this module's own thread, never on the runner's workers or the
IOLoop, so serving goes on at full speed while a version is validated or loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from core.clock import iso, now_ms
from core.errors import BadRequest, Conflict, NotFound, ServiceError, quoted, quoted_names
from core.options import MODEL_VERSION, Options
from core.session import Session
from inference.model import AccuracyGuardFailed, Backend, LoadedModel, ModelLoadError
from inference.runner import ModelRunner, ServedModel
from service.feedback import FeedbackService, quality_view
from sessions.model_registry import Canary, ModelEvent, ModelRegistry, VersionRecord

log = logging.getLogger("inference.weights")
T = TypeVar("T")

# The fixed input of the validation forward: a deterministic ramp rather than zeros, so that every
# layer sees varied values.
_CHECK_SHAPE = (1, 3, 224, 224)
_CLOSE_TIMEOUT_SECONDS = 2.0


class BadWeights(ServiceError):
    status = 422
    code = "invalid_weights"


class VersionNotPinnable(ServiceError):
    status = 403
    code = "model_version_not_pinnable"


class InvalidTrafficPercent(ServiceError):
    status = 422
    code = "invalid_traffic_percent"


TRAFFIC_PERCENT = (1, 100)


def parse_traffic_percent(body: dict[str, Any]) -> int:
    """The share of sessions an activation serves (100 unless the body says): 422 outside 1..100."""
    unknown = set(body) - {"traffic_percent"}
    low, high = TRAFFIC_PERCENT
    if unknown:
        raise InvalidTrafficPercent(f"Unknown field(s) {quoted_names(unknown)}; the body takes traffic_percent.")
    percent = body.get("traffic_percent", high)
    if isinstance(percent, bool) or not isinstance(percent, int) or not low <= percent <= high:
        raise InvalidTrafficPercent(f"traffic_percent must be an integer from {low} to {high}, got {quoted(percent)}.")
    return percent


def in_canary(session_id: str, canary: Canary, slot: int | None = None) -> bool:
    """Whether the canary serves this session: stable for the session and the canary's version.

    `slot`: the session's canary slot (sessions.store.canary_slot), shifted by a hash of the version so
    that each canary takes other sessions, and exactly its share of any 100 consecutive new ones. A
    session older than slots falls back to a hash of its id and the version."""
    if slot is not None:
        shift = int.from_bytes(hashlib.sha256(canary.version.encode()).digest()[:8], "big")
        return (slot + shift) % 100 < canary.traffic_percent
    digest = hashlib.sha256(f"{session_id}:{canary.version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < canary.traffic_percent


def choose_version(canary: Canary | None, session: Session | None, options: Options) -> str | None:
    """The version a request runs: the session's pinned one, else `canary`'s where the canary serves
    the session, else None (the active version). Anonymous requests (no session) run the active one."""
    if options.model_version is not None:
        return options.model_version
    if canary is not None and session is not None and in_canary(session.id, canary, session.canary_slot):
        return canary.version
    return None


class ModelVersions:
    """Publishes, activates, removes and follows model versions for this process's runner."""

    def __init__(self, registry: ModelRegistry, runner: ModelRunner, *, store_dir: Path,
                 backend_for: Callable[[LoadedModel], Backend], feedback: FeedbackService | None = None):
        """`store_dir`: models.store_dir resolved; `backend_for`: the configured runtime for a model
        loaded with torch (the composition root knows which); `feedback`: the quality of each version."""
        self.registry = registry
        self.feedback = feedback
        self.runner = runner
        self._backend_for = backend_for
        self.name = runner.model.name
        self.base_version = runner.model.version  # the weights the config names, served until an activation
        self._base = runner.served()  # kept so that sessions may pin the configured weights too
        self.model_dir = store_dir.expanduser().resolve() / self.name
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="weights")
        self._lock = asyncio.Lock()  # one load-and-swap at a time in this process
        self._prepared: dict[str, ServedModel] = {}  # the last validated upload, ready to activate
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self.canary: Canary | None = None  # as this replica last read it (kept current by _follow)

    # -- publishing -------------------------------------------------------------------------------
    def check_name(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise NotFound(f"This server serves the model {self.name!r}, not {quoted(name)}.", code="model_not_found")
        if version is not None and not MODEL_VERSION.match(version):
            raise BadRequest("A version name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit.", code="invalid_version")

    def upload_path(self) -> Path:
        """A fresh temporary file in the store, next to where the version will live (same filesystem,
        so publishing it is a rename)."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        return self.model_dir / f".upload-{uuid.uuid4().hex}.partial"

    def path_for(self, record: VersionRecord) -> Path:
        # The hash in the name keeps two uploads racing for one version name from overwriting each other.
        return self.model_dir / f"{record.version}.{record.sha256[:16]}.pt"

    async def publish(self, version: str, upload: Path, sha256: str, size: int) -> VersionRecord:
        """Validate the uploaded state_dict and record it as `version` (not yet active)."""
        try:
            await self._ensure_new(version)
            model = await self._off_path(self._load_checked, upload, version, sha256)
            served = await self._off_path(self._serve, model)  # exports for ONNX Runtime now, not at activation
            record = VersionRecord(self.name, version, sha256, size, now_ms())
            final = self.path_for(record)
            os.replace(upload, final)
            if not await self.registry.add(record):  # another upload took the name meanwhile
                winner = await self.registry.get(self.name, version)
                if winner is None or winner.sha256 != sha256:
                    final.unlink(missing_ok=True)
                raise Conflict(f"Version {version!r} of {self.name} already exists; versions are immutable, "
                               "publish under a new name.", code="version_exists")
        finally:
            upload.unlink(missing_ok=True)
        self._prepared = {version: served}
        log.info("published %s version %s (sha256 %s, %d bytes)", self.name, version, sha256[:12], size)
        return record

    async def _ensure_new(self, version: str) -> None:
        if version == self.base_version or await self.registry.get(self.name, version) is not None:
            raise Conflict(f"Version {version!r} of {self.name} already exists; versions are immutable, publish "
                           "under a new name.", code="version_exists")

    def _load_checked(self, path: Path, version: str, sha256: str | None = None) -> LoadedModel:
        """A fresh copy of the architecture with these weights, checked by one forward on a fixed input."""
        # Imported on the first upload or version load only, so a process that never gets one
        # stays torch-free on ONNX Runtime (see inference.model).
        import torch

        from inference.torch_model import load_model

        try:
            model = load_model(self.name, str(path))  # torch.load(weights_only=True): no pickle code
        except ModelLoadError as exc:
            raise BadWeights(str(exc).replace(str(path), "the uploaded file")) from None
        if sha256 is not None and model.weights_sha256 != sha256:
            raise BadWeights("The file changed while it was read; upload it again.")
        example = torch.linspace(-2.0, 2.0, steps=int(torch.tensor(_CHECK_SHAPE).prod())).reshape(_CHECK_SHAPE)
        try:
            with torch.inference_mode():
                logits = model.module(example)
        except Exception as exc:
            raise BadWeights(f"The model failed on a test input with these weights ({type(exc).__name__}).") from None
        expected = (1, len(model.labels))
        if tuple(logits.shape) != expected:
            raise BadWeights(f"The model gives {tuple(logits.shape)} logits on one image, not {expected}.")
        if not bool(torch.isfinite(logits).all()):
            raise BadWeights("The model gives NaN or infinite logits with these weights.")
        return dataclasses.replace(model, version=version)

    def _serve(self, model: LoadedModel) -> ServedModel:
        """`model` on the configured runtime, held to the accuracy guard against its own torch FP32
        reference (at publish, and again wherever it is loaded): a version whose export disagrees is refused."""
        try:
            return ServedModel(model, self._backend_for(model))
        except AccuracyGuardFailed as exc:
            raise BadWeights(f"Version {model.version!r} was refused: {exc}") from None

    # -- activating, pinning, removing ------------------------------------------------------------
    def version_for(self, session: Session | None, options: Options) -> str | None:
        return choose_version(self.canary, session, options)

    async def activate(self, version: str, traffic_percent: int = 100) -> dict[str, Any]:
        """Load `version` here, mark it active in Redis (which tells the other replicas), swap it in.
        The configured weights' version rolls every replica back to them. Below 100 percent the
        version starts a canary instead; any activation at 100 ends a canary."""
        if traffic_percent < 100:
            return await self._start_canary(version, traffic_percent)
        if version == self.base_version:
            async with self._lock:
                await self.registry.restore_configured(self.name)
                self.runner.activate(self._base)
                self.canary = None
            log.info("activated %s's configured weights (%s)", self.name, version)
            return {"version": version, "sha256": self._base.model.weights_sha256, "configured": True,
                    "activated_at": iso(now_ms()), "active": True}
        async with self._lock:
            record = await self._record(version)
            served = self._prepared.pop(version, None)
            if served is None:
                served = self.runner.served(version) if self.runner.has_version(version) else await self._load(record)
            if not await self.registry.activate(self.name, version, now_ms()):
                raise NotFound(f"Version {version!r} was removed meanwhile.", code="model_version_not_found")
            self.runner.activate(served)
            self.canary = None
        log.info("activated %s version %s", self.name, version)
        return (await self._record(version)).to_dict(active=True)

    async def _start_canary(self, version: str, traffic_percent: int) -> dict[str, Any]:
        configured = version == self.base_version
        if not configured:
            await self._record(version)  # 404 for an unknown version
        baseline = await self.registry.active(self.name) or self.base_version
        if version == baseline:
            raise Conflict(f"Version {version!r} is active: it serves every session already.", code="version_active")
        await self._hold(version)  # loaded here before any session is sent to it
        canary = Canary(version, traffic_percent, baseline, now_ms())
        if not await self.registry.start_canary(self.name, canary, configured=configured):
            raise NotFound(f"Version {version!r} was removed meanwhile.", code="model_version_not_found")
        self.canary = canary
        log.info("canary: %s version %s serves %d%% of sessions, the others keep %s", self.name, version,
                 traffic_percent, baseline)
        return canary_view(canary)

    async def ensure(self, version: str | None) -> None:
        """Make the `version` a request runs (version_for) available to the runner: 409 when it was
        removed, 403 when it is neither active, the canary's, nor marked pinnable (a pin made while it
        was, or a per-request override), so a session cannot make this process load any version."""
        if version is None:
            return
        if not await self.may_pin(version):
            raise _removed(version)
        await self._hold(version)

    async def _hold(self, version: str) -> None:
        """Load `version` into this process's runner unless it holds it; 409 when it was removed."""
        if self.runner.has_version(version):
            return
        async with self._lock:
            if self.runner.has_version(version):
                return
            if version == self.base_version:
                self.runner.add_version(self._base)
                return
            record = await self.registry.get(self.name, version)
            if record is None:
                raise _removed(version)
            self.runner.add_version(await self._load(record))

    async def may_pin(self, version: str) -> bool:
        """Whether a session may pin `version`: False when there is no such version; 403
        `model_version_not_pinnable` when there is, but it is neither active, the canary's, nor marked
        pinnable by an admin. What this replica serves and its canary answer without Redis."""
        if version == self.runner.model.version or (self.canary is not None and version == self.canary.version):
            return True
        status = await self.registry.pin_status(self.name, version, configured=version == self.base_version)
        if status == "missing":
            return False
        if status == "not_pinnable":
            raise VersionNotPinnable(f"Model version {version!r} is not pinnable: a session may pin the active "
                                     "version, the canary's, or one an admin marked pinnable (GET /v1/models "
                                     "lists them); set model_version to null to follow the active version.")
        return True

    async def set_pinnable(self, version: str, pinnable: bool) -> dict[str, Any]:
        """Let sessions pin `version` (published, or the configured weights') or no longer; 404 for
        an unknown version. Unmarked, replicas drop a copy they hold only for pins, and its pinned
        sessions are refused (403) unless it is active or the canary's."""
        if not await self.registry.mark_pinnable(self.name, version, pinnable,
                                                 configured=version == self.base_version):
            raise NotFound(f"No version {version!r} of {self.name}.", code="model_version_not_found")
        log.info("%s version %s %s pinnable", self.name, version, "made" if pinnable else "no longer")
        return {"name": self.name, "version": version, "pinnable": pinnable}

    async def remove(self, version: str) -> None:
        record = await self._record(version)
        outcome = await self.registry.remove(self.name, version)
        if outcome in ("active", "canary"):
            what = "active" if outcome == "active" else "serving a canary"
            raise Conflict(f"Version {version!r} is {what}; activate another one first.", code="version_active")
        if outcome == "missing":
            raise NotFound(f"No version {version!r} of {self.name}.", code="model_version_not_found")
        self.runner.drop_version(version)
        self._prepared.pop(version, None)
        self.path_for(record).unlink(missing_ok=True)
        log.info("removed %s version %s", self.name, version)

    def labels(self, name: str) -> dict[str, Any]:
        """The class labels of the version serving everyone: index i names class i (what feedback takes)."""
        self.check_name(name)
        model = self.runner.served().model
        return {"name": model.name, "version": model.version, "labels": model.labels}

    async def listing(self) -> dict[str, Any]:
        records, active = await self.registry.versions(self.name)
        quality = await self.feedback.quality() if self.feedback is not None else {}
        pinned_quality = await self.feedback.quality(pinned=True) if self.feedback is not None else {}
        canary = await self.registry.canary(self.name)
        pinnable = await self.registry.pinnable(self.name)
        none = quality_view(0, 0)

        def pins_and_feedback(version: str) -> dict[str, Any]:
            # feedback: from sessions that did not choose the version (the canary's or the baseline's
            # share), the number to promote on; pinned_feedback: from sessions that pinned it.
            return {"pinnable": version in pinnable, "feedback": quality.get(version, none),
                    "pinned_feedback": pinned_quality.get(version, none)}

        return {"models": [{
            "name": self.name,
            "active_version": active,  # null: the weights named in the config
            "serving_version": self.runner.model.version,  # what this replica runs now
            "canary": canary_view(canary) if canary is not None else None,
            "configured": {"version": self.base_version, "sha256": self._base.model.weights_sha256,
                           **pins_and_feedback(self.base_version)},
            "versions": [{**record.to_dict(active=record.version == active), **pins_and_feedback(record.version)}
                         for record in records],
        }]}

    async def _record(self, version: str) -> VersionRecord:
        record = await self.registry.get(self.name, version)
        if record is None:
            raise NotFound(f"No version {version!r} of {self.name}.", code="model_version_not_found")
        return record

    async def _load(self, record: VersionRecord) -> ServedModel:
        path = self.path_for(record)
        if not path.is_file():
            raise Conflict(f"The file of version {record.version!r} is missing from models.store_dir.",
                           code="model_version_removed")
        model = await self._off_path(self._load_checked, path, record.version, record.sha256)
        return await self._off_path(self._serve, model)

    async def _off_path(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    # -- following the other replicas --------------------------------------------------------------
    async def start(self) -> None:
        """Serve the active version, then follow activations and removals until close(). A replica
        that starts after an activation so never answers with the older weights; one that starts
        while Redis is down serves the configured weights and catches up once it is back."""
        try:
            await self._catch_up()
        except ServiceError as exc:
            log.warning("could not read the active model version (%s); serving %s until Redis answers",
                        exc.message, self.runner.model.version)
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        self._closing = True
        if self._follower is not None:
            self._follower.cancel()
            # redis-py can turn a cancellation inside a reconnect into a connection error, which the
            # follower's retry loop would take for Redis trouble; the flag ends it then, and the wait
            # is bounded either way, so a shutdown never hangs here.
            await asyncio.wait({self._follower}, timeout=_CLOSE_TIMEOUT_SECONDS)
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _follow(self) -> None:
        delay, failing = 0.25, False
        while True:
            try:
                async for event in self.registry.events():
                    if event.event == "subscribed":
                        await self._catch_up()  # whatever happened while we were not listening
                    else:
                        await self._apply(event)
                    delay, failing = 0.25, False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarted: keep serving, resubscribe later
                if self._closing:
                    return
                if not failing:
                    log.warning("not following model versions (%s); retrying", exc)
                failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _catch_up(self) -> None:
        await self._follow_canary()
        active = await self.registry.active(self.name)
        if (active or self.base_version) != self.runner.model.version:
            await self._apply(ModelEvent("activated", self.name, active or ""))

    async def _follow_canary(self) -> None:
        """Read the canary (an activation ends it, a canary event starts or changes it) and load its
        version here before any session is sent to it."""
        canary = await self.registry.canary(self.name)
        if canary is not None:
            try:
                await self._hold(canary.version)
            except ServiceError as exc:
                log.error("cannot load %s canary version %s (%s); its sessions keep %s", self.name, canary.version,
                          exc.message, self.runner.model.version)
                canary = None
        self.canary = canary

    async def _apply(self, event: ModelEvent) -> None:
        if event.name != self.name:
            return
        if event.event in ("activated", "canary"):
            await self._follow_canary()
        if event.event == "removed":
            self.runner.drop_version(event.version)
            self._prepared.pop(event.version, None)
            return
        if event.event == "unpinnable":  # held for pinned sessions only, unless it serves a canary here
            if self.canary is None or self.canary.version != event.version:
                self.runner.drop_version(event.version)
            return
        if event.event != "activated" or event.version == self.runner.model.version:
            return
        if not event.version:  # back to the configured weights, unless something newer was activated
            async with self._lock:
                if await self.registry.active(self.name) is None:
                    self.runner.activate(self._base)
            log.info("following activation: now serving %s's configured weights", self.name)
            return
        async with self._lock:
            record = await self.registry.get(self.name, event.version)
            if record is None or await self.registry.active(self.name) != event.version:
                return  # superseded or removed since: the later event will say what to do
            try:
                served = self._prepared.pop(event.version, None) or await self._load(record)
            except ServiceError as exc:
                log.error("cannot load %s version %s (%s); still serving %s", self.name, event.version,
                          exc.message, self.runner.model.version)
                return
            self.runner.activate(served)
        log.info("following activation: now serving %s version %s", self.name, event.version)


    # -- temporary (issue 23): the model catalogue's two methods the OIP dataplane reads; the split of
    # this module into a catalogue replaces them ----------------------------------------------------
    def listed_versions(self) -> list[str]:
        """The versions this process answers with, the active one first: the canary's and those held for
        pinned sessions or named in a request."""
        held = [self.runner.model.version]
        if self.canary is not None:
            held.append(self.canary.version)
        held.extend(self.runner._pinned)  # temporary: the catalogue will own the loaded versions
        return list(dict.fromkeys(held))

    async def served_for_version(self, version: str | None) -> ServedModel:
        """The served model that answers `version` (None: the active one), loaded here if need be; 404
        `model_version_not_found` for an unknown version, 403 `model_version_not_pinnable` for one that
        may not be served."""
        if version is None or version == self.runner.model.version:
            return self.runner.served()
        if not await self.may_pin(version):
            raise NotFound(f"Model {self.name!r} has no version {quoted(version)}; it serves version "
                           f"{self.runner.model.version!r}.", code="model_version_not_found")
        await self._hold(version)
        return self.runner.served(version)

def _removed(version: str) -> Conflict:
    return Conflict(f"Model version {version!r} was removed (or never published); set the session's model_version "
                    "to null or to a version listed by GET /v1/models.", code="model_version_removed")


def canary_view(canary: Canary) -> dict[str, Any]:
    return {"version": canary.version, "traffic_percent": canary.traffic_percent, "baseline": canary.baseline,
            "started_at": iso(canary.started_at_ms)}
