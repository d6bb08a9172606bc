"""Hosts as network namespaces: each one a veth pair into a bridge in the root namespace, on a private
/24, so a process in a namespace is on a host of its own and the test (in the root namespace) reaches
all of them."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Sequence

# Every namespace and link of a run starts with this, so the leftovers of a crashed run can be found.
PREFIX = "infl-"


def ip_netns_usable() -> str | None:
    """None where `ip netns` and a bridge can be made here, else why not (the test skips saying it)."""
    if shutil.which("ip") is None:
        return "the fleet test needs iproute2's `ip`"
    if os.geteuid() != 0:
        return "the fleet test needs root for `ip netns` and a bridge"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def remove_leftovers() -> None:
    """Remove what a crashed run left: its namespaces (after killing the processes in them, all of them
    the test's own) and its bridges and veths in the root namespace."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            _kill_processes_in(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        fields = line.split(": ")
        if len(fields) > 1 and fields[1].split("@")[0].startswith(PREFIX):
            subprocess.run(["ip", "link", "del", fields[1].split("@")[0]], capture_output=True)


def _kill_processes_in(namespace: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class Hosts:
    """Namespaces named `infl-<run>-<host>` on one bridge: `address(host)` is the host's IP, and
    `command(host, argv)` the argv that runs there."""

    def __init__(self, names: Sequence[str]):
        self.run = f"{random.randrange(16**4):04x}"
        self.subnet = f"10.213.{random.randrange(1, 255)}"
        self.names = list(names)
        self.bridge = f"{PREFIX}{self.run}-br"
        self.made: list[str] = []

    def namespace(self, host: str) -> str:
        return f"{PREFIX}{self.run}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{10 + self.names.index(host)}"

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host), *argv]  # execs argv: its pid is the process's

    def create(self) -> Hosts:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(self.bridge)
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(self.names):
            namespace, veth, peer = self.namespace(host), f"{PREFIX}{self.run}-{index}", f"{PREFIX}{self.run}-p{index}"
            _ip("netns", "add", namespace)
            self.made.append(namespace)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("link", "set", peer, "netns", namespace)
            _ip("-n", namespace, "link", "set", peer, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        return self

    def remove(self) -> None:
        """Kill what still runs in the namespaces, delete them (their veth ends go with them) and the bridge."""
        for name in self.made:
            if name != self.bridge:
                _kill_processes_in(name)
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if self.bridge in self.made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.made.clear()
