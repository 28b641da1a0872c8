"""A full-size Mixtral-8x7B checkpoint folder that takes no disk space, for tests of checking and planning.

`write_sparse_hf(folder)` writes what `mistralai/Mixtral-8x7B-Instruct-v0.1` ships — config.json,
model.safetensors.index.json and 19 bf16 shards named model-000NN-of-00019.safetensors — where each shard
is a real safetensors header followed by a hole of exactly the length the header implies (a sparse file:
93.4 GB long, no blocks written). Headers, sizes and the index are what a download has, so everything that
reads only those (check_checkpoint, the planner, the memory check) sees the real thing; the weights read
as zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

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
