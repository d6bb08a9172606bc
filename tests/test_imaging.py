"""Decoding and preprocessing: every image mode, decompression bombs, equivalence with torchvision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from server import imaging
from sessions.errors import BadImage
from sessions.options import Options
from tests.conftest import CAT_JPEG

MAX_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def cat() -> Image.Image:
    return Image.open(io.BytesIO(CAT_JPEG)).convert("RGB")


def test_matches_torchvision_transforms() -> None:
    options = Options()
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(options.mean, options.std)])(cat())
    ours = imaging.preprocess(CAT_JPEG, options, max_pixels=MAX_PIXELS, draft=False)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.abs(ours - reference.numpy()).max() < 1e-4


def test_options_shape_the_tensor() -> None:
    small = imaging.preprocess(CAT_JPEG, Options(resize=128, crop=96), max_pixels=MAX_PIXELS)
    assert small.shape == (3, 96, 96)
    gray = imaging.preprocess(CAT_JPEG, Options(color="grayscale", mean=(0.5,) * 3, std=(0.5,) * 3),
                              max_pixels=MAX_PIXELS)
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    shifted = imaging.preprocess(CAT_JPEG, Options(mean=(0, 0, 0), std=(1, 1, 1)), max_pixels=MAX_PIXELS)
    assert shifted.min() >= 0 and shifted.max() <= 1


@pytest.mark.parametrize("mode_image, fmt", [
    (lambda: cat().convert("L"), "PNG"),
    (lambda: cat().convert("RGBA"), "PNG"),
    (lambda: cat().convert("CMYK"), "JPEG"),
    (lambda: cat().convert("P"), "GIF"),
    (lambda: Image.fromarray(np.asarray(cat().convert("L"), dtype=np.uint16) * 257), "PNG"),
    (lambda: cat().convert("1"), "BMP"),
    (lambda: cat(), "WEBP"),
])
def test_every_mode_becomes_8_bit(mode_image, fmt: str) -> None:
    data = encode(mode_image(), fmt)
    image = imaging.decode(data, max_pixels=MAX_PIXELS)
    assert image.mode in ("RGB", "L")
    array = imaging.preprocess(data, Options(), max_pixels=MAX_PIXELS)
    assert array.shape == (3, 224, 224) and np.isfinite(array).all()


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256 * 16, dtype=np.uint16).reshape(64, 64) * 16)
    image = imaging.decode(encode(Image.fromarray(ramp), "PNG"), max_pixels=MAX_PIXELS)
    values = np.asarray(image)
    assert values.min() == 0 and 250 <= values.max() <= 255 and len(np.unique(values)) > 200


def test_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = imaging.decode(buffer.getvalue(), max_pixels=MAX_PIXELS).convert("RGB")
    red, _, blue = image.getpixel((10, 10))
    assert red > 200 and blue < 50


def test_transparent_areas_become_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert imaging.decode(encode(clear, "PNG"), max_pixels=MAX_PIXELS).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A PNG whose header claims 50 000 x 50 000 pixels; only the header is read.
    bomb = _bomb_png()
    with pytest.raises(BadImage) as caught:
        imaging.decode(bomb, max_pixels=MAX_PIXELS)
    assert caught.value.code == "image_too_large"


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("data, code", [
    (b"", "empty_image"), (b"GIF89a nonsense", "invalid_image"), (b"plain text", "invalid_image"),
    (CAT_JPEG[:2000], "invalid_image"),
])
def test_broken_inputs(data: bytes, code: str) -> None:
    with pytest.raises(BadImage) as caught:
        imaging.preprocess(data, Options(), max_pixels=MAX_PIXELS)
    assert caught.value.code == code


def test_draft_decode_reduces_large_jpegs_but_covers_the_resize() -> None:
    big = encode(cat().resize((1804, 1200)), "JPEG", quality=90)
    drafted = imaging.decode(big, max_pixels=MAX_PIXELS, min_short_side=256)
    assert min(drafted.size) >= 256 and drafted.size[0] < 1804
    full = imaging.decode(big, max_pixels=MAX_PIXELS)
    assert full.size == (1804, 1200)


def test_pipelines_are_cached_per_option_set() -> None:
    assert imaging.pipeline_for(Options(top_k=3)) is imaging.pipeline_for(Options(top_k=3))
    assert imaging.pipeline_for(Options(resize=300)) is not imaging.pipeline_for(Options())
