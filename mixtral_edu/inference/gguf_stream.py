"""Mixtral streamed from a GGUF file: the weights stay in the file, each matrix is dequantized when it runs.

A Q4_K_M Mixtral-8x7B file is about 26 GB; dequantized to float32 it would be 187 GB. So
`load_gguf` builds the plain `Mixtral` and installs streamed storage where the bulk is:

* each layer's experts are `StreamedExperts` (an `ExpertsBase`): expert e's w1, w2, w3 are read
  from the memory-mapped file and dequantized when a token routed to e reaches that layer, so
  only chosen experts are ever dequantized;
* each layer's q, k, v, o projections are `StreamedLinear`s, dequantized when the layer runs;
* embeddings, lm_head, norms and routers (2% of the weights) are dequantized once and stay.

What the streamed matrices leave resident is one `DequantCache`: an LRU of dequantized matrices
bounded by a byte budget. Consecutive tokens often reuse experts (the paper's Section 5), so
spare memory spent here saves dequantizing them again. The model's forward, hooks, routing tracer,
generate and chat are the plain model's; only where the weights come from changes.

Memory: `memory_budget` bounds the resident weights (the always-resident part plus the cache).
The smallest budget that can run is the resident part plus one layer's attention plus one expert;
below that, loading is refused. Peak memory adds the activations and the matrix being dequantized.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import ExpertsBase
from ..model.mixtral import Mixtral
from ..model.moe import dispatch_auto
from ..model.rope import RotaryEmbedding
from ..weights.gguf_file import GGUFError, GGUFFile
from ..weights.load import meta_skeleton
from .offload import CacheStats          # hits, misses, evictions; bytes_copied counts bytes dequantized

GIB = 2 ** 30
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class BudgetError(GGUFError):
    """The memory budget is too small for even one layer's matrices next to the resident ones."""


class DequantCache:
    """An LRU of dequantized matrices bounded by `budget` bytes, shared by every streamed matrix.

    `get(key, load, nbytes)` returns the cached value or `load()`s it (a tensor or tuple of tensors
    of `nbytes` bytes), evicting least recently used entries first so that the cache stays within
    `budget`. A value larger than the whole budget is returned without being kept.

    `load` takes its output tensors from `take(numel)`: the memory of the entries just evicted, where
    nothing outside the cache still holds them. Fresh memory costs a page fault per 4 KB page, which
    for a 235 MB expert matrix took longer than dequantizing it (and on a machine whose memory is full
    of file cache, the kernel must first reclaim pages); reused memory costs nothing.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self.entries: "OrderedDict[object, tuple[object, int]]" = OrderedDict()
        self.used = 0
        self.stats = CacheStats()
        self.reused = 0                  # tensors whose memory a load got back from an evicted entry
        self._spare: list = []

    def get(self, key, load: Callable, nbytes: int):
        if key in self.entries:
            self.stats.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key][0]
        self.stats.misses += 1
        while self.entries and self.used + nbytes > self.budget:      # make room before loading
            _, (old, size) = self.entries.popitem(last=False)
            self.used -= size
            self.stats.evictions += 1
            self._spare += unheld(old)
        try:
            with torch.inference_mode(False), torch.no_grad():   # plain tensors, usable in and out of inference mode
                value = load()
        finally:
            self._spare.clear()
        self.stats.bytes_copied += nbytes
        if nbytes <= self.budget:
            self.entries[key] = (value, nbytes)
            self.used += nbytes
        return value

    def take(self, shape: tuple) -> torch.Tensor:
        """A float32 tensor of `shape` for the running `load` to fill: an evicted entry's memory if its size fits."""
        numel = math.prod(shape)
        for i, t in enumerate(self._spare):
            if t.numel() == numel and t.dtype == torch.float32:
                self.reused += 1
                return self._spare.pop(i).resize_(shape)        # the same tensor reshaped, not a view of it
        return torch.empty(shape, dtype=torch.float32)

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


