"""Load and save Mixtral checkpoints in every published layout, one tensor at a time.

Layouts, recognised from the folder's contents (`detect_layout`); other files such as
tokenizer.model, README.md or generation_config.json are ignored:

    "hf"           config.json + model.safetensors
    "hf-sharded"   config.json + model.safetensors.index.json + model-000NN-of-000MM.safetensors
    "mistral"      params.json + consolidated.safetensors      (interleaved RoPE q/k rows)
    "mistral-pt"   params.json + consolidated.00.pt ... (or .pth): the original release, experts
                   fused per layer. Each file holds whole tensors (transformers' converter merges
                   the files' dicts, it does not concatenate slices); read only with
                   torch.load(weights_only=True, mmap=True), so nothing but tensors is unpickled.

Loading never holds two copies of the model. The model is built on the "meta" device (no memory),
then given uninitialised storage in the target dtype on the target device; each tensor is read
from the memory-mapped file (`SafetensorsFile`), converted (names, q/k permutation, fused experts;
see convert.py), copied into place, and its file pages released. Peak host memory is the final
model plus one tensor (plus one .pt file for the original release, 1/8 of the model).

Everything is checked: each key must be known and fill a parameter exactly once, with the shape the
config implies; every parameter must be filled; an index must name shards that exist and hold
exactly the tensors it promises, each a plain file name inside the folder; a safetensors file is
accepted only if the official `safetensors` reader would accept it (tests/test_fuzz_safetensors.py
checks that on generated damaged files); weights holding NaN or infinity are refused by name unless
`allow_non_finite=True`. Config and index files are read only if they are small regular files.
Problems raise CheckpointError naming the file and the tensor. Before loading, `memory_plan` compares
the weights' size (plus the RoPE tables) with the free memory of the device and refuses
(InsufficientMemoryError) unless told to go ahead.

`save_model` writes the Hugging Face layout that transformers' from_pretrained reads; `save_mistral`
writes Mistral's two layouts (used by the tests and the notebook). Both are atomic: the files are
written into a hidden folder inside the target and flushed, then renamed into place, so a failure
at any point leaves the old checkpoint loadable (this needs room for both on the disk). Of the files
already there, a save replaces only those of its own layout (see `_stale_files`), and it replaces a
symlink rather than writing through it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..config import MixtralConfig, read_json_file
from .convert import hf_to_mistral_state_dict, hf_to_original_state_dict, mistral_to_hf_tensors
from .keys import hf_to_ours_key, ours_to_hf_key, split_fused_experts, to_hf_state_dict
from ..model.mixtral import Mixtral
from ..params import count_parameters, memory_footprint
from ..model.rope import RotaryEmbedding

PathLike = Union[str, os.PathLike]
MIXTRAL_VOCAB_SIZE = 32000
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
MISTRAL_SAFETENSORS = "consolidated.safetensors"
_PT_FILE = re.compile(r"consolidated\.(\d+)\.pth?$")
_MAX_INDEX_BYTES = 64 << 20        # the index of a 100 GB checkpoint is about 100 KB
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


_LAYOUT_NAMES = {"hf-sharded": "Hugging Face (sharded)", "hf": "Hugging Face", "mistral": "Mistral",
                 "mistral-pt": "Mistral .pt"}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it stands (the message says where)."""


class InsufficientMemoryError(MemoryError):
    """The model would not fit in the free memory of the target device (see `memory_plan`)."""


# ============================================================================= layout
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
    elif any(_PT_FILE.match(n) for n in names):
        layout, config = "mistral-pt", "params.json"
    else:
        raise CheckpointError(
            f"{folder}: no weights found (expected {HF_INDEX}, {HF_SINGLE}, {MISTRAL_SAFETENSORS} or "
            f"consolidated.00.pt ...); the folder holds {sorted(names) or 'nothing'}")
    if config not in names:
        raise CheckpointError(f"{folder}: the {layout} layout needs {config}, which is missing")
    others = [f for f in (MISTRAL_SAFETENSORS, "consolidated.00.pt", "consolidated.00.pth")
              if f in names and not layout.startswith("mistral")]
    if layout == "mistral" and any(_PT_FILE.match(n) for n in names):
        others = ["consolidated.00.pt ..."]
    if others:   # published downloads ship both; the choice must not be silent
        warnings.warn(f"{folder}: holds weights in more than one layout; loading the {layout} layout, "
                      f"ignoring {', '.join(others)}", stacklevel=3)
    return layout


