"""The published checkpoint layouts: which one a folder holds, its config, its weight files in order.

Layouts, recognised from the folder's contents (`detect_layout`); other files such as
tokenizer.model, README.md or generation_config.json are ignored:

    "hf"           config.json + model.safetensors
    "hf-sharded"   config.json + model.safetensors.index.json + model-000NN-of-000MM.safetensors
    "mistral"      params.json + consolidated.safetensors      (interleaved RoPE q/k rows)
    "mistral-pt"   params.json + consolidated.00.pt ... (or .pth): the original release, experts
                   fused per layer. Each file holds whole tensors (transformers' converter merges
                   the files' dicts, it does not concatenate slices); read by pt_header.py, which
                   unpickles nothing but tensor records and maps one tensor at a time.

An index must name shards that exist and hold exactly the tensors it promises, each a plain file
name inside the folder; config and index files are read only if they are small regular files.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from ..config import MixtralConfig, read_json_file
from .errors import CheckpointError
from .safetensors_reader import ST_DTYPES, SafetensorsFile, safetensors_tensors

PathLike = Union[str, os.PathLike]
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
MISTRAL_SAFETENSORS = "consolidated.safetensors"
PT_FILE = re.compile(r"consolidated\.(\d+)\.pth?$")
MAX_INDEX_BYTES = 64 << 20        # the index of a 100 GB checkpoint is about 100 KB
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # what a checkpoint's weights may be stored in
LAYOUT_NAMES = {"hf-sharded": "Hugging Face (sharded)", "hf": "Hugging Face", "mistral": "Mistral",
                "mistral-pt": "Mistral .pt"}


def detect_layout(path: PathLike) -> str:
    """"hf-sharded", "hf", "mistral" or "mistral-pt", from the files in folder `path`.

    Files that are not weights (tokenizer.model, README.md, generation_config.json, ...) are ignored.
    Raises CheckpointError when the folder is missing, has no weights, or lacks the config its
    weights need (config.json for Hugging Face, params.json for Mistral).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    names = {p.name for p in folder.iterdir()}
    if HF_INDEX in names and HF_SINGLE in names:
        raise CheckpointError(f"{folder}: holds both {HF_SINGLE} and {HF_INDEX} (two different checkpoints?); "
                              "remove the one that is not wanted")
    if HF_INDEX in names:
        layout, config = "hf-sharded", "config.json"
    elif HF_SINGLE in names:
        layout, config = "hf", "config.json"
    elif MISTRAL_SAFETENSORS in names:
        layout, config = "mistral", "params.json"
    elif any(PT_FILE.match(n) for n in names):
        layout, config = "mistral-pt", "params.json"
    else:
        raise CheckpointError(
            f"{folder}: no weights found (expected {HF_INDEX}, {HF_SINGLE}, {MISTRAL_SAFETENSORS} or "
            f"consolidated.00.pt ...); the folder holds {sorted(names) or 'nothing'}")
    if config not in names:
        raise CheckpointError(f"{folder}: the {layout} layout needs {config}, which is missing")
    others = [f for f in (MISTRAL_SAFETENSORS, "consolidated.00.pt", "consolidated.00.pth")
              if f in names and not layout.startswith("mistral")]
    if layout == "mistral" and any(PT_FILE.match(n) for n in names):
        others = ["consolidated.00.pt ..."]
    if others:   # published downloads ship both; the choice must not be silent
        warnings.warn(f"{folder}: holds weights in more than one layout; loading the {layout} layout, "
                      f"ignoring {', '.join(others)}", stacklevel=3)
    return layout


def read_config(path: PathLike, layout: Optional[str] = None) -> MixtralConfig:
    """The architecture of the checkpoint in folder `path` (config.json or params.json by layout);
    `layout` when the caller has detected it already (so its warnings are not given twice)."""
    folder = Path(path)
    layout = layout or detect_layout(folder)
    try:
        if layout.startswith("hf"):
            return MixtralConfig.from_hf_config(folder / "config.json")
        return MixtralConfig.from_params_json(folder / "params.json")
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from None


