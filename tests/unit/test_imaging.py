"""Decoding and preprocessing: every image mode, decompression bombs, the crop's equivalences (equivalence
with torchvision: tests/test_imaging.py, out of the unit tier because torchvision takes seconds to import)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from core.errors import BadImage
from core.options import Options
from inference import imaging
from tests.conftest import CAT_JPEG

pytestmark = pytest.mark.unit

MAX_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def cat() -> Image.Image:
    return Image.open(io.BytesIO(CAT_JPEG)).convert("RGB")


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


def test_phone_jpegs_with_several_pictures_decode_at_draft_scale_too() -> None:
    # An MPO (the JPEG a phone writes with a second picture) opens as Pillow's MPO format.
    buffer = io.BytesIO()
    cat().resize((2000, 1600)).save(buffer, "MPO", save_all=True, append_images=[cat().resize((2000, 1600))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    drafted = imaging.decode(buffer.getvalue(), max_pixels=MAX_PIXELS, min_short_side=256)
    assert drafted.size == (500, 400)


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST}


def resize_then_crop(image: Image.Image, options: Options) -> np.ndarray:
    """The reference: Resize(shorter side) of the whole image, then CenterCrop, in torchvision's
    arithmetic, normalized as the pipeline does it."""
    image = ImageOps.grayscale(image) if options.color == "grayscale" else image.convert("RGB")
    width, height = image.size
    resize, crop = options.resize, options.crop
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    if size != image.size:
        image = image.resize(size, RESAMPLING[options.interpolation])
    left, top = round((size[0] - crop) / 2.0), round((size[1] - crop) / 2.0)
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pipeline = imaging.pipeline_for(options)
    return pixels.transpose(2, 0, 1) * pipeline.scale[0] + pipeline.shift[0]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("color", ["rgb", "grayscale"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_the_crop_equals_resizing_the_whole_image_then_cropping(interpolation: str, color: str) -> None:
    """Bit for bit for sides up to 4:1 after Resize (noise: every pixel counts). Portrait shapes over 2:1
    take Pillow 13's vertical-first pass order; (20, 20) under resize 256 is scaled up."""
    shapes = [(500, 375), (375, 500), (300, 300), (451, 300), (1804, 1200), (257, 700), (700, 257), (20, 20),
              (61, 240)]
    for options in [Options(), Options(resize=320, crop=288), Options(resize=160, crop=96),
                    Options(resize=300, crop=300), Options(resize=1024, crop=224)]:
        options = dataclasses.replace(options, interpolation=interpolation, color=color)
        for size in shapes:
            image = noise(*size)
            difference = np.abs(imaging.pipeline_for(options)(image) - resize_then_crop(image, options)).max()
            assert difference == 0, (size, options)


RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # the pipeline's output is then pixels / 255
STRIPS = [(40, 3000), (3000, 40), (2, 150), (150, 2), (13, 1999), (600, 120)]


def levels(image: Image.Image, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """(ours, the reference) in 8-bit levels."""
    ours = imaging.pipeline_for(options)(image)
    return np.rint(ours * 255).astype(int), np.rint(resize_then_crop(image, options) * 255).astype(int)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_strip_resampled_over_the_crops_span_only_is_within_float_tolerance(interpolation: str) -> None:
    # Pillow takes the span as float32: a level or two on noise, in a small share of the pixels.
    for options in [Options(interpolation=interpolation, **RAW),
                    Options(resize=320, crop=288, interpolation=interpolation, **RAW)]:
        for size in STRIPS:
            plan = imaging.plan_resize(*size, options.resize, options.crop)
            assert not (plan.x.whole and plan.y.whole)  # the span path, not the whole-axis one
            ours, reference = levels(noise(*size), options)
            assert np.abs(ours - reference).max() <= 2 and (ours != reference).mean() < 0.05, size


def test_nearest_on_a_strip_picks_the_same_source_pixel_but_at_ties() -> None:
    """A sample exactly between two source pixels may go either way (float rounding): each channel here
    holds a source coordinate, so a pick may differ from the reference's by one pixel, no more."""
    options = Options(interpolation="nearest", **RAW)
    for width, height in STRIPS:
        x, y = np.meshgrid(np.arange(width), np.arange(height))
        image = Image.fromarray(np.stack([x % 256, y % 256, (x // 256 + y // 256) % 256], axis=2).astype(np.uint8))
        ours, reference = levels(image, options)
        assert set(np.unique((ours - reference) % 256)) <= {0, 1, 255}, (width, height)
        assert (ours != reference).mean() < 0.05


def test_pipelines_are_cached_per_option_set() -> None:
    assert imaging.pipeline_for(Options(top_k=3)) is imaging.pipeline_for(Options(top_k=3))
    assert imaging.pipeline_for(Options(resize=300)) is not imaging.pipeline_for(Options())
