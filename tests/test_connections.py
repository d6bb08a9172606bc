"""Connection limits on real sockets: idle, header and body timeouts, the cap on open connections
(with one process and on the multi-process accept path), the write timeout, and the client address behind a proxy."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import tornado.netutil

from inference.runner import ModelRunner, ServedModel
from server.balance import SharedCounts
from server.config import Config
from server.runtime import build_runner, build_store, serve_loaded
from server.server import Server
from tests.conftest import CAT_JPEG, LoopThread, RedisServer, login, make_config, wait_for

SHORT = 0.3  # the timeouts under test, in seconds
PATIENCE = 5.0  # how long a test waits for something that a working limit does within SHORT


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    """One model runner for the module's servers (their HTTP settings differ, the model does not)."""
    shared = build_runner(make_config())
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def served(default_model: Any) -> ServedModel:
    """The model the balanced server serves, on its runtime."""
    return serve_loaded(make_config(), default_model)


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:  # before connect: the window it advertises is fixed at the handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(PATIENCE)
    sock.connect((host, int(port)))
    return sock


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: test", *headers, "", ""]).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the headers ended: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed before the body ended"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float = PATIENCE) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `within` seconds; data is discarded."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def open_connections(url: str) -> float:
    """The server's inference_open_connections, asked on a connection of its own (counted too)."""
    with httpx.Client(base_url=url, timeout=PATIENCE) as http:
        text = http.get("/metrics").text
    return float(re.search(r"^inference_open_connections(?:\{[^}]*\})? (\S+)$", text, re.M).group(1))


# -- timeouts while reading a request -------------------------------------------------------------
@pytest.fixture(scope="module")
def short_timeouts(serve: Callable[..., Any], runner: ModelRunner) -> Iterator[Any]:
    config = make_config(http={"idle_timeout_seconds": SHORT, "body_timeout_seconds": SHORT})
    with serve(config, runner=runner) as running:
        yield running


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(short_timeouts) -> None:
    with connect(short_timeouts.url) as sock:
        for _ in range(2):  # kept alive between requests sent without a pause
            sock.sendall(get("/healthz"))
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection", "").lower() != "close"
        idle_since = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - idle_since >= SHORT / 2  # by the timeout, not at once


def test_headers_that_never_finish_and_silent_connections_are_closed(short_timeouts) -> None:
    with connect(short_timeouts.url) as slow, connect(short_timeouts.url) as silent:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")  # never ends
        assert closed_by_server(slow)
        assert closed_by_server(silent)


def test_a_body_that_stalls_is_cut_off_after_the_body_timeout(short_timeouts) -> None:
    with connect(short_timeouts.url) as sock:
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")  # 1 of the 100 bytes announced
        assert closed_by_server(sock)
    with short_timeouts.client() as http:  # a body sent in time is read as always
        assert http.post("/v1/sessions", json={"options": {"top_k": 2}}).status_code == 201


# -- the cap on open connections -------------------------------------------------------------------
CAP = 3


@contextlib.contextmanager
def balanced_server(loop_thread: LoopThread, config: Config, runner: ModelRunner,
                    served: ServedModel) -> Iterator[tuple[str, SharedCounts]]:
    """The server behind the multi-process accept path (BalancedHTTPServer) as process 0 of 1."""
    counts = SharedCounts(1)

    async def start() -> Server:
        store = build_store(config, config.redis.url)
        server = Server(config, store, runner, served, tornado.netutil.bind_sockets(0, "127.0.0.1"), counts=counts,
                        slot=0)
        await server.start(background=False)
        return server

    server = loop_thread.run(start())
    try:
        yield f"http://127.0.0.1:{server.http.port}", counts
    finally:
        loop_thread.stop_server(server)


@pytest.fixture(params=["one process", "balanced"])
def capped(request: pytest.FixtureRequest, serve: Callable[..., Any], loop_thread: LoopThread,
           redis_server: RedisServer, runner: ModelRunner,
           served: ServedModel) -> Iterator[tuple[str, SharedCounts | None]]:
    config = make_config(redis_server.url, http={"max_connections": CAP})
    if request.param == "balanced":
        with balanced_server(loop_thread, config, runner, served) as (url, counts):
            yield url, counts
    else:
        with serve(config, runner=runner) as running:
            yield running.url, None


