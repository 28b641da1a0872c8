"""What a PyTorch `.pt` / `.pth` file holds (names, dtypes, shapes, byte extents), read without loading it.

`torch.save` writes a zip archive (uncompressed members):

    NAME/data.pkl        a pickle of the saved dict; each tensor is a call
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                         and each storage a persistent id ('storage', torch.BFloat16Storage, key, location, numel)
    NAME/data/KEY        the bytes of storage KEY, numel * element size of them
    NAME/version, NAME/byteorder, ...

So the shapes live in a pickle of a few hundred KB, while the data (93 GB for Mixtral-8x7B) lives in the
other members. Reading that pickle must not run what it names: a pickle may call any importable function.
`_MetadataUnpickler` resolves only the globals a dict of tensors uses, each to a harmless record of ours,
and refuses any other with the name it found (Python's documented "restricting globals"; the same idea as
`torch.load(weights_only=True)`, without touching the data). The zip's central directory, at the end of
the file, gives each member's length and place, so a truncated download is caught here too.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple, Union

import torch

from .errors import CheckpointError
from .safetensors_reader import open_regular

MAX_PICKLE_BYTES = 64 << 20      # Mixtral's data.pkl is about 100 KB
MAX_DIRECTORY_BYTES = 64 << 20   # the zip's central directory, read whole by zipfile: Mixtral's is about 100 KB
#: torch's storage classes, as the pickle names them -> (dtype name, bytes per element)
STORAGE_TYPES = {
    "BFloat16Storage": ("bfloat16", 2), "HalfStorage": ("float16", 2), "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")          # a zip member's local header, 30 bytes


class StorageType(NamedTuple):
    """Stands for a torch storage class such as `torch.BFloat16Storage` (the pickle names it)."""

    dtype: str
    itemsize: int


class StorageRef(NamedTuple):
    """One storage the pickle refers to: member `data/<key>` of `numel` elements of `dtype`."""

    key: str
    dtype: str
    itemsize: int
    numel: int


class TensorInfo(NamedTuple):
    """One tensor: a view of `storage` (shape, stride, offset in elements)."""

    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def elements_spanned(self) -> int:
        """How far into its storage the view reaches, in elements (0 for an empty tensor)."""
        if any(n == 0 for n in self.shape):
            return 0
        return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


def _rebuild_tensor(storage, offset, shape, stride, *_rest) -> TensorInfo:
    """Stands for torch._utils._rebuild_tensor_v2: records the view, builds nothing."""
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor whose storage is not a persistent storage id")
    ints = (offset, *shape, *stride)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ints) or len(shape) != len(stride):
        raise pickle.UnpicklingError(f"a tensor with offset {offset!r}, size {shape!r}, stride {stride!r}")
    return TensorInfo(storage, offset, tuple(shape), tuple(stride))


def _ordered_dict(*args):
    if args:
        raise pickle.UnpicklingError("an OrderedDict built from arguments")
    return collections.OrderedDict()


_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("collections", "OrderedDict"): _ordered_dict}
_GLOBALS.update({("torch", name): StorageType(*spec) for name, spec in STORAGE_TYPES.items()})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.save dict of tensors into TensorInfo records; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a dict of tensors") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"unexpected storage id {pid!r:.80}")
        return StorageRef(key, kind.dtype, kind.itemsize, numel)


def read_pt_header(path: Union[str, os.PathLike]) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a torch.save'd dict of tensors in `path`, its data unread.

    Checks, from the zip directory and the pickle alone: one data.pkl, every storage a stored
    (uncompressed) member of exactly numel * element size bytes that lies inside the file, every
    tensor inside its storage. Raises CheckpointError naming the file and the problem.
    """
    return _read_header(path)[0]


def _read_header(path) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """(tensors, {storage key: byte offset of its data in the file})."""
    path = Path(path)
    with open_regular(path) as handle:        # never a FIFO or a device, even one swapped in
        return _read_archive(path, handle)