def pt_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one original-release .pt/.pth file, in file order, nothing unpickled but tensor
    records (pt_header.py). Each tensor maps only its own bytes and is unmapped once the caller lets go
    of it, so the 93 GB single-file release stays about one tensor resident, on any host.
    """
    from .pt_header import pt_file_tensors

    if not file.is_file():
        raise CheckpointError(f"{file}: not a regular file")
    yield from pt_file_tensors(file)


def hf_shards(folder: Path) -> list[tuple[Path, Optional[list[str]]]]:
    """(shard file, keys the index assigns to it) for a sharded HF folder, all shards checked to exist."""
    index_file = folder / HF_INDEX
    try:
        index = read_json_file(index_file, MAX_INDEX_BYTES)
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(f"not a valid index: {err}") from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: not a valid index (weight_map must be an object of "
                              f"tensor name -> shard file name)")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_file}: tensor {key}: the shard must be a file name, got {shard!r}")
        # A shard is a file of this folder: no directories, no "..", no absolute paths.
        if (not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard
                or os.path.isabs(shard) or Path(shard).name != shard):
            raise CheckpointError(f"{index_file}: tensor {key}: shard {shard!r} is not a file name inside "
                                  "the checkpoint folder")
        by_shard.setdefault(shard, []).append(key)
    missing = [s for s in by_shard if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_file}: names shard(s) {sorted(missing)} that are not in the folder "
                              f"(e.g. tensor {by_shard[missing[0]][0]} lives in {missing[0]})")
    # Check every shard's header against the index before loading anything: no partial loads.
    headers = {s: _header_keys(folder / s) for s in by_shard}
    for shard, keys in sorted(by_shard.items()):
        absent = [k for k in keys if k not in headers[shard]]
        if absent:
            raise CheckpointError(f"{folder / shard}: the index says this shard holds tensor {absent[0]}"
                                  f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}, but it does not")
    for shard, keys in sorted(by_shard.items()):
        extra = sorted(headers[shard] - set(keys))
        if extra:
            raise CheckpointError(f"{folder / shard}: holds tensor {extra[0]} that the index does not list")
    return [(folder / s, by_shard[s]) for s in sorted(by_shard)]


def _header_keys(file: Path) -> set[str]:
    with SafetensorsFile(file) as st:
        return set(st.keys())


def weight_files(folder: Path, layout: str) -> tuple[list[Path], Callable[[Path], Iterator[tuple[str, torch.Tensor]]]]:
    """The layout's weight files in loading order, and the function that streams one file's tensors."""
    if layout == "hf-sharded":
        shards = dict(hf_shards(folder))
        return list(shards), lambda f: safetensors_tensors(f, shards[f])
    if layout == "hf":
        return [folder / HF_SINGLE], safetensors_tensors
    if layout == "mistral":
        return [folder / MISTRAL_SAFETENSORS], safetensors_tensors
    files = sorted((p for p in folder.iterdir() if PT_FILE.match(p.name)),
                   key=lambda p: int(PT_FILE.match(p.name).group(1)))
    return files, pt_tensors


def checkpoint_dtype(folder: Path, layout: str, files: list[Path]) -> torch.dtype:
    """The dtype the checkpoint stores its float weights in (config.json's dtype, else the first float tensor's)."""
    if layout.startswith("hf"):
        data = read_json_file(folder / "config.json")
        name = data.get("dtype") or data.get("torch_dtype")
        if isinstance(name, str) and getattr(torch, name, None) in FLOAT_DTYPES:
            return getattr(torch, name)
    if layout == "mistral-pt":
        for file in files:
            for _key, tensor in pt_tensors(file):
                if tensor.is_floating_point():
                    return tensor.dtype
    else:
        with SafetensorsFile(files[0]) as st:
            for info in st.header.values():
                if ST_DTYPES.get(info["dtype"]) in FLOAT_DTYPES:
                    return ST_DTYPES[info["dtype"]]
    return torch.float32