def test_past_the_cap_a_connection_gets_a_503_and_a_freed_slot_is_used_again(capped) -> None:
    url, counts = capped
    held = [connect(url) for _ in range(CAP)]
    try:
        for sock in held:  # answered: accepted and counted
            sock.sendall(get("/healthz"))
            assert read_response(sock)[0] == 200
        if counts is not None:
            assert counts.connections(0) == CAP  # the count the processes balance on

        with connect(url) as extra:
            extra.sendall(get("/healthz"))
            status, headers, body = read_response(extra)
            assert status == 503 and headers["connection"] == "close"
            assert headers["content-type"].startswith("application/json")
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            assert closed_by_server(extra)
        for sock in held:  # the connections held are unaffected
            sock.sendall(get("/healthz"))
            assert read_response(sock)[0] == 200

        held.pop().close()

        def served() -> bool:
            with connect(url) as fresh:
                fresh.sendall(get("/healthz", "Connection: close"))
                return read_response(fresh)[0] == 200

        assert wait_for(served, timeout=PATIENCE, interval=0.02)  # once the server has seen the close
    finally:
        for sock in held:
            sock.close()
    # Every close was counted: only the connection asking is open.
    assert wait_for(lambda: open_connections(url) == 1, timeout=PATIENCE, interval=0.02)
    if counts is not None:
        assert wait_for(lambda: counts.connections(0) == 0, timeout=PATIENCE, interval=0.02)


def test_a_websocket_stream_counts_until_it_closes(serve: Callable[..., Any], runner: ModelRunner) -> None:
    from websockets.sync.client import connect as ws_connect

    with serve(make_config(http={"max_connections": 2}), runner=runner) as running:
        ws_url = running.url.replace("http://", "ws://") + "/v1/stream"
        # Upgraded, a stream is no longer an HTTP request, but it is still an open connection.
        with ws_connect(ws_url, open_timeout=PATIENCE), connect(running.url) as second:
            second.sendall(get("/healthz"))
            assert read_response(second)[0] == 200
            with connect(running.url) as third:
                third.sendall(get("/healthz"))
                assert read_response(third)[0] == 503
        assert wait_for(lambda: open_connections(running.url) == 1, timeout=PATIENCE, interval=0.02)


# -- the write side ------------------------------------------------------------------------------
def ask_for_a_large_answer(sock: socket.socket, auth: dict[str, str]) -> None:
    """Send a preprocess whose answer, the .npy of a 1024 x 1024 crop (12.6 MB), is far more than the
    socket buffers hold."""
    sock.sendall("\r\n".join([
        "POST /v1/preprocess?resize=1024&crop=1024 HTTP/1.1", "Host: test", "Content-Type: image/jpeg",
        f"Authorization: {auth['Authorization']}", f"Content-Length: {len(CAT_JPEG)}", "", "",
    ]).encode() + CAT_JPEG)


def test_a_client_that_never_reads_its_answer_is_dropped_after_the_write_timeout(serve: Callable[..., Any],
                                                                                   runner: ModelRunner) -> None:
    with serve(make_config(http={"write_timeout_seconds": SHORT}), runner=runner) as running:
        with running.client() as http:
            auth = login(http)
        with connect(running.url, receive_buffer=4096) as stalled:
            ask_for_a_large_answer(stalled, auth)
            with running.client() as http:  # others are served meanwhile
                assert http.get("/healthz").status_code == 200
            # Dropped: only the connection asking is open.
            assert wait_for(lambda: open_connections(running.url) == 1, timeout=PATIENCE, interval=0.05)
            with running.client() as http:
                assert http.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"},
                                 content=CAT_JPEG).status_code == 200
            # What reached the client before the drop is all it gets: a reset, short of the body.
            stalled.settimeout(PATIENCE)
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := stalled.recv(65536):
                    received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
        assert length > 12_000_000 and len(body) < length


def test_a_slow_reader_keeps_its_connection_while_it_makes_progress(serve: Callable[..., Any],
                                                                   runner: ModelRunner) -> None:
    # The 12.6 MB answer is read half a megabyte at a time with short pauses: the whole takes longer
    # than the write timeout, but any window of it sees megabytes read (the kernel's send buffer
    # reports room only once about half of it is free, so progress shows in steps of megabytes).
    with serve(make_config(http={"write_timeout_seconds": 1.5}), runner=runner) as running:
        with running.client() as http:
            auth = login(http)
        with connect(running.url, receive_buffer=65536) as slow:
            ask_for_a_large_answer(slow, auth)
            received, since_pause = b"", 0
            while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < 12_582_528:
                chunk = slow.recv(65536)
                assert chunk, f"dropped after {len(received)} bytes"
                received += chunk
                since_pause += len(chunk)
                if since_pause >= 1 << 19:
                    time.sleep(0.12)
                    since_pause = 0
        head = received.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200")


def test_a_request_that_is_not_valid_http_gets_a_json_400(serve: Callable[..., Any], runner: ModelRunner) -> None:
    with serve(make_config(), runner=runner) as running, connect(running.url) as raw:
        raw.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: test\r\nContent-Length: twelve\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "malformed_request"


