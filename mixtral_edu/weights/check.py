"""Before a long load: what this machine has, and how long reading the weights will take.

Loading the real Mixtral-8x7B reads 93.4 GB. That is minutes even from a fast disk, so the course
says up front what it found and what it expects, instead of going quiet:

* `describe_gpus()`: the CUDA devices this process sees (their name, free and total memory) and the
  `CUDA_VISIBLE_DEVICES` that chose them;
* `host_free_bytes()` (from devices.py): the host memory available;
* `checkpoint_files(folder)`: the weight files of the one layout `load_model` reads (published downloads
  hold two: Hugging Face shards and Mistral's `consolidated` files; only one is counted or timed);
* `measure_read_speed(folder)`: bytes per second read from those files' middles, from the disk itself
  (O_DIRECT, or the pages dropped from the cache first), so a second run does not time the page cache;
* `estimate_load_seconds(folder)`: the layout's weight bytes over that speed;
* `check_checkpoint(folder)`: the download is complete and is the model its config describes —
  from the headers alone, in seconds for 93 GB: the layout, every expected tensor present with its
  shape and one float dtype, no unexpected tensor, every file exactly as long as its header says.
  Safetensors headers are JSON; Mistral's `.pt`/`.pth` files are zip archives whose pickle gives the
  shapes, read by `pt_header` without unpickling anything but tensor records.

Nothing here needs a GPU or reads the weights themselves.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import CheckpointError
from .layouts import FLOAT_DTYPES as LOADABLE_DTYPES
from .layouts import detect_layout, read_config
from .layouts import weight_files as layout_weight_files
from .pt_header import read_pt_header, storage_bytes
from .safetensors_reader import ST_DTYPES, SafetensorsFile
from ..config import MixtralConfig, read_json_file
from .convert import hf_to_mistral_key, hf_to_original_state_dict
from .keys import to_hf_state_dict
from ..devices import gpu_memory, host_free_bytes

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

    return [GPU(i, torch.cuda.get_device_name(i), free, total) for i, (free, total) in enumerate(gpu_memory())]


def weight_files(folder) -> list:
    """Every weight file in `folder` (not its subfolders), whatever its layout, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def checkpoint_files(folder) -> list:
    """The weight files of the layout `load_model` picks in `folder` (layouts.detect_layout), in load order."""
    folder = Path(folder)
    return layout_weight_files(folder, detect_layout(folder))[0]


def weight_bytes(folder) -> int:
    """Total bytes of the checkpoint's files in `folder` (the layout load_model reads, not the others)."""
    return sum(p.stat().st_size for p in checkpoint_files(folder))


def _read_from_disk(path: Path, offset: int, count: int) -> tuple[int, float]:
    """(bytes read, seconds) for about `count` bytes at `offset` of `path`, not served by the page cache.

    O_DIRECT bypasses the cache (it needs a page-aligned buffer, offset and length); where the file
    system refuses it, a plain read after dropping the range's cached pages (posix_fadvise DONTNEED).
    """
    import mmap

    page = mmap.PAGESIZE
    offset, count = offset // page * page, max(page, count // page * page)
    buffer = mmap.mmap(-1, count)                         # page-aligned
    try:
        for flags in (os.O_RDONLY | getattr(os, "O_DIRECT", 0), os.O_RDONLY):
            try:
                fd = os.open(path, flags)
            except OSError:
                continue
            try:
                if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
                    os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)
                start = time.perf_counter()
                n = _pread(fd, buffer, offset)
                return n, time.perf_counter() - start
            except OSError:
                if flags == os.O_RDONLY:
                    raise
            finally:
                os.close(fd)
        raise OSError(f"{path}: cannot be opened for reading")
    finally:
        buffer.close()


