"""Hostile image shapes, formats and batch sizes (issue #15): the work is bounded by what the model
sees, and what is still absurd is refused with 422 from the header, before pixels are decoded."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from core.errors import BadImage
from core.options import Options
from inference import imaging
from server.runtime import build_runner
from tests.conftest import CAT_JPEG, RunningServer, error_code, login, make_config

MODEL = "efficientnet_lite0"
MAX_PIXELS = 40_000_000
SIDE = 64  # the crop of the sessions that send batches below
LIMITS = {
    "max_aspect_ratio": 4.0,
    "max_upscale": 4.0,
    "max_request_pixels": 3 * SIDE * SIDE,
    "max_forward_pixels": SIDE * SIDE,
}


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A 1-bit black PNG written by hand: kilobytes for tens of megapixels, never held decoded here."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    pixels = zlib.compressobj(9)
    idat = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico_wrapping(png: bytes) -> bytes:
    """An ICO made by Pillow whose one 16x16 entry is swapped for `png`: the directory still says 16x16."""
    icon = encode(Image.new("RGBA", (16, 16)), "ICO", sizes=[(16, 16)])
    (count,) = struct.unpack_from("<H", icon, 4)
    assert count == 1
    return icon[:14] + struct.pack("<II", len(png), 22) + png


def strip(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (200, 120, 40)), "PNG")


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoding fails the test (and allocates nothing)."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{self.format} {self.size} was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# -- 1. the resize works on what the crop covers; absurd shapes are refused from the header -------
def test_a_strips_crop_covers_a_sliver_of_the_source() -> None:
    plan = imaging.plan_resize(1, 8000, 256, 224)
    assert (plan.x.scaled, plan.y.scaled) == (256, 2_048_000)  # what Resize(256) alone would make
    assert plan.x.whole and not plan.y.whole
    low, high = plan.y.span
    assert 3999 < low < high < 4001 and high - low < 1
    first, stop = plan.y.reads(Image.Resampling.BICUBIC)
    assert stop - first <= 10  # source rows the horizontal pass runs on


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(1, 8000), (8000, 1), (3, 5000)])
def test_resampling_a_strip_never_makes_an_image_larger_than_crop_by_resize(
    monkeypatch: pytest.MonkeyPatch, interpolation: str, size: tuple[int, int]
) -> None:
    options = Options(interpolation=interpolation)
    resize = Image.Image.resize
    made: list[tuple[int, int]] = []

    def bounded(self: Image.Image, wanted: tuple[int, int], *args: Any, **kwargs: Any) -> Image.Image:
        made.append(tuple(wanted))
        # Checked before resizing, so that the unbounded path fails here instead of allocating gigabytes.
        assert wanted[0] * wanted[1] <= options.resize * options.crop, f"a {wanted[0]}x{wanted[1]} resize"
        return resize(self, wanted, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    for image in (Image.new("RGB", size, (10, 20, 30)), Image.new("L", size, 90)):
        tensor = imaging.pipeline_for(options)(image)
        assert tensor.shape == (3, 224, 224)
    assert made


def test_aspect_ratio_and_upscale_are_refused_from_the_header(no_decoding: None) -> None:
    with pytest.raises(BadImage) as long:
        imaging.preprocess(strip(1, 8000), Options(), max_pixels=MAX_PIXELS, max_aspect_ratio=100, max_upscale=256)
    assert long.value.code == "image_aspect_ratio_too_large" and long.value.status == 422
    assert "1x8000" in long.value.message and "model.max_aspect_ratio" in long.value.message
    with pytest.raises(BadImage) as small:
        imaging.preprocess(strip(2, 2), Options(resize=1024, crop=1024), max_pixels=MAX_PIXELS,
                           max_aspect_ratio=100, max_upscale=256)
    assert small.value.code == "image_too_small" and "model.max_upscale" in small.value.message


def test_the_header_checks_draw_the_line_at_the_limits() -> None:
    def code(size: tuple[int, int], options: Options) -> str:
        try:
            tensor = imaging.preprocess(strip(*size), options, max_pixels=MAX_PIXELS, max_aspect_ratio=100,
                                        max_upscale=256)
        except BadImage as error:
            return error.code
        assert tensor.shape == (3, options.crop, options.crop)
        return "served"

    assert code((1, 100), Options()) == code((100, 1), Options()) == "served"  # 100:1
    assert code((1, 101), Options()) == code((101, 1), Options()) == "image_aspect_ratio_too_large"
    assert code((1, 1), Options()) == code((4, 4), Options(resize=1024, crop=512)) == "served"  # 256 times
    assert code((1, 1), Options(resize=257)) == code((3, 3), Options(resize=1024)) == "image_too_small"


# -- 3. only the promised formats are opened ----------------------------------------------------
def test_an_ico_is_refused_without_decoding_its_embedded_png(no_decoding: None) -> None:
    bomb = ico_wrapping(blank_png(8000, 8000))
    assert len(bomb) < 200_000
    with pytest.raises(BadImage) as caught:
        imaging.decode(bomb, max_pixels=MAX_PIXELS)
    assert caught.value.code == "invalid_image"
    assert "JPEG, PNG, WebP, GIF, BMP" in caught.value.message


def test_a_tiff_is_not_an_accepted_format(no_decoding: None) -> None:
    tiff = encode(Image.new("RGB", (300, 300), (1, 2, 3)), "TIFF")
    with pytest.raises(BadImage) as caught:
        imaging.preprocess(tiff, Options(), max_pixels=MAX_PIXELS)
    assert caught.value.code == "invalid_image"


def test_pillows_own_bomb_limit_follows_the_configured_one(default_model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    runner = build_runner(make_config(model={"max_image_pixels": 1_234_567}))
    runner.close()
    assert Image.MAX_IMAGE_PIXELS == 1_234_567


# -- end to end: status and code on every image route -------------------------------------------
@pytest.fixture(scope="module")
def bounded(serve: Callable[..., Any]) -> Iterator[RunningServer]:
    with serve(make_config(model=LIMITS)) as running:
        yield running


@pytest.fixture
def http(bounded: RunningServer) -> Iterator[httpx.Client]:
    with bounded.client() as client:
        yield client


def send(client: httpx.Client, route: str, image: bytes, content_type: str) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if route != "/predict":
        headers.update(login(client))
    return client.post(route, headers=headers, content=image)


ROUTES = ["/v1/predict", "/predict", "/v1/preprocess"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("image", "content_type", "code", "named"), [
    (strip(1, 40), "image/png", "image_aspect_ratio_too_large", "model.max_aspect_ratio"),
    (strip(600, 120), "image/png", "image_aspect_ratio_too_large", "model.max_aspect_ratio"),
    (strip(16, 16), "image/png", "image_too_small", "model.max_upscale"),
    (encode(Image.new("RGB", (300, 300), (1, 2, 3)), "TIFF"), "image/jpeg", "invalid_image", "JPEG, PNG"),
    (ico_wrapping(blank_png(2000, 2000)), "image/png", "invalid_image", "JPEG, PNG"),
], ids=["tall", "wide", "tiny", "tiff-as-jpeg", "ico-as-png"])
def test_routes_refuse_with_422_and_a_code(http: httpx.Client, route: str, image: bytes, content_type: str,
                                           code: str, named: str) -> None:
    response = send(http, route, image, content_type)
    assert response.status_code == 422, response.text
    assert error_code(response) == code
    assert named in response.json()["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_routes_draw_the_line_at_the_limits(http: httpx.Client, route: str) -> None:
    assert send(http, route, CAT_JPEG, "image/jpeg").status_code == 200
    assert send(http, route, strip(256, 64), "image/png").status_code == 200  # 4:1, and scaled up 4 times
    assert error_code(send(http, route, strip(257, 64), "image/png")) == "image_aspect_ratio_too_large"
    assert error_code(send(http, route, strip(63, 63), "image/png")) == "image_too_small"


# -- 2. pixels per request over the Open Inference Protocol --------------------------------------
def infer(client: httpx.Client, auth: dict[str, str], tensor: dict[str, Any]) -> httpx.Response:
    return client.post(f"/v2/models/{MODEL}/infer", headers=auth, json={"inputs": [tensor]})


def images_input(*images: bytes) -> dict[str, Any]:
    return {"name": "image", "datatype": "BYTES", "shape": [len(images)],
            "data": [base64.b64encode(image).decode() for image in images]}


def preprocessed_input(count: int, side: int) -> dict[str, Any]:
    return {"name": "preprocessed", "datatype": "FP32", "shape": [count, 3, side, side],
            "data": np.zeros(count * 3 * side * side).tolist()}


def test_oip_refuses_more_pixels_than_a_request_may_carry(http: httpx.Client) -> None:
    auth = login(http, resize=SIDE, crop=SIDE)
    # Four crops of 64x64 are over 3 * 64 * 64; the bodies are not images, so only a check made
    # before decoding answers with the limit.
    refused = infer(http, auth, images_input(*[b"not an image"] * 4))
    assert refused.status_code == 422, refused.text
    assert "model.max_request_pixels" in refused.json()["error"]
    tensor = infer(http, auth, preprocessed_input(4, SIDE))
    assert tensor.status_code == 422 and "model.max_request_pixels" in tensor.json()["error"]
    # At the limit both are served (in forwards of one image each: max_forward_pixels is 64 * 64).
    served = infer(http, auth, images_input(CAT_JPEG, CAT_JPEG, CAT_JPEG))
    assert served.status_code == 200, served.text
    assert served.json()["outputs"][0]["shape"] == [3, 1000]
    assert infer(http, auth, preprocessed_input(3, SIDE)).status_code == 200