def unheld(value) -> list:
    """The tensors of an evicted cache value that nothing else holds: no other reference to the tensor,
    no view of it, no owner inside torch. Only their memory may be overwritten; the others are left
    to whoever still holds them (a learner's variable, say) and freed when they let go."""
    tensors = list(value) if isinstance(value, tuple) else [value]
    del value                            # so that a lone tensor and a tuple's count the same
    try:
        # references to t: the caller's name for the value (or its tuple), `tensors`, the loop's name
        # and getrefcount's argument
        return [t for t in tensors if isinstance(t, torch.Tensor) and sys.getrefcount(t) <= 4
                and t._use_count() == 1 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2]
    except AttributeError:               # a torch without these counts: never reuse
        return []


class StreamedLinear(nn.Module):
    """`y = x W^T` with W `[out, in]` read from a GGUF file when called (through the cache)."""

    def __init__(self, file: GGUFFile, name: str, cache: DequantCache) -> None:
        super().__init__()
        self.file, self.name, self.cache = file, name, cache
        self.out_features, self.in_features = file.matrices[(name, None)].shape
        self.nbytes = file.nbytes_dequantized(name)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized `[out, in]` matrix (from the cache, or read now)."""
        shape = (self.out_features, self.in_features)
        return self.cache.get(self.name, lambda: self.file.read(self.name, out=self.cache.take(shape)), self.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        m = self.file.matrices[(self.name, None)]
        return f"in_features={self.in_features}, out_features={self.out_features}, {m.qtype} streamed"


class StreamedExperts(ExpertsBase):
    """One layer's experts left in the GGUF file; expert e's (w1, w2, w3) dequantized when e is chosen."""

    def __init__(self, file: GGUFFile, layer_idx: int, cache: DequantCache) -> None:
        super().__init__()
        self.file, self.layer_idx, self.cache = file, layer_idx, cache
        self.num_experts = file.config.num_local_experts
        self.prefix = f"layers.{layer_idx}.block_sparse_moe.experts."
        self.nbytes = sum(file.nbytes_dequantized(self.prefix + w, 0) for w in ("w1", "w2", "w3"))
        self.shapes = {w: file.matrices[(self.prefix + w, 0)].shape for w in ("w1", "w2", "w3")}

    def expert_weights(self, expert: int) -> tuple:
        """Expert `expert`'s w1 `[I, H]`, w2 `[H, I]`, w3 `[I, H]` in float32."""
        e = int(expert)
        return self.cache.get((self.layer_idx, e),
                              lambda: tuple(self.file.read(self.prefix + w, e, out=self.cache.take(self.shapes[w]))
                                            for w in ("w1", "w2", "w3")),
                              self.nbytes)

    def prefetch(self, expert_ids: torch.Tensor) -> None:
        """Ask the OS to start reading the chosen experts' bytes that are not dequantized already.

        The block then reads them one expert at a time; meanwhile the disk fetches the next ones.
        """
        for e in torch.unique(expert_ids).tolist():
            if (self.layer_idx, e) not in self.cache.entries:
                for w in ("w1", "w2", "w3"):
                    self.file.prefetch(self.file.matrices[(self.prefix + w, e)])

    def gathered_weights(self, expert_ids: torch.Tensor) -> tuple:
        """expert_ids `[tokens, k]` -> w1, w2, w3 `[tokens, k, out, in]` (the distinct experts read once)."""
        wanted = torch.unique(expert_ids).tolist()
        stacks = list(zip(*(self.expert_weights(e) for e in wanted)))         # per matrix: [U] tensors
        position = torch.zeros(self.num_experts, dtype=torch.long)
        position[wanted] = torch.arange(len(wanted))
        index = position[expert_ids]
        return tuple(torch.stack(ws)[index] for ws in stacks)

    def extra_repr(self) -> str:
        m = self.file.matrices[(self.prefix + "w1", 0)]
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, {m.qtype} streamed from {self.file.path.name}"


def dispatch_prefetching(experts: StreamedExperts, x: torch.Tensor, weights: torch.Tensor,
                         expert_ids: torch.Tensor) -> torch.Tensor:
    """The MoE block's usual dispatch (`dispatch_auto`), once the file is asked for the chosen experts."""
    experts.prefetch(expert_ids)
    return dispatch_auto(experts, x, weights, expert_ids)