def _pread(fd: int, buffer, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    os.lseek(fd, offset, os.SEEK_SET)                    # Windows: no preadv
    return len(os.read(fd, len(buffer)))


def measure_read_speed(folder, sample_bytes: int = SAMPLE_BYTES, max_files: int = 4) -> Optional[float]:
    """Bytes per second read from the disk: the middle of up to `max_files` of the checkpoint's files.

    Only the layout load_model reads (checkpoint_files); the middle of a file, because its start (the
    header) was just read; from the disk, not the page cache (`_read_from_disk`). None when the files
    are too small to time.
    """
    read, seconds = 0, 0.0
    for path in checkpoint_files(folder)[:max_files]:
        size = path.stat().st_size
        count = min(sample_bytes, size)
        n, took = _read_from_disk(path, max(0, size // 2 - count // 2), count)
        read, seconds = read + n, seconds + took
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
        n = len(checkpoint_files(folder))
        lines.append(f"weights: {_size(total)} in {n} file{'s' if n != 1 else ''}, read at "
                     f"{speed / 1e9:.2f} GB/s here -> about {total / speed:.0f} s to read them once")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checking a download
# torch's names: "bfloat16", "float16", "float32" (layouts.FLOAT_DTYPES), and of safetensors' dtypes ("BF16": "bfloat16")
FLOAT_DTYPES = tuple(str(dtype).removeprefix("torch.") for dtype in LOADABLE_DTYPES)
_ST_DTYPES = {name: str(dtype).removeprefix("torch.") for name, dtype in ST_DTYPES.items() if dtype in LOADABLE_DTYPES}


@dataclass
class CheckResult:
    """What `check_checkpoint` found: a folder that will load as `config`."""

    folder: Path
    layout: str
    config: MixtralConfig
    tensors: int
    dtype: str            # "bfloat16", "float16" or "float32"
    weight_bytes: int     # bytes of tensor data in the layout's files
    files: list
    ignored: list = field(default_factory=list)   # weight files of another layout in the same folder

    def __str__(self) -> str:
        c = self.config
        text = (f"{self.folder}: {self.layout} layout, {len(self.files)} weight file"
                f"{'s' if len(self.files) != 1 else ''}, {self.tensors} tensors in {self.dtype}, "
                f"{_size(self.weight_bytes)}; {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_local_experts} experts (top-{c.num_experts_per_tok}), vocabulary {c.vocab_size}")
        if self.ignored:
            text += (f" (the folder also holds {len(self.ignored)} weight file{'s' if len(self.ignored) != 1 else ''}"
                     f" of another layout, {self.ignored[0].name} ...: not counted, not loaded)")
        return text


def expected_tensors(cfg: MixtralConfig, layout: str) -> dict:
    """{checkpoint key: shape} that a `layout` checkpoint of `cfg` holds (built on the meta device: no memory).

    "mistral-pt" is the original release: experts fused per layer, `[E * I, H]` (convert.py).
    """
    import torch

    from ..model.mixtral import Mixtral

    with torch.device("meta"):
        model = Mixtral(cfg)
        hf = to_hf_state_dict(model)
        if layout == "mistral-pt":
            return {key: tuple(t.shape) for key, t in hf_to_original_state_dict(hf, cfg).items()}
    shapes = {key: tuple(t.shape) for key, t in hf.items()}
    if layout == "mistral":
        return {hf_to_mistral_key(key): shape for key, shape in shapes.items()}
    return shapes


def _list(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _safetensors_headers(files: list) -> tuple[dict, int]:
    """({key: (dtype name, shape, file)}, data bytes) from safetensors headers (offsets tile each file)."""
    found, data_bytes = {}, 0
    for path in files:
        with SafetensorsFile(path) as st:
            for key, info in st.header.items():
                if key in found:
                    raise CheckpointError(f"{path}: tensor {key} is also in {found[key][2].name}")
                found[key] = (_ST_DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"]), path)
                begin, end = info["data_offsets"]
                data_bytes += end - begin
    return found, data_bytes


def _pt_headers(files: list) -> tuple[dict, int]:
    """The same from torch zip archives (pt_header: the pickle's tensor records, no data read)."""
    found, data_bytes = {}, 0
    for path in files:
        tensors = read_pt_header(path)
        for key, info in tensors.items():
            if key in found:
                raise CheckpointError(f"{path}: tensor {key} is also in {found[key][2].name}")
            found[key] = (info.dtype, info.shape, path)
        data_bytes += storage_bytes(tensors)
    return found, data_bytes


def check_checkpoint(folder) -> CheckResult:
    """Verify a checkpoint folder without reading its weights; raise CheckpointError naming the first problem.

    Reads config.json/params.json, the index and each file's header (a safetensors JSON header, or a
    .pt archive's directory and pickle): that is the whole cost, however large the weights. A folder
    with two layouts is checked in the one load_model reads; the other's files are listed as ignored.
    """
    folder = Path(folder)
    layout = detect_layout(folder)
    cfg = read_config(folder)
    files = checkpoint_files(folder)                    # hf-sharded: index, shard names and headers agree
    found, data_bytes = (_pt_headers if layout == "mistral-pt" else _safetensors_headers)(files)
    expected = expected_tensors(cfg, layout)
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) the config needs are missing: {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} tensor(s) the config has no place for: "
                              f"{_list(unexpected)} (in {found[sorted(unexpected)[0]][2].name})")
    for key, shape in expected.items():
        if found[key][1] != shape:
            raise CheckpointError(f"{found[key][2]}: tensor {key} has shape {list(found[key][1])}, "
                                  f"the config needs {list(shape)}")
    dtypes = {dtype for dtype, _, _ in found.values()}
    if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
        by = {d: next(k for k, v in found.items() if v[0] == d) for d in sorted(dtypes)}
        raise CheckpointError(f"{folder}: expected one float dtype (bfloat16, float16 or float32) for all tensors, "
                              "found " + ", ".join(f"{d} (e.g. {k})" for d, k in by.items()))
    if layout == "hf-sharded":
        total = read_json_file(folder / "model.safetensors.index.json", 64 << 20).get("metadata", {}).get("total_size")
        if total is not None and total != data_bytes:
            raise CheckpointError(f"{folder / 'model.safetensors.index.json'}: metadata.total_size is {total} "
                                  f"but the shards hold {data_bytes} bytes of tensors")
    ignored = [p for p in weight_files(folder) if p not in set(files)]
    return CheckResult(folder, layout, cfg, len(found), dtypes.pop(), data_bytes, files, ignored)
