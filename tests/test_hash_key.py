"""`python -m server hash-key [--admin]`: the line it prints is the setting that lets the key in, as
config.toml and as the environment override, and the docs' admin-key recipe runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.config import from_dict, load_config
from service.auth import api_key_hash

ROOT = Path(__file__).resolve().parent.parent


def hash_key(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "server", "hash-key", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _setting_lines(output: str) -> tuple[str, str]:
    """The config.toml line and the environment line of hash-key's output."""
    toml_line = next(line for line in output.splitlines() if re.match(r"^\w+ = \[", line))
    env_line = next(line for line in output.splitlines() if line.startswith("INFERENCE_"))
    return toml_line, env_line


@pytest.mark.parametrize(("flags", "setting"), [((), "api_keys"), (("--admin",), "admin_api_keys")])
def test_hash_key_prints_the_setting_as_toml_and_as_the_environment(flags: tuple[str, ...], setting: str) -> None:
    toml_line, env_line = _setting_lines(hash_key(*flags, "my-key"))
    from_toml = from_dict(tomllib.loads(f"[auth]\n{toml_line}\n"))
    assert getattr(from_toml.auth, setting) == [api_key_hash("my-key")]
    name, _, value = env_line.partition("=")
    from_env = load_config(env={name: value})
    assert getattr(from_env.auth, setting) == [api_key_hash("my-key")]


def test_a_generated_admin_key_is_printed_with_its_setting() -> None:
    output = hash_key("--admin")
    key = re.search(r"^new API key.*: (\S+)$", output, re.MULTILINE)
    assert key is not None
    toml_line, _ = _setting_lines(output)
    assert toml_line == f'admin_api_keys = ["{api_key_hash(key.group(1))}"]'


def test_hash_key_help_mentions_admin_keys() -> None:
    help_text = hash_key("--help")
    assert "--admin" in help_text and "auth.admin_api_keys" in help_text


def test_the_docs_admin_key_recipe_sets_the_key_it_uses() -> None:
    """docs/model-versions.md's example, up to starting the server, run as written: the key it then
    sends as $ADMIN_KEY is the one the server's configuration lets in."""
    text = (ROOT / "docs" / "model-versions.md").read_text()
    block = text.split("## Example", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    recipe = block.split("./dev serve", 1)[0].rsplit("\n", 1)[0]
    assert "hash-key --admin" in recipe
    result = subprocess.run(["bash", "-ec", recipe + '\necho "ADMIN_KEY=$ADMIN_KEY"\nenv | grep ^INFERENCE_AUTH_'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line)
    admin_key = values.pop("ADMIN_KEY")
    assert admin_key and load_config(env=values).auth.admin_api_keys == [api_key_hash(admin_key)]
    training_loop = (ROOT / "docs" / "training-loop.md").read_text()
    assert "hash-key --admin" in training_loop and "model-versions.md#example" in training_loop
