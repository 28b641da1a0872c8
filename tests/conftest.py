"""Shared pytest fixtures."""

import pytest
import torch


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
