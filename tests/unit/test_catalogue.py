"""What the model catalogue tells the Open Inference Protocol's dataplane: the versions this server answers
with, and the model that answers for a version named in a URL (as a pin would load it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from core.errors import Conflict, NotFound
from core.options import Options
from core.session import Session
from inference.runner import ServedModel
from service.catalogue import ModelCatalogue, VersionNotPinnable
from sessions.model_registry import Canary, VersionRecord
from tests.unit.fakes import FakeBackend, FakeVersions, fake_model

pytestmark = pytest.mark.unit


class Registry:
    """The two reads of sessions.model_registry.ModelRegistry that resolving a version makes."""

    def __init__(self, statuses: dict[str, str]):
        self.statuses = statuses  # version -> "missing" | "not_pinnable" | "ok"

    async def pin_status(self, name: str, version: str, *, configured: bool) -> str:
        return self.statuses.get(version, "missing")

    async def get(self, name: str, version: str) -> VersionRecord | None:
        return VersionRecord(name, version, "0" * 64, 1, 0) if self.statuses.get(version) == "ok" else None


def catalogue(tmp_path: Path, **statuses: str) -> ModelCatalogue:
    made = ModelCatalogue(Registry(statuses), FakeVersions.spec,  # type: ignore[arg-type]
                          ServedModel(fake_model("v1"), FakeBackend()), store_dir=tmp_path,
                          backend_for=lambda model: FakeBackend())

    async def load(record: VersionRecord) -> ServedModel:  # what publishing stored, without torch
        return ServedModel(fake_model(record.version), FakeBackend())

    made.load = load  # type: ignore[method-assign]
    return made


def test_listed_versions_are_the_active_first_then_configured_canary_and_pinnable(tmp_path: Path) -> None:
    versions = catalogue(tmp_path)
    assert versions.listed_versions() == ["v1"]
    versions.canary, versions.pinnable = Canary("v3", 10, "v1", 0), {"v2", "v3"}
    assert versions.listed_versions() == ["v1", "v3", "v2"]
    versions.loaded.activate(ServedModel(fake_model("v4"), FakeBackend()))
    assert versions.listed_versions() == ["v4", "v1", "v3", "v2"]


def test_served_for_version_resolves_like_a_pin(tmp_path: Path) -> None:
    versions = catalogue(tmp_path, v2="ok", v5="not_pinnable")

    async def resolve(version: str | None) -> Any:
        return await versions.served_for_version(version)

    assert asyncio.run(resolve(None)) is versions.active
    assert asyncio.run(resolve("v1")) is versions.active
    served = asyncio.run(resolve("v2"))  # loaded on first use, then held
    assert served.model.version == "v2" and versions.loaded.has("v2")
    with pytest.raises(NotFound) as missing:
        asyncio.run(resolve("ghost"))
    assert missing.value.code == "model_version_not_found"
    with pytest.raises(VersionNotPinnable):
        asyncio.run(resolve("v5"))
    assert not versions.loaded.has("v5")


def test_served_for_runs_a_pin_else_the_canarys_else_the_active_version(tmp_path: Path) -> None:
    versions = catalogue(tmp_path, v2="ok", v3="ok", v5="not_pinnable")
    session = Session("s1", 0, 0, 0, Options(), 0, canary_slot=0)

    def run(options: Options, in_session: Session | None = session) -> str:
        return asyncio.run(versions.served_for(in_session, options)).model.version

    assert run(Options()) == "v1"
    versions.canary = Canary("v3", 100, "v1", 0)  # every session is in it
    assert run(Options()) == "v3" and versions.loaded.has("v3")
    assert run(Options(), None) == "v1"  # no session, no canary
    assert run(Options(model_version="v2")) == "v2"  # a pin wins, loaded on first use
    with pytest.raises(VersionNotPinnable):
        run(Options(model_version="v5"))
    with pytest.raises(Conflict) as removed:
        run(Options(model_version="ghost"))
    assert removed.value.code == "model_version_removed" and not versions.loaded.has("ghost")
