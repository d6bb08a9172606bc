"""Beyond one process: replicas on one Redis, `--processes N`, and Redis Cluster.

Every server and Redis here is the test's own, on 127.0.0.1.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from server.embedded_redis import redis_server_binary
from tests.conftest import CAT_JPEG, RedisServer, error_code, wait_for
from tests.test_cli import ROOT, server_env


@contextmanager
def server_process(tmp_path: Path, *args: str, ready_lines: int = 1, **env: str) -> Iterator[tuple[str, list[str]]]:
    """`python -m server --port 0 ARGS`; yields its URL and, for each of `ready_lines` serving processes, its
    ready line: with several, the supervisor says ready once for all (`pids=a,b`), read here as one line per
    process, ending in that process's `pid=`."""
    process = subprocess.Popen([sys.executable, "-m", "server", "--port", "0", *args], cwd=ROOT,
                               env=server_env(tmp_path, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert process.stdout is not None
    ready: list[str] = []
    deadline = time.monotonic() + 180
    while len(ready) < ready_lines and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if "ready on " in line:
            pids = re.search(r" pids=([\d,]+)", line)
            ready.extend([f"{line.rstrip()} pid={pid}" for pid in pids.group(1).split(",")] if pids else [line])
    try:
        assert len(ready) == ready_lines, f"got {len(ready)} ready lines"
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield re.search(r"ready on (http://\S+)", ready[0]).group(1), ready
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def predict(client: httpx.Client, auth: dict[str, str]) -> httpx.Response:
    return client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)


def session_flow(first: httpx.Client, second: httpx.Client) -> None:
    """Log in on one server, predict on the other, read and log out across them."""
    login = first.post("/v1/sessions", json={"options": {"top_k": 2}})
    assert login.status_code == 201
    auth = {"Authorization": f"Bearer {login.json()['token']}"}
    prediction = predict(second, auth)
    assert prediction.status_code == 200 and len(prediction.json()["top_k"]) == 2
    assert first.get("/v1/history", headers=auth).json()["items"][0]["id"] == prediction.json()["id"]
    assert second.patch("/v1/session/options", headers=auth, json={"top_k": 3}).status_code == 200
    assert first.get("/v1/session/options", headers=auth).json()["options"]["top_k"] == 3
    assert second.delete("/v1/session", headers=auth).status_code == 204
    assert error_code(first.get("/v1/session", headers=auth)) == "session_revoked"


def test_two_replicas_share_sessions_revocation_and_rate_limit(tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "redis").start()
    shared = {"INFERENCE_REDIS_URL": store.url, "INFERENCE_AUTH_SECRET_KEYS": "replica-secret-0123456789",
              "INFERENCE_SESSIONS_RATE_LIMIT_PER_MINUTE": "3"}
    try:
        with server_process(tmp_path / "a", **shared) as (url_a, _), server_process(tmp_path / "b", **shared) as (
                url_b, _), httpx.Client(base_url=url_a, timeout=60) as a, httpx.Client(base_url=url_b, timeout=60) as b:
            session_flow(a, b)
            auth = {"Authorization": f"Bearer {a.post('/v1/sessions').json()['token']}"}
            assert [predict(a, auth).status_code, predict(b, auth).status_code, predict(a, auth).status_code] == [
                200, 200, 200]
            limited = predict(b, auth)  # the bucket is in Redis: the fourth predict is over, on either replica
            assert limited.status_code == 429 and error_code(limited) == "rate_limited"
    finally:
        store.stop()


def test_processes_share_one_port(tmp_path: Path) -> None:
    with server_process(tmp_path, "--processes", "2", ready_lines=2) as (url, ready), \
            httpx.Client(base_url=url, timeout=60) as client:
        pids = {re.search(r"pid=(\d+)", line).group(1) for line in ready}
        assert len(pids) == 2  # two serving processes, each with its own model
        auth = {"Authorization": f"Bearer {client.post('/v1/sessions').json()['token']}"}
        for _ in range(4):  # fresh connections land on either process; the session is in the shared Redis
            with httpx.Client(base_url=url, timeout=60) as fresh:
                assert predict(fresh, auth).status_code == 200
        assert client.get("/v1/session", headers=auth).json()["predictions"] == 4


def test_connections_spread_evenly_over_processes_and_metrics_add_up(tmp_path: Path) -> None:
    """Keep-alive clients stay on the process that accepted them, so an uneven split would idle a
    core: four clients on two processes get two each. Any process's /metrics reports both."""
    with server_process(tmp_path, "--processes", "2", ready_lines=2) as (url, ready):
        pids = {re.search(r"pid=(\d+)", line).group(1) for line in ready}
        clients = [httpx.Client(base_url=url, timeout=60) for _ in range(4)]
        try:
            for client in clients:
                assert client.get("/healthz").status_code == 200  # connects, and keeps the connection
            def healthz_counted(metrics: str) -> list[float]:
                return [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("inference_http_requests_total{") and 'route="/healthz"' in line]

            # A request is counted once its response is written, so the last one may still be on its
            # way into the count when a busy machine answers the first scrape.
            assert wait_for(lambda: healthz_counted(clients[0].get("/metrics").text) == [4.0], timeout=10)
            for client in clients:  # each scrape is answered by the process that holds that connection
                metrics = client.get("/metrics").text
                per_process = dict(re.findall(r'^inference_open_connections\{pid="(\d+)"\} (\S+)$', metrics, re.M))
                assert set(per_process) == pids and [float(v) for v in per_process.values()] == [2.0, 2.0]
                assert healthz_counted(metrics) == [4.0]  # two requests on each process, counted together
        finally:
            for client in clients:
                client.close()


class RedisCluster:
    """Three masters from the suite's redis-server binary: cluster mode, free ports, temp folder."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.ports = [cluster_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> RedisCluster:
        binary = redis_server_binary()
        for port in self.ports:
            folder = self.directory / str(port)
            folder.mkdir(parents=True)
            self.processes.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            assert wait_for(lambda port=port: _pings(port), timeout=10)
        cli = str(Path(binary).with_name("redis-cli"))
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        assert wait_for(lambda: all(_cluster_ok(p) for p in self.ports), timeout=30)
        return self

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, so at most 55535) is free too."""
    for _ in range(100):
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
    except redis.ConnectionError:
        return False


def _cluster_ok(port: int) -> bool:
    return redis.Redis(port=port).cluster("info").get("cluster_state") == "ok"


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster")
    try:  # stopped even when it fails to form, so no node outlives the test
        yield cluster.start()
    finally:
        cluster.stop()


def test_the_session_flow_runs_on_redis_cluster_with_one_slot_per_session(serve, redis_cluster) -> None:
    from tests.conftest import make_config

    with serve(make_config(redis_cluster.url)) as first, serve(make_config(redis_cluster.url)) as second, \
            first.client() as a, second.client() as b:
        session_flow(a, b)
        login = a.post("/v1/sessions").json()
        auth = {"Authorization": f"Bearer {login['token']}"}
        keyed = {**auth, "Idempotency-Key": "cluster-retry-1"}
        first_answer = b.post("/v1/predict", headers={**keyed, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        replay = a.post("/v1/predict", headers={**keyed, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert replay.json()["id"] == first_answer.json()["id"]
        assert a.get("/metrics").status_code == 200
        # Each session's keys hash to one slot, wherever the cluster put it.
        nodes = [redis.Redis(port=p, decode_responses=True) for p in redis_cluster.ports]
        keys = [k for node in nodes for k in node.keys(f"sess:{{{login['session_id']}}}*")]
        assert len(keys) >= 3  # the hash, the history and the idempotency key
        assert len({nodes[0].cluster("keyslot", key) for key in keys}) == 1


class RedisSentinelSet:
    """A master, its replica and one sentinel watching them: processes of the test's own."""

    SERVICE = "sessions"

    def __init__(self, directory: Path):
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(directory / "replica")
        self.directory = directory
        self.port = cluster_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisSentinelSet:
        self.master.start()
        self.replica.start()
        redis.Redis(port=self.replica.port).replicaof("127.0.0.1", self.master.port)
        conf = self.directory / "sentinel.conf"  # sentinel rewrites its config file: it must be its own
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                        f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                        f"sentinel failover-timeout {self.SERVICE} 5000\n")
        self.log = self.directory / "sentinel.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                            stdout=log, stderr=subprocess.STDOUT)
        assert wait_for(lambda: _pings(self.port) and self.replica_count() == 1, timeout=20)
        return self

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def replica_count(self) -> int:
        return len(self.sentinel().sentinel_slaves(self.SERVICE))

    def master_port(self) -> int:
        return int(self.sentinel().sentinel_get_master_addr_by_name(self.SERVICE)[1])

    def fail_over(self, timeout: float = 45.0) -> None:
        """Promote the replica. A failover the sentinel aborts (its replica's state not fresh enough
        yet, on a busy machine) is asked for again until the replica is the master."""
        def promoted() -> bool:
            if self.master_port() == self.replica.port:
                return True
            try:
                self.sentinel().execute_command("SENTINEL", "FAILOVER", self.SERVICE)
            except redis.ResponseError as refused:  # INPROG: one under way; NOGOODSLAVE: not yet
                assert "INPROG" in str(refused) or "NOGOODSLAVE" in str(refused), refused
            return False

        assert wait_for(promoted, timeout=timeout, interval=1.0), self.log.read_text(errors="replace")[-3000:]

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.SERVICE}/0"

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(10)
        self.replica.stop()
        self.master.stop()


def test_sessions_survive_a_sentinel_failover(serve, tmp_path: Path) -> None:
    from tests.conftest import make_config

    sentinels = RedisSentinelSet(tmp_path)
    try:
        sentinels.start()
        with serve(make_config(sentinels.url)) as server, server.client() as client:
            login = client.post("/v1/sessions")
            auth = {"Authorization": f"Bearer {login.json()['token']}"}
            first = predict(client, auth)
            assert first.status_code == 200
            old_master = sentinels.master_port()
            # Wait until the replica holds what the master acknowledged, then fail over.
            assert wait_for(lambda: redis.Redis(port=sentinels.replica.port).exists(
                f"sess:{{{login.json()['session_id']}}}:history") == 1, timeout=10)
            sentinels.fail_over()
            assert old_master != sentinels.master_port()
            # The client follows the new master: the session, its token and its history are there.
            assert wait_for(lambda: predict(client, auth).status_code == 200, timeout=20)
            items = client.get("/v1/history", headers=auth).json()["items"]
            assert first.json()["id"] in [item["id"] for item in items]
    finally:
        sentinels.stop()
