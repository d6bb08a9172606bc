"""The model versions this process holds loaded: the active one, and those kept for pinned sessions and
canaries. The model catalogue owns the one instance and the replica follower swaps through it; the
runner holds none and runs whichever ServedModel a request was given at admission."""

from __future__ import annotations

from core.errors import Conflict
from inference.runner import ServedModel


class LoadedVersions:
    """The active version and the others held, each a ServedModel. Activating is a reference swap: a
    request that picked a ServedModel keeps it, whatever is activated meanwhile."""

    def __init__(self, active: ServedModel):
        self._active = active
        self._held: dict[str, ServedModel] = {}  # pinned or a canary's versions, other than the active one

    @property
    def active(self) -> ServedModel:
        return self._active

    def activate(self, served: ServedModel) -> None:
        """Serve `served` to every request admitted from now on."""
        self._held.pop(served.model.version, None)
        self._active = served

    def hold(self, served: ServedModel) -> None:
        """Keep `served` loaded for sessions that pin its version (or a canary's)."""
        if served.model.version != self._active.model.version:
            self._held[served.model.version] = served

    def drop(self, version: str) -> None:
        self._held.pop(version, None)

    def has(self, version: str) -> bool:
        return version == self._active.model.version or version in self._held

    def served(self) -> tuple[ServedModel, ...]:
        """Every version held: the active one, then those held for pins and canaries."""
        return (self._active, *self._held.values())

    def any_loaded(self) -> bool:
        """Whether a version is on its runtime in this process now (a runtime built on first use, and
        unloaded past models.max_loaded, says so by its `loaded`)."""
        return any(getattr(served.backend, "loaded", True) for served in self.served())

    def get(self, version: str | None = None) -> ServedModel:
        """The active model, or the held `version` (409 when this process does not hold it)."""
        active = self._active
        if version is None or version == active.model.version:
            return active
        held = self._held.get(version)
        if held is None:
            raise Conflict(f"Model version {version!r} was removed; unpin it (model_version: null) or pin "
                           "another version.", code="model_version_removed")
        return held
