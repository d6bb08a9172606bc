"""Canaries by session: the stable assignment, the share it serves, a pin winning over it, the body of an
activation, and the classifier running (and recording) the chosen version while the session's options
stay its own."""

from __future__ import annotations

import asyncio

import pytest

from inference.runner import ModelRunner
from service.classify import Classifier
from service.model_versions import InvalidTrafficPercent, in_canary, parse_traffic_percent
from sessions.model_registry import Canary
from sessions.options import Options
from sessions.tokens import new_session_id
from tests.unit.fakes import FakeStore, FakeVersions, solid_image

pytestmark = pytest.mark.unit


def test_assignment_is_stable_and_serves_about_the_share_asked() -> None:
    canary = Canary("v2", 20, "v1", 0)
    sessions = [new_session_id() for _ in range(2000)]
    chosen = [session for session in sessions if in_canary(session, canary)]
    assert 300 <= len(chosen) <= 500  # 20% of 2000, give or take five standard deviations
    assert all(in_canary(session, canary) for session in chosen)  # the same answer every time
    assert not any(in_canary(session, Canary("v2", 0, "v1", 0)) for session in sessions[:100])
    assert all(in_canary(session, Canary("v2", 100, "v1", 0)) for session in sessions[:100])
    # Another canary version draws another share: no session is always the guinea pig.
    again = {session for session in sessions if in_canary(session, Canary("v3", 20, "v1", 0))}
    assert again != set(chosen)


def test_traffic_percent_is_one_to_a_hundred_and_defaults_to_all() -> None:
    assert parse_traffic_percent({}) == 100 and parse_traffic_percent({"traffic_percent": 1}) == 1
    for bad in ({"traffic_percent": 0}, {"traffic_percent": 101}, {"traffic_percent": 20.5},
                {"traffic_percent": True}, {"traffic_percent": "20"}, {"percent": 20}):
        with pytest.raises(InvalidTrafficPercent) as caught:
            parse_traffic_percent(bad)
        assert caught.value.code == "invalid_traffic_percent" and caught.value.status == 422


def test_the_classifier_runs_each_session_on_its_version_and_a_pin_wins(store: FakeStore,
                                                                        runner: ModelRunner) -> None:
    canary = Canary("v2", 50, "v1", 0)
    versions = FakeVersions(runner, published=("v2", "v3"), canary=canary)
    classifier = Classifier(store, runner, versions)  # type: ignore[arg-type]
    served: dict[str, set[str]] = {}
    for _ in range(20):
        session = asyncio.run(store.create(Options()))
        for _ in range(3):
            answer, _ = asyncio.run(classifier.classify(session, solid_image(1), Options()))
            assert "model_version" not in answer["options"]  # what is recorded is the session's own options
            served.setdefault(session.id, set()).add(answer["model"]["version"])
        expected = "v2" if in_canary(session.id, canary) else "v1"
        assert served[session.id] == {expected}
    assert {version for versions_seen in served.values() for version in versions_seen} == {"v1", "v2"}
    pinned = asyncio.run(store.create(Options(model_version="v3")))
    answer, _ = asyncio.run(classifier.classify(pinned, solid_image(1), Options(model_version="v3")))
    assert answer["model"]["version"] == "v3"
    anonymous = asyncio.run(classifier.classify_anonymous(solid_image(1), Options()))
    assert anonymous.model == {"name": "fake-net", "version": "v1"}
