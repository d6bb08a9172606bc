"""The clients' stream window across a 1001 resume: images answered before the close are never sent
again, those sent and unanswered are sent again once, first and in order (clients/python/protocol.py)."""

from __future__ import annotations

import json

import pytest

from clients.python import protocol
from tests.conftest import CAT_JPEG

pytestmark = pytest.mark.unit


def result(seq: int) -> dict:
    return {"type": "result", "ref": None, "seq": seq, "result": {}}


def refs(frames: list[tuple[str, bytes]]) -> list[str]:
    return [json.loads(header)["ref"] for header, _ in frames]


def fill(window: protocol.StreamWindow) -> list[tuple[str, bytes]]:
    frames = []
    while window.room():
        frames.append(window.next_frames())
    return frames


def test_a_resume_sends_only_the_unanswered_images_again_once_then_the_rest() -> None:
    window = protocol.StreamWindow([{"image": CAT_JPEG, "ref": f"i{n}"} for n in range(6)], {}, 3)
    assert refs(fill(window)) == ["i0", "i1", "i2"]
    assert window.received(result(1)).ref is None and window.pending == 2  # i1 answered on connection 1
    assert refs(fill(window)) == ["i3"]  # connection seq 3
    assert window.may_resume(1001) and not window.may_resume(1006)
    window.resume(2)  # connection 2: its seq counts from 0 again
    assert refs(fill(window)) == ["i0", "i2"]
    assert window.received(result(1)).seq == 2  # connection 2's seq 1 is i2, the stream's item 2
    assert refs(fill(window)) == ["i3"]
    assert window.received(result(0)).seq == 0 and window.received(result(2)).seq == 3
    assert refs(fill(window)) == ["i4", "i5"]
    assert window.received(result(3)).seq == 4 and window.received(result(4)).seq == 5
    assert fill(window) == [] and window.done


def test_resumes_are_bounded() -> None:
    window = protocol.StreamWindow([CAT_JPEG], {}, 1)
    fill(window)
    for _ in range(protocol.MAX_STREAM_RESUMES):
        assert window.may_resume(protocol.GOING_AWAY)
        window.resume(1)
    assert not window.may_resume(protocol.GOING_AWAY)
