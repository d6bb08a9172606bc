"""`python -m server` as a user runs it: embedded Redis, restart keeps everything, clear start-up errors,
one server per data folder, crashed serving processes restarted within a budget."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.data_dir import DataDirInUse, development_secret, lock_data_dir
from server.embedded_redis import redis_server_binary, redis_server_version
from server.supervisor import RestartBudget
from tests.conftest import CAT_CLASSES, CAT_JPEG, MODEL_CACHE, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a test's server: its own data folder, the shared export cache, and one
    serving process unless the test asks for more (the default, one per core, depends on the machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    return env | {"INFERENCE_SERVER_DATA_DIR": str(data_dir), "INFERENCE_MODEL_CACHE_DIR": str(MODEL_CACHE),
                  "INFERENCE_SERVER_PROCESSES": "1", "PYTHONUNBUFFERED": "1"} | extra


class ServerProcess:
    """`python -m server --port 0` with its log read on a thread, so that a test can wait for any line."""

    def __init__(self, data_dir: Path, *, port: int = 0, **extra: str):
        self.process = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port)], cwd=ROOT,
                                        env=server_env(data_dir, **extra), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # end of output
            self._changed.notify_all()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 120) -> re.Match[str]:
        """The first line from index `after` on that matches `pattern`; fails with the log if none comes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match := re.search(pattern, line):
                        return match
                if (self.lines and self.lines[-1] == "") or time.monotonic() > deadline:
                    pytest.fail(f"no line matching {pattern!r} in the server's log:\n" + "".join(self.lines))
                self._changed.wait(0.1)

    def ready_pids(self, count: int, after: int = 0) -> list[int]:
        """Wait until `count` serving processes have said "ready" (from line `after` on): in the
        supervisor's one line for all of them (`pids=`), or in a restarted one's own; their pids."""
        deadline = time.monotonic() + 300  # a bound only: the run's first start exports the model
        pattern = r"ready on .* pids=([\d,]+)|serving process (\d+) ready"
        while True:
            pids = [int(pid) for line in self.lines[after:] if (m := re.search(pattern, line))
                    for pid in (m.group(1) or m.group(2)).split(",")]
            if len(pids) >= count:
                return pids
            self.wait_for(pattern, after=len(self.lines), timeout=max(0.0, deadline - time.monotonic()))

    @property
    def url(self) -> str:
        return self.wait_for(r"ready on (http://\S+) ").group(1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@contextmanager
def running_server(data_dir: Path, **extra: str) -> Iterator[str]:
    server = ServerProcess(data_dir, **extra)
    try:
        url = server.url
    except BaseException:
        server.process.kill()
        server.process.wait(30)
        raise
    try:
        yield url
    finally:
        assert server.stop() == 0


def requests_counted(client: httpx.Client) -> float:
    """inference_http_requests_total over all labels, as /metrics reports it."""
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inference_http_requests_total{"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_run_and_restart_keep_sessions_tokens_and_history(tmp_path: Path) -> None:
    # As a user runs it: the default layout, one serving process per core.
    with running_server(tmp_path, INFERENCE_SERVER_PROCESSES="0") as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        login = client.post("/v1/sessions", json={"options": {"top_k": 3}}).json()
        auth = {"Authorization": f"Bearer {login['token']}"}
        first = client.post("/v1/predict", headers=auth, files={"image": ("cat.jpg", CAT_JPEG, "image/jpeg")})
        assert first.status_code == 200 and first.json()["predicted_class"] in CAT_CLASSES
    assert (tmp_path / "secret_key").exists() and (tmp_path / "redis").is_dir()
    with running_server(tmp_path, INFERENCE_SERVER_PROCESSES="0") as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        session = client.get("/v1/session", headers=auth)
        assert session.status_code == 200 and session.json()["predictions"] == 1
        assert session.json()["options"]["top_k"] == 3
        assert client.get("/v1/history", headers=auth).json()["items"][0]["id"] == first.json()["id"]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_model_that_cannot_load_stops_start_up_with_one_sentence(tmp_path: Path, processes: str) -> None:
    result = subprocess.run([sys.executable, "-m", "server", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                            env=server_env(tmp_path, INFERENCE_MODEL_NAME="resnet5000",
                                           INFERENCE_SERVER_PROCESSES=processes), timeout=120)
    assert result.returncode == 1
    assert "Unknown model 'resnet5000'" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_stops_start_up(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, capture_output=True, text=True,
                            env=server_env(tmp_path, INFERENCE_MODEL_WORKERS="lots"), timeout=60)
    assert result.returncode == 2 and "INFERENCE_MODEL_WORKERS must be an integer" in result.stderr


def test_hash_key_helper_prints_a_config_entry() -> None:
    result = subprocess.run([sys.executable, "-m", "server", "hash-key", "my-key"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    from service.auth import api_key_hash

    assert f'"{api_key_hash("my-key")}"' in result.stdout


def test_restart_budget_counts_per_sliding_window_and_pauses_grow_per_slot() -> None:
    now = [0.0]
    budget = RestartBudget(max_restarts=3, window=60, first_pause=0.5, max_pause=3, clock=lambda: now[0])
    assert budget.pause(0) == 0.5
    now[0] = 1
    assert budget.pause(0) == 1.0  # the same slot again: twice the pause
    now[0] = 2
    assert budget.pause(1) == 0.5  # another slot: a pause of its own, the same budget
    now[0] = 3
    assert budget.pause(0) is None and budget.recent == 3  # a 4th within 60 s: stop
    now[0] = 60.5
    assert budget.pause(0) == 2.0  # the restart at 0 has left the window
    now[0] = 61.5
    assert budget.pause(0) == 3.0  # capped
    now[0] = 61.6
    assert budget.pause(1) is None
    now[0] = 200
    assert budget.pause(0) == 0.5 and budget.recent == 1  # quiet for a whole window: all starts over


def test_the_development_secret_is_private_and_one_too_short_is_replaced(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "secret_key"
    secret = development_secret(tmp_path)
    assert len(secret) >= 32 and path.read_text() == secret and mode(path) == 0o600
    assert development_secret(tmp_path) == secret  # kept: a restart keeps sessions
    path.chmod(0o644)  # as an earlier version left it
    assert development_secret(tmp_path) == secret and mode(path) == 0o600
    assert not caplog.records
    for unusable in ["", "\n", "x" * 31, "\udcff"]:
        path.write_bytes(unusable.encode(errors="surrogateescape"))
        caplog.clear()
        replaced = development_secret(tmp_path)
        assert len(replaced) >= 32 and path.read_text() == replaced and mode(path) == 0o600
        assert "sessions signed with the old one end" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]  # no temporary file left behind


def test_the_data_dir_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    lock = lock_data_dir(tmp_path)
    try:
        with pytest.raises(DataDirInUse, match=rf"in use by another server \(pid {os.getpid()},"):
            lock_data_dir(tmp_path)
        assert (tmp_path / "server.lock").read_text() == f"{os.getpid()}\n" and mode(tmp_path / "server.lock") == 0o600
    finally:
        os.close(lock)
    os.close(lock_data_dir(tmp_path))  # free again once its holder has let go


def test_a_second_server_on_the_same_data_dir_exits_and_the_first_keeps_serving(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "redis").mkdir(parents=True)
    for folder in (data_dir, data_dir / "redis"):
        folder.chmod(0o755)  # as an earlier version left them
    first = ServerProcess(data_dir, INFERENCE_SERVER_PROCESSES="2")  # shared metrics: a folder to protect
    try:
        first.ready_pids(2)
        with httpx.Client(base_url=first.url, timeout=60) as client:
            auth = {"Authorization": f"Bearer {client.post('/v1/sessions').json()['token']}"}
            predict = client.post("/v1/predict", headers=auth, files={"image": ("cat.jpg", CAT_JPEG, "image/jpeg")})
            assert predict.status_code == 200
            counted = requests_counted(client)
            assert counted >= 2

            second = subprocess.run([sys.executable, "-m", "server", "--port", "0"], cwd=ROOT, capture_output=True,
                                    text=True, env=server_env(data_dir, INFERENCE_SERVER_PROCESSES="2"), timeout=60)
            assert second.returncode == 2, second.stderr
            assert f"in use by another server (pid {first.process.pid}," in second.stderr
            assert "server.data_dir" in second.stderr and "Traceback" not in second.stderr

            # The first one's Redis (socket, files), sessions and metrics are untouched.
            assert client.get("/v1/session", headers=auth).json()["predictions"] == 1
            assert requests_counted(client) >= counted + 1
        binary = redis_server_binary()
        first.wait_for(rf"embedded redis-server {re.escape(str(redis_server_version(binary)))} "
                       rf"\({re.escape(binary)}, pid \d+\)")
        assert mode(data_dir) == 0o700 and mode(data_dir / "secret_key") == 0o600
        assert mode(data_dir / "server.lock") == 0o600
        redis_files = [data_dir / "redis", *(data_dir / "redis").rglob("*")]
        assert len(redis_files) >= 3  # the folder, its log, the append-only file(s)
        assert {path.name: oct(mode(path)) for path in redis_files if mode(path) & 0o077} == {}
    finally:
        assert first.stop() == 0


def test_crashed_workers_are_restarted_within_a_budget_per_window(tmp_path: Path) -> None:
    window = 3.0
    server = ServerProcess(tmp_path, INFERENCE_SERVER_PROCESSES="2", INFERENCE_SERVER_MAX_RESTARTS="1",
                           INFERENCE_SERVER_RESTART_WINDOW_SECONDS=str(window))
    try:
        crashing, other = server.ready_pids(2)
        mark = len(server.lines)
        os.kill(crashing, signal.SIGKILL)
        crashed_at = time.monotonic()
        server.wait_for(rf"worker process {crashing} exited with -9; starting another in 0\.5s "
                        r"\(restart 1 of at most 1 per 3s\)", after=mark)
        [replacement] = server.ready_pids(1, after=mark)

        # Once that restart has left the window, another crash is restarted (a budget for the server's
        # whole life would stop here), with the first pause again: the slot was quiet for a window.
        time.sleep(max(0.0, crashed_at + window + 0.2 - time.monotonic()))
        mark = len(server.lines)
        os.kill(replacement, signal.SIGKILL)
        server.wait_for(rf"worker process {replacement} exited with -9; starting another in 0\.5s "
                        r"\(restart 1 of at most 1", after=mark)

        os.kill(other, signal.SIGKILL)  # a second crash within the window: past the budget
        server.wait_for(rf"worker process {other} exited with -9 after 1 restarts within 3s .*stopping the server",
                        after=mark)
        assert server.process.wait(30) == 1
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)


def test_a_stop_during_a_restart_pause_ends_the_server_at_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, INFERENCE_SERVER_PROCESSES="2")
    try:
        crashing, _ = server.ready_pids(2)
        mark = len(server.lines)
        os.kill(crashing, signal.SIGKILL)
        server.wait_for(r"starting another in 0\.5s", after=mark)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        server.wait_for(r"stopped", after=mark)  # the other worker drained and stopped as usual
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)


def test_a_port_in_use_stops_start_up_with_one_sentence_before_redis_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "server", "--port", str(port)], cwd=ROOT, capture_output=True,
                                text=True, env=server_env(tmp_path), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"Port {port} on 127.0.0.1 is already in use;" in result.stderr and "--port or server.port" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "redis").exists()  # the embedded Redis never started


