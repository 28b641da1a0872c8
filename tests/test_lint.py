"""The package, the tests, the benchmarks, docs/ and tools/ pass ruff (pyflakes and pycodestyle; the rules are in
pyproject.toml's [tool.ruff] section, the ruff version in requirements.lock)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "mixtral_edu", "tests", "benchmarks", "docs", "tools"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
