"""The first export (a child process for up to minutes) says when it starts, that it is still running,
and how long it took."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

from inference import model
from inference.repository import configured_spec
from tests.conftest import wait_until

pytestmark = pytest.mark.unit


def test_a_long_export_logs_its_start_its_progress_and_its_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    go = tmp_path / "go"
    exporter = tmp_path / "fake-python"  # stands in for `python -m inference.torch_model`: runs until told
    exporter.write_text(f'#!/bin/sh\nwhile [ ! -e "{go}" ]; do sleep 0.01; done\n')
    exporter.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(exporter))
    monkeypatch.setattr(model, "_EXPORT_PROGRESS_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger=model.log.name)
    spec = configured_spec("tiny", "w.pt")
    export = threading.Thread(target=model._export_in_child, args=(spec, tmp_path, tmp_path / "m.json"))
    export.start()
    try:
        wait_until(lambda: "still exporting tiny to ONNX" in caplog.text, "a progress line")
    finally:
        go.touch()
        export.join(30)
    messages = [record.getMessage() for record in caplog.records if record.name == model.log.name]
    assert messages[0].startswith("exporting tiny to ONNX in a child process")
    assert all(message.startswith("still exporting tiny to ONNX (") for message in messages[1:-1])
    assert len(messages) >= 3 and messages[-1].startswith("exported tiny to ONNX in ")
