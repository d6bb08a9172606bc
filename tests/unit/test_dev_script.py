"""The `dev` script's own logic, run by bash with the script sourced (its functions, no command)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

DEV = Path(__file__).resolve().parent.parent.parent / "dev"


def dev_bash(script: str, cwd: Path) -> str:
    """stdout of `script` run after sourcing ./dev from `cwd` (where a user would run it)."""
    done = subprocess.run(["bash", "-c", f'source "{DEV}"; {script}'], cwd=cwd, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serve_resolves_a_relative_config_from_where_dev_was_run(tmp_path: Path) -> None:
    out = dev_bash("resolve_config_args --config ../my.toml --port 0 --config=here.toml --config /etc/abs.toml",
                   cwd=tmp_path)
    assert out.split("\0")[:-1] == ["--config", f"{tmp_path}/../my.toml", "--port", "0",
                                    f"--config={tmp_path}/here.toml", "--config", "/etc/abs.toml"]


def test_serve_after_test_does_not_reinstall_the_test_install_includes_export_and_base(tmp_path: Path) -> None:
    check = ('VENV="$1"; for extra in "" export test; do '
             'env_installed "$extra" && echo "${extra:-base} yes" || echo "${extra:-base} no"; done')
    script = f"set -- {tmp_path}; {check}"
    assert dev_bash(script, tmp_path).split("\n")[:3] == ["base no", "export no", "test no"]
    dev_bash(f'VENV={tmp_path}; touch "$(install_stamp test)"', tmp_path)
    assert dev_bash(script, tmp_path).split("\n")[:3] == ["base yes", "export yes", "test yes"]
    for stamp in tmp_path.iterdir():
        stamp.unlink()
    dev_bash(f'VENV={tmp_path}; touch "$(install_stamp export)"', tmp_path)
    # What ./dev serve installs (serving and exporting) lacks the test extra.
    assert dev_bash(script, tmp_path).split("\n")[:3] == ["base yes", "export yes", "test no"]
