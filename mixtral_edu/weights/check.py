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
  shape and a float dtype, no unexpected tensor, every file exactly as long as its header says. It
  runs load_model's own key mapping and `WeightFiller` on meta tensors, so it passes what loads.
  Safetensors headers are JSON; Mistral's `.pt`/`.pth` files are zip archives whose pickle gives the
  shapes, read by `pt_header` without unpickling anything but tensor records.

Nothing here needs a GPU or reads the weights themselves (but for a tied config whose files also hold
lm_head: load_model compares it with the embeddings, so check does too).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..files import NotRegularFile, open_regular as open_file
from .errors import CheckpointError
from .layouts import MAX_INDEX_BYTES, checkpoint_dtype, detect_layout, read_config
from .layouts import weight_files as layout_weight_files
from .load import WeightFiller, _to_hf_tensors, meta_skeleton
from .publish import leftovers, read_whole, save_in_progress
from .pt_header import read_pt_header, storage_bytes
from .safetensors_reader import ST_DTYPES, SafetensorsFile
from ..config import MixtralConfig, read_json_file
from ..params import count_parameters
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
        for flags in (getattr(os, "O_DIRECT", 0), 0):
            try:
                f = open_file(path, flags=flags)     # never a FIFO or a device, even one swapped in
            except NotRegularFile:
                raise CheckpointError(f"{path}: not a regular file") from None
            except OSError:
                continue
            with f:
                try:
                    if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
                        os.posix_fadvise(f.fileno(), offset, count, os.POSIX_FADV_DONTNEED)
                    start = time.perf_counter()
                    n = _pread(f.fileno(), buffer, offset)
                    return n, time.perf_counter() - start
                except OSError:
                    if flags == 0:
                        raise
        raise OSError(f"{path}: cannot be opened for reading")
    finally:
        buffer.close()


