"""The Open Inference Protocol's codec and request validation (handlers/oip_protocol.py), without a server
or a model; over HTTP in tests/test_oip.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from core.errors import BadRequest
from service.dataplane import (
    RawInput,
    RequestedOutput,
    decode_bytes_elements,
    encode_bytes_elements,
    parse_request,
)

pytestmark = pytest.mark.unit


def test_bytes_elements_are_length_prefixed_little_endian() -> None:
    raw = encode_bytes_elements([b"ab", b"", b"\xff" * 3])
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00\xff\xff\xff"
    assert decode_bytes_elements(raw, "image") == [b"ab", b"", b"\xff" * 3]
    with pytest.raises(BadRequest, match="length prefix"):
        decode_bytes_elements(raw + b"\x01\x00", "image")
    with pytest.raises(BadRequest, match="claims 9 bytes"):
        decode_bytes_elements(struct.pack("<I", 9) + b"abc", "image")


@pytest.mark.parametrize(("tensor", "message"), [
    (RawInput("image", "FP32", [1], elements=[1.0]), "must be BYTES"),
    (RawInput("preprocessed", "BYTES", [1, 3, 32, 32], elements=[b"x"]), "must be FP32"),
    (RawInput("pixels", "BYTES", [1], elements=[b"x"]), "Unknown input"),
    (RawInput("image", "BYTES", [1, 2], elements=[b"x", b"y"]), "shape"),
    (RawInput("image", "BYTES", [0], elements=[]), "shape"),
    (RawInput("image", "BYTES", [65], elements=[b"x"] * 65), "shape"),
    (RawInput("image", "BYTES", [2], elements=[b"x"]), "says 2 elements"),
    (RawInput("preprocessed", "FP32", [1, 3, 16, 16], elements=[0.0] * 768), "shape"),
    (RawInput("preprocessed", "FP32", [1, 1, 32, 32], elements=[0.0] * 1024), "shape"),
    (RawInput("preprocessed", "FP32", [1, 3, 32, 32], raw=b"\x00" * 100), "needs 12288 bytes"),
    (RawInput("preprocessed", "FP32", [1, 3, 32, 32], elements=[float("nan")] * 3072), "NaN"),
])
def test_invalid_inputs_are_refused_with_a_reason(tensor: RawInput, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request("", [tensor], [])


def test_requests_take_one_known_input_and_known_outputs() -> None:
    image = RawInput("image", "BYTES", [1, 1], raw=encode_bytes_elements([b"jpeg"]))
    parsed = parse_request("r1", [image], [RequestedOutput.from_parameters("probabilities", {"classification": 3})])
    assert parsed.images == [b"jpeg"] and parsed.batch_size == 1 and parsed.outputs[0].classification == 3
    with pytest.raises(BadRequest, match="exactly one input"):
        parse_request("", [image, image], [])
    with pytest.raises(BadRequest, match="Unknown output"):
        RequestedOutput.from_parameters("logits", {})
    with pytest.raises(BadRequest, match="positive integer"):
        RequestedOutput.from_parameters("probabilities", {"classification": "3"})
    tensor = parse_request("", [RawInput("preprocessed", "FP32", [2, 3, 32, 32],
                                         raw=np.ones((2, 3, 32, 32), "<f4").tobytes())], []).tensor
    assert tensor is not None and tensor.shape == (2, 3, 32, 32) and tensor.dtype == np.float32
