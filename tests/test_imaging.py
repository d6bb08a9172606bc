"""Preprocessing equals torchvision's transforms. Not in the unit tier (tests/unit/test_imaging.py holds the
rest): importing torchvision takes seconds."""

from __future__ import annotations

import io

import numpy as np
import torchvision.transforms as T
from PIL import Image

from core.options import Options
from inference import imaging
from tests.conftest import CAT_JPEG

MAX_PIXELS = 40_000_000


def cat() -> Image.Image:
    return Image.open(io.BytesIO(CAT_JPEG)).convert("RGB")


def test_matches_torchvision_transforms() -> None:
    options = Options()
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(options.mean, options.std)])(cat())
    ours = imaging.preprocess(CAT_JPEG, options, max_pixels=MAX_PIXELS, draft=False)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.abs(ours - reference.numpy()).max() < 1e-4
