"""The model runner without HTTP: results, options, bounded queue, failures."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from core.errors import BadImage, BadRequest, InferenceFailed, ServiceBusy
from core.options import Options
from handlers.predict import ImageUpload
from inference.model import LoadedModel
from inference.pixels import PixelBatch
from inference.runner import ModelRunner, ServedModel
from server.runtime import build_runner, serve_loaded
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG, make_config, wait_until_async


@pytest.fixture
def runner():
    runner = build_runner(make_config(model={"max_queue": 8}))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def served(default_model) -> ServedModel:
    """The default model on its configured runtime: what each call hands the runner."""
    return serve_loaded(make_config(), default_model)


def test_each_caller_gets_its_own_result_and_options(runner: ModelRunner, served: ServedModel) -> None:
    async def main():
        return await asyncio.gather(
            runner.predict(served, CAT_JPEG, Options(top_k=3)),
            runner.predict(served, COFFEE_JPEG, Options(top_k=1)),
            runner.predict(served, CAT_JPEG, Options(top_k=7, color="grayscale")),
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
def test_an_upload_is_read_on_the_runners_threads_not_the_loops(served: ServedModel, batching: int) -> None:
    runner = build_runner(make_config(model={"max_batch_size": batching}))
    boundary = "b0undary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"c.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + COFFEE_JPEG + f"\r\n--{boundary}--\r\n".encode()
    upload = ThreadRecordingUpload((multipart[:1000], multipart[1000:]), f"multipart/form-data; boundary={boundary}")
    malformed = ImageUpload((b"--b0undary\r\nbroken",), f"multipart/form-data; boundary={boundary}")
    try:
        prediction = asyncio.run(runner.predict(served, upload, Options(top_k=1)))
        with pytest.raises(BadRequest):
            asyncio.run(runner.predict(served, malformed, Options()))
    finally:
        runner.close()
    assert prediction.top_k[0].class_index in COFFEE_CLASSES
    assert upload.read_on.startswith("model")  # the runner's executor, not the event loop's thread
    assert runner.queue_depth == 0


def test_bad_image_is_a_domain_error(runner: ModelRunner, served: ServedModel) -> None:
    with pytest.raises(BadImage):
        asyncio.run(runner.predict(served, b"nope", Options()))
    assert runner.queue_depth == 0


def test_queue_is_bounded(served: ServedModel) -> None:
    gate = threading.Event()

    class Held:
        name = "held"

        def __init__(self, inner):
            self.inner = inner

        def forward(self, batch, alone=False):
            gate.wait(30)
            return self.inner.forward(batch, alone=alone)

    runner = build_runner(make_config(model={"max_queue": 2, "workers": 1}))
    held = ServedModel(served.model, Held(served.backend))

    async def main():
        admitted = [asyncio.ensure_future(runner.predict(held, CAT_JPEG, Options())) for _ in range(2)]
        await wait_until_async(lambda: runner.queue_depth == 2, "both requests admitted")
        with pytest.raises(ServiceBusy):
            await runner.predict(held, CAT_JPEG, Options())
        assert runner.queue_depth == 2
        gate.set()
        return await asyncio.gather(*admitted)

    assert len(asyncio.run(main())) == 2
    runner.close()


def test_forward_failure_is_inference_failed(served: ServedModel) -> None:
    class Broken:
        name = "broken"

        def forward(self, batch, alone=False):
            raise RuntimeError("kaput")

    runner = build_runner(make_config())
    with pytest.raises(InferenceFailed):
        asyncio.run(runner.predict(ServedModel(served.model, Broken()), CAT_JPEG, Options()))
    runner.close()


def test_a_lone_request_gets_every_core_only_when_sibling_processes_are_idle(served: ServedModel) -> None:
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
        runner = build_runner(make_config(), siblings=siblings)
        recording = Recording(served.backend)
        try:
            asyncio.run(runner.predict(ServedModel(served.model, recording), CAT_JPEG, Options()))
        finally:
            runner.close()
        assert recording.alone == [expected]
        assert siblings.published == [1, 0]


# -- pixels per forward and per request (issue #15) -------------------------------------------------
class ShapeRecorder:
    """A backend that records each forward's batch shape; row i's logits peak at the class its pixels
    hold (tensors filled with i), so the order of the rows can be checked."""

    name = "recording"

    def __init__(self, classes: int = 10):
        self.classes, self.shapes = classes, []

    def forward(self, batch, alone=False):
        self.shapes.append(batch.shape)  # NCHW, for pixel batches too
        if isinstance(batch, PixelBatch):
            batch = batch.to_tensor()
        logits = np.zeros((len(batch), self.classes), np.float32)
        logits[np.arange(len(batch)), batch[:, 0, 0, 0].astype(int) % self.classes] = 10.0
        return logits


SIDE = 64
SMALL = Options(resize=SIDE, crop=SIDE)


def recording_runner(**limits) -> tuple[ModelRunner, ShapeRecorder, ServedModel]:
    backend = ShapeRecorder()
    model = LoadedModel("fake", "1", None, [f"class {i}" for i in range(backend.classes)], "0" * 64)
    runner = ModelRunner(workers=2, max_queue=64, max_image_pixels=1_000_000, **limits)
    return runner, backend, ServedModel(model, backend)


def png(side: int = SIDE) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_large_batch_runs_as_forwards_within_the_pixel_bound() -> None:
    runner, backend, model = recording_runner(max_forward_pixels=2 * SIDE * SIDE)
    try:
        batch = np.repeat(np.arange(5, dtype=np.float32), 3 * SIDE * SIDE).reshape(5, 3, SIDE, SIDE)
        result = asyncio.run(runner.classify_tensor(model, batch))
        assert [shape[0] for shape in backend.shapes] == [2, 2, 1]
        assert all(shape[1:] == (3, SIDE, SIDE) for shape in backend.shapes)
        assert list(result.probabilities.argmax(axis=1)) == [0, 1, 2, 3, 4]  # rows in the order sent
        backend.shapes.clear()
        images = asyncio.run(runner.classify_images(model, [png()] * 5, SMALL))
        assert [shape[0] for shape in backend.shapes] == [2, 2, 1] and images.probabilities.shape == (5, 10)
    finally:
        runner.close()
    assert runner.queue_depth == 0


def test_a_request_past_the_pixel_bound_is_refused_before_decoding() -> None:
    runner, backend, model = recording_runner(max_request_pixels=5 * SIDE * SIDE)
    try:
        with pytest.raises(BadImage) as images:  # not images at all: decoding first would say invalid_image
            asyncio.run(runner.classify_images(model, [b"nope"] * 6, SMALL))
        with pytest.raises(BadImage) as tensor:
            asyncio.run(runner.classify_tensor(model, np.zeros((6, 3, SIDE, SIDE), np.float32)))
        served = asyncio.run(runner.classify_images(model, [png()] * 5, SMALL))
    finally:
        runner.close()
    for refused in (images.value, tensor.value):
        assert refused.code == "request_too_large" and refused.status == 422
        assert "model.max_request_pixels" in refused.message and str(5 * SIDE * SIDE) in refused.message
    assert sum(shape[0] for shape in backend.shapes) == 5 and served.probabilities.shape == (5, 10)


def test_micro_batches_stay_within_the_pixel_bound() -> None:
    runner, backend, model = recording_runner(max_batch_size=8, max_batch_delay_ms=200,
                                              max_forward_pixels=3 * SIDE * SIDE)
    image = png()

    async def main():
        return await asyncio.gather(*(runner.predict(model, image, SMALL) for _ in range(8)))

    try:
        results = asyncio.run(main())
    finally:
        runner.close()
    sizes = [shape[0] for shape in backend.shapes]
    assert sum(sizes) == 8 and max(sizes) == 3  # batches formed, none over three 64x64 images
    assert all(len(result.top_k) == 5 for result in results)
