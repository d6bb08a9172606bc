"""The client's command line refuses an empty id, label, token or model (an unset shell variable) as a usage
error, exit 2 with argparse's message, before any request is sent."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from clients.python.cli import USAGE, main


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def _record(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _record

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder_url() -> Iterator[str]:
    _Recorder.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("argv", "argument"), [
    (["feedback", "", "tiger cat", "--token", "t"], "ID"),
    (["feedback", "  ", "282", "--token", "t"], "ID"),
    (["feedback", "1733061234567-0", "", "--token", "t"], "LABEL"),
    (["feedback", "1733061234567-0", "282", "--token", ""], "--token"),
    (["history", "--token", ""], "--token"),
    (["predict", "tests/data/cat.jpg", "--token", ""], "--token"),
    (["predict", "tests/data/cat.jpg", "--model", ""], "--model"),
    (["login", "--model", " "], "--model"),
    (["labels", ""], "MODEL"),
])
def test_an_empty_id_label_or_token_is_a_usage_error(recorder_url: str, capsys: pytest.CaptureFixture[str],
                                                     argv: list[str], argument: str) -> None:
    assert main([*argv, "--url", recorder_url]) == USAGE
    assert f"argument {argument}: must not be empty" in capsys.readouterr().err
    assert _Recorder.requests == []
