"""The set-up promises: the lock pins the whole set, conda's file agrees, and `make lab` serves."""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment

import check_lock   # tools/check_lock.py and tools/install.py: tests/conftest.py puts tools/ on sys.path
import install

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["torch", "numpy", "matplotlib", "safetensors", "sentencepiece", "protobuf",
            "mistral-common", "transformers", "tqdm", "jupyterlab", "ipykernel", "nbval",
            "pytest", "hypothesis"]


def lock_pins(env=None):
    """name -> version for the lock's lines that apply on `env` (this machine by default)."""
    return check_lock.expected(ROOT / "requirements.lock", env or default_environment())


def test_lock_pins_the_required_set_exactly():
    pins = lock_pins()
    for name in REQUIRED:
        assert name in pins, f"{name} missing from requirements.lock"
    assert pins["torch"] == "2.13.0"  # the tested release
    major, minor = (int(x) for x in pins["numpy"].split(".")[:2])
    assert (major, minor) < (2, 4)  # mistral-common needs numpy < 2.4
    assert all(marker is None or ";" not in marker for _, _, marker in check_lock.lock_lines(ROOT / "requirements.lock"))


def test_lock_markers_pick_each_platforms_own_packages():
    """What the issue found missing per platform is in the lock, under the right platform's marker."""
    linux, mac, windows = (target[1] for target in (check_lock.TARGETS[0], check_lock.TARGETS[3], check_lock.TARGETS[4]))
    assert {"nvidia-cudnn-cu13", "triton", "aiohttp"} <= set(lock_pins(linux))
    assert "appnope" in lock_pins(mac) and not any(n.startswith("nvidia-") for n in lock_pins(mac))
    assert {"pywinpty", "colorama"} <= set(lock_pins(windows)) and "appnope" not in lock_pins(windows)
    # soupsieve 4.1.3 needs Python >= 3.11.5: older 3.11s (Debian 12 has 3.11.2) get a release that runs there
    old = dict(linux, python_full_version="3.11.2")
    assert lock_pins(old)["soupsieve"] != lock_pins(linux)["soupsieve"]


def test_only_torch_needs_the_cuda_stack():
    """The CPU route (tools/install.py --torch cpu) drops the CUDA packages: safe only if nothing but torch,
    or another CUDA package, needs them. uv's annotations in the lock say who needs what."""
    text = (ROOT / "requirements.lock").read_text()
    blocks = re.findall(r"^([A-Za-z0-9_.\-]+)==\S+.*\n((?:    #.*\n)*)", text, re.M)
    cuda = {name for name, _ in blocks if install.CUDA_STACK.match(f"{name}==")}
    assert {"triton", "nvidia-cudnn-cu13", "cuda-toolkit"} <= cuda
    for name, annotation in blocks:
        if name in cuda:
            needed_by = set(re.findall(r"#\s+(?:via\s+)?([A-Za-z0-9_.\-]+)\s*$", annotation, re.M)) - {"via"}
            assert needed_by and needed_by <= cuda | {"torch"}, f"{name} is needed by {needed_by - cuda - {'torch'}}"


def test_lock_matches_this_environment():
    """Every package the lock pins for this machine is installed at its pinned version (nothing drifted)."""
    from importlib.metadata import version, PackageNotFoundError
    cpu_route = "+cpu" in version("torch")
    for name, pinned in lock_pins().items():
        if cpu_route and install.CUDA_STACK.match(f"{name}=="):
            continue                                   # the CPU-only torch needs none of them (test above)
        try:
            have = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name}=={pinned} is in requirements.lock but not installed")
        assert have.split("+")[0] == pinned, f"{name}: lock {pinned}, installed {have}"


def test_environment_yml_agrees_with_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_list = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    lines = [line for line in pip_list if not line.startswith("-")]
    locked = [f"{n}=={v}" + (f" ; {m}" if m else "") for n, v, m in check_lock.lock_lines(ROOT / "requirements.lock")]
    assert [" ".join(line.split()) for line in lines] == [" ".join(line.split()) for line in locked]
    assert "-e ." in pip_list                          # the package itself, editable, as make install does


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    for _ in range(20):  # the URL is printed as the server starts listening; allow a moment
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.status == 200
                return response.read().decode("utf-8", "replace")
        except urllib.error.URLError:
            time.sleep(0.5)
    return None


def test_make_lab_serves_jupyterlab(tmp_path):
    """`make lab` prints the URL of notebook 00 and JupyterLab answers on it, rooted at the repository,
    with one kernel and no news pop-up (then we stop it)."""
    port = _free_port()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    proc = subprocess.Popen(
        ["make", "-s", "lab", f"PORT={port}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url, seen = None, []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            # "localhost" may resolve to ::1 first, where the server may not listen; use the IPv4 line.
            found = re.search(rf"(http://127\.0\.0\.1:{port})(/lab/tree/notebooks/00_overview\.ipynb)\?(token=\w+)", line)
            url = found.group(0) if found else None
        assert url, "make lab printed no URL of notebook 00:\n" + "".join(seen[-30:])
        base, token = found.group(1), found.group(3)
        body = _get(url)
        assert body is not None and "JupyterLab" in body, f"no answer from {url}"
        # rooted at the repository: the package, the data and the README are in the file browser
        names = {item["name"] for item in json.loads(_get(f"{base}/api/contents?{token}"))["content"]}
        assert {"README.md", "mixtral_edu", "data", "notebooks"} <= names, names
        kernels = json.loads(_get(f"{base}/api/kernelspecs?{token}"))
        assert kernels["default"] == "mixtral-edu" and list(kernels["kernelspecs"]) == ["mixtral-edu"]
        notification = json.loads(_get(f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?{token}"))
        defaults = {k: v.get("default") for k, v in notification["schema"]["properties"].items()}
        assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False
    finally:
        proc.stdout.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_readme_quotes_the_instruct_models_measured_accuracy():
    """The README's accuracy figures are the ones the shipped model's training log records."""
    log = json.loads((ROOT / "data" / "tiny-mixtral-instruct" / "training_log.json").read_text())["heldout_accuracy"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    for question, family in (("What is A plus B?", "sum"), ("Which is larger, A or B?", "larger"),
                             ("Reply with only the word: W", "word")):
        assert re.search(re.escape(question) + rf'"\s*\({log[family]:.0%}', readme), (question, log[family])
