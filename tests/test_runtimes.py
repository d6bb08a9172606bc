"""Runtimes and the fast paths: ONNX Runtime agrees with torch, the export is cached, draft decode
keeps the answer, micro-batching gives every caller its own result."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from core.options import Options
from inference.backends.onnxruntime_backend import OnnxBackend
from inference.backends.torch_backend import TorchBackend
from inference.imaging import preprocess
from inference.model import ModelLoadError, load_exported, manifest_path, softmax
from inference.repository import configured_spec
from inference.torch_model import export_onnx, load_model
from server.runtime import build_runner, serve_loaded
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG, DATA, MODEL_CACHE, make_config

PHOTOS = {"cat": CAT_JPEG, "coffee": COFFEE_JPEG}


def probabilities(backend, image: bytes, options: Options) -> np.ndarray:
    return softmax(backend.forward(preprocess(image, options, max_pixels=10**8)[None]))[0]


def assert_same_top_k(torch_backend, onnx_backend, options: Options, k: int = 5) -> None:
    for name, image in PHOTOS.items():
        expected = probabilities(torch_backend, image, options)
        got = probabilities(onnx_backend, image, options)
        assert list(np.argsort(got)[-k:]) == list(np.argsort(expected)[-k:]), name
        assert np.abs(got - expected).max() < 1e-3, name


@pytest.mark.parametrize("options", [Options(), Options(resize=320, crop=288), Options(crop=160, color="grayscale")])
def test_onnxruntime_matches_torch_on_the_default_model(default_model, options: Options) -> None:
    assert_same_top_k(TorchBackend(default_model.module), OnnxBackend(export_onnx(default_model, MODEL_CACHE)), options)


def test_onnxruntime_matches_torch_on_a_torchvision_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    model = load_model("resnet18", str(path))
    assert_same_top_k(TorchBackend(model.module), OnnxBackend(export_onnx(model, tmp_path / "cache")), Options())


def test_export_is_cached_by_weights_and_settings(default_model, tmp_path: Path) -> None:
    cached = export_onnx(default_model, MODEL_CACHE)
    started = time.perf_counter()
    assert export_onnx(default_model, MODEL_CACHE) == cached and time.perf_counter() - started < 0.1
    assert cached.name.startswith("efficientnet_lite0-")


def test_draft_decode_keeps_the_top_1(default_model) -> None:
    from io import BytesIO

    from PIL import Image

    backend = OnnxBackend(export_onnx(default_model, MODEL_CACHE))
    for image in PHOTOS.values():
        # A 12-megapixel version of the photo: draft decoding reads it at 1/8 scale.
        big = BytesIO()
        Image.open(BytesIO(image)).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC).save(
            big, "JPEG", quality=90)
        full = preprocess(big.getvalue(), Options(), max_pixels=10**8, draft=False)
        drafted = preprocess(big.getvalue(), Options(), max_pixels=10**8, draft=True)
        assert backend.forward(full[None]).argmax() == backend.forward(drafted[None]).argmax()


def test_micro_batching_gives_each_caller_its_own_result(default_model) -> None:
    config = make_config(model={"max_batch_size": 8, "max_batch_delay_ms": 20, "workers": 1})
    runner, served = build_runner(config), serve_loaded(config, default_model)

    async def main():
        requests = [(CAT_JPEG, Options(top_k=1 + i % 4)) for i in range(6)]
        requests += [(COFFEE_JPEG, Options(top_k=2)), (COFFEE_JPEG, Options(top_k=3, crop=192))]
        return requests, await asyncio.gather(*(runner.predict(served, image, options) for image, options in requests))

    requests, results = asyncio.run(main())
    runner.close()
    assert max(result.timing_ms["batch_size"] for result in results) > 1  # batches really formed
    for (image, options), result in zip(requests, results, strict=True):
        assert len(result.top_k) == options.top_k
        assert result.top_k[0].class_index in (CAT_CLASSES if image is CAT_JPEG else COFFEE_CLASSES)
    # Batched answers equal unbatched ones.
    single = build_runner(make_config())
    alone = asyncio.run(single.predict(serve_loaded(make_config(), default_model), CAT_JPEG, Options(top_k=4)))
    single.close()
    batched = results[3]
    assert [s.class_index for s in batched.top_k] == [s.class_index for s in alone.top_k]
    assert np.allclose([s.score for s in batched.top_k], [s.score for s in alone.top_k], atol=1e-4)


def test_the_idle_two_thread_forward_gives_the_same_answer(default_model) -> None:
    backend = OnnxBackend(export_onnx(default_model, MODEL_CACHE), intra_op_threads=1, idle_intra_op_threads=2)
    assert backend.idle_session is not backend.session
    batch = preprocess(CAT_JPEG, Options(), max_pixels=10**8)[None]
    assert np.allclose(backend.forward(batch, alone=True), backend.forward(batch), atol=1e-4)


def test_an_onnx_serving_process_never_imports_torch(default_model) -> None:
    """The serving process reads the cached export and its manifest; the export itself (and torch)
    runs in a child process that exits, so each serving process stays small."""
    script = f"""
