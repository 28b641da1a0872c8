"""How much memory this machine has free right now, on the host and on each GPU.

Not pure: each call asks the operating system or the CUDA driver. The planner, the loader's
memory check and `mixtral-edu check` all ask here.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch


def host_free_bytes() -> Optional[int]:
    """Host memory available now (Linux: MemAvailable of /proc/meminfo; elsewhere the physical
    memory from sysconf), or None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_memory() -> list[tuple[int, int]]:
    """(free, total) bytes of each visible CUDA device, in index order; empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [tuple(int(b) for b in torch.cuda.mem_get_info(i)) for i in range(torch.cuda.device_count())]


def free_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Free bytes on `device`: the host's for "cpu", the driver's count for a CUDA device, else None."""
    device = torch.device(device)
    if device.type == "cpu":
        return host_free_bytes()
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None