# -- behind a proxy ------------------------------------------------------------------------------
def test_xheaders_take_the_client_address_from_x_real_ip(serve: Callable[..., Any], runner: ModelRunner) -> None:
    config = make_config(http={"xheaders": True}, sessions={"login_rate_limit_per_minute": 1})
    subnet = uuid.uuid4().int  # addresses of this run's own: the limit's buckets live in Redis
    first, second = (f"10.{subnet % 250}.{subnet // 250 % 250}.{host}" for host in (1, 2))
    with serve(config, runner=runner) as running, running.client() as http:
        def log_in(address: str) -> int:
            return http.post("/v1/sessions", headers={"X-Real-Ip": address}).status_code

        # The login rate limit counts per client address: the proxy's header names it.
        assert [log_in(first), log_in(first), log_in(second)] == [201, 429, 201]


def own_loopback_address() -> str:
    """A loopback address of this test's own to connect from (Linux routes all of 127/8 to lo): the
    login limit's buckets live in Redis, shared by the whole run."""
    number = uuid.uuid4().int
    return f"127.{number % 250 + 1}.{number // 250 % 250}.{number // 62500 % 250 + 1}"


def proxy_client(running: Any, peer: str) -> httpx.Client:
    """A client whose connections come from `peer`, as a proxy's would."""
    return running.client(transport=httpx.HTTPTransport(local_address=peer))


def login_statuses(http: httpx.Client, headers: list[dict[str, str]]) -> list[int]:
    return [http.post("/v1/sessions", headers=h).status_code for h in headers]


def test_forwarded_headers_from_an_untrusted_peer_do_not_change_the_login_bucket(
        serve: Callable[..., Any], runner: ModelRunner) -> None:
    per_minute, peer = 5, own_loopback_address()
    config = make_config(http={"xheaders": True, "trusted_proxies": ["192.0.2.0/24"]},  # the peer is not one
                         sessions={"login_rate_limit_per_minute": per_minute})
    spoofed = [{"X-Real-Ip": f"198.51.100.{n}", "X-Forwarded-For": f"203.0.113.{n}"} for n in range(20)]
    with serve(config, runner=runner) as running, proxy_client(running, peer) as http:
        started = time.monotonic()
        statuses = login_statuses(http, spoofed)
        refilled = int((time.monotonic() - started) * per_minute / 60)  # the bucket refills as time passes
    # All 20 count against the peer's own bucket, whatever the headers say.
    assert statuses[:per_minute] == [201] * per_minute and statuses[per_minute] == 429, statuses
    assert statuses.count(201) <= per_minute + refilled, statuses


def test_a_trusted_proxy_names_the_client_by_the_right_most_untrusted_hop(
        serve: Callable[..., Any], runner: ModelRunner) -> None:
    peer, subnet = own_loopback_address(), uuid.uuid4().int
    first, second, third = (f"10.{subnet % 250}.{subnet // 250 % 250}.{host}" for host in (1, 2, 3))
    config = make_config(http={"xheaders": True, "trusted_proxies": [peer]},
                         sessions={"login_rate_limit_per_minute": 1})
    with serve(config, runner=runner) as running, proxy_client(running, peer) as http:
        assert login_statuses(http, [
            {"X-Forwarded-For": f"1.1.1.1, {first}"},  # what the client wrote itself (left) is not read
            {"X-Forwarded-For": f"8.8.8.8, {first}"},  # so the same client, whatever it writes: limited
            {"X-Forwarded-For": f"::ffff:{first}"},  # the same address spelled as IPv4-mapped IPv6
            {"X-Forwarded-For": second},  # another client behind the proxy: a bucket of its own
            {"X-Real-Ip": third},  # X-Real-Ip where there is no X-Forwarded-For
            {"X-Real-Ip": third},
        ]) == [201, 429, 429, 201, 201, 429]


def test_six_spellings_of_one_ipv6_64_share_one_login_bucket(serve: Callable[..., Any], runner: ModelRunner) -> None:
    peer, number = own_loopback_address(), uuid.uuid4().int
    prefix = f"2001:db8:{number % 65536:x}:{number // 65536 % 65536:x}"  # a /64 of this test's own
    expanded = ":".join(part.zfill(4) for part in prefix.split(":"))
    spellings = [f"{prefix}::1", f"{prefix.upper()}::1", f"{expanded}:0000:0000:0000:0001", f"[{prefix}::1]:443",
                 f"{prefix}::2", f"{prefix}:ffff:ffff:ffff:ffff"]
    config = make_config(http={"xheaders": True, "trusted_proxies": [peer]},
                         sessions={"login_rate_limit_per_minute": 5})
    with serve(config, runner=runner) as running, proxy_client(running, peer) as http:
        started = time.monotonic()
        statuses = login_statuses(http, [{"X-Forwarded-For": spelling} for spelling in spellings])
        refilled = int((time.monotonic() - started) * 5 / 60)
    assert statuses[:5] == [201] * 5 and (refilled or statuses[5] == 429), statuses
