"""Redis on hosts of their own: one server, or a Sentinel set (a master, a replica, three sentinels)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from server.embedded_redis import redis_server_binary
from tests.conftest import wait_until
from tests.fleet.hosts import Hosts

REDIS_PORT = 6379
SENTINEL_PORT = 26379


class FleetRedis:
    """A redis-server process per host in `hosts`; `url` is what the replicas are given."""

    service = "sessions"

    def __init__(self, hosts: Hosts, directory: Path, data_hosts: list[str], sentinel_hosts: list[str],
                 sentinel_binary: str = "redis-sentinel"):
        self.hosts, self.directory, self.sentinel_binary = hosts, directory, sentinel_binary
        self.data_hosts, self.sentinel_hosts = data_hosts, sentinel_hosts
        self.processes: list[subprocess.Popen[bytes]] = []

    def _start(self, host: str, name: str, argv: list[str]) -> None:
        log = (self.directory / f"{name}.log").open("wb")
        self.processes.append(subprocess.Popen(self.hosts.command(host, argv), stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def client(self, host: str, port: int = REDIS_PORT) -> redis.Redis:
        return redis.Redis(host=self.hosts.address(host), port=port, socket_timeout=5, decode_responses=True)

    def start(self) -> FleetRedis:
        binary = redis_server_binary()
        for index, host in enumerate(self.data_hosts):
            folder = self.directory / host
            folder.mkdir(parents=True)
            # Bound to a private address with no password: protected mode would refuse the replicas.
            argv = [binary, "--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no",
                    "--dir", str(folder), "--save", "", "--appendonly", "no"]
            if index:
                argv += ["--replicaof", self.hosts.address(self.data_hosts[0]), str(REDIS_PORT)]
            self._start(host, f"redis-{host}", argv)
        for host in self.data_hosts:
            wait_until(lambda host=host: _answers(self.client(host)), f"redis-server on {host}")
        if len(self.data_hosts) > 1:
            wait_until(lambda: self.client(self.data_hosts[0]).info("replication")["connected_slaves"]
                       == len(self.data_hosts) - 1, "the replica to connect")
        master = self.hosts.address(self.data_hosts[0])
        for host in self.sentinel_hosts:
            conf = self.directory / f"sentinel-{host}.conf"  # a sentinel rewrites its file: one each
            conf.write_text(f"port {SENTINEL_PORT}\nbind 0.0.0.0\nprotected-mode no\ndir {self.directory}\n"
                            f"sentinel monitor {self.service} {master} {REDIS_PORT} 2\n"
                            f"sentinel down-after-milliseconds {self.service} 1000\n"
                            f"sentinel failover-timeout {self.service} 5000\n")
            self._start(host, f"sentinel-{host}", [self.sentinel_binary, str(conf)])
        for host in self.sentinel_hosts:
            wait_until(lambda host=host: self._sentinel_sees_all(host), f"the sentinel on {host}", timeout=60)
        return self

    def _sentinel_sees_all(self, host: str) -> bool:
        try:
            sentinel = self.client(host, SENTINEL_PORT)
            return (len(sentinel.sentinel_slaves(self.service)) == len(self.data_hosts) - 1
                    and len(sentinel.sentinel_sentinels(self.service)) == len(self.sentinel_hosts) - 1)
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        if not self.sentinel_hosts:
            return f"redis://{self.hosts.address(self.data_hosts[0])}:{REDIS_PORT}/0"
        addresses = ",".join(f"{self.hosts.address(h)}:{SENTINEL_PORT}" for h in self.sentinel_hosts)
        return f"redis+sentinel://{addresses}/{self.service}/0"

    def master_host(self) -> str:
        address = self.client(self.sentinel_hosts[0], SENTINEL_PORT).sentinel_get_master_addr_by_name(self.service)[0]
        return next(h for h in self.data_hosts if self.hosts.address(h) == address)

    def fail_over(self, timeout: float = 60.0) -> tuple[str, str]:
        """Move the master to the replica without losing an acknowledged write: pause the old master's
        writes (they wait, then are refused as READONLY once it is a replica, and the clients retry),
        wait until the replica holds all it acknowledged, SENTINEL FAILOVER (asked again while a sentinel
        finds the replica not fresh enough yet), make the old master a replica of the new one, and only
        then end the pause. Returns the old and the new master's host."""
        old = self.master_host()
        master = self.client(old)
        master.execute_command("CLIENT", "PAUSE", int(timeout * 1000), "WRITE")
        try:
            replica = next(h for h in self.data_hosts if h != old)
            offset = master.info("replication")["master_repl_offset"]
            wait_until(lambda: self.client(replica).info("replication").get("slave_repl_offset", -1) >= offset,
                       "the replica to catch up before the failover")
            sentinel = self.client(self.sentinel_hosts[0], SENTINEL_PORT)
            deadline = time.monotonic() + timeout

            def promoted() -> bool:
                if self.master_host() == replica:
                    return True
                try:
                    sentinel.execute_command("SENTINEL", "FAILOVER", self.service)
                except redis.ResponseError as refused:  # INPROG: one under way; NOGOODSLAVE: not yet
                    assert "INPROG" in str(refused) or "NOGOODSLAVE" in str(refused), refused
                return False

            wait_until(promoted, "the sentinels to promote the replica", timeout=deadline - time.monotonic(),
                       interval=0.5)
            # The sentinels' own reconfiguration of the old master is a transaction, which the pause holds
            # back: made a replica here instead, its paused writes are refused once the pause ends.
            master.execute_command("REPLICAOF", self.hosts.address(replica), REDIS_PORT)
            wait_until(lambda: master.info("replication")["role"] == "slave", "the old master to become a replica",
                       timeout=max(1.0, deadline - time.monotonic()))
        finally:
            master.execute_command("CLIENT", "UNPAUSE")
        return old, replica

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
