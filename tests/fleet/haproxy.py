"""Debian's HAProxy in front of the replicas, configured as a production rollout would have it: health
checks on /readyz every 250 ms, retries and redispatch to another replica on a failed connection, and a
log line per request (to a file the test parses) naming the client's try that it answered."""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, wait_until

# The header the test's clients put on every try (tests/fleet/load.py), captured into the log.
TRY_HEADER = "X-Fleet-Try"

CONFIG = """\
global
    log stdout format raw local0
    stats socket {socket} level admin
    maxconn 512

defaults
    mode http
    log global
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 300s
    # A request whose connection to a replica fails (a replica gone between two health checks) is tried
    # again, on another replica: nothing was sent, so nothing is run twice.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend fleet
    bind 127.0.0.1:{port}
    http-request capture req.hdr({header}) len 64
    log-format "fleet try=%[capture.req.hdr(0)] status=%ST server=%s retries=%rc term=%ts request=%{{+Q}}r"
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 250ms fastinter 250ms downinter 250ms fall 1 rise 2
{servers}
"""

LOG_LINE = re.compile(r'fleet try=(\S*) status=(-?\d+) server=(\S+) retries=(\S+) term=(\S+) request="([^"]*)"')


@dataclass
class LoggedRequest:
    try_id: str  # "-" where the request carried no try header
    status: int
    server: str
    request: str


class HAProxy:
    def __init__(self, directory: Path, backends: dict[str, str]):
        """`backends`: a name per replica and its host:port."""
        self.directory = directory
        self.port = free_port()
        self.socket = directory / "haproxy.sock"
        self.log = directory / "haproxy.log"
        servers = "\n".join(f"    server {name} {address} check" for name, address in backends.items())
        self.config = directory / "haproxy.cfg"
        self.config.write_text(CONFIG.format(socket=self.socket, port=self.port, header=TRY_HEADER, servers=servers))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HAProxy:
        checked = subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(self.socket.exists, "HAProxy's stats socket")
        return self

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(5)
            connection.connect(str(self.socket))
            connection.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Each replica's state as HAProxy's checks see it: "UP", "DOWN", ... ("no check" while unknown)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row["status"] for row in rows
                if row.get("pxname") == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_state(self, name: str, state: str, timeout: float = 60) -> None:
        wait_until(lambda: self.server_states().get(name, "").startswith(state),
                   f"HAProxy to see {name} {state}", timeout=timeout, interval=0.05)

    def requests(self) -> list[LoggedRequest]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            match = LOG_LINE.search(line)
            if match:
                found.append(LoggedRequest(match.group(1), int(match.group(2)), match.group(3), match.group(6)))
        return found

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None
