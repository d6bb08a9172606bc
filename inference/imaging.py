"""Image decoding and preprocessing: bytes in, uint8 pixels of the crop out (`prepare`).

Pure functions with no threads: the model runner calls them from its own executor. The steps
match torchvision's Resize(shorter side) -> CenterCrop, done in uint8 with libjpeg-turbo (JPEG, at a
DCT scale) and Pillow (the other formats, and the antialiased resampling torchvision itself uses);
ToTensor -> Normalize then run inside the model's graph (`inference.pixels`).

The work is bounded by what the model sees, not by the image's shape: the centre crop is located in
source pixels first and a long side is resampled only where the crop covers it (`plan_resize`), and an
image whose shape is absurd for a crop (a 1x8000 strip, one pixel under resize=1024) is refused from
its header.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import PIL
import simplejpeg
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from core import images
from core.errors import BadImage
from core.options import Options
from inference.pixels import PixelBatch, normalization

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

#: The formats the API promises (core.images), as Pillow names them. Pillow tries only these, so a TIFF, ICO or PSD
#: is refused from its signature whatever Content-Type it came with; some other plugins decode while
#: opening (an ICO decodes its largest entry), before any size check could run. For these five the
#: size read from the header is that of the frame `load()` decodes (for a GIF, Pillow folds the first
#: frame's bounds into it); a JPEG may decode smaller (draft).
FORMATS = images.PILLOW_NAMES

#: Defaults of the shape limits (server config: model.max_aspect_ratio, model.max_upscale).
DEFAULT_MAX_ASPECT_RATIO = 100.0
DEFAULT_MAX_UPSCALE = 256.0

#: The filters' support radius in source pixels at scale 1 (Pillow's libImaging/Resample.c); nearest
#: reads only the pixel under each sample.
_SUPPORT = {Image.Resampling.NEAREST: 0.0, Image.Resampling.BILINEAR: 1.0, Image.Resampling.BICUBIC: 2.0}

#: A side at most this many times the short one is resampled whole and then cropped, which is exactly
#: what Resize -> CenterCrop computes; a longer one (a strip) is resampled only over the crop's span,
#: equal up to the float32 precision Pillow keeps that span in (an 8-bit level or two).
_WHOLE_SIDE_RATIO = 4

# Pillow 13 runs the vertical pass first when the height shrinks more than twice as much as the width
# (libImaging/Resample.c); earlier versions always start with the horizontal one. The passes here run
# in the order a whole-image resize would use, since each rounds to 8 bits in between.
_PILLOW_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only, refusing non-images, other formats and oversized images before any pixel
    is decoded."""
    if not data:
        raise BadImage("The image is empty (0 bytes).", code="empty_image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(f"The image has more pixels than the limit of {max_pixels} (model.max_image_pixels).",
                       code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadImage(f"The body is not an image in a format the server reads ({images.NAMES}).",
                       code="invalid_image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage("The image has no pixels.", code="invalid_image")
    if width * height > max_pixels:
        raise BadImage(f"The image is {width}x{height} pixels; the limit is {max_pixels} pixels "
                       "(model.max_image_pixels).", code="image_too_large")
    return image


def check_shape(width: int, height: int, resize: int, *, max_aspect_ratio: float, max_upscale: float) -> None:
    """Refuse (422) a shape no crop makes sense of: far longer than wide, or so small that reaching
    `resize` means inventing nearly every pixel. Needs the header's size only."""
    short, long = min(width, height), max(width, height)
    if long > short * max_aspect_ratio:
        raise BadImage(f"The image is {width}x{height} pixels: its long side is {long / short:.4g} times its short "
                       f"side; the limit is {max_aspect_ratio:g} (model.max_aspect_ratio).",
                       code="image_aspect_ratio_too_large")
    if resize > short * max_upscale:
        raise BadImage(f"The image is {width}x{height} pixels: reaching resize={resize} would scale it up "
                       f"{resize / short:.4g} times; the limit is {max_upscale:g} (model.max_upscale).",
                       code="image_too_small")


def decode(data: bytes, *, max_pixels: int, min_short_side: int | None = None) -> Image.Image:
    """Decode to 8-bit RGB or L. With `min_short_side`, JPEGs decode at the smallest DCT scale
    (1/2, 1/4, 1/8) whose shorter side still covers it, which makes a large photo's decode several times faster.
    """
    return _load(open_image(data, max_pixels), min_short_side, data=data)


def dct_factor(width: int, height: int, min_short_side: int | None) -> int:
    """The JPEG reduction (1, 2, 4 or 8) whose shorter side still covers `min_short_side`: the one
    Pillow's draft picks."""
    if not min_short_side:
        return 1
    scale = min_short_side / min(width, height)
    if scale >= 1:
        return 1
    room = min(width // math.ceil(width * scale), height // math.ceil(height * scale))
    return next(factor for factor in (8, 4, 2, 1) if factor <= room)


def _load(image: Image.Image, min_short_side: int | None, *, data: bytes | None = None,
          gray: bool = False) -> Image.Image:
    """Decode the opened `image`; `data`: its bytes, which libjpeg-turbo decodes directly when it is a
    baseline or progressive RGB or grayscale JPEG (`gray`: to luma, as JPEG stores it)."""
    if isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO (phones' JPEGs) included
        width, height = image.size
        factor = dct_factor(width, height, min_short_side)
        if data is not None and image.mode in ("RGB", "L"):
            decoded = _turbo_decode(data, width, height, factor, gray or image.mode == "L")
            if decoded is not None:
                return decoded
        if factor > 1 and min_short_side is not None:  # Pillow's draft picks the same factor from the size asked for
            scale = min_short_side / min(width, height)
            image.draft(image.mode if image.mode in ("L", "RGB") else "RGB",
                        (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImage(f"The image could not be decoded ({exc}).", code="invalid_image") from None
    return _to_8bit(image)


def _turbo_decode(data: bytes, width: int, height: int, factor: int, gray: bool) -> Image.Image | None:
    """libjpeg-turbo's decode at 1/`factor` (simplejpeg); None where it declines (a corrupt or unusual
    file), so that Pillow decodes it or says what is wrong."""
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB",
                                        min_width=math.ceil(width / factor), min_height=math.ceil(height / factor))
    except (ValueError, RuntimeError):
        return None
    if pixels.shape[0] * pixels.shape[1] > width * height:  # not the image the header described
        return None
    return Image.fromarray(pixels[:, :, 0] if gray else pixels, "L" if gray else "RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Normalize every mode the formats produce to RGB or L (transparent areas onto white)."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit and 32-bit grayscale: scale the value range to 0..255 instead of clipping.
        array = np.asarray(image, dtype=np.float32)
        high = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / high), 0, 255).astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


# -- Resize(shorter side) -> CenterCrop, resampling a strip only where the crop covers it ----------
@dataclass(frozen=True)
class Axis:
    """One axis of Resize(shorter side to `resize`) -> CenterCrop(`crop`)."""

    size: int  # source pixels
    scaled: int  # pixels after Resize
    start: int  # where the crop starts, in scaled pixels
    crop: int
    whole: bool  # resampled whole and cropped after (Resize's own pixels), else only over `span`

    @property
    def span(self) -> tuple[float, float]:
        """The source interval the crop covers: Resize maps scaled pixel i to source i * size / scaled."""
        step = self.size / self.scaled
        return self.start * step, min((self.start + self.crop) * step, float(self.size))

    def reads(self, resample: Image.Resampling) -> tuple[int, int]:
        """The source pixels that resampling the span reads: the filter's support either side, plus one."""
        low, high = self.span
        support = _SUPPORT[resample] * max((high - low) / self.crop, 1.0)
        return max(0, math.floor(low - support) - 1), min(self.size, math.ceil(high + support) + 1)


@dataclass(frozen=True)
class ResizePlan:
    """Both axes, and which one a whole-image resize would resample first."""

    x: Axis
    y: Axis
    horizontal_first: bool


def plan_resize(width: int, height: int, resize: int, crop: int) -> ResizePlan:
    """Where Resize(`resize`) -> CenterCrop(`crop`) takes its pixels from a width x height source."""
    # torchvision's sizes and offsets: the long side truncated, the crop's start rounded.
    scaled_w, scaled_h = (resize, int(resize * height / width)) if width <= height else \
        (int(resize * width / height), resize)
    longest_whole = _WHOLE_SIDE_RATIO * resize
    shrink_x, shrink_y = width - scaled_w, height - scaled_h
    return ResizePlan(
        Axis(width, scaled_w, round((scaled_w - crop) / 2.0), crop, whole=scaled_w <= longest_whole),
        Axis(height, scaled_h, round((scaled_h - crop) / 2.0), crop, whole=scaled_h <= longest_whole),
        horizontal_first=not (_PILLOW_ORDERS_PASSES and shrink_y > 0 and shrink_y > 2 * shrink_x),
    )


def resize_and_crop(image: Image.Image, resize: int, crop: int, resample: Image.Resampling) -> Image.Image:
    """Resize(shorter side) -> CenterCrop as two one-axis passes. A strip's long side is resampled only
    over the crop's span, and the other pass runs only on the source lines that span reads: whatever the
    aspect ratio, no image made here is larger than the decoded source or _WHOLE_SIDE_RATIO x resize^2."""
    plan = plan_resize(*image.size, resize, crop)
    (first, first_axis), (second, second_axis) = [(0, plan.x), (1, plan.y)][:: 1 if plan.horizontal_first else -1]
    origin = 0
    if not second_axis.whole:  # the first pass runs only on the lines the second one reads
        origin, stop = second_axis.reads(resample)
        image = _cut(image, second, origin, stop)
    image = _one_pass(image, first, first_axis, 0, resample)
    return _one_pass(image, second, second_axis, origin, resample)


def _one_pass(image: Image.Image, axis: int, spec: Axis, origin: int, resample: Image.Resampling) -> Image.Image:
    """Resample along `axis` alone, as `spec` says; `origin`: the source pixel where `image` starts on it."""
    if spec.whole:
        if spec.scaled != spec.size:  # Resize leaves an axis that already has its length alone
            image = _resample(image, axis, 0, spec.size, spec.scaled, resample)
        return _cut(image, axis, spec.start, spec.start + spec.crop)
    low, high = spec.span
    return _resample(image, axis, low - origin, high - origin, spec.crop, resample)


def _resample(image: Image.Image, axis: int, low: float, high: float, length: int,
              resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    if axis == 0:
        return image.resize((length, height), resample, box=(low, 0, high, height))
    return image.resize((width, length), resample, box=(0, low, width, high))


def _cut(image: Image.Image, axis: int, start: int, stop: int) -> Image.Image:
    width, height = image.size
    if (start, stop) == (0, image.size[axis]):
        return image
    return image.crop((start, 0, stop, height) if axis == 0 else (0, start, width, stop))


@dataclass(frozen=True)
class Pipeline:
    """Resize and crop under one option set, in uint8; built once per distinct Options. Normalization
    is the runtime's (inference.pixels): this only says which."""

    options: Options
    scale: np.ndarray  # (1, 3, 1, 1): 1 / (255 * std)
    shift: np.ndarray  # (1, 3, 1, 1): -mean / std

    @property
    def gray(self) -> bool:
        return self.options.color == "grayscale"

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The (crop, crop, 3) uint8 array the model sees before normalization."""
        opts = self.options
        if self.gray and image.mode != "L":
            image = ImageOps.grayscale(image)
        elif not self.gray and image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(resize_and_crop(image, opts.resize, opts.crop, _RESAMPLING[opts.interpolation]))
        if self.gray:  # grayscale is fed as three equal channels
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        return pixels

    def batch(self, image: Image.Image) -> PixelBatch:
        return PixelBatch(self.pixels(image)[None], self.scale, self.shift)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """The normalized (3, crop, crop) float32 tensor."""
        tensor: np.ndarray = self.batch(image).to_tensor()[0]
        return tensor


@functools.lru_cache(maxsize=256)
def pipeline_for(options: Options) -> Pipeline:
    return Pipeline(options, *normalization(tuple(options.mean), tuple(options.std)))


def prepare(data: bytes, options: Options, *, max_pixels: int, draft: bool = True,
            max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
            max_upscale: float = DEFAULT_MAX_UPSCALE) -> PixelBatch:
    """Bytes to the batch of one image the model takes under `options` (uint8 pixels and their
    normalization). JPEGs decode with libjpeg-turbo at the DCT scale that still covers `resize` (with
    `draft`), straight to grayscale when the options ask for it."""
    image = open_image(data, max_pixels)
    check_shape(*image.size, options.resize, max_aspect_ratio=max_aspect_ratio, max_upscale=max_upscale)
    pipeline = pipeline_for(options)
    return pipeline.batch(_load(image, options.resize if draft else None, data=data, gray=pipeline.gray))


def preprocess(data: bytes, options: Options, *, max_pixels: int, draft: bool = True,
               max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
               max_upscale: float = DEFAULT_MAX_UPSCALE) -> np.ndarray:
    """Bytes to the normalized (3, crop, crop) float32 tensor the model sees under `options`."""
    tensor: np.ndarray = prepare(data, options, max_pixels=max_pixels, draft=draft, max_aspect_ratio=max_aspect_ratio,
                                 max_upscale=max_upscale).to_tensor()[0]
    return tensor
