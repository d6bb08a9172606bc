"""The GPU path, `model.device = "cuda"`: skipped where no CUDA GPU is visible, as on CI.

On a GPU machine: the torch runtime on the GPU gives the CPU's answer, micro-batching there answers
each caller under its own options, and `python -m server` serves, records and reads back on it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from core.options import Options
from inference.backends.torch_backend import TorchBackend
from inference.torch_model import load_model
from server.runtime import build_runner, serve_loaded
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG, make_config
from tests.test_cli import running_server
from tests.test_runtimes import PHOTOS, probabilities

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.mark.parametrize("options", [Options(), Options(resize=320, crop=288)])
def test_the_gpu_gives_the_cpus_answer(options: Options) -> None:
    # Each backend gets its own copy: TorchBackend moves the module it is given to its device.
    cpu = TorchBackend(load_model("efficientnet_lite0", "default").module, "cpu")
    gpu = TorchBackend(load_model("efficientnet_lite0", "default").module, DEVICE)
    for name, image in PHOTOS.items():
        expected, got = probabilities(cpu, image, options), probabilities(gpu, image, options)
        # cuDNN's kernels round differently: the same top 3 and probabilities within 2e-3 (an H200
        # measured at most 4e-4); lower ranks may swap where two classes are nearly tied.
        assert list(np.argsort(got)[-3:]) == list(np.argsort(expected)[-3:]), name
        assert np.abs(got - expected).max() < 2e-3, name


def test_micro_batching_on_the_gpu_answers_each_caller_under_its_own_options() -> None:
    config = make_config(model={"runtime": "torch", "device": DEVICE, "workers": 4,
                                "max_batch_size": 8, "max_batch_delay_ms": 20})
    runner, served = build_runner(config), serve_loaded(config, load_model("efficientnet_lite0", "default"))

    async def main():
        requests = [(CAT_JPEG, Options(top_k=1 + i % 5)) for i in range(12)]
        requests += [(COFFEE_JPEG, Options(top_k=3)), (COFFEE_JPEG, Options(top_k=2, crop=192))] * 2
        return requests, await asyncio.gather(*(runner.predict(served, image, options) for image, options in requests))

    try:
        requests, results = asyncio.run(main())
    finally:
        runner.close()
    assert max(result.timing_ms["batch_size"] for result in results) > 1  # batches really formed
    for (image, options), result in zip(requests, results, strict=True):
        assert len(result.top_k) == options.top_k
        assert result.top_k[0].class_index in (CAT_CLASSES if image is CAT_JPEG else COFFEE_CLASSES)


def test_the_server_serves_and_records_on_the_gpu(tmp_path: Path) -> None:
    with running_server(tmp_path, INFERENCE_MODEL_RUNTIME="torch", INFERENCE_MODEL_DEVICE=DEVICE,
                        INFERENCE_MODEL_MAX_BATCH_SIZE="8") as url, httpx.Client(base_url=url, timeout=60) as client:
        token = client.post("/v1/sessions", json={"options": {"top_k": 3}}).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        answer = client.post("/v1/predict", content=CAT_JPEG, headers=auth | {"Content-Type": "image/jpeg"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["top_k"][0]["class_index"] in CAT_CLASSES
        history = client.get("/v1/history", headers=auth).json()
        assert [item["id"] for item in history["items"]] == [answer.json()["id"]]
