"""core/images.py: the image formats are known in one table; what cannot import it (the page, the
Python client, the export's file names) is checked against it here."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from clients.python import protocol
from core import images
from service.capture import content_type, image_length

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _encoded(pillow_name: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (200, 10, 10)).save(buffer, format=pillow_name)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", images.FORMATS, ids=lambda f: f.name)
def test_each_row_is_a_format_pillow_writes_and_capture_walks_to_its_end(image_format: images.ImageFormat) -> None:
    data = _encoded(image_format.pillow)
    assert images.sniff(data) == image_format
    assert content_type(data) == image_format.media_type
    assert image_length(data + b"trailing bytes") == len(data)
    assert Image.open(io.BytesIO(data)).format == image_format.pillow


def test_the_python_client_sniffs_the_same_formats() -> None:
    for image_format in images.FORMATS:
        assert protocol.sniff_content_type(_encoded(image_format.pillow)) == image_format.media_type


def test_the_page_accepts_the_media_types_and_names_the_formats() -> None:
    page = (ROOT / "web" / "index.html").read_text()
    accept = re.search(r'id="file-input"[^>]*accept="([^"]+)"', page)
    assert accept is not None and tuple(accept.group(1).split(",")) == images.MEDIA_TYPES
    spoken = ", ".join(f.name for f in images.FORMATS[:-1]) + f" or {images.FORMATS[-1].name}"
    assert spoken in page
    assert spoken in (ROOT / "web" / "app.js").read_text()


def test_the_upload_message_and_the_export_use_the_table() -> None:
    assert images.MEDIA_TYPES_SENTENCE == "image/jpeg, image/png, image/webp, image/gif or image/bmp"
    assert images.extension("image/webp") == "webp" and images.extension("application/octet-stream") == "bin"
