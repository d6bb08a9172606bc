"""service.classify: what is run, pinned and recorded for each use case (one image, a replay, anonymous, a
batch), with a real ModelRunner around a backend of known logits."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import numpy as np
import pytest

from core.errors import Conflict, InvalidToken
from core.options import Options
from core.session import Session
from inference.runner import ModelRunner
from service.classify import Classifier
from sessions.tokens import VerifiedToken
from tests.unit.fakes import LABELS, FakeBackend, FakeStore, FakeVersions, fake_models, solid_image

pytestmark = pytest.mark.unit

# The shape of a history entry, whichever route recorded it; an answer adds its timing.
ENTRY_KEYS = {"id", "created_at", "predicted_class", "label", "top_k", "options", "model", "image"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def new_session(store: FakeStore, options: Options | None = None) -> Session:
    session = asyncio.run(store.create(options or Options()))
    store.calls.clear()
    return session


def retry_of(store: FakeStore, session: Session, idempotency_key: str) -> Session:
    """The session as authentication hands it to a request that repeats `idempotency_key`."""
    return asyncio.run(store.touch(VerifiedToken(session.id, 0.0), idempotency_key=idempotency_key))


def history(store: FakeStore, session: Session) -> list[dict[str, Any]]:
    """Oldest first."""
    items, _ = asyncio.run(store.history(session.id, limit=100))
    return list(reversed(items))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_classify_records_one_entry_and_answers_with_it(store: FakeStore, runner: ModelRunner,
                                                        backend: FakeBackend, fmt: str, versions: FakeVersions) -> None:
    session = new_session(store)
    options = Options(top_k=3)
    classifier = Classifier(store, runner, fake_models(versions))
    answer, replayed = asyncio.run(classifier.classify(session, solid_image(7, fmt=fmt), options))
    assert not replayed
    assert set(answer) == ENTRY_KEYS | {"feedback", "timing_ms"}
    assert answer["predicted_class"] == 7 and answer["label"] == LABELS[7]
    assert answer["top_k"][0]["class_index"] == 7 and len(answer["top_k"]) == 3
    assert all(set(score) == {"class_index", "label", "score"} for score in answer["top_k"])
    scores = [score["score"] for score in answer["top_k"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99
    assert answer["options"] == options.to_dict()
    assert answer["model"] == {"name": "fake-net", "version": "v1"}
    assert ISO_UTC.match(answer["created_at"])
    assert set(answer["timing_ms"]) >= {"preprocess", "inference"}
    # Recorded before answering: exactly one entry, the answer without its timing (and feedback, given later).
    assert len(store.called("record")) == 1 and backend.forwards == [1]
    assert history(store, session) == [{key: value for key, value in answer.items()
                                        if key not in ("timing_ms", "feedback")}]


def test_classify_replay_records_nothing_and_returns_the_first_answer(store: FakeStore, runner: ModelRunner,
                                                                     backend: FakeBackend,
                                                                     versions: FakeVersions) -> None:
    classifier = Classifier(store, runner, fake_models(versions))
    session = new_session(store)
    first, _ = asyncio.run(classifier.classify(session, solid_image(2), Options(), "key-1"))
    again, replayed = asyncio.run(classifier.classify(retry_of(store, session, "key-1"), solid_image(8), Options(),
                                                      "key-1"))
    assert replayed
    assert again == {**first, "timing_ms": {}}  # the first image's answer, not a classification of the second
    assert len(store.called("record")) == 1 and backend.forwards == [1]  # the retry never reached the model


def test_classify_retry_that_raced_the_first_attempt_gets_its_answer(store: FakeStore, runner: ModelRunner,
                                                                     versions: FakeVersions) -> None:
    """Both attempts authenticated before either recorded: the store's record says which came first."""
    classifier = Classifier(store, runner, fake_models(versions))
    session = new_session(store)
    first, _ = asyncio.run(classifier.classify(session, solid_image(2), Options(), "key-1"))
    second, replayed = asyncio.run(classifier.classify(session, solid_image(8), Options(), "key-1"))
    assert replayed and second == {**first, "timing_ms": {}}
    assert len(history(store, session)) == 1


def test_classify_replay_of_an_entry_gone_is_a_409(runner: ModelRunner, versions: FakeVersions) -> None:
    store = FakeStore(history_max_entries=1)
    classifier = Classifier(store, runner, fake_models(versions))
    session = new_session(store)
    asyncio.run(classifier.classify(session, solid_image(2), Options(), "key-1"))
    asyncio.run(classifier.classify(session, solid_image(3), Options()))  # the capped history drops key-1's entry
    with pytest.raises(Conflict) as caught:
        asyncio.run(classifier.classify(retry_of(store, session, "key-1"), solid_image(2), Options(), "key-1"))
    assert caught.value.code == "idempotent_result_gone" and caught.value.status == 409
    assert len(store.called("record")) == 2


def test_classify_on_a_session_logged_out_meanwhile_answers_with_the_store_error(
        store: FakeStore, runner: ModelRunner, versions: FakeVersions) -> None:
    """A 200 means recorded: a logout that overtook the request leaves no unrecorded result."""
    session = new_session(store)
    asyncio.run(store.delete(session))
    with pytest.raises(InvalidToken) as caught:
        asyncio.run(Classifier(store, runner, fake_models(versions)).classify(session, solid_image(4), Options()))
    assert caught.value.code == "session_revoked"