def resident_bytes(file: GGUFFile) -> int:
    """float32 bytes of what stays dequantized: embeddings, lm_head, norms, routers, the RoPE tables."""
    cfg = file.config
    streamed = {"experts.w1", "experts.w2", "experts.w3"} | {f"{p}.weight" for p in ATTENTION}
    total = sum(4 * m.numel for (name, _), m in file.matrices.items()
                if not any(name.endswith(s) for s in streamed))
    return total + 2 * 4 * cfg.max_position_embeddings * cfg.head_dim


def minimum_budget(file: GGUFFile) -> int:
    """The resident part plus the largest layer's attention matrices plus one expert (float32 bytes)."""
    cfg = file.config
    attention = max(sum(file.nbytes_dequantized(f"layers.{i}.self_attn.{p}.weight") for p in ATTENTION)
                    for i in range(cfg.num_hidden_layers))
    expert = sum(file.nbytes_dequantized(f"layers.0.block_sparse_moe.experts.{w}", 0) for w in ("w1", "w2", "w3"))
    return resident_bytes(file) + attention + expert


def parse_size(text: str) -> int:
    """"5GB" -> 5e9, "4.5GiB" -> 4.5 * 2**30, "800MB", "123" (bytes) -> bytes; ValueError otherwise."""
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    s = text.strip().upper()
    number = s.rstrip("KMGTIB")
    try:
        value = float(number) * units[s[len(number):].strip()]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 4.5GiB, 800MB)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r}: a size must be positive")
    return int(value)


def default_budget() -> int:
    """Half of the memory the OS reports available now (MemAvailable), the rest left to others."""
    import psutil
    return int(psutil.virtual_memory().available * 0.5)


@torch.no_grad()
def load_gguf(path, memory_budget: Optional[int] = None, check_tokenizer: bool = True) -> Mixtral:
    """A GGUF Mixtral file -> a `Mixtral` in eval mode whose attention and experts stream from the file.

    memory_budget: bytes the dequantized weights may hold (default `default_budget()`); refused with
    BudgetError when smaller than `minimum_budget`. The model's `gguf_cache` (a DequantCache) holds
    what the budget leaves after the resident part, and counts hits and misses.
    Raises GGUFError (one line) for a file that is not a usable Mixtral GGUF.
    """
    file = GGUFFile(path, check_tokenizer=check_tokenizer)
    cfg = file.config
    budget = default_budget() if memory_budget is None else int(memory_budget)
    need = minimum_budget(file)
    if budget < need:
        raise BudgetError(f"{path}: a memory budget of {budget / GIB:.2f} GiB is too small; streaming this file needs "
                          f"at least {need / GIB:.2f} GiB (embeddings, lm_head, norms and routers resident, plus one "
                          f"layer's attention and one expert dequantized)")
    cache = DequantCache(budget - resident_bytes(file))
    model = meta_skeleton(cfg)
    for module in (model.embed_tokens, model.norm, model.lm_head):
        module.to_empty(device="cpu")
    file.read("embed_tokens.weight", out=model.embed_tokens.weight)       # dequantized in place, no copy
    model.norm.weight.copy_(file.read("norm.weight"))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        file.read("lm_head.weight", out=model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).to_empty(device="cpu")
            getattr(layer, norm).weight.copy_(file.read(p + norm + ".weight"))
        gate = layer.block_sparse_moe.gate
        gate.to_empty(device="cpu")
        gate.weight.copy_(file.read(p + "block_sparse_moe.gate.weight"))
        for proj in ATTENTION:
            setattr(layer.self_attn, proj, StreamedLinear(file, f"{p}self_attn.{proj}.weight", cache))
        layer.block_sparse_moe.experts = StreamedExperts(file, i, cache)
        layer.block_sparse_moe.dispatch = dispatch_prefetching
    model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"load_gguf left {left[:4]} unfilled")       # a bug here, not a bad file
    # Inference only: with a parameter needing gradients, autograd would keep every dequantized matrix
    # of a forward alive for the backward pass, whatever the budget says.
    model.requires_grad_(False)
    model.gguf_file, model.gguf_cache = file, cache
    return model.eval()
