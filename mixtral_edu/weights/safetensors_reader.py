"""A safetensors reader that accepts exactly what the official reader accepts, one tensor at a time.

A safetensors file is 8 bytes of header length, a JSON header (each tensor's dtype, shape and byte
range) and the raw data. `SafetensorsFile` memory-maps the file, checks the header as strictly as
the official `safetensors` reader does (tests/test_fuzz_safetensors.py compares the two on generated
damaged files) and hands out each tensor as a view of the mapping, whose pages it can release once
the tensor has been copied: reading a checkpoint never holds it in memory twice. Every problem is a
CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..files import NotRegularFile, open_regular as open_file
from .errors import CheckpointError

# Every dtype name the official reader knows, with its size in bits; the torch dtype where torch has one.
_ST_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
            "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
            "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
                     ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F4", "float4_e2m1fn_x2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
_USIZE_MAX = 2 ** 64 - 1
_INT64_MAX = 2 ** 63 - 1
_MAX_HEADER = 100_000_000          # the official reader's limit
_MAX_JSON_DEPTH = 127              # serde_json's recursion limit, as the official reader applies it
_INFO_FIELDS = ("dtype", "shape", "data_offsets")


def open_regular(path: Path):
    """`path` opened for binary reading, refused (CheckpointError) unless it is a regular file; the open cannot
    block and the check is made on what was opened (mixtral_edu.files)."""
    try:
        return open_file(path)
    except NotRegularFile:
        raise CheckpointError(f"{path}: not a regular file") from None
    except OSError as err:
        why = "file not found" if isinstance(err, FileNotFoundError) else f"cannot be opened ({err.strerror})"
        raise CheckpointError(f"{path}: {why}") from None


class _Obj(dict):
    """A parsed JSON object that remembers its repeated keys (json keeps the last value) and their earlier
    values: the official reader deserialises every value of a repeated tensor key, so each must be valid."""
    repeated: frozenset = frozenset()
    earlier: dict = {}


def _json_object(pairs):
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        last = {k: i for i, (k, _) in enumerate(pairs)}
        obj.earlier = {}
        for i, (k, v) in enumerate(pairs):
            if last[k] != i:
                obj.earlier.setdefault(k, []).append(v)
        obj.repeated = frozenset(obj.earlier)
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
        for earlier in header.earlier.get(key, ()):       # a repeated key: its earlier values must be valid too
            _entry(path, key, earlier)
        tensors[key] = _entry(path, key, info)
    return tensors, metadata


def _entry(path: Path, key: str, info) -> tuple[str, list, tuple[int, int]]:
    """One tensor's header entry as (dtype, shape, (begin, end)), checked as serde reads a TensorInfo."""
    if isinstance(info, list) and len(info) == 3:       # serde also reads a struct from a 3-element array
        info = dict(zip(_INFO_FIELDS, info))
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {key}: corrupt header entry {info!r}"[:300])
    twice = [f for f in _INFO_FIELDS if f in getattr(info, "repeated", ())]
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if (twice or not isinstance(dtype, str) or dtype not in _ST_BITS or not isinstance(shape, list)
            or not all(map(_is_usize, shape))
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_usize, offsets))):
        raise CheckpointError(f"{path}: tensor {key}: corrupt header entry {dict(info)!r}"[:300])
    return dtype, shape, (offsets[0], offsets[1])


def _check_layout(path: Path, tensors: dict, data_start: int, size: int) -> None:
    """The tensors' bytes must tile the data exactly: sorted by offsets, each begins where the previous one
    ended, holds exactly shape x dtype bytes, and the last one ends at the end of the file."""
    end_of_previous = 0
    for key, (dtype, shape, (begin, end)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if begin != end_of_previous or end < begin:
            raise CheckpointError(f"{path}: tensor {key}: data_offsets {[begin, end]} overlap another tensor or "
                                  f"leave a gap (expected it to begin at byte {end_of_previous})")
        numel = 1
        for d in shape:              # as the official reader multiplies: overflow at any step refuses
            numel *= d
            if numel > _USIZE_MAX:
                raise CheckpointError(f"{path}: tensor {key}: shape {shape} is too large"[:300])
        bits = numel * _ST_BITS[dtype]
        if bits > _USIZE_MAX or any(d > _INT64_MAX for d in shape):   # torch's sizes are int64
            raise CheckpointError(f"{path}: tensor {key}: shape {shape} is too large"[:300])
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

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = self._mm = None
        f = open_regular(self.path)
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
        dtype = ST_DTYPES.get(info["dtype"])
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


def safetensors_tensors(file: Path, keys: Optional[list[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one safetensors file (only `keys`, if given), one at a time, each released after use."""
    with SafetensorsFile(file) as st:
        for key in (keys if keys is not None else sorted(st.keys())):
            tensor = st.tensor(key)
            yield key, tensor
            del tensor              # the view must go before its pages are released and the map closed
            st.release(key)
