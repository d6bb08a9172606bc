"""Model loading: the packaged default, a torchvision model from a state_dict file, clear failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from core.options import Options
from inference.backends.torch_backend import TorchBackend
from inference.imaging import preprocess
from inference.model import ModelLoadError, softmax
from inference.torch_model import imagenet_labels, load_model
from tests.conftest import CAT_CLASSES, CAT_JPEG, COFFEE_CLASSES, COFFEE_JPEG


def top3(model, image: bytes) -> set[int]:
    batch = preprocess(image, Options(), max_pixels=10**8)[None]
    probabilities = softmax(TorchBackend(model.module).forward(batch))[0]
    return set(np.argsort(probabilities)[-3:].tolist())


def test_default_model_knows_cats_and_coffee(default_model) -> None:
    assert default_model.name == "efficientnet_lite0" and default_model.version.startswith("imagenet-")
    assert len(default_model.labels) == 1000 and default_model.labels[281] == "tabby"
    assert top3(default_model, CAT_JPEG) & CAT_CLASSES
    assert top3(default_model, COFFEE_JPEG) & COFFEE_CLASSES


def test_torchvision_model_from_a_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model("resnet18", str(path))
    assert loaded.name == "resnet18" and loaded.version.startswith("file-") and loaded.labels == imagenet_labels()
    batch = preprocess(CAT_JPEG, Options(), max_pixels=10**8)[None]
    with torch.inference_mode():
        expected = reference(torch.from_numpy(batch)).numpy()
    assert np.allclose(TorchBackend(loaded.module).forward(batch), expected, atol=1e-5)


@pytest.mark.parametrize("name, weights, fragment", [
    ("resnet5000", "default", "Unknown model 'resnet5000'"),
    ("resnet18", "/no/such/file.pt", "neither a file nor a known weights name"),
    ("efficientnet_lite0", "/no/such/file.pt", "neither a file nor a known weights name"),
])
def test_load_failures_are_one_clear_sentence(name: str, weights: str, fragment: str) -> None:
    with pytest.raises(ModelLoadError, match=fragment) as caught:
        load_model(name, weights)
    assert "\n" not in str(caught.value)


def test_weights_of_the_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ModelLoadError, match="do not fit the efficientnet_lite0 architecture"):
        load_model("efficientnet_lite0", str(path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="state_dict"):
        load_model("resnet18", str(junk))
