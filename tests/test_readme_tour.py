"""The README's tour, run as a new user would run it: its shell blocks in order, in one bash, against a
live server (the suite's own, on a free port), so the README cannot drift from what works.

Every ```sh block of README.md is preceded by a marker: `<!-- tour -->` (run here) or
`<!-- tour: skip, <why> -->` (not run: starting the server, which this test provides, or running the
test suite). The README sets `SERVER=${SERVER:-http://localhost:8000}`; this test exports `SERVER` as
its server's address. Each command is bounded: curl by `--max-time` (and `--fail-with-body`, so an
HTTP error fails the command as a refused CLI call does), the CLI and Python by `timeout`, the
whole tour by the subprocess's timeout. The docs' feedback example runs here too, with capture off.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.auth import api_key_hash
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

MARKER = re.compile(r"<!--\s*tour(?P<skip>:\s*skip\b[^>]*)?\s*-->\s*\n```sh\n(?P<body>.*?)\n```", re.S)
SH_BLOCK = re.compile(r"^```sh$", re.M)
STARTS_SERVER = re.compile(r"^[^#\n]*\./dev serve", re.M)  # a command, not a comment naming it
COMMAND_SECONDS = 60
TOUR_SECONDS = 300

# Bounds for each command and HTTP errors as failures; the tour's own lines stay as the README has them.
PREAMBLE = f"""\
set -euo pipefail
trap 'echo "tour: exit $? at: $BASH_COMMAND" >&2' ERR
curl() {{ command curl --fail-with-body --max-time {COMMAND_SECONDS} "$@"; }}
inference-client() {{ timeout {COMMAND_SECONDS} inference-client "$@"; }}
python3() {{ timeout {COMMAND_SECONDS} python3 "$@"; }}
python() {{ timeout {COMMAND_SECONDS} python "$@"; }}
"""


def tour_script(bodies: list[str]) -> str:
    """One bash script of `bodies` in order, each followed by a line saying it is done."""
    # The marker starts a line of its own: curl's answers end without a newline.
    return PREAMBLE + "".join(f"{body}\nprintf '\\ntour: block {n} done\\n'\n" for n, body in enumerate(bodies, 1))


def tour_blocks(text: str) -> list[tuple[bool, str]]:
    """README's marked shell blocks in order: (skipped, body)."""
    return [(bool(match["skip"]), match["body"]) for match in MARKER.finditer(text)]


def test_every_shell_block_in_the_readme_is_marked() -> None:
    text = README.read_text()
    blocks = tour_blocks(text)
    assert len(blocks) == len(SH_BLOCK.findall(text)), (
        "each ```sh block in README.md needs a `<!-- tour -->` or `<!-- tour: skip, <why> -->` line before it")
    run = [body for skipped, body in blocks if not skipped]
    assert len(run) >= 2, "the tour has its login and its CLI blocks"
    # The test provides the server: a block that starts one is marked skip, and no block it runs starts one.
    assert any(STARTS_SERVER.search(body) for skipped, body in blocks if skipped)
    assert not any(STARTS_SERVER.search(body) for body in run)


def test_readme_tour_runs_in_order_against_a_live_server(serve: Any) -> None:
    bodies = [body for skipped, body in tour_blocks(README.read_text()) if not skipped]
    script = tour_script(bodies)
    with serve() as server:
        env = {**os.environ, "SERVER": server.url,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TOUR_SECONDS)
    finished = re.findall(r"^tour: block (\d+) done$", done.stdout, re.M)
    assert done.returncode == 0 and len(finished) == len(bodies), (
        f"the README tour stopped after {len(finished)} of {len(bodies)} blocks (exit {done.returncode}):\n"
        f"--- stderr\n{done.stderr[-3000:]}\n--- stdout\n{done.stdout[-2000:]}")


def test_clients_feedback_example_runs_with_capture_off(serve: Any) -> None:
    """docs/clients.md's feedback example, as written, on a server with capture off (the default)."""
    text = (ROOT / "docs" / "clients.md").read_text()
    section = text[text.index("### Feedback: correcting a prediction"):]
    example = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert example, "docs/clients.md's feedback section has a Python example"
    with serve() as server:
        assert not server.config.capture.enabled
        code = example[1].replace("http://127.0.0.1:8000", server.url)
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=TOUR_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]


def test_model_versions_weights_command_makes_weights_the_server_takes(serve: Any, tmp_path: Path) -> None:
    """docs/model-versions.md's command for a `weights.pt`, as written, makes a file that publishes."""
    text = (ROOT / "docs" / "model-versions.md").read_text()
    command = next((body for body in re.findall(r"```sh\n(.*?)\n```", text, re.S) if '"weights.pt"' in body), None)
    assert command, "docs/model-versions.md shows how to make a weights.pt"
    # `.venv/bin/python` from the repository root, as the page says; the file lands in the current folder.
    script = command.replace(".venv/bin/python", f"cd {tmp_path} && {sys.executable}", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TOUR_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = (tmp_path / "weights.pt").read_bytes()
    admin_key = "docs-weights-admin-key"
    config = make_config(auth={"admin_api_keys": [api_key_hash(admin_key)]},
                         models={"store_dir": str(tmp_path / "models")})
    with serve(config) as server, server.client() as http:
        answer = http.put(f"/v1/models/{config.model.name}/versions/docs-v1", content=weights,
                          headers={"Authorization": f"ApiKey {admin_key}",
                                   "X-Content-SHA256": hashlib.sha256(weights).hexdigest()})
    assert answer.status_code in (200, 201), answer.text


def test_models_doc_runs_in_order_on_the_repository_it_makes(serve: Any, redis_server: Any, tmp_path: Path) -> None:
    """docs/models.md as written: its blocks before the server's start make a model repository (in a temporary
    folder, `MODELS`), then a server serves that repository and the blocks after it run against it."""
    blocks = tour_blocks((ROOT / "docs" / "models.md").read_text())
    starts = next(n for n, (skipped, body) in enumerate(blocks) if skipped and STARTS_SERVER.search(body))
    before = [body for skipped, body in blocks[:starts] if not skipped]
    after = [body for skipped, body in blocks[starts + 1:] if not skipped]
    assert before and after, "docs/models.md makes a repository, starts the server, then uses it"
    env = {**os.environ, "MODELS": str(tmp_path / "my-models"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def run(bodies: list[str]) -> None:
        done = subprocess.run(["bash", "-c", tour_script(bodies)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TOUR_SECONDS)
        finished = re.findall(r"^tour: block (\d+) done$", done.stdout, re.M)
        assert done.returncode == 0 and len(finished) == len(bodies), (
            f"docs/models.md stopped after {len(finished)} of {len(bodies)} blocks (exit {done.returncode}):\n"
            f"--- stderr\n{done.stderr[-3000:]}\n--- stdout\n{done.stdout[-2000:]}")
        env["OUTPUT"] = done.stdout

    run(before)
    config = make_config(redis_server.url, models={"repository_dir": str(tmp_path / "my-models"),
                                                   "store_dir": str(tmp_path / "store")})
    with serve(config) as server:
        env["SERVER"] = server.url
        run(after)
    assert "('efficientnet_lite0', 1000), ('shapes', 5)" in env["OUTPUT"]
    assert '"model":{"name":"shapes"' in env["OUTPUT"].replace(" ", "")
