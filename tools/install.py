"""Install requirements.lock into the running Python (the venv `make install` made), for this platform.

    python tools/install.py [--torch auto|cpu|pypi]

The lock pins every package for every platform (environment markers say which), so pip installs it with
--no-deps and `pip check` confirms that nothing is missing. Only torch has a choice:

  pypi  torch 2.13.0 from PyPI. On Linux (x86-64 and aarch64) that is a CUDA build, which pulls NVIDIA's
        libraries and Triton (several GB): what a machine with an NVIDIA GPU needs.
  cpu   Linux only: torch 2.13.0+cpu from PyTorch's own index (download.pytorch.org/whl/cpu), a few hundred
        MB, and none of the CUDA packages. If that index cannot be reached, it says so and falls back to pypi.
  auto  (default) cpu on Linux without `nvidia-smi`, pypi everywhere else (macOS and Windows wheels on PyPI
        are CPU builds already).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# torch's CUDA build is the only thing that needs these (tests/test_setup.py checks the lock's annotations).
CUDA_STACK = re.compile(r"^(nvidia-|cuda-|triton==)")


def pinned_lines(lock: Path = LOCK) -> list[str]:
    """The requirement lines of the lock (`name==version` with an optional `; marker`), comments dropped."""
    return [line.strip() for line in lock.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def choose_torch(requested: str) -> str:
    if requested != "auto":
        return requested
    if sys.platform == "linux" and shutil.which("nvidia-smi") is None:
        return "cpu"
    return "pypi"


def pip(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pip", *args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", choices=["auto", "cpu", "pypi"], default=os.environ.get("TORCH", "auto") or "auto")
    args = parser.parse_args(argv)
    flavour = choose_torch(args.torch)
    if flavour == "cpu" and sys.platform != "linux":
        print(f"error: --torch cpu is for Linux; on {platform.system()} PyPI's torch is already a CPU build", file=sys.stderr)
        return 2
    lines = pinned_lines()
    torch_pin = next(line for line in lines if line.startswith("torch=="))
    if flavour == "cpu":
        print(f"torch: the CPU-only build {torch_pin}+cpu from {CPU_INDEX} (TORCH=pypi for the CUDA build)")
        if pip("install", "--no-deps", "--retries", "1", "--timeout", "30", "--progress-bar", "on",
               "--extra-index-url", CPU_INDEX, f"{torch_pin}+cpu") != 0:
            print(f"torch: {CPU_INDEX} could not be reached; installing PyPI's torch instead "
                  "(the CUDA build, with NVIDIA's libraries: several GB)")
            flavour = "pypi"
    if flavour == "cpu":
        lines = [line for line in lines if not line.startswith("torch==") and not CUDA_STACK.match(line)]
    else:
        print(f"torch: {torch_pin} from PyPI" + (" (a CUDA build, with NVIDIA's libraries and Triton)"
                                                  if sys.platform == "linux" else ""))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as plan:
        plan.write("\n".join(lines) + "\n")
    try:
        code = pip("install", "--no-deps", "--progress-bar", "on", "-r", plan.name)
    finally:
        os.unlink(plan.name)
    if code != 0:
        return code
    # With --no-deps nothing unpinned sneaks in; pip check proves nothing needed is left out either.
    return pip("check")


if __name__ == "__main__":
    sys.exit(main())