def read_config(path: PathLike) -> MixtralConfig:
    """The architecture of the checkpoint in folder `path` (config.json or params.json by layout)."""
    folder = Path(path)
    layout = detect_layout(folder)
    try:
        if layout.startswith("hf"):
            return MixtralConfig.from_hf_config(folder / "config.json")
        return MixtralConfig.from_params_json(folder / "params.json")
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from None


# ============================================================================= memory plan
def available_memory(device: Union[str, torch.device]) -> Optional[int]:
    """Free bytes on `device`: MemAvailable for "cpu", torch.cuda.mem_get_info for CUDA, else None."""
    device = torch.device(device)
    if device.type == "cpu":
        import psutil
        return int(psutil.virtual_memory().available)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def memory_plan(cfg: MixtralConfig, dtype: torch.dtype, device: Union[str, torch.device] = "cpu") -> dict:
    """What loading needs against what `device` has: {"needed_bytes", "available_bytes", "fits"}.

    needed_bytes is the weights in `dtype` (params.memory_footprint with no KV cache) plus the RoPE cos/sin
    tables `[max_position_embeddings, head_dim]` the model builds (`rope_table_bytes`); the file is
    memory-mapped and streamed, so nothing else of the model's size is held. available_bytes is
    None (and fits True) for devices that cannot be asked (e.g. "meta").
    """
    needed = memory_footprint(cfg, dtype, context_len=0)["weights_bytes"] + rope_table_bytes(cfg, dtype)
    available = available_memory(device)
    return {"needed_bytes": needed, "available_bytes": available,
            "fits": available is None or needed <= available}


def rope_table_bytes(cfg: MixtralConfig, dtype: torch.dtype) -> int:
    """Bytes of the cos and sin tables, each `[max_position_embeddings, head_dim]` in `dtype`."""
    return 2 * cfg.max_position_embeddings * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def _refusal(plan: dict, dtype: torch.dtype, device) -> str:
    gib = 2 ** 30
    return (
        f"loading needs {plan['needed_bytes'] / gib:.2f} GiB of weights (and RoPE tables) in {dtype} on {device}, but only "
        f"{plan['available_bytes'] / gib:.2f} GiB is free. Ways out: load in int8 (about half of bf16), "
        "offload experts to CPU memory and bring them in on demand, spread the layers over more GPUs "
        "(placement.plan_placement and load_placed choose and do these), or use a smaller dtype (bf16 "
        "instead of float32). To try anyway: ignore_memory_check=True in Python, --ignore-memory-check "
        "on the mixtral-edu command line."
    )


# ============================================================================= reading tensors
# Every dtype name the official reader knows, with its size in bits; the torch dtype where torch has one.
_ST_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
            "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
            "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
                     ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F4", "float4_e2m1fn_x2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_USIZE_MAX = 2 ** 64 - 1
_MAX_HEADER = 100_000_000          # the official reader's limit
_MAX_JSON_DEPTH = 127              # serde_json's recursion limit, as the official reader applies it
_INFO_FIELDS = ("dtype", "shape", "data_offsets")


class _Obj(dict):
    """A parsed JSON object that remembers which of its keys were repeated (json keeps the last one)."""
    repeated: frozenset = frozenset()


