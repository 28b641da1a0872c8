"""The set-up promises: the lock pins the whole set, conda's file agrees, and `make lab` serves."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["torch", "numpy", "matplotlib", "safetensors", "sentencepiece", "protobuf",
            "mistral-common", "transformers", "tqdm", "jupyterlab", "ipykernel", "nbval",
            "pytest", "hypothesis"]


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert match, f"not an exact pin: {line!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def lock_pins():
    return _pins((ROOT / "requirements.lock").read_text().splitlines())


def test_lock_pins_the_required_set_exactly():
    pins = lock_pins()
    for name in REQUIRED:
        assert name in pins, f"{name} missing from requirements.lock"
    assert pins["torch"] == "2.13.0"  # any other torch pulls a several-GB CUDA build here
    major, minor = (int(x) for x in pins["numpy"].split(".")[:2])
    assert (major, minor) < (2, 4)  # mistral-common needs numpy < 2.4


def test_lock_matches_this_environment():
    """Every pinned package is installed at its pinned version (nothing drifted)."""
    from importlib.metadata import version, PackageNotFoundError
    for name, pinned in lock_pins().items():
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
    assert _pins(pip_list) == lock_pins()


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
