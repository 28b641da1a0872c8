"""A full-size Mixtral-8x7B checkpoint folder that takes no disk space, for tests of checking and planning.

`write_sparse_hf(folder)` writes what `mistralai/Mixtral-8x7B-Instruct-v0.1` ships — config.json,
model.safetensors.index.json and 19 bf16 shards named model-000NN-of-00019.safetensors — where each shard
is a real safetensors header followed by a hole of exactly the length the header implies (a sparse file:
93.4 GB long, no blocks written). Headers, sizes and the index are what a download has, so everything that
reads only those (check_checkpoint, the planner, the memory check) sees the real thing; the weights read
as zeros.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.check import expected_tensors

SHARDS = 19


def write_shard(path: Path, tensors: list, dtype: str = "BF16") -> int:
    """A safetensors file of `tensors` [(key, shape)] whose data is a hole. Returns the data bytes."""
    header, offset = {}, 0
    for key, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                     # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def shard_plan(cfg: MixtralConfig, shards: int = SHARDS) -> list:
    """The tensors of each shard, in checkpoint order, cut into `shards` runs of about equal bytes."""
    items = list(expected_tensors(cfg, "hf").items())
    sizes = [2 * _numel(shape) for _, shape in items]
    target = sum(sizes) / shards
    plan, current, filled = [[] for _ in range(shards)], 0, 0
    for (key, shape), size in zip(items, sizes):
        if filled >= target * (current + 1) and current < shards - 1:
            current += 1
        plan[current].append((key, shape))
        filled += size
    return plan


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_name(i: int, shards: int = SHARDS) -> str:
    return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"


def write_index(folder: Path, plan: list, total_size: int) -> None:
    weight_map = {key: shard_name(i, len(plan)) for i, tensors in enumerate(plan) for key, _ in tensors}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))


def write_sparse_hf(folder: Path, cfg: MixtralConfig = None) -> Path:
    """The full-size Hugging Face layout of `cfg` (Mixtral-8x7B by default) in `folder`, sparse."""
    cfg = cfg or MixtralConfig.mixtral_8x7b()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    plan = shard_plan(cfg)
    total = sum(write_shard(folder / shard_name(i), tensors) for i, tensors in enumerate(plan))
    write_index(folder, plan, total)
    return folder


def linked_copy(source: Path, target: Path) -> Path:
    """`target` with a symbolic link to each file of `source` (a variant to damage one file of)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).symlink_to(path)
    return target


# ----------------------------------------------------------------------------- Mistral's original .pt release
def write_sparse_pt(folder: Path, cfg: MixtralConfig = None, files: int = 1, suffix: str = ".pth") -> Path:
    """Mistral's original layout of `cfg` (8x7B by default): params.json + consolidated.NN.pth, sparse.

    Experts fused per layer as `layers.{i}.block_sparse_moe.w{1,2,3}` `[E * I, H]`; whole layers spread
    over `files` files. Each file is what torch.save writes (a zip of stored members, data 64-byte
    aligned) with every storage a hole: 93.4 GB long for the 8x7B, no data blocks written.
    """
    cfg = cfg or MixtralConfig.mixtral_8x7b()
    folder.mkdir(parents=True, exist_ok=True)
    params = cfg.to_params_json()
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    parts = [[] for _ in range(files)]
    for key, shape in expected_tensors(cfg, "mistral-pt").items():
        layer = key.split(".")[1] if key.startswith("layers.") else None
        index = (int(layer) * files // cfg.num_hidden_layers if layer is not None
                 else 0 if key == "tok_embeddings.weight" else files - 1)
        parts[index].append((key, shape))
    for i, tensors in enumerate(parts):
        write_torch_zip(folder / f"consolidated.{i:02d}{suffix}", tensors)
    return folder


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape):
        self.storage, self.shape = storage, tuple(shape)


class _TorchPickler(pickle.Pickler):
    """Pickles _Tensor records exactly as torch.save pickles bf16 tensors (the same globals and ids)."""

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.BFloat16Storage, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            stride = [1] * len(obj.shape)
            for d in range(len(obj.shape) - 2, -1, -1):
                stride[d] = stride[d + 1] * obj.shape[d + 1]
            return torch._utils._rebuild_tensor_v2, (obj.storage, 0, obj.shape, tuple(stride), False,
                                                     collections.OrderedDict())
        return NotImplemented


def write_torch_zip(path: Path, tensors: list, zeros: bool = False) -> None:
    """A torch.save-format file of bf16 `tensors` [(key, shape)] whose storages read as zeros (holes).

    zeros=False leaves holes (sparse); the member CRCs are those of zero bytes either way.
    """
    storages = [_Storage(str(i), _numel(shape)) for i, (_, shape) in enumerate(tensors)]
    state = {key: _Tensor(s, shape) for (key, shape), s in zip(tensors, storages)}
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(state)
    name = path.stem
    members = [(f"{name}/data.pkl", buffer.getvalue()), (f"{name}/byteorder", b"little")]
    members += [(f"{name}/data/{s.key}", 2 * s.numel) for s in storages]
    members += [(f"{name}/version", b"3\n")]
    central = []
    with open(path, "wb") as f:
        for member, data in members:
            size = data if isinstance(data, int) else len(data)
            crc = _crc32_of_zeros(size) if isinstance(data, int) else zlib.crc32(data)
            offset, raw_name = f.tell(), member.encode()
            pad = -(offset + 30 + len(raw_name) + 4) % 64          # data 64-byte aligned, as torch.save does
            extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, size, size,
                                len(raw_name), len(extra)) + raw_name + extra)
            if isinstance(data, int):
                f.seek(size, 1)                                   # a hole
                if zeros:
                    f.seek(-size, 1)
                    f.write(bytes(size))
            else:
                f.write(data)
            central.append((raw_name, crc, size, offset))
        _write_central_directory(f, central)


def _write_central_directory(f, central: list) -> None:
    start = f.tell()
    for raw_name, crc, size, offset in central:
        extra = struct.pack("<HHQ", 1, 8, offset) if offset >= 0xFFFFFFFF else b""
        f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, size, size,
                            len(raw_name), len(extra), 0, 0, 0, 0, min(offset, 0xFFFFFFFF)) + raw_name + extra)
    end = f.tell()
    n, size = len(central), end - start
    f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, size, start))   # zip64 end record
    f.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))                                     # its locator
    f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, size, min(start, 0xFFFFFFFF), 0))


@functools.lru_cache(maxsize=None)
def _crc32_of_zeros(n: int) -> int:
    """zlib.crc32(bytes(n)) in about 32 steps: crc32 continued over zero bytes is affine in the running
    value, so the map for 2m bytes is the map for m bytes applied twice (square and multiply)."""
    def table(run):             # an affine map on 32-bit values, kept as its value at 0 and at each bit
        return [run(0)] + [run(1 << b) for b in range(32)]

    def apply(t, value):
        out = t[0]
        for b in range(32):
            if value >> b & 1:
                out ^= t[b + 1] ^ t[0]
        return out

    step, result = table(lambda c: zlib.crc32(b"\0", c)), table(lambda c: c)
    while n:
        if n & 1:
            result = table(lambda c, r=result, s=step: apply(s, apply(r, c)))
        step = table(lambda c, s=step: apply(s, apply(s, c)))
        n >>= 1
    return apply(result, 0)