def _json_object(pairs):
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        obj.repeated = frozenset(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _json_int(literal: str):
    """serde_json (the official reader's parser) reads `-0` as the float -0.0, so it is no usize there either."""
    return -0.0 if literal == "-0" else int(literal)


def _json_depth(value, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counting stops once `limit` is passed."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _is_usize(value) -> bool:
    return type(value) is int and 0 <= value <= _USIZE_MAX


def _parse_header(path: Path, raw: bytes) -> tuple[dict, dict]:
    """The JSON header's (tensors {key: (dtype, shape, (begin, end))}, metadata), checked as the official
    reader checks it: UTF-8, JSON without NaN, integers that fit in 64 bits, strings without lone
    surrogates, metadata of strings, no repeated field inside an entry, depth at most 127."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header ({why})")

    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_json_object, parse_constant=_no_constant,
                            parse_int=_json_int)
    except UnicodeDecodeError as err:
        raise bad(f"not UTF-8: {err.reason} at byte {err.start}") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except ValueError as err:           # JSONDecodeError, NaN, or an integer too long to parse
        raise bad(str(err)) from None
    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    if _json_depth(header, _MAX_JSON_DEPTH) > _MAX_JSON_DEPTH:
        raise bad("JSON nested too deeply")
    try:
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad("a string holds an unpaired UTF-16 surrogate escape") from None
    if "__metadata__" in header.repeated:
        raise bad("__metadata__ appears twice")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    tensors = {}
    for key, info in header.items():
        if isinstance(info, list) and len(info) == 3:       # serde also reads a struct from a 3-element array
            info = dict(zip(_INFO_FIELDS, info))
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: tensor {key}: corrupt header entry {info!r}")
        twice = [f for f in _INFO_FIELDS if f in getattr(info, "repeated", ())]
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (twice or not isinstance(dtype, str) or dtype not in _ST_BITS or not isinstance(shape, list) or not all(map(_is_usize, shape))
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_usize, offsets))):
            raise CheckpointError(f"{path}: tensor {key}: corrupt header entry {dict(info)!r}"[:400])
        tensors[key] = (dtype, shape, (offsets[0], offsets[1]))
    return tensors, metadata


def _check_layout(path: Path, tensors: dict, data_start: int, size: int) -> None:
    """The tensors' bytes must tile the data exactly: sorted by offsets, each begins where the previous one
    ended, holds exactly shape x dtype bytes, and the last one ends at the end of the file."""
    end_of_previous = 0
    for key, (dtype, shape, (begin, end)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if begin != end_of_previous or end < begin:
            raise CheckpointError(f"{path}: tensor {key}: data_offsets {[begin, end]} overlap another tensor or "
                                  f"leave a gap (expected it to begin at byte {end_of_previous})")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * _ST_BITS[dtype]
        if numel > _USIZE_MAX or bits > _USIZE_MAX:
            raise CheckpointError(f"{path}: tensor {key}: shape {shape} is too large")
        if bits % 8:
            raise CheckpointError(f"{path}: tensor {key}: shape {shape} of {dtype} is not a whole number of bytes")
        if end - begin != bits // 8:
            raise CheckpointError(f"{path}: tensor {key}: data_offsets {[begin, end]} disagree with "
                                  f"shape {shape} of {dtype}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {key} ends at byte {data_start + end}, "
                                  f"the file has {size}")
        end_of_previous = end
    data_size = size - data_start
    if end_of_previous != data_size:
        raise CheckpointError(f"{path}: {data_size - end_of_previous} trailing byte(s) after the last tensor "
                              "(the data must end where the last tensor ends)")


class SafetensorsFile:
    """A safetensors file, memory-mapped, accepted only if the official `safetensors` reader accepts it.

    The format: 8 bytes little-endian N, then N bytes of JSON `{key: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the tensors' bytes (offsets count
    from the end of the header). Checked before anything is mapped: the header is strict JSON; shapes
    and offsets are integers; the tensors' byte ranges tile the data exactly (no overlap, so two keys
    never share bytes; no gap; no trailing bytes). `tensor(key)` is a zero-copy view of the mapped
    bytes; `release(key)` tells the kernel those pages are no longer needed, so a load never keeps the
    file resident beside the model it fills. Use as a context manager (or call close()).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._file = self._mm = None
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found" if not self.path.exists()
                                  else f"{self.path}: not a regular file")
        f = open(self.path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated or not safetensors ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated or not safetensors (header of {n} bytes "
                                      f"does not fit in a {size}-byte file)")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{self.path}: not safetensors (a header of {n} bytes; the format allows "
                                      f"{_MAX_HEADER})")
            tensors, self.metadata = _parse_header(self.path, f.read(n))
            _check_layout(self.path, tensors, 8 + n, size)
        except BaseException:
            f.close()
            raise
        self.header: dict[str, dict] = {k: {"dtype": d, "shape": s, "data_offsets": list(o)}
                                        for k, (d, s, o) in tensors.items()}
        self._data_start = 8 + n
        self._file = f
        # ACCESS_COPY: writable (torch.frombuffer wants that) but private, so the file is never changed.
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self.header)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key`, a view of the mapped file (delete it before close())."""
        info = self.header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key}: dtype {info['dtype']} has no torch equivalent here")
        shape = info["shape"]
        if info["dtype"] == "F4":       # torch packs two 4-bit values per element, along the last dimension
            if not shape or shape[-1] % 2:
                raise CheckpointError(f"{self.path}: tensor {key}: F4 shape {shape} does not pack into bytes")
            shape = [*shape[:-1], shape[-1] // 2]
        begin, end = info["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._data_start + begin)
        return flat.reshape(shape)

    def release(self, key: str) -> None:
        """Drop the pages of tensor `key` from this process's memory (they stay in the page cache)."""
        begin, end = self.header[key]["data_offsets"]
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        stop = min(self._data_start + end, len(self._mm)) if self._mm is not None else 0
        if stop > start and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        if self._file is None:
            return
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:   # a tensor view is still alive (e.g. in a traceback); it unmaps when freed
                pass
            self._mm = None
        self._file.close()
        self._file = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _safetensors_tensors(file: Path, keys: Optional[list[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one safetensors file (only `keys`, if given), one at a time, each released after use."""
    with SafetensorsFile(file) as st:
        for key in (keys if keys is not None else sorted(st.keys())):
            tensor = st.tensor(key)
            yield key, tensor
            del tensor              # the view must go before its pages are released and the map closed
            st.release(key)


def _pt_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one original-release .pt file, memory-mapped, tensors only (no arbitrary unpickling).

    The file's mapping lives until its last tensor is used: peak memory is the model plus one file.
    """
    if not file.is_file():
        raise CheckpointError(f"{file}: not a regular file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{file}: not a readable weights-only torch file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    if not all(isinstance(k, str) for k in state):
        bad = next(k for k in state if not isinstance(k, str))
        raise CheckpointError(f"{file}: key {bad!r} is a {type(bad).__name__}, not a tensor name")
    for key in sorted(state):
        value = state.pop(key)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {key} is a {type(value).__name__}, not a tensor")
        yield key, value


def _hf_shards(folder: Path) -> list[tuple[Path, Optional[list[str]]]]:
    """(shard file, keys the index assigns to it) for a sharded HF folder, all shards checked to exist."""
    index_file = folder / HF_INDEX
    try:
        index = read_json_file(index_file, _MAX_INDEX_BYTES)
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


def _weight_files(folder: Path, layout: str) -> tuple[list[Path], Callable[[Path], Iterator[tuple[str, torch.Tensor]]]]:
    """The layout's weight files in loading order, and the function that streams one file's tensors."""
    if layout == "hf-sharded":
        shards = dict(_hf_shards(folder))
        return list(shards), lambda f: _safetensors_tensors(f, shards[f])
    if layout == "hf":
        return [folder / HF_SINGLE], _safetensors_tensors
    if layout == "mistral":
        return [folder / MISTRAL_SAFETENSORS], _safetensors_tensors
    files = sorted((p for p in folder.iterdir() if _PT_FILE.match(p.name)),
                   key=lambda p: int(_PT_FILE.match(p.name).group(1)))
    return files, _pt_tensors


def _checkpoint_dtype(folder: Path, layout: str, files: list[Path]) -> torch.dtype:
    """The dtype the checkpoint stores its float weights in (config.json's dtype, else the first float tensor's)."""
    if layout.startswith("hf"):
        data = read_json_file(folder / "config.json")
        name = data.get("dtype") or data.get("torch_dtype")
        if isinstance(name, str) and name in _DTYPES:
            return _DTYPES[name]
    if layout == "mistral-pt":
        for file in files:
            for _key, tensor in _pt_tensors(file):
                if tensor.is_floating_point():
                    return tensor.dtype
    else:
        with SafetensorsFile(files[0]) as st:
            for info in st.header.values():
                if info["dtype"] in _DTYPES:
                    return _DTYPES[info["dtype"]]
    return torch.float32


# ============================================================================= load
def _empty_model(cfg: MixtralConfig, devices: list[torch.device], dtype: torch.dtype) -> Mixtral:
    """A Mixtral with uninitialised weights of `dtype`, never materialised anywhere but their device.

    devices: one device per decoder layer; the embeddings go with the first layer, the final norm
    and lm_head with the last (as `layer_split.split_by_layers` places them).
    """
    with torch.device("meta"):
        model = Mixtral(cfg).to(dtype=dtype)
    model.embed_tokens.to_empty(device=devices[0])
    for layer, device in zip(model.layers, devices):
        layer.to_empty(device=device)
    model.norm.to_empty(device=devices[-1])
    model.lm_head.to_empty(device=devices[-1])
    if cfg.tie_word_embeddings:      # to_empty made a new Parameter for each module, undoing the tie
        model.lm_head.weight = model.embed_tokens.weight
    # The cos/sin table is not in the checkpoint: compute it (as Mixtral(cfg).to(device, dtype) has it).
    model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(
        device=devices[0], dtype=dtype)
    return model


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in float tensor `t`. Two reductions, no temporary of t's size (which would
    add to the load's peak memory): min and max are NaN when any value is, infinite when any is."""
    if t.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(t)
    except RuntimeError:            # dtypes without aminmax (float8): the plain way
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _is_stacked_expert(name: str) -> bool:
    """True for a layer's stacked expert weights (`layers.{i}.block_sparse_moe.experts.w1` ...)."""
    return re.search(r"\.experts\.w[123]$", name) is not None


def _bytes_per_device(cfg: MixtralConfig, devices: list[torch.device], dtype: torch.dtype) -> dict[torch.device, int]:
    """Bytes of weights that `_empty_model(cfg, devices, dtype)` puts on each device, from the config alone."""
    counts = count_parameters(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = dict.fromkeys(devices, 0)
    sizes[devices[0]] += counts["embeddings"]
    for device in devices:
        sizes[device] += counts["per_layer"]
    sizes[devices[-1]] += counts["lm_head"] + cfg.hidden_size          # and the final norm
    sizes = {device: n * itemsize for device, n in sizes.items()}
    sizes[devices[0]] += rope_table_bytes(cfg, dtype)
    return sizes


def _to_hf_tensors(layout: str, key: str, tensor: torch.Tensor, cfg: MixtralConfig):
    """Any layout's (key, tensor) -> per-expert HF (key, tensor) pairs."""
    if layout.startswith("mistral"):
        return mistral_to_hf_tensors(key, tensor, cfg)
    return list(split_fused_experts({key: tensor}).items())   # also accepts transformers-5 fused tensors


@torch.no_grad()
def load_model(path: PathLike, device: Union[str, torch.device, Sequence] = "cpu", dtype: Optional[torch.dtype] = None,
               *, progress: bool = True, ignore_memory_check: bool = False,
               layers_per_device: Optional[Sequence[int]] = None,
               on_layer_loaded: Optional[Callable[[int, torch.nn.Module], None]] = None,
               allow_non_finite: bool = False) -> Mixtral:
    """Load the checkpoint in folder `path` (any layout, see `detect_layout`) as a Mixtral in eval mode.

    device: where the weights go ("cpu", "cuda", "cuda:1", ...); each tensor is copied there directly.
        A list of devices splits the model by layers (`layer_split.split_by_layers`): each layer's
        tensors are copied straight to their own device, `layers_per_device[i]` consecutive layers
        on `device[i]` (default: as even as possible), so no device ever holds the whole model.
    dtype: the weights' dtype; None keeps the checkpoint's (config.json's `dtype`, else the tensors').
    progress: a tqdm bar over the tensors (on stderr).
    ignore_memory_check: load even when `memory_plan` says the weights will not fit.
    on_layer_loaded: called as `on_layer_loaded(i, model.layers[i])` as soon as every tensor of
        decoder layer i is in place (e.g. to quantise it and move it to a GPU); the loader then
        holds no reference to that layer's old weights, so CPU pages it released are not needed
        again: the host holds a few layers at a time, not the whole model.
    allow_non_finite: load weights holding NaN or infinity (after conversion to `dtype`); by default
        such a tensor is refused by name, since a model with them only ever predicts NaN.
    Raises CheckpointError (file and tensor named) for anything wrong with the files, and
    InsufficientMemoryError when the weights would not fit.
    """
    from tqdm.auto import tqdm

    folder = Path(path)
    layout = detect_layout(folder)
    cfg = read_config(folder)
    files, tensors_of = _weight_files(folder, layout)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    dtype = dtype or _checkpoint_dtype(folder, layout, files)
    split = isinstance(device, (list, tuple))
    if split:
        from ..inference.split import layer_devices
        devices = layer_devices(cfg.num_hidden_layers, device, layers_per_device)
    else:
        devices = [torch.device(device)] * cfg.num_hidden_layers
        plan = memory_plan(cfg, dtype, devices[0])
        if not plan["fits"] and not ignore_memory_check:
            raise InsufficientMemoryError(_refusal(plan, dtype, devices[0]))
    if split and not ignore_memory_check:       # each device must hold its own share
        for dev, needed in _bytes_per_device(cfg, devices, dtype).items():
            available = available_memory(dev)
            if available is not None and needed > available:
                raise InsufficientMemoryError(_refusal(
                    {"needed_bytes": needed, "available_bytes": available, "fits": False}, dtype, dev))

    model = _empty_model(cfg, devices, dtype)   # meta -> empty storage only: nothing is allocated twice
    params = dict(model.named_parameters())
    # tensors still to come per decoder layer (a stacked expert parameter counts once per expert)
    pending = [0] * cfg.num_hidden_layers
    for name, param in params.items():
        if name.startswith("layers."):
            pending[int(name.split(".")[1])] += param.shape[0] if _is_stacked_expert(name) else 1
    config_name = "config.json" if layout.startswith("hf") else "params.json"
    filled: dict[tuple[str, Optional[int]], str] = {}
    tied_lm_head: Optional[tuple[str, torch.Tensor]] = None
    bar = tqdm(total=sum(p.numel() for p in params.values()), unit="param", unit_scale=True,
               desc=f"reading {_LAYOUT_NAMES[layout]} weights", disable=not progress)
    for file in files:
        for key, tensor in tensors_of(file):
            where = f"{file}: tensor {key}"
            try:
                pairs = _to_hf_tensors(layout, key, tensor, cfg)
            except (KeyError, ValueError, RuntimeError) as err:   # RuntimeError: torch refused a reshape
                raise CheckpointError(f"{where}: {err.args[0] if err.args else err}") from None
            for hf_key, t in pairs:
                try:
                    name, expert = hf_to_ours_key(hf_key)
                except KeyError:
                    raise CheckpointError(f"{where}: unexpected key, not a weight of this model") from None
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    tied_lm_head = (where, t.clone())   # checked against embed_tokens once that is loaded
                    continue
                if (name, expert) in filled:
                    raise CheckpointError(f"{where}: {hf_key} was already loaded from {filled[(name, expert)]}")
                param = params.get(name)
                if param is None or (expert is not None and expert >= param.shape[0]):
                    raise CheckpointError(f"{where}: unexpected key, the model in {config_name} has no {hf_key}")
                target = param if expert is None else param[expert]
                if tuple(t.shape) != tuple(target.shape):
                    raise CheckpointError(f"{where}: shape {tuple(t.shape)}, but {config_name} implies "
                                          f"{tuple(target.shape)} for {hf_key}")
                if not t.is_floating_point():
                    raise CheckpointError(f"{where}: dtype {t.dtype} is not a float weight")
                target.copy_(t)                           # converts dtype and moves to the device
                if not allow_non_finite and target.device.type != "meta" and not _all_finite(target):
                    bad = int(target.numel() - torch.isfinite(target).sum())
                    raise CheckpointError(f"{where}: {bad} of {target.numel()} values of {hf_key} are NaN or "
                                          f"infinite in {target.dtype}; pass allow_non_finite=True to load anyway")
                filled[(name, expert)] = file.name
                bar.update(t.numel())
                if name.startswith("layers."):
                    layer = int(name.split(".")[1])
                    pending[layer] -= 1
                    if pending[layer] == 0 and on_layer_loaded is not None:
                        del target, param
                        for done in [n for n in params if n.startswith(f"layers.{layer}.")]:
                            del params[done]              # complete: let the callback free it
                        on_layer_loaded(layer, model.layers[layer])
            del tensor, pairs, t
    bar.close()

    missing = []
    for name, param in params.items():
        experts = range(param.shape[0]) if _is_stacked_expert(name) else [None]
        missing += [ours_to_hf_key(name, j, dense=not cfg.is_moe) for j in experts if (name, j) not in filled]
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model in "
                              f"{config_name} needs (HF names): {missing[:8]}")
    if tied_lm_head is not None:
        where, t = tied_lm_head
        if t.shape != model.embed_tokens.weight.shape or not torch.equal(
                t.to(model.embed_tokens.weight), model.embed_tokens.weight):
            raise CheckpointError(f"{where}: {config_name} ties lm_head to the "
                                  "embeddings, but this tensor differs from them")
    if split:
        from ..inference.split import split_by_layers
        split_by_layers(model, device, layers_per_device)    # the hooks; every tensor is already in place
    return model.eval()


# ============================================================================= save
_OWNER_KEY = "written_by"
_OWNER = "mixtral-edu"
_NUMBERED_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


def _parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5e9 bytes; KB/MB/GB are powers of 10, KiB/MiB/GiB of 2 (as in Hugging Face)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be at least 1 byte, got {size}")
        return size
    if not isinstance(size, str):
        raise ValueError(f"max_shard_size {size!r}: expected bytes (int) or e.g. '500MB', '5GB', '2GiB'")
    m = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes (int) or e.g. '500MB', '5GB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    value = int(float(m.group(1)) * scale[unit])
    if value < 1:
        raise ValueError(f"max_shard_size {size!r} is less than one byte")
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to a NEW file `path` (never through an existing file or link), flushed to disk."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ours(file: Path) -> bool:
    """True when `file` is a safetensors shard or index that an earlier save_model wrote (it says so inside)."""
    try:
        if file.is_symlink() or not file.is_file():
            return False
        if file.name.endswith(".json"):
            data = read_json_file(file, _MAX_INDEX_BYTES)
            return isinstance(data, dict) and isinstance(data.get("metadata"), dict) and \
                data["metadata"].get(_OWNER_KEY) == _OWNER
        with SafetensorsFile(file) as st:
            return st.metadata.get(_OWNER_KEY) == _OWNER
    except (CheckpointError, OSError, ValueError):
        return False


def _index_shards(folder: Path) -> set[str]:
    """Numbered shard names that the folder's current index lists (the checkpoint a save replaces)."""
    try:
        weight_map = read_json_file(folder / HF_INDEX, _MAX_INDEX_BYTES).get("weight_map", {})
        return {s for s in weight_map.values() if isinstance(s, str) and _NUMBERED_SHARD.fullmatch(s)}
    except (OSError, ValueError, AttributeError):
        return set()


def _stale_files(folder: Path, keep: set[str], layout_names: Sequence[str]) -> list[Path]:
    """Files of the checkpoint being replaced that the new one does not overwrite by name.

    `layout_names` (config.json, model.safetensors, the index) define the layout, so a save of that
    layout owns them. A numbered shard `model-000NN-of-000MM.safetensors` goes only if an earlier save of
    ours wrote it or the index being replaced lists it; anything else (a user's own
    `model-final-of-run3.safetensors`, tokenizer files, notes) stays.
    """
    listed = _index_shards(folder)
    stale = []
    for entry in folder.iterdir():
        if entry.name in keep or not (entry.is_file() or entry.is_symlink()):
            continue
        if entry.name in layout_names or (_NUMBERED_SHARD.fullmatch(entry.name)
                                          and (entry.name in listed or _ours(entry))):
            stale.append(entry)
    return stale


def _commit(folder: Path, staging: Path, names: list[str], stale: list[Path]) -> None:
    """Move the finished files in `staging` into `folder`, replacing the old checkpoint's files.

    Every new file is complete and on disk before this starts. The old files are first moved aside
    (renames, no copying), then the new ones moved in; if anything fails, the old ones are put back.
    A rename replaces a symlink itself, never the file it points to. Should the process die in the
    middle, both checkpoints are still complete on disk (the new one in `staging`, the old one in
    the `.mixtral-edu-old-*` folder beside it).
    """
    import tempfile

    backup = Path(tempfile.mkdtemp(prefix=".mixtral-edu-old-", dir=folder))
    moved_aside: list[tuple[Path, Path]] = []
    moved_in: list[Path] = []
    try:
        for old in [*(folder / n for n in names if (folder / n).is_file() or (folder / n).is_symlink()), *stale]:
            aside = backup / old.name
            os.replace(old, aside)
            moved_aside.append((old, aside))
        for name in names:
            os.replace(staging / name, folder / name)
            moved_in.append(folder / name)
        _fsync(folder)
    except BaseException:
        for new in moved_in:
            os.replace(new, staging / new.name)
        for old, aside in reversed(moved_aside):
            os.replace(aside, old)
        os.rmdir(backup)
        raise
    import shutil
    shutil.rmtree(backup, ignore_errors=True)


def _staged_save(folder: Path, write: Callable[[Path], list[str]], layout_names: Sequence[str]) -> list[str]:
    """Run `write(staging_folder) -> names` in a fresh hidden folder inside `folder`, then `_commit`.

    A failure while writing (a full disk, an interrupt) removes the staging folder and leaves the old
    checkpoint exactly as it was.
    """
    import shutil
    import tempfile

    if folder.is_symlink() and not folder.exists():
        raise CheckpointError(f"{folder}: a symlink to a folder that does not exist")
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mixtral-edu-save-", dir=folder))
    try:
        names = write(staging)
        for name in names:
            _fsync(staging / name)
        _commit(folder, staging, names, _stale_files(folder, set(names), layout_names))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


@torch.no_grad()
def save_model(model: Mixtral, path: PathLike, max_shard_size: Union[int, str] = "5GB",
               progress: bool = False) -> list[str]:
    """Write `model` in the Hugging Face layout that transformers' from_pretrained reads.

    Files: config.json (with the weights' dtype), and model.safetensors when everything fits in one
    shard of `max_shard_size` bytes (int, or '500MB', '5GB', '2GiB'), else
    model-000NN-of-000MM.safetensors shards plus model.safetensors.index.json. Keys are per expert
    (`...experts.{j}.w1.weight`), tensors in the model's dtype; only one shard is copied at a time.

    Atomic: everything is written into a hidden folder inside `path` and flushed to disk, then moved
    into place by renames (see `_commit`), so a full disk or a crash mid-save leaves the old checkpoint
    loadable. Of the files already there it replaces only config.json, model.safetensors, the index
    and numbered shards an earlier save of ours (or the replaced index) accounts for; symlinks are
    replaced, never written through. Returns the names of the files written.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(path)
    limit = _parse_size(max_shard_size)
    state = to_hf_state_dict(model)                           # views into the model, no copy
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    dtype = model.embed_tokens.weight.dtype
    config = model.config.to_hf_config()
    config["dtype"] = _dtype_name(dtype)
    n = len(shards)
    names = [HF_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def write(staging: Path) -> list[str]:
        weight_map = {}
        for name, keys in tqdm(list(zip(names, shards)), desc="saving shards", disable=not progress):
            # safetensors refuses tensors that share memory (w1[0], w1[1] are views of one parameter): copy this shard only.
            save_file({k: state[k].detach().to("cpu").contiguous().clone() for k in keys}, str(staging / name),
                      metadata={"format": "pt", _OWNER_KEY: _OWNER})
            weight_map.update({k: name for k in keys})
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            _write_json(staging / HF_INDEX, {"metadata": {"total_size": total, _OWNER_KEY: _OWNER},
                                             "weight_map": weight_map})
        _write_json(staging / "config.json", config)
        return [*names, *([HF_INDEX] if n > 1 else []), "config.json", *_tokenizer_files(staging, model.config)]

    written = _staged_save(folder, write, ("config.json", HF_SINGLE, HF_INDEX))
    return ["config.json", *names] + ([HF_INDEX] if n > 1 else []) + [w for w in written if w in TOKENIZER_FILES]


def _tokenizer_files(staging: Path, cfg: MixtralConfig) -> list[str]:
    """tokenizer.model, tokenizer_config.json (chat template, BOS/EOS) and generation_config.json, so that
    transformers, llama.cpp's converter and other tools read the save as a Mixtral checkpoint (hf_files.py).
    Only for Mixtral's 32000-piece vocabulary; skipped, with a warning, when the tokenizer file is absent."""
    if cfg.vocab_size != MIXTRAL_VOCAB_SIZE:
        return []
    from .hf_files import write_tokenizer_files

    try:
        return write_tokenizer_files(staging, model_max_length=cfg.max_position_embeddings)
    except FileNotFoundError as err:
        warnings.warn(f"saved without tokenizer files: {err}", stacklevel=4)
        return []


@torch.no_grad()
def save_mistral(model: Mixtral, path: PathLike, layout: str = "mistral", num_files: int = 8) -> list[str]:
    """Write `model` in one of Mistral's layouts (for tests and the notebook; it converts in memory).

    layout "mistral": params.json + consolidated.safetensors (per-expert keys, interleaved q/k rows).
    layout "mistral-pt": params.json + consolidated.00.pt ... as in the original release: experts
    fused per layer, whole layers spread over `num_files` files (embeddings in the first, the final
    norm and output in the last). Returns the names of the files written.
    """
    from safetensors.torch import save_file

    cfg = model.config
    folder = Path(path)
    if layout not in ("mistral", "mistral-pt"):
        raise ValueError(f"layout must be 'mistral' or 'mistral-pt', got {layout!r}")
    params = cfg.to_params_json()
    if cfg.max_position_embeddings != 32768:          # from_params_json's default, Mixtral's context
        params["max_seq_len"] = cfg.max_position_embeddings
    hf_state = to_hf_state_dict(model)
    if cfg.tie_word_embeddings:                       # params.json cannot say "tied": store output explicitly
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]

    def write(staging: Path) -> list[str]:
        _write_json(staging / "params.json", params)
        if layout == "mistral":
            state = {k: v.to("cpu").contiguous().clone() for k, v in hf_to_mistral_state_dict(hf_state, cfg).items()}
            save_file(state, str(staging / MISTRAL_SAFETENSORS), metadata={_OWNER_KEY: _OWNER})
            return ["params.json", MISTRAL_SAFETENSORS]
        state = hf_to_original_state_dict(hf_state, cfg)
        files: list[dict[str, torch.Tensor]] = [{} for _ in range(num_files)]
        for key, tensor in state.items():
            m = re.match(r"layers\.(\d+)\.", key)
            if m:
                index = int(m.group(1)) * num_files // cfg.num_hidden_layers
            else:
                index = 0 if key == "tok_embeddings.weight" else num_files - 1
            files[index][key] = tensor.to("cpu").contiguous().clone()
        names = []
        for i, part in enumerate(files):
            names.append(f"consolidated.{i:02d}.pt")
            torch.save(part, staging / names[-1])
        return ["params.json", *names]

    return _staged_save(folder, write, ("params.json", MISTRAL_SAFETENSORS))