import json, sys
import server.app, server.cli  # everything a serving process imports
from server.config import Config
from inference.imaging import preprocess
from inference.loading import LoadedBackends
from server.runtime import build_runner, build_served, configured
from core.options import Options

config = Config()
config.model.cache_dir = {str(MODEL_CACHE)!r}
runner, served = build_runner(config), build_served(config, configured(config), LoadedBackends(1))
image = open({str(DATA / 'cat.jpg')!r}, "rb").read()
logits = served.backend.forward(preprocess(image, Options(), max_pixels=10**8)[None])
print(json.dumps({{"version": served.model.version, "labels": served.model.labels, "top1": int(logits.argmax()),
                  "torch": "torch" in sys.modules}}))
"""
    manifest = manifest_path(configured_spec("efficientnet_lite0", "default"), MODEL_CACHE)
    manifest.unlink(missing_ok=True)
    written: list[int] = []
    for _start in ("first start: exports in a child", "second start: reads the cache"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr
        served = json.loads(done.stdout)
        assert served["torch"] is False
        assert served["version"] == default_model.version and served["labels"] == default_model.labels
        assert served["top1"] in CAT_CLASSES
        written.append(manifest.stat().st_mtime_ns)
    assert written[0] == written[1]  # the second start exported nothing


def test_a_failed_export_says_why(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither a file nor a known weights name"):
        load_exported(configured_spec("efficientnet_lite0", str(tmp_path / "missing.pt")), tmp_path / "cache")


# -- libjpeg-turbo decoding (issue #17) ----------------------------------------------------------------
def twelve_megapixels(image: bytes) -> bytes:
    from io import BytesIO

    from PIL import Image

    big = BytesIO()
    Image.open(BytesIO(image)).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC).save(big, "JPEG",
                                                                                                   quality=90)
    return big.getvalue()


@pytest.mark.parametrize("name", ["cat", "coffee", "cat-12mp"])
def test_libjpeg_turbo_decodes_what_pillow_decodes_at_the_same_dct_scale(name: str) -> None:
    from io import BytesIO

    from PIL import Image

    from inference import imaging

    data = twelve_megapixels(CAT_JPEG) if name == "cat-12mp" else PHOTOS[name]
    opened = Image.open(BytesIO(data))
    width, height = opened.size
    factor = imaging.dct_factor(width, height, 256)
    assert factor == (8 if name == "cat-12mp" else 1)
    opened.draft("RGB", (-(-width * 256 // min(width, height)), -(-height * 256 // min(width, height))))
    pillow = np.asarray(opened.convert("RGB"))
    turbo = np.asarray(imaging._turbo_decode(data, width, height, factor, gray=False))
    assert turbo.shape == pillow.shape and np.array_equal(turbo, pillow)


def test_grayscale_from_the_luma_plane_keeps_the_answer(default_model) -> None:
    """Under color=grayscale a JPEG decodes to its luma plane instead of RGB converted back to gray."""
    from io import BytesIO

    from PIL import Image, ImageOps

    from inference import imaging

    backend = OnnxBackend(export_onnx(default_model, MODEL_CACHE))
    options = Options(color="grayscale")
    for data in PHOTOS.values():
        luma = imaging.preprocess(data, options, max_pixels=10**8)
        rgb_to_gray = imaging.pipeline_for(options)(ImageOps.grayscale(Image.open(BytesIO(data)).convert("RGB")))
        expected, got = (softmax(backend.forward(t[None]))[0] for t in (rgb_to_gray, luma))
        assert got.argmax() == expected.argmax() and np.abs(got - expected).max() < 0.03


def test_a_jpeg_libjpeg_turbo_declines_goes_through_pillow() -> None:
    from io import BytesIO

    from PIL import Image

    from inference import imaging

    cmyk = BytesIO()
    Image.open(BytesIO(CAT_JPEG)).convert("CMYK").save(cmyk, "JPEG")
    batch = imaging.prepare(cmyk.getvalue(), Options(), max_pixels=10**8)
    assert batch.pixels.shape == (1, 224, 224, 3) and batch.pixels.dtype == np.uint8