def test_an_unreachable_redis_is_named_once_and_ready_is_said_only_once_it_answers(tmp_path: Path) -> None:
    redis_port, http_port = free_port(), free_port()  # nobody listens on either yet
    server = ServerProcess(tmp_path, port=http_port, INFERENCE_REDIS_URL=f"redis://:hunter2@127.0.0.1:{redis_port}/0",
                           INFERENCE_REDIS_CONNECT_TIMEOUT_SECONDS="0.5")
    redis_server = None
    try:
        server.wait_for(rf"Cannot reach Redis at redis://\*\*\*@127\.0\.0\.1:{redis_port}/0 \(.*\); check redis\.url\.")
        # It serves without Redis (/readyz 503: test_faults.py), but does not say it is ready.
        url = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: _status(f"{url}/readyz") == 503, "the server to serve /readyz without Redis", timeout=300,
                   interval=0.2)
        assert not [line for line in server.lines if "ready on http" in line], "".join(server.lines)
        redis_server = subprocess.Popen(
            [redis_server_binary(""), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", "hunter2", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server.wait_for(rf"ready on http://127\.0\.0\.1:{http_port} ")
        assert _status(f"{url}/readyz") == 200
        assert server.stop() == 0
        assert len([line for line in server.lines if "Redis at" in line]) == 1, "".join(server.lines)
        assert "hunter2" not in "".join(server.lines) and "Traceback" not in "".join(server.lines)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(10)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_several_serving_processes_say_ready_in_one_line_with_the_url_to_open(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, INFERENCE_SERVER_PROCESSES="2")
    try:
        pids = server.ready_pids(2)
        assert len(set(pids)) == 2
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.get("/readyz").status_code == 200
        assert server.stop() == 0
        url_lines = [line for line in server.lines if "http://" in line]
        assert len(url_lines) == 1, "".join(server.lines)
        assert re.search(r"ready on http://127\.0\.0\.1:\d+ .*\(open http://127\.0\.0\.1:\d+/ in a browser\) "
                         r"model=.* processes=2 pids=\d+,\d+", url_lines[0])
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)
