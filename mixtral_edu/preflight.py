"""Before a long load: what this machine has, and how long reading the weights will take.

Loading the real Mixtral-8x7B reads 93.4 GB. That is minutes even from a fast disk, so the course
says up front what it found and what it expects, instead of going quiet:

* `describe_gpus()`: the CUDA devices this process sees (their name, free and total memory) and the
  `CUDA_VISIBLE_DEVICES` that chose them;
* `host_free_bytes()` (from placement.py): the host memory available;
* `measure_read_speed(folder)`: bytes per second read from the checkpoint's own files (a sample of
  each shard, so the figure is the disk's, not a cache's, on a first read);
* `estimate_load_seconds(folder)`: the folder's weight bytes over that speed.

Nothing here needs a GPU or reads a whole file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .placement import host_free_bytes

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
SAMPLE_BYTES = 64 * 2 ** 20       # read per file when measuring: long enough to see the disk, not a seek


@dataclass
class GPU:
    """One visible CUDA device: index in this process, name, free and total bytes."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int

    def __str__(self) -> str:
        return (f"cuda:{self.index} {self.name}: {self.free_bytes / 1e9:.1f} GB free "
                f"of {self.total_bytes / 1e9:.1f} GB")


def describe_gpus() -> list:
    """The CUDA devices this process sees, as GPU records (empty without CUDA). Asks the driver."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GPU(i, torch.cuda.get_device_name(i), int(free), int(total)))
    return gpus


def weight_files(folder) -> list:
    """The checkpoint's weight files in `folder` (not its subfolders), sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def weight_bytes(folder) -> int:
    """Total bytes of the weight files in `folder`."""
    return sum(p.stat().st_size for p in weight_files(folder))


def measure_read_speed(folder, sample_bytes: int = SAMPLE_BYTES, max_files: int = 4) -> Optional[float]:
    """Bytes per second read from the middle of up to `max_files` weight files of `folder`.

    The middle of a file, because its start (the header) was likely just read and sits in the page
    cache. None when the folder has no weight files or they are too small to time.
    """
    files = weight_files(folder)[:max_files]
    read, seconds = 0, 0.0
    for path in files:
        size = path.stat().st_size
        count = min(sample_bytes, size)
        with open(path, "rb", buffering=0) as f:
            f.seek(max(0, size // 2 - count // 2))
            start = time.perf_counter()
            data = f.read(count)
            seconds += time.perf_counter() - start
        read += len(data)
    if read == 0 or seconds <= 0:
        return None
    return read / seconds


def estimate_load_seconds(folder, read_speed: Optional[float] = None) -> Optional[float]:
    """Seconds to read every weight file of `folder` at `read_speed` (measured when None)."""
    speed = measure_read_speed(folder) if read_speed is None else read_speed
    if not speed:
        return None
    return weight_bytes(folder) / speed


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def report(folder) -> str:
    """A few lines for a person about to load `folder`: GPUs, host memory, expected read time."""
    gpus = describe_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    lines = [f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else
             "CUDA_VISIBLE_DEVICES is not set: every GPU of the machine is visible"]
    lines += [f"  {gpu}" for gpu in gpus] or ["  no CUDA GPU is visible"]
    host = host_free_bytes()
    lines.append(f"host memory available: {host / 1e9:.1f} GB" if host else "host memory: unknown")
    total = weight_bytes(folder)
    speed = measure_read_speed(folder)
    if speed:
        n = len(weight_files(folder))
        lines.append(f"weights: {_size(total)} in {n} file{'s' if n != 1 else ''}, read at "
                     f"{speed / 1e9:.2f} GB/s here -> about {total / speed:.0f} s to read them once")
    return "\n".join(lines)