def test_classify_anonymous_runs_the_model_and_records_nothing(store: FakeStore, runner: ModelRunner,
                                                               backend: FakeBackend, versions: FakeVersions) -> None:
    classifier = Classifier(store, runner, fake_models(versions))
    prediction = asyncio.run(classifier.classify_anonymous(solid_image(5), top_k=1))
    assert [score.class_index for score in prediction.top_k] == [5]
    assert prediction.model == {"name": "fake-net", "version": "v1"}
    assert backend.forwards == [1] and store.calls == []


def test_classify_batch_records_one_entry_per_image_in_order(store: FakeStore, runner: ModelRunner,
                                                             versions: FakeVersions) -> None:
    session = new_session(store)
    options = Options(top_k=2)
    winners = [7, 2, 5]
    result = asyncio.run(Classifier(store, runner, fake_models(versions)).classify_batch(
        session, options, images=[solid_image(k) for k in winners]))
    assert result.probabilities.shape == (3, len(LABELS))
    assert list(result.probabilities.argmax(axis=1)) == winners
    assert np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (result.model_name, result.model_version, result.labels) == ("fake-net", "v1", LABELS)
    entries = history(store, session)
    assert [entry["predicted_class"] for entry in entries] == winners
    for entry in entries:
        assert set(entry) == ENTRY_KEYS  # the same shape as a single prediction's
        assert entry["label"] == LABELS[entry["predicted_class"]] and len(entry["top_k"]) == 2
        assert entry["options"] == options.to_dict() and entry["model"] == {"name": "fake-net", "version": "v1"}


def test_classify_batch_of_a_tensor_records_each_row(store: FakeStore, runner: ModelRunner,
                                                     versions: FakeVersions) -> None:
    session = new_session(store)
    tensor = np.stack([asyncio.run(runner.preprocess(solid_image(k), Options())) for k in (1, 9)])
    classifier = Classifier(store, runner, fake_models(versions))
    result = asyncio.run(classifier.classify_batch(session, Options(), tensor=tensor))
    assert list(result.probabilities.argmax(axis=1)) == [1, 9]
    assert [entry["predicted_class"] for entry in history(store, session)] == [1, 9]


def test_classify_batch_without_a_session_records_nothing(store: FakeStore, runner: ModelRunner,
                                                          backend: FakeBackend, versions: FakeVersions) -> None:
    classifier = Classifier(store, runner, fake_models(versions))
    result = asyncio.run(classifier.classify_batch(None, Options(), images=[solid_image(3)] * 2))
    assert list(result.probabilities.argmax(axis=1)) == [3, 3]
    assert sum(backend.forwards) == 2 and store.calls == []


def test_a_pinned_version_is_loaded_before_it_runs_and_recorded(store: FakeStore, runner: ModelRunner) -> None:
    versions = FakeVersions(published=("v2",))
    classifier = Classifier(store, runner, fake_models(versions))  # type: ignore[arg-type]
    session = new_session(store)
    pinned = Options(model_version="v2")
    answer, _ = asyncio.run(classifier.classify(session, solid_image(6), pinned))
    assert versions.ensured == ["v2"]
    assert answer["model"] == {"name": "fake-net", "version": "v2"}
    assert answer["options"]["model_version"] == "v2"
    batch = asyncio.run(classifier.classify_batch(session, pinned, images=[solid_image(6)]))
    assert batch.model_version == "v2" and versions.ensured == ["v2", "v2"]
    assert [entry["model"]["version"] for entry in history(store, session)] == ["v2", "v2"]


def test_a_pinned_tensor_batch_runs_the_pinned_version(store: FakeStore, runner: ModelRunner) -> None:
    versions = FakeVersions(published=("v2",))
    tensor = asyncio.run(runner.preprocess(solid_image(4), Options()))[None]
    result = asyncio.run(Classifier(store, runner, fake_models(versions)).classify_batch(  # type: ignore[arg-type]
        None, Options(model_version="v2"), tensor=tensor))
    assert versions.ensured == ["v2"] and result.model_version == "v2"


def test_an_unpinned_session_does_not_ask_for_a_version(store: FakeStore, runner: ModelRunner) -> None:
    versions = FakeVersions(published=("v2",))
    classifier = Classifier(store, runner, fake_models(versions))  # type: ignore[arg-type]
    session = new_session(store)
    answer, _ = asyncio.run(classifier.classify(session, solid_image(1), Options()))
    asyncio.run(classifier.classify_batch(session, Options(), images=[solid_image(1)]))
    assert versions.ensured == [] and answer["model"]["version"] == "v1"


def test_a_removed_pinned_version_is_a_409_before_the_model_runs(store: FakeStore, runner: ModelRunner,
                                                                 backend: FakeBackend) -> None:
    classifier = Classifier(store, runner, fake_models(FakeVersions(backend)))  # type: ignore[arg-type]
    session = new_session(store)
    gone = Options(model_version="gone")
    for call in (classifier.classify(session, solid_image(1), gone),
                 classifier.classify_batch(session, gone, images=[solid_image(1)])):
        with pytest.raises(Conflict) as caught:
            asyncio.run(call)  # type: ignore[arg-type]
        assert caught.value.code == "model_version_removed"
    assert backend.forwards == [] and store.calls == []
