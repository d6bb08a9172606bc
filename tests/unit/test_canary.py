"""Canaries by session: the stable assignment, the share it serves, a pin winning over it, the body of an
activation, the classifier running (and recording) the chosen version while the session's options
stay its own, which versions may be pinned, and pinned sessions' feedback counted apart."""

from __future__ import annotations

import asyncio

import pytest

from core.options import Options
from inference.runner import ModelRunner
from service.canary import InvalidTrafficPercent, in_canary, parse_traffic_percent
from service.catalogue import VersionNotPinnable
from service.classify import Classifier
from service.feedback import FeedbackService
from sessions.model_registry import Canary
from sessions.store import canary_slot
from sessions.tokens import TokenSigner, new_session_id
from tests.unit.fakes import LABELS, FakeFeedbackRecords, FakeStore, FakeVersions, fake_models, solid_image

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


@pytest.mark.parametrize("version", ["v2", "fb-1", "2026-12-01"])
@pytest.mark.parametrize("percent", [1, 10, 20, 50, 99])
def test_slots_give_a_canary_exactly_its_share_of_any_100_consecutive_new_sessions(version: str,
                                                                                   percent: int) -> None:
    canary = Canary(version, percent, "v1", 0)
    first = 1 + sum(map(ord, version)) * percent  # anywhere in the count
    chosen = [in_canary("unused", canary, canary_slot(number)) for number in range(first, first + 300)]
    for start in range(0, 201, 25):
        assert sum(chosen[start:start + 100]) == percent
    # Another version's canary takes other sessions: nobody is always the guinea pig.
    assert chosen[:100] != [in_canary("unused", Canary("v9", percent, "v1", 0), canary_slot(number))
                            for number in range(first, first + 100)]


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
    versions = FakeVersions(published=("v2", "v3"), canary=canary)
    classifier = Classifier(store, runner, fake_models(versions))  # type: ignore[arg-type]
    served: dict[str, set[str]] = {}
    for _ in range(20):
        session = asyncio.run(store.create(Options()))
        for _ in range(3):
            answer, _ = asyncio.run(classifier.classify(session, solid_image(1), Options()))
            assert "model_version" not in answer["options"]  # what is recorded is the session's own options
            served.setdefault(session.id, set()).add(answer["model"]["version"])
        expected = "v2" if in_canary(session.id, canary, session.canary_slot) else "v1"
        assert served[session.id] == {expected}
    assert {version for versions_seen in served.values() for version in versions_seen} == {"v1", "v2"}
    pinned = asyncio.run(store.create(Options(model_version="v3")))
    answer, _ = asyncio.run(classifier.classify(pinned, solid_image(1), Options(model_version="v3")))
    assert answer["model"]["version"] == "v3"
    anonymous = asyncio.run(classifier.classify_anonymous(solid_image(1), top_k=5))
    assert anonymous.model == {"name": "fake-net", "version": "v1"}


def test_a_session_may_pin_only_the_active_version_the_canarys_or_a_marked_one(store: FakeStore,
                                                                               runner: ModelRunner) -> None:
    versions = FakeVersions(published=("v2", "v3"), canary=Canary("v2", 50, "v1", 0), pinnable=())
    classifier = Classifier(store, runner, fake_models(versions))  # type: ignore[arg-type]
    session = asyncio.run(store.create(Options()))
    with pytest.raises(VersionNotPinnable) as caught:
        asyncio.run(classifier.classify(session, solid_image(1), Options(model_version="v3")))
    assert caught.value.status == 403 and caught.value.code == "model_version_not_pinnable"
    assert not versions.loaded.has("v3")  # refused before anything was loaded
    for allowed in ("v1", "v2"):  # the active version, the canary's
        answer, _ = asyncio.run(classifier.classify(session, solid_image(1), Options(model_version=allowed)))
        assert answer["model"]["version"] == allowed
    versions.pinnable.add("v3")  # an admin marked it
    answer, _ = asyncio.run(classifier.classify(session, solid_image(1), Options(model_version="v3")))
    assert answer["model"]["version"] == "v3"


def test_feedback_from_pinned_sessions_is_counted_apart_from_the_canarys_assigned_ones(
        store: FakeStore, runner: ModelRunner, signer: TokenSigner) -> None:
    canary = Canary("v2", 100, "v1", 0)  # every unpinned session is assigned the canary
    records = FakeFeedbackRecords()
    feedback = FeedbackService(store, records, labels=lambda model: LABELS, signer=signer)
    classifier = Classifier(store, runner, fake_models(FakeVersions(published=("v2",), canary=canary)))  # type: ignore[arg-type]
    assigned, pinned = asyncio.run(store.create(Options())), asyncio.run(store.create(Options(model_version="v2")))
    ours, _ = asyncio.run(classifier.classify(assigned, solid_image(1), assigned.options))
    theirs = [asyncio.run(classifier.classify(pinned, solid_image(1), pinned.options))[0] for _ in range(3)]
    assert {ours["model"]["version"]} | {item["model"]["version"] for item in theirs} == {"v2"}
    wrong = (ours["predicted_class"] + 1) % len(LABELS)
    asyncio.run(feedback.give(assigned, ours["id"], {"label": wrong}))
    for item in theirs:  # the pinned session agrees with everything
        asyncio.run(feedback.give(pinned, item["id"], {"label": item["predicted_class"]}))
    assert asyncio.run(feedback.quality("fake-net"))["v2"] == {"count": 1, "agreement": 0.0}
    assert asyncio.run(feedback.quality("fake-net", pinned=True))["v2"] == {"count": 3, "agreement": 1.0}
    asyncio.run(feedback.give(pinned, theirs[0]["id"], {"label": wrong}))  # replaced: within its own count
    asyncio.run(feedback.erase(pinned.id))
    assert asyncio.run(feedback.quality("fake-net", pinned=True))["v2"] == {"count": 0, "agreement": None}
    assert asyncio.run(feedback.quality("fake-net"))["v2"] == {"count": 1, "agreement": 0.0}
