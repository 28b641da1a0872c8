"""Read part of a checkpoint: the tensors a caller has room for, and nothing else.

Expert parallelism gives each of N ranks the shared weights and 1/N of every layer's experts; the
reference it is checked against holds one decoder layer at a time; int8 and offload loads
(`load_by_layer`) give one decoder layer host memory at a time. All fill their parameters with

    read_into(folder, target)        target(name, expert) -> the tensor to copy into, or None to skip

where `name` is our parameter name (`layers.3.block_sparse_moe.experts.w1`) and `expert` the row of a
stacked expert parameter (else None). A tensor whose key says it is not wanted is never read:
safetensors files are memory-mapped and its pages are not touched; the original release's `.pt`
files are memory-mapped too, so of a fused `[E * I, H]` expert tensor only the wanted experts' rows
are read. Names, q/k permutation and fused experts are converted as `load_model` converts them
(convert.py, keys.py). Every copy checks the shape; the caller checks that everything it needs was
filled (the returned set); `fill_modules` does both for whole modules of a meta-device model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import MixtralConfig
from .convert import mistral_to_hf_key, mistral_to_hf_tensors
from .errors import CheckpointError
from .keys import hf_to_ours_key, split_fused_experts
from .layouts import PathLike, detect_layout, pt_tensors, read_config, weight_files
from .safetensors_reader import SafetensorsFile, safetensors_tensors

Target = Callable[[str, Optional[int]], Optional[torch.Tensor]]


def _names_of(layout: str, key: str) -> Optional[tuple[str, Optional[int]]]:
    """(our name, expert) that file key `key` holds, from the key alone; None when the tensor must be
    read to be split (fused experts) or is unknown (then reading it raises the loader's error)."""
    try:
        return hf_to_ours_key(mistral_to_hf_key(key) if layout.startswith("mistral") else key)
    except KeyError:
        return None


def _to_hf(layout: str, key: str, tensor: torch.Tensor, cfg: MixtralConfig) -> list:
    if layout.startswith("mistral"):
        return mistral_to_hf_tensors(key, tensor, cfg)
    return list(split_fused_experts({key: tensor}).items())


@torch.no_grad()
def read_into(folder: PathLike, target: Target) -> set[tuple[str, Optional[int]]]:
    """Copy the checkpoint's tensors that `target` wants into the tensors it returns; the set of
    (name, expert) filled. Raises CheckpointError for a shape that differs or a key with no meaning."""
    folder = Path(folder)
    layout = detect_layout(folder)
    cfg = read_config(folder)
    files, _ = weight_files(folder, layout)
    filled: set[tuple[str, Optional[int]]] = set()

    def wanted(key: str) -> bool:
        names = _names_of(layout, key)
        return names is None or target(*names) is not None

    for file in files:
        if layout == "mistral-pt":
            stream = ((k, t) for k, t in pt_tensors(file) if wanted(k))    # lazy views: skipped ones are not read
        else:
            with SafetensorsFile(file) as st:
                keys = [k for k in st.keys() if wanted(k)]
            stream = safetensors_tensors(file, keys)
        for key, tensor in stream:
            where = f"{file}: tensor {key}"
            try:
                pairs = _to_hf(layout, key, tensor, cfg)
            except (KeyError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"{where}: {err.args[0] if err.args else err}") from None
            for hf_key, t in pairs:
                try:
                    name, expert = hf_to_ours_key(hf_key)
                except KeyError:
                    raise CheckpointError(f"{where}: unexpected key, not a weight of this model") from None
                dest = target(name, expert)
                if dest is None:
                    continue
                if tuple(t.shape) != tuple(dest.shape):
                    raise CheckpointError(f"{where}: shape {tuple(t.shape)}, but the config implies "
                                          f"{tuple(dest.shape)} for {hf_key}")
                dest.copy_(t)
                filled.add((name, expert))
            del tensor, pairs
    return filled


def missing(needed: set, filled: set, folder: PathLike) -> None:
    """Raise CheckpointError naming what `needed` (a set of (name, expert)) lacks after reading."""
    absent = sorted(needed - filled, key=str)
    if absent:
        shown = ", ".join(f"{n}[{e}]" if e is not None else n for n, e in absent[:4])
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(absent)} tensor(s) this part of the model "
                              f"needs: {shown}{' ...' if len(absent) > 4 else ''}")


@torch.no_grad()
def fill_modules(folder: PathLike, modules: dict, device, check_finite: bool = True) -> None:
    """Give `modules` {name prefix: module of a meta model} storage on `device` and read their weights.

    Only their tensors are read (`read_into`); an expert parameter needs every expert row. A tensor
    holding NaN or infinity is refused as `load_model` refuses it (check_finite=False allows it).
    """
    from .keys import is_stacked_expert
    from .load import _all_finite

    params = {}
    for prefix, module in modules.items():
        module.to_empty(device=device)
        params.update(module.named_parameters(prefix=prefix))
    needed = set()
    for name, p in params.items():
        needed |= {(name, j) for j in range(p.shape[0])} if is_stacked_expert(name) else {(name, None)}

    def target(name: str, expert: Optional[int]) -> Optional[torch.Tensor]:
        if name not in params:
            return None
        return params[name] if expert is None else params[name][expert]

    missing(needed, read_into(folder, target), folder)
    if check_finite:
        for name, p in params.items():
            if p.device.type != "meta" and not _all_finite(p):
                raise CheckpointError(f"{folder}: {name} holds NaN or infinite values in {p.dtype}")


@torch.no_grad()
def load_by_layer(folder: PathLike, dtype: torch.dtype, device, place_layer: Callable[[int, torch.nn.Module], None],
                  progress: bool = False):
    """A Mixtral read from `folder` with at most one decoder layer's weights in host memory at a time.

    The model starts on the meta device (no memory). The embeddings, final norm and lm_head are read
    straight onto `device`. Then each decoder layer i gets host storage in `dtype`, is filled with its
    own tensors only, and goes to `place_layer(i, layer)`, which takes its weights off the host (int8 on
    the GPU, experts into pinned memory, ...) before the next layer is read. Peak host memory: one layer
    plus what `place_layer` keeps there; `load_model` instead gives every layer host storage up front.
    progress: a tqdm bar over the layers (on stderr).
    """
    from tqdm.auto import tqdm

    from ..model.rope import RotaryEmbedding
    from .load import meta_skeleton

    cfg = read_config(folder)
    model = meta_skeleton(cfg).to(dtype)
    ends = {"embed_tokens": model.embed_tokens, "norm": model.norm}
    if not cfg.tie_word_embeddings:
        ends["lm_head"] = model.lm_head
    fill_modules(folder, ends, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(device, dtype)
    for i, layer in enumerate(tqdm(model.layers, desc="reading layer by layer", disable=not progress)):
        fill_modules(folder, {f"layers.{i}": layer}, "cpu")
        place_layer(i, layer)
        _return_freed_memory()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):          # not glibc (musl, macOS, Windows): nothing to trim
        return None


def _return_freed_memory() -> None:
    """Give the pages of a placed layer's freed host storage back to the system. glibc serves blocks under
    its mmap threshold (raised up to 32 MiB as larger blocks are freed) from its heap, where freed ones can
    stay resident: measured on 8 MiB expert stacks, half the runs kept one per layer (8 MiB x layers).
    malloc_trim(0) returns every free page of the heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
