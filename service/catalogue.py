"""The model catalogue: weights pushed from training, validated, stored, activated on every replica.

A version's file lives in `models.store_dir` (in a multi-host deployment, a volume the replicas
share) as `<name>/<version>.<sha256 prefix>.pt`; its metadata and the active version live in Redis
(`sessions.model_registry`). Activation is a reference swap in this process's LoadedVersions
(service.loaded_versions): requests admitted before it finish on the weights they started with.
Every replica follows activations and removals over Redis pub/sub (service.follower).

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
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from core.clock import iso, now_ms
from core.errors import BadRequest, BadWeights, Conflict, NotFound, ServiceError
from core.options import MODEL_VERSION, Options
from core.session import Session
from inference.model import AccuracyGuardFailed, Backend, LoadedModel
from inference.repository import ModelSpec
from inference.runner import ServedModel
from service.canary import canary_view, choose_version
from service.feedback import FeedbackService, quality_view
from service.follower import VersionFollower
from service.loaded_versions import LoadedVersions
from sessions.model_registry import Canary, ModelRegistry, VersionRecord

log = logging.getLogger("inference.weights")
T = TypeVar("T")
Args = TypeVarTuple("Args")


class VersionNotPinnable(ServiceError):
    status = 403
    code = "model_version_not_pinnable"


class ModelCatalogue:
    """One model's versions: publishes, activates, removes and lists them, and picks (loading it on first
    use) the one each request runs; a VersionFollower keeps it in step with the other replicas."""

    def __init__(self, registry: ModelRegistry, spec: ModelSpec, configured: ServedModel, *, store_dir: Path,
                 backend_for: Callable[[LoadedModel], Backend], feedback: FeedbackService | None = None):
        """`spec`: the model as its manifest (or `[model]`) states it; `configured`: the weights it names,
        served until an activation; `store_dir`: models.store_dir resolved; `backend_for`: the configured
        runtime for a version loaded with torch (the composition root knows which); `feedback`: the quality
        of each version."""
        self.spec = spec
        self.registry = registry
        self.feedback = feedback
        self.loaded = LoadedVersions(configured)  # the versions this process holds, swapped by reference
        self._backend_for = backend_for
        self.name = configured.model.name
        self.base_version = configured.model.version
        self.base = configured  # kept so that sessions may pin the configured weights too
        self.model_dir = store_dir.expanduser().resolve() / self.name
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="weights")
        self.lock = asyncio.Lock()  # one load-and-swap at a time in this process
        self.prepared: dict[str, ServedModel] = {}  # the last validated upload, ready to activate
        self.canary: Canary | None = None  # as this replica last read it (kept current by the follower)
        self.pinnable: set[str] = set()  # versions marked pinnable, as this replica last read them
        self._follower = VersionFollower(self)

    # -- publishing -------------------------------------------------------------------------------
    @staticmethod
    def check_version(version: str) -> None:
        if not MODEL_VERSION.match(version):
            raise BadRequest("A version name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit.", code="invalid_version")

    def upload_path(self) -> Path:
        """A fresh temporary file in the store, next to where the version will live (same filesystem,
        so publishing it is a rename)."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        return self.model_dir / f".upload-{uuid.uuid4().hex}.partial"

    def path_for(self, record: VersionRecord) -> Path:
        # The hash in the name keeps two uploads racing for one version name from overwriting each other.
        suffix = ".onnx" if self.spec.format == "onnx" else ".pt"
        return self.model_dir / f"{record.version}.{record.sha256[:16]}{suffix}"

    async def publish(self, version: str, upload: Path, sha256: str, size: int) -> VersionRecord:
        """Validate the uploaded file (a state_dict, an ONNX or a TorchScript file, as the model is) and record
        it as `version` (not yet active)."""
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
        self.prepared = {version: served}
        log.info("published %s version %s (sha256 %s, %d bytes)", self.name, version, sha256[:12], size)
        return record

    async def _ensure_new(self, version: str) -> None:
        if version == self.base_version or await self.registry.get(self.name, version) is not None:
            raise Conflict(f"Version {version!r} of {self.name} already exists; versions are immutable, publish "
                           "under a new name.", code="version_exists")

    def _load_checked(self, path: Path, version: str, sha256: str | None = None) -> LoadedModel:
        # Imported on the first upload or version load only, so a process that never gets one
        # stays torch-free on an exported runtime (see inference.model).
        from inference.torch_model import load_checked

        return load_checked(self.spec, path, version, sha256)

    def _serve(self, model: LoadedModel) -> ServedModel:
        """`model` on the configured runtime, held to the accuracy guard against its own torch FP32
        reference (at publish, and again wherever it is loaded): a version whose export disagrees is refused."""
        try:
            return ServedModel(model, self._backend_for(model))
        except AccuracyGuardFailed as exc:
            raise BadWeights(f"Version {model.version!r} was refused: {exc}") from None

    # -- activating, pinning, removing ------------------------------------------------------------
    @property
    def active(self) -> ServedModel:
        """The version serving everyone not pinned or in a canary."""
        return self.loaded.active

    def version_for(self, session: Session | None, options: Options) -> str | None:
        return choose_version(self.canary, session, options)

    async def served_for(self, session: Session | None, options: Options) -> ServedModel:
        """The model a request runs: the session's pin, else a canary's where one serves the session,
        else the active one; loaded into this process on first use, so whichever serving process or
        transport takes a request, the session gets one answer. 409 `model_version_removed` for a
        version removed, 403 `model_version_not_pinnable` for one that may not be pinned (see ensure)."""
        version = self.version_for(session, options)
        if version:
            await self.ensure(version)
        return self.loaded.get(version)

    async def activate(self, version: str, traffic_percent: int = 100) -> dict[str, Any]:
        """Load `version` here, mark it active in Redis (which tells the other replicas), swap it in.
        The configured weights' version rolls every replica back to them. Below 100 percent the
        version starts a canary instead; any activation at 100 ends a canary."""
        if traffic_percent < 100:
            return await self._start_canary(version, traffic_percent)
        if version == self.base_version:
            async with self.lock:
                await self.registry.restore_configured(self.name)
                self.loaded.activate(self.base)
                self.canary = None
            log.info("activated %s's configured weights (%s)", self.name, version)
            return {"version": version, "sha256": self.base.model.weights_sha256, "configured": True,
                    "activated_at": iso(now_ms()), "active": True}
        async with self.lock:
            record = await self._record(version)
            served = self.prepared.pop(version, None)
            if served is None:
                served = self.loaded.get(version) if self.loaded.has(version) else await self.load(record)
            if not await self.registry.activate(self.name, version, now_ms()):
                raise NotFound(f"Version {version!r} was removed meanwhile.", code="model_version_not_found")
            self.loaded.activate(served)
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
        await self.hold(version)  # loaded here before any session is sent to it
        canary = Canary(version, traffic_percent, baseline, now_ms())
        if not await self.registry.start_canary(self.name, canary, configured=configured):
            raise NotFound(f"Version {version!r} was removed meanwhile.", code="model_version_not_found")
        self.canary = canary
        log.info("canary: %s version %s serves %d%% of sessions, the others keep %s", self.name, version,
                 traffic_percent, baseline)
        return canary_view(canary)

    async def ensure(self, version: str | None) -> None:
        """Make the `version` a request runs (version_for) loaded in this process: 409 when it was
        removed, 403 when it is neither active, the canary's, nor marked pinnable (a pin made while it
        was, or a per-request override), so a session cannot make this process load any version."""
        if version is None:
            return
        if not await self.may_pin(version):
            raise _removed(version)
        await self.hold(version)

    async def hold(self, version: str) -> None:
        """Load `version` into this process unless it holds it; 409 when it was removed."""
        if self.loaded.has(version):
            return
        async with self.lock:
            if self.loaded.has(version):
                return
            if version == self.base_version:
                self.loaded.hold(self.base)
                return
            record = await self.registry.get(self.name, version)
            if record is None:
                raise _removed(version)
            self.loaded.hold(await self.load(record))

    async def may_pin(self, version: str) -> bool:
        """Whether a session may pin `version`: False when there is no such version; 403
        `model_version_not_pinnable` when there is, but it is neither active, the canary's, nor marked
        pinnable by an admin. What this replica serves and its canary answer without Redis."""
        if version == self.active.model.version or (self.canary is not None and version == self.canary.version):
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
        (self.pinnable.add if pinnable else self.pinnable.discard)(version)
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
        self.loaded.drop(version)
        self.prepared.pop(version, None)
        self.path_for(record).unlink(missing_ok=True)
        log.info("removed %s version %s", self.name, version)

    def listed_versions(self) -> list[str]:
        """The version names this server answers with now, active first: the active one, the configured
        weights', the canary's and those marked pinnable (as this replica last read them)."""
        canary = [self.canary.version] if self.canary is not None else []
        named = [self.active.model.version, self.base_version, *canary, *sorted(self.pinnable)]
        return list(dict.fromkeys(named))

    async def served_for_version(self, version: str | None) -> ServedModel:
        """The model that answers for `version`: the active one for None, else that version, loaded as a
        pin loads it: 404 `model_version_not_found` when there is no such version, 403
        `model_version_not_pinnable` when it may not be served, 409 when it was removed meanwhile."""
        if version is None:
            return self.active
        if not await self.may_pin(version):
            raise NotFound(f"No version {version!r} of {self.name}.", code="model_version_not_found")
        await self.hold(version)
        return self.loaded.get(version)

    def labels(self) -> dict[str, Any]:
        """The class labels of the version serving everyone: index i names class i (what feedback takes)."""
        model = self.active.model
        return {"name": model.name, "version": model.version, "labels": model.labels}

    async def listing(self) -> dict[str, Any]:
        records, active = await self.registry.versions(self.name)
        quality = await self.feedback.quality(self.name) if self.feedback is not None else {}
        pinned_quality = await self.feedback.quality(self.name, pinned=True) if self.feedback is not None else {}
        canary = await self.registry.canary(self.name)
        pinnable = await self.registry.pinnable(self.name)
        none = quality_view(0, 0)

        def pins_and_feedback(version: str) -> dict[str, Any]:
            # feedback: from sessions that did not choose the version (the canary's or the baseline's
            # share), the number to promote on; pinned_feedback: from sessions that pinned it.
            return {"pinnable": version in pinnable, "feedback": quality.get(version, none),
                    "pinned_feedback": pinned_quality.get(version, none)}

        return {
            "name": self.name,
            **self.spec.to_dict(),
            "classes": len(self.active.model.labels),
            "loaded": self.loaded.any_loaded(),  # whether this process holds a version on its runtime now
            "active_version": active,  # null: the weights named in the config
            "serving_version": self.active.model.version,  # what this replica runs now
            "canary": canary_view(canary) if canary is not None else None,
            "configured": {"version": self.base_version, "sha256": self.base.model.weights_sha256,
                           **pins_and_feedback(self.base_version)},
            "versions": [{**record.to_dict(active=record.version == active), **pins_and_feedback(record.version)}
                         for record in records],
        }

    async def _record(self, version: str) -> VersionRecord:
        record = await self.registry.get(self.name, version)
        if record is None:
            raise NotFound(f"No version {version!r} of {self.name}.", code="model_version_not_found")
        return record

    async def load(self, record: VersionRecord) -> ServedModel:
        path = self.path_for(record)
        if not path.is_file():
            raise Conflict(f"The file of version {record.version!r} is missing from models.store_dir.",
                           code="model_version_removed")
        model = await self._off_path(self._load_checked, path, record.version, record.sha256)
        return await self._off_path(self._serve, model)

    async def _off_path(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        return await on_executor(self._loader, fn, *args)

    # -- following the other replicas (service.follower) --------------------------------------------
    async def start(self) -> None:
        """Serve the active version, then follow the other replicas until close()."""
        await self._follower.start()

    async def close(self) -> None:
        await self._follower.close()
        self._loader.shutdown(wait=False, cancel_futures=True)


async def on_executor(executor: Executor, fn: Callable[[*Args], T], *args: *Args) -> T:
    """`fn(*args)` on `executor` (loading, checking, exporting: never on the IOLoop or the runner's threads)."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _removed(version: str) -> Conflict:
    return Conflict(f"Model version {version!r} was removed (or never published); set the session's model_version "
                    "to null or to a version listed by GET /v1/models.", code="model_version_removed")


