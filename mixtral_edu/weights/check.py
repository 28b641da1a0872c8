"""Before a long load: what this machine has, and how long reading the weights will take.

Loading the real Mixtral-8x7B reads 93.4 GB. That is minutes even from a fast disk, so the course
says up front what it found and what it expects, instead of going quiet:

* `describe_gpus()`: the CUDA devices this process sees (their name, free and total memory) and the
  `CUDA_VISIBLE_DEVICES` that chose them;
* `host_free_bytes()` (from placement.py): the host memory available;
* `measure_read_speed(folder)`: bytes per second read from the checkpoint's own files (a sample of
  each shard, so the figure is the disk's, not a cache's, on a first read);
* `estimate_load_seconds(folder)`: the folder's weight bytes over that speed;
* `check_checkpoint(folder)`: the download is complete and is the model its config describes —
  from the safetensors headers alone, in seconds for 93 GB: the layout, every expected tensor
  present with its shape and one float dtype, no unexpected tensor, every shard the index names
  present and exactly as long as its header says, the index's total size equal to the tensors'.

Nothing here needs a GPU or reads the weights themselves.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CheckpointError
from .layouts import detect_layout, hf_shards, read_config
from .safetensors_reader import SafetensorsFile
from ..config import MixtralConfig, read_json_file
from .convert import hf_to_mistral_key
from .keys import to_hf_state_dict
from ..inference.placement import host_free_bytes

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


# ----------------------------------------------------------------------------- checking a download
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_ST_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


@dataclass
class CheckResult:
    """What `check_checkpoint` found: a folder that will load as `config`."""

    folder: Path
    layout: str
    config: MixtralConfig
    tensors: int
    dtype: str            # "bfloat16", "float16" or "float32"
    weight_bytes: int     # bytes of tensor data in the files
    files: list

    def __str__(self) -> str:
        c = self.config
        return (f"{self.folder}: {self.layout} layout, {len(self.files)} weight file"
                f"{'s' if len(self.files) != 1 else ''}, {self.tensors} tensors in {self.dtype}, "
                f"{_size(self.weight_bytes)}; {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_local_experts} experts (top-{c.num_experts_per_tok}), vocabulary {c.vocab_size}")


def expected_tensors(cfg: MixtralConfig, layout: str) -> dict:
    """{checkpoint key: shape} that a `layout` checkpoint of `cfg` holds (built on the meta device: no memory)."""
    import torch

    from ..model.mixtral import Mixtral

    with torch.device("meta"):
        model = Mixtral(cfg)
    hf = {key: tuple(t.shape) for key, t in to_hf_state_dict(model).items()}
    if layout == "mistral":
        return {hf_to_mistral_key(key): shape for key, shape in hf.items()}
    return hf


def _list(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_checkpoint(folder) -> CheckResult:
    """Verify a checkpoint folder without reading its weights; raise CheckpointError naming the first problem.

    Reads config.json/params.json, the index and each file's header: that is the whole cost, however
    large the weights. The Mistral `.pt` release cannot be checked this way (reading a pickle means
    loading it), so it is refused with that reason; `load_model` checks it while loading.
    """
    folder = Path(folder)
    layout = detect_layout(folder)
    cfg = read_config(folder)
    if layout == "mistral-pt":
        raise CheckpointError(f"{folder}: the consolidated.NN.pt layout can only be checked by loading it "
                              "(load_model does); check reads safetensors headers")
    if layout == "hf-sharded":
        files = [path for path, _ in hf_shards(folder)]       # index, shard names and headers agree
    else:
        files = [folder / ("model.safetensors" if layout == "hf" else "consolidated.safetensors")]
    found, where, data_bytes = {}, {}, 0
    for path in files:
        with SafetensorsFile(path) as st:                  # header valid, offsets tile the file exactly
            for key, info in st.header.items():
                if key in found:
                    raise CheckpointError(f"{path}: tensor {key} is also in {where[key].name}")
                found[key], where[key] = info, path
                begin, end = info["data_offsets"]
                data_bytes += end - begin
    expected = expected_tensors(cfg, layout)
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) the config needs are missing: {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} tensor(s) the config has no place for: "
                              f"{_list(unexpected)} (in {where[sorted(unexpected)[0]].name})")
    for key, shape in expected.items():
        if tuple(found[key]["shape"]) != shape:
            raise CheckpointError(f"{where[key]}: tensor {key} has shape {list(found[key]['shape'])}, "
                                  f"the config needs {list(shape)}")
    dtypes = {info["dtype"] for info in found.values()}
    if len(dtypes) != 1 or not dtypes <= set(_ST_DTYPES):
        by = {d: next(k for k, i in found.items() if i["dtype"] == d) for d in sorted(dtypes)}
        raise CheckpointError(f"{folder}: expected one float dtype (BF16, F16 or F32) for all tensors, found "
                              + ", ".join(f"{d} (e.g. {k})" for d, k in by.items()))
    if layout == "hf-sharded":
        total = read_json_file(folder / "model.safetensors.index.json", 64 << 20).get("metadata", {}).get("total_size")
        if total is not None and total != data_bytes:
            raise CheckpointError(f"{folder / 'model.safetensors.index.json'}: metadata.total_size is {total} "
                                  f"but the shards hold {data_bytes} bytes of tensors")
    return CheckResult(folder, layout, cfg, len(found), _ST_DTYPES[dtypes.pop()], data_bytes, files)
