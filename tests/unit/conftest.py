"""The unit tier (`pytest -m unit`): the service layer's use cases against in-memory fakes, no Redis and
no model weights (tests/unit/fakes.py). Tests call the async use cases with `asyncio.run`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.runner import ModelRunner
from sessions.tokens import TokenSigner
from tests.unit.fakes import FakeBackend, FakeStore, FakeVersions, fake_runner

HERE = Path(__file__).parent
SECRET = "unit-test-secret-0123456789"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: an unmarked test here would silently leave the tier
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `redis`: the real store's half of the contract tests (test_store_contract.py), deliberately outside.
    unmarked = [item.nodeid for item in items
                if item.path.is_relative_to(HERE) and item.get_closest_marker("unit") is None
                and item.get_closest_marker("redis") is None]
    if unmarked:
        raise pytest.UsageError("tests/unit needs `pytestmark = pytest.mark.unit` in every module; unmarked: "
                                + ", ".join(unmarked))


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner([SECRET], max_age_seconds=3600)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def runner() -> Iterator[ModelRunner]:
    runner = fake_runner()
    yield runner
    runner.close()


@pytest.fixture
def versions(backend: FakeBackend) -> FakeVersions:
    """The model catalogue's part the use cases call, serving fake_model("v1") on `backend`."""
    return FakeVersions(backend)
