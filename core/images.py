"""The image formats the server takes: one table that decoding, the upload check, capture, the export,
the OpenAPI document and the error messages all read. A format is added here, in one row (Pillow must
decode it, and capture must know where it ends: service/capture.py's image_length)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    pillow: str  # Pillow's name for it: the decoder tries only these
    name: str  # as messages write it
    media_type: str
    extension: str  # a captured image's file name in the training export
    signature: re.Pattern[bytes]  # its first bytes

    def matches(self, data: bytes) -> bool:
        return self.signature.match(data) is not None


def _signature(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(pattern, re.DOTALL)


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", "JPEG", "image/jpeg", "jpg", _signature(rb"\xff\xd8\xff")),
    ImageFormat("PNG", "PNG", "image/png", "png", _signature(rb"\x89PNG\r\n\x1a\n")),
    ImageFormat("WEBP", "WebP", "image/webp", "webp", _signature(rb"RIFF....WEBP")),
    ImageFormat("GIF", "GIF", "image/gif", "gif", _signature(rb"GIF8[79]a")),
    ImageFormat("BMP", "BMP", "image/bmp", "bmp", _signature(rb"BM")),
)

PILLOW_NAMES = tuple(image_format.pillow for image_format in FORMATS)
MEDIA_TYPES = tuple(image_format.media_type for image_format in FORMATS)
#: The formats as a message lists them: "JPEG, PNG, WebP, GIF, BMP".
NAMES = ", ".join(image_format.name for image_format in FORMATS)
#: The media types as a sentence lists them: "image/jpeg, …, image/gif or image/bmp".
MEDIA_TYPES_SENTENCE = f"{', '.join(MEDIA_TYPES[:-1])} or {MEDIA_TYPES[-1]}"


def sniff(data: bytes) -> ImageFormat | None:
    """The format `data` is in, from its first bytes (whatever a request said it was); None for another."""
    return next((image_format for image_format in FORMATS if image_format.matches(data)), None)


def extension(media_type: str) -> str:
    """The file extension of a media type; "bin" for one that is not a format here."""
    return next((f.extension for f in FORMATS if f.media_type == media_type), "bin")
