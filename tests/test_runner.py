"""The model runner without HTTP: results, options, bounded queue, failures."""

from __future__ import annotations

import asyncio
import threading

import pytest

from handlers.predict import ImageUpload
from server.runner import ModelRunner
from server.runtime import build_runner
from sessions.errors import BadImage, BadRequest, InferenceFailed, ServiceBusy
from sessions.options import Options
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG, make_config


@pytest.fixture
def runner(default_model):
    runner = build_runner(make_config(model={"max_queue": 8}), default_model)
    yield runner
    runner.close()


def test_each_caller_gets_its_own_result_and_options(runner: ModelRunner) -> None:
    async def main():
        return await asyncio.gather(
            runner.predict(CAT_JPEG, Options(top_k=3)),
            runner.predict(COFFEE_JPEG, Options(top_k=1)),
            runner.predict(CAT_JPEG, Options(top_k=7, color="grayscale")),
        )

    cat, coffee, gray_cat = asyncio.run(main())
    assert len(cat.top_k) == 3 and {s.class_index for s in cat.top_k} & CAT_CLASSES
    assert len(coffee.top_k) == 1 and coffee.top_k[0].class_index in COFFEE_CLASSES
    assert len(gray_cat.top_k) == 7
    assert cat.top_k[0].score >= cat.top_k[1].score >= cat.top_k[2].score
    assert runner.queue_depth == 0


class ThreadRecordingUpload(ImageUpload):
    def image_bytes(self) -> bytes:
        object.__setattr__(self, "read_on", threading.current_thread().name)
        return super().image_bytes()


@pytest.mark.parametrize("batching", [1, 4])
def test_an_upload_is_read_on_the_runners_threads_not_the_loops(default_model, batching: int) -> None:
    runner = build_runner(make_config(model={"max_batch_size": batching}), default_model)
    boundary = "b0undary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"c.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + COFFEE_JPEG + f"\r\n--{boundary}--\r\n".encode()
    upload = ThreadRecordingUpload((multipart[:1000], multipart[1000:]), f"multipart/form-data; boundary={boundary}")
    malformed = ImageUpload((b"--b0undary\r\nbroken",), f"multipart/form-data; boundary={boundary}")
    try:
        prediction = asyncio.run(runner.predict(upload, Options(top_k=1)))
        with pytest.raises(BadRequest):
            asyncio.run(runner.predict(malformed, Options()))
    finally:
        runner.close()
    assert prediction.top_k[0].class_index in COFFEE_CLASSES
    assert upload.read_on.startswith("model")  # the runner's executor, not the event loop's thread
    assert runner.queue_depth == 0


def test_bad_image_is_a_domain_error(runner: ModelRunner) -> None:
    with pytest.raises(BadImage):
        asyncio.run(runner.predict(b"nope", Options()))
    assert runner.queue_depth == 0


def test_queue_is_bounded(default_model) -> None:
    gate = threading.Event()

    class Held:
        name = "held"

        def __init__(self, inner):
            self.inner = inner

        def forward(self, batch, alone=False):
            gate.wait(30)
            return self.inner.forward(batch, alone=alone)

    runner = build_runner(make_config(model={"max_queue": 2, "workers": 1}), default_model)
    runner.backend = Held(runner.backend)

    async def main():
        admitted = [asyncio.ensure_future(runner.predict(CAT_JPEG, Options())) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceBusy):
            await runner.predict(CAT_JPEG, Options())
        assert runner.queue_depth == 2
        gate.set()
        return await asyncio.gather(*admitted)

    assert len(asyncio.run(main())) == 2
    runner.close()


def test_forward_failure_is_inference_failed(default_model) -> None:
    class Broken:
        name = "broken"

        def forward(self, batch, alone=False):
            raise RuntimeError("kaput")

    runner = build_runner(make_config(), default_model)
    runner.backend = Broken()
    with pytest.raises(InferenceFailed):
        asyncio.run(runner.predict(CAT_JPEG, Options()))
    runner.close()


def test_a_lone_request_gets_every_core_only_when_sibling_processes_are_idle(default_model) -> None:
    """The wide (every-core) forward is for a request alone on the machine: with work in flight in
    another serving process, it would oversubscribe the cores. The runner also tells the siblings
    what it has in flight."""

    class Siblings:
        def __init__(self, others: int):
            self.in_flight_others, self.published = others, []

        def publish(self, in_flight: int) -> None:
            self.published.append(in_flight)

        def others(self) -> int:
            return self.in_flight_others

    class Recording:
        name = "recording"

        def __init__(self, inner):
            self.inner, self.alone = inner, []

        def forward(self, batch, alone=False):
            self.alone.append(alone)
            return self.inner.forward(batch, alone=alone)

    for others, expected in ((0, True), (2, False)):
        siblings = Siblings(others)
        runner = build_runner(make_config(), default_model, siblings=siblings)
        runner.backend = recording = Recording(runner.backend)
        try:
            asyncio.run(runner.predict(CAT_JPEG, Options()))
        finally:
            runner.close()
        assert recording.alone == [expected]
        assert siblings.published == [1, 0]
