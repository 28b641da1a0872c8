"""Write environment.yml (the conda route) from requirements.lock: the same pins, markers included.

    python tools/environment_yml.py        # `make lock` runs it after re-resolving the lock
"""

from __future__ import annotations

from pathlib import Path

import check_lock   # tools/check_lock.py: a script's own folder is first on sys.path

ROOT = Path(__file__).resolve().parents[1]

HEADER = """\
# Conda users (any platform):
#   conda env create -f environment.yml && conda activate mixtral-edu
#   python -m ipykernel install --user --name mixtral-edu --display-name "Python (mixtral-edu)"
# The last line registers the kernel the notebooks ask for. The pip list is requirements.lock, markers and all
# (written by tools/environment_yml.py; tests/test_setup.py checks that they agree). On Linux it brings PyPI's
# torch, the CUDA build; the CPU-only build is `make install` (README, "Set-up on each platform").
name: mixtral-edu
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
"""


def main() -> None:
    lines = [f"{n}=={v}" + (f" ; {m}" if m else "") for n, v, m in check_lock.lock_lines(ROOT / "requirements.lock")]
    body = "".join(f'      - "{line}"\n' if ";" in line else f"      - {line}\n" for line in lines)
    (ROOT / "environment.yml").write_text(HEADER + body + "      - -e .\n")


if __name__ == "__main__":
    main()
