"""Shared pytest fixtures, and the tools/ scripts made importable.

tools/ holds scripts run as `python tools/NAME.py`; Python puts a script's folder first on sys.path,
so each imports its siblings as top-level modules (`import check_lock`). The tests see them the same way.
"""

import sys
from pathlib import Path

import pytest
import torch

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if TOOLS not in sys.path:
    sys.path.append(TOOLS)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny matrices on one torch thread, then restore the setting.

    For matrices this small one thread is faster, and it is immune to the spin-waits that make a
    second thread crawl when the cores are busy with other work.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