def _read_archive(path: Path, handle) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    try:
        end = zipfile._EndRecData(handle)   # the end record zipfile reads first: size the directory before
    except (AttributeError, OSError):       # zipfile reads it whole (a private helper; skipped if it goes)
        end = None
    if end and end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:
        raise CheckpointError(f"{path}: a zip directory of {end[zipfile._ECD_SIZE]} bytes, more than a torch "
                              f"file of tensors needs ({MAX_DIRECTORY_BYTES})")
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable weights-only torch file (not a zip archive, or truncated: "
                              f"its directory at the end is unreadable: {err}; files from torch < 1.6 are not read)"
                              ) from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in members if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if members[pickles[0]].file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: its data.pkl is {members[pickles[0]].file_size} bytes, more than a "
                                  f"dict of tensors needs ({MAX_PICKLE_BYTES})")
        try:
            raw = archive.read(pickles[0])
            state = _MetadataUnpickler(io.BytesIO(raw)).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable weights-only torch file (its pickle is not a plain "
                                  f"dict of tensors: {err})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(state).__name__}")
        for key, value in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{path}: key {key!r:.60} is a {type(key).__name__}, not a tensor name")
            if not isinstance(value, TensorInfo):
                raise CheckpointError(f"{path}: entry {key:.60} is a {type(value).__name__}, not a tensor")
        if f"{prefix}byteorder" in members and archive.read(f"{prefix}byteorder") != b"little":
            raise CheckpointError(f"{path}: saved on a big-endian machine; only little-endian files are read")
        starts = _check_storages(path, members, prefix, state)
    return dict(state), starts


def _check_storages(path: Path, members: dict, prefix: str, state: dict) -> dict[str, int]:
    seen = {}
    with open_regular(path) as f:
        length = os.fstat(f.fileno()).st_size
        for key, tensor in state.items():
            ref = tensor.storage
            member = members.get(f"{prefix}data/{ref.key}")
            if member is None:
                raise CheckpointError(f"{path}: tensor {key}: its storage data/{ref.key} is not in the archive")
            if member.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: storage data/{ref.key} is compressed; torch stores them as is")
            if member.file_size != ref.numel * ref.itemsize:
                raise CheckpointError(f"{path}: storage data/{ref.key} holds {member.file_size} bytes, the pickle "
                                      f"says {ref.numel} x {ref.itemsize}")
            if tensor.elements_spanned() > ref.numel:
                raise CheckpointError(f"{path}: tensor {key} of shape {list(tensor.shape)} reaches past the end "
                                      f"of its storage data/{ref.key} ({ref.numel} elements)")
            if ref.key not in seen:
                end = _data_end(f, member)
                if end > length:
                    raise CheckpointError(f"{path}: storage data/{ref.key} ends at byte {end}, past the "
                                          f"end of the file ({length} bytes): truncated?")
                seen[ref.key] = end - member.file_size
    return seen


def _data_end(f, member: zipfile.ZipInfo) -> int:
    """The byte just past a member's data: its local header gives the name and padding lengths."""
    f.seek(member.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{f.name}: member {member.filename} has no local header at byte {member.header_offset}")
    fields = _LOCAL_HEADER.unpack(raw)
    name_len, extra_len = fields[-2], fields[-1]
    return member.header_offset + _LOCAL_HEADER.size + name_len + extra_len + member.file_size


def storage_bytes(tensors: dict[str, TensorInfo]) -> int:
    """Bytes of data behind `tensors`: each distinct storage once."""
    refs = {t.storage.key: t.storage for t in tensors.values()}
    return sum(ref.numel * ref.itemsize for ref in refs.values())


def pt_file_tensors(path: Union[str, os.PathLike]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a torch.save'd dict of tensors, one at a time in file order; nothing is
    unpickled beyond `read_pt_header`'s records.

    Each tensor is a read-only memory map of its own storage only, unmapped when the caller lets go of
    it: the pages resident at once stay about one tensor's, even for the 93 GB single-file release,
    and no map of the whole file is asked for (torch.load(mmap=True) asks for one, copy-on-write,
    which a host with less memory than the file may refuse: this 24 GB machine does).
    """
    import mmap

    path = Path(path)
    tensors, starts = _read_header(path)
    page = mmap.ALLOCATIONGRANULARITY
    with open_regular(path) as f:
        for key, info in sorted(tensors.items(), key=lambda kv: (starts[kv[1].storage.key], kv[0])):
            ref = info.storage
            dtype = getattr(torch, ref.dtype)
            start, nbytes = starts[ref.key], ref.numel * ref.itemsize
            if nbytes == 0:
                yield key, torch.empty(info.shape, dtype=dtype)
                continue
            base = start // page * page
            mapped = mmap.mmap(f.fileno(), start - base + nbytes, access=mmap.ACCESS_READ, offset=base)
            with warnings.catch_warnings():               # a read-only buffer: nothing writes to it
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(mapped, dtype=dtype, count=ref.numel, offset=start - base)
            tensor = flat.as_strided(info.shape, info.stride, info.offset)
            del flat
            yield key, tensor
            del tensor
            try:
                mapped.close()
            except BufferError:                           # the caller kept a view: unmapped when it goes
                pass