def _pread(fd: int, buffer, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    os.lseek(fd, offset, os.SEEK_SET)                    # Windows: no preadv
    return len(os.read(fd, len(buffer)))


def measure_read_speed(folder, sample_bytes: int = SAMPLE_BYTES, max_files: int = 4,
                       files: Optional[list] = None) -> Optional[float]:
    """Bytes per second read from the disk: the middle of up to `max_files` of the checkpoint's files.

    Only the layout load_model reads (checkpoint_files, or `files` when the caller has them: a
    CheckResult's); the middle of a file, because its start (the header) was just read; from the disk,
    not the page cache (`_read_from_disk`). None when the files are too small to time.
    """
    read, seconds = 0, 0.0
    for path in (checkpoint_files(folder) if files is None else files)[:max_files]:
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
@dataclass
class CheckResult:
    """What `check_checkpoint` found: a folder that will load as `config`."""

    folder: Path
    layout: str
    config: MixtralConfig
    tensors: int
    dtype: str            # the dtype load_model gives the weights: "bfloat16", "float16", "float32", ...
    weight_bytes: int     # bytes of tensor data in the layout's files
    files: list
    ignored: list = field(default_factory=list)    # weight files of another layout in the same folder
    stored: list = field(default_factory=list)     # the dtypes the files store, when more than one
    leftovers: list = field(default_factory=list)  # what killed saves left (publish.leftovers)
    saving: bool = False                           # a save holds the folder's lock right now
    notes: list = field(default_factory=list)      # what is odd but does not stop load_model

    def __str__(self) -> str:
        c = self.config
        text = (f"{self.folder}: {self.layout} layout, {len(self.files)} weight file"
                f"{'s' if len(self.files) != 1 else ''}, {self.tensors} tensors in {self.dtype}, "
                f"{_size(self.weight_bytes)}; {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_local_experts} experts (top-{c.num_experts_per_tok}), vocabulary {c.vocab_size}")
        if len(self.stored) > 1:
            text += f" (stored as {' and '.join(self.stored)}; loaded as {self.dtype})"
        if self.ignored:
            text += (f" (the folder also holds {len(self.ignored)} weight file{'s' if len(self.ignored) != 1 else ''}"
                     f" of another layout, {self.ignored[0].name} ...: not counted, not loaded)")
        for note in self.notes:
            text += f" (note: {note})"
        if self.leftovers:
            names = ", ".join(self.leftovers[:3]) + (f" and {len(self.leftovers) - 3} more" if len(self.leftovers) > 3 else "")
            text += (f" (a save is writing into it now: {names})" if self.saving else
                     f" (an interrupted save left {names}: what is checked is what loads; the next save into "
                     "this folder removes them)")
        return text


def expected_tensors(cfg: MixtralConfig, layout: str) -> dict:
    """{checkpoint key: shape} that a `layout` checkpoint of `cfg` holds (built on the meta device: no memory).

    "mistral-pt" is the original release: experts fused per layer, `[E * I, H]` (convert.py).
    """
    hf = to_hf_state_dict(meta_skeleton(cfg))
    if layout == "mistral-pt":
        return {key: tuple(t.shape) for key, t in hf_to_original_state_dict(hf, cfg).items()}
    shapes = {key: tuple(t.shape) for key, t in hf.items()}
    if layout == "mistral":
        return {hf_to_mistral_key(key): shape for key, shape in shapes.items()}
    return shapes


def _headers(layout: str, files: list) -> dict:
    """{key: (dtype name as stored, torch dtype or None, shape, file)} from the files' headers alone: a
    safetensors JSON header, or a torch archive's pickle (pt_header). A key in two files is refused."""
    import torch

    found = {}
    for path in files:
        if layout == "mistral-pt":
            entries = [(k, i.dtype, getattr(torch, i.dtype, None), i.shape) for k, i in read_pt_header(path).items()]
        else:
            with SafetensorsFile(path) as st:
                entries = [(k, i["dtype"], ST_DTYPES.get(i["dtype"]), tuple(i["shape"])) for k, i in st.header.items()]
        for key, name, dtype, shape in entries:
            if key in found:
                raise CheckpointError(f"{path}: tensor {key} is also in {found[key][3].name}")
            found[key] = (name, dtype, tuple(shape), path)
    return found


def _data_bytes(layout: str, files: list) -> int:
    if layout == "mistral-pt":
        return sum(storage_bytes(read_pt_header(path)) for path in files)
    total = 0
    for path in files:
        with SafetensorsFile(path) as st:
            total += sum(i["data_offsets"][1] - i["data_offsets"][0] for i in st.header.values())
    return total


def _check_folder(folder: Path) -> CheckResult:
    """check_checkpoint's work on one checkpoint folder, as it stands: load_model's own steps (layout,
    config, files, key mapping, conversion and `WeightFiller`) on meta tensors of the headers' shapes."""
    import torch

    layout = detect_layout(folder)
    cfg = read_config(folder, layout)
    files = layout_weight_files(folder, layout)[0]     # hf-sharded: index, shard names and headers agree
    found = _headers(layout, files)
    # The config's claims against what the files hold, before anything of the config's size is built:
    # every parameter needs a value of its own, so a 650-byte config cannot make this take minutes.
    needed, held = count_parameters(cfg)["total"], sum(math.prod(shape) for _, _, shape, _ in found.values())
    tensors = cfg.num_hidden_layers * (7 + 3 * cfg.num_local_experts) + 3      # about; the filler names them
    if needed > held and tensors > 2 * len(found) + 64:
        raise CheckpointError(f"{folder}: the config describes {needed:,} parameters, but the weight files hold "
                              f"only {held:,} values ({len(found)} tensors)")
    config_name = "config.json" if layout.startswith("hf") else "params.json"
    filler = WeightFiller(meta_skeleton(cfg), config_name)
    with torch.no_grad():
        _fill_from_headers(filler, layout, cfg, found)
    filler.check_complete(folder)
    if filler.tied_lm_head is not None:                 # the only check that reads weights: two tensors
        _check_tied_head(filler, folder, layout, files)
    data_bytes, notes = _data_bytes(layout, files), []
    if layout == "hf-sharded":
        metadata = read_json_file(folder / "model.safetensors.index.json", MAX_INDEX_BYTES).get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if total is not None and total != data_bytes:     # loaders ignore it; it still hints at a damaged index
            notes.append(f"the index's metadata.total_size says {total!r}, the shards hold {data_bytes} bytes; "
                         "load_model does not use it"[:200])
    dtype = str(checkpoint_dtype(folder, layout, files)).removeprefix("torch.")
    stored = sorted({str(d).removeprefix("torch.") for _, d, _, _ in found.values()})
    ignored = [p for p in weight_files(folder) if p not in set(files)]
    return CheckResult(folder, layout, cfg, len(found), dtype, data_bytes, files, ignored,
                       stored if len(stored) > 1 else [], notes=notes)


def _fill_from_headers(filler: WeightFiller, layout: str, cfg: MixtralConfig, found: dict) -> None:
    """Feed `filler` one meta tensor per header entry, through load_model's conversion."""
    import torch

    for key, (name, dtype, shape, path) in found.items():
        where = f"{path}: tensor {key}"
        if dtype is None:
            raise CheckpointError(f"{where}: dtype {name} has no torch equivalent here")
        try:
            pairs = _to_hf_tensors(layout, key, torch.empty(shape, dtype=dtype, device="meta"), cfg)
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{where}: {err.args[0] if err.args else err}") from None
        for hf_key, tensor in pairs:
            filler.fill(hf_key, tensor, where, origin=path.name)


def _check_tied_head(filler: WeightFiller, folder: Path, layout: str, files: list) -> None:
    """A config that ties lm_head to the embeddings, and files that hold both: load_model accepts them only
    when they are equal, so compare them (the embeddings and the head, nothing else, are read)."""
    _, tensors_of = layout_weight_files(folder, layout)
    embed = None
    for file in files:
        for key, tensor in tensors_of(file):
            for hf_key, t in _to_hf_tensors(layout, key, tensor, filler.cfg):
                if hf_key == "lm_head.weight":
                    filler.tied_lm_head = (f"{file}: tensor {key}", t.clone())
                elif hf_key == "model.embed_tokens.weight":
                    embed = t.clone()
    filler.check_tied(embed)


def check_checkpoint(folder) -> CheckResult:
    """Verify a checkpoint folder without reading its weights; raise CheckpointError naming the first problem.

    Reads config.json/params.json, the index and each file's header (a safetensors JSON header, or a
    .pt archive's directory and pickle): that is the whole cost, however large the weights, and it is
    bounded by the files' real size, whatever the config claims. The checks are load_model's own, on meta
    tensors, so what passes here loads there (NaN or infinite values, which only reading every weight
    finds, aside). A folder with two layouts is checked in the one load_model reads; the other's files
    are listed as ignored. A save publishing into the folder meanwhile makes it check again (as
    load_model does); what killed saves left behind is reported (`CheckResult.leftovers`).
    """
    folder = Path(folder)
    result = read_whole(folder, _check_folder)
    result.folder = folder
    result.leftovers = leftovers(folder)
    result.saving = bool(result.leftovers) and save_in_progress(folder)
    return result
