"""Expert offloading: experts in (pinned) CPU memory, an LRU cache of experts on the GPU.

The experts are 96.6% of Mixtral's weights, but a token uses only 2 of the 8 in each layer. So a
GPU too small for the model can keep everything else resident and fetch experts on demand:

* every expert's w1, w2, w3 stay in CPU memory, pinned (page-locked) when CUDA is there, so the
  copy to the GPU runs at full PCIe speed;
* an `ExpertCache` owns `capacity` slots on the compute device, each big enough for one expert.
  Asking for expert (layer, e) is a *hit* when a slot already holds it; otherwise a *miss*
  copies it into the least recently used slot (an *eviction* when that slot was in use).

Consecutive tokens often reuse experts (the paper's Section 5), which is what makes the cache
pay, but only per layer: one decoded token asks for 2 experts of each of the 32 layers in turn, so
between two uses of (layer 5, expert 3) come at least 62 other keys, and one LRU shared by all layers
with fewer than 64 slots never hits (the 24 GB plan has 51). `offload_experts(per_layer=True)`, what
`load_placed` uses, gives each layer its own LRU of an equal share of the slots (`layer_slots`), as
Mixtral-offloading does (Eliseev & Mazur, arXiv 2312.17238): a layer's cache then hits whenever its
experts repeat from one token to the next. `replay_hit_rate` computes that offline from a routing trace.

The arithmetic is the in-memory model's own (`ExpertsBase.forward` / `forward_gathered` on the
fetched weights), so outputs are bit-for-bit identical; only where the weights come from changes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..model.experts import Experts, ExpertsBase


@dataclass
class CacheStats:
    """Counters of an ExpertCache: hits + misses = lookups; evictions <= misses."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_copied: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class ExpertCache:
    """An LRU cache of experts on `device`, shared by all layers.

    Slots are allocated once: w1, w3 `[capacity, I, H]` and w2 `[capacity, H, I]` in `dtype`.
    `get(key, source)` returns the slot index holding expert `key` (any hashable, e.g. (layer, e)),
    copying `source()` = (w1, w2, w3) into a free or least recently used slot on a miss.
    """

    def __init__(self, capacity: int, hidden_size: int, intermediate_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError(f"ExpertCache capacity must be at least 1 expert, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.w1 = torch.empty(capacity, intermediate_size, hidden_size, device=device, dtype=dtype)
        self.w3 = torch.empty(capacity, intermediate_size, hidden_size, device=device, dtype=dtype)
        self.w2 = torch.empty(capacity, hidden_size, intermediate_size, device=device, dtype=dtype)
        self.slot_of: "OrderedDict[object, int]" = OrderedDict()   # key -> slot, least recent first
        self.stats = CacheStats()

    def get(self, key, source) -> int:
        """The slot holding `key`, fetching `source()` = (w1, w2, w3) on a miss; marks it most recent."""
        if key in self.slot_of:
            self.stats.hits += 1
            self.slot_of.move_to_end(key)
            return self.slot_of[key]
        self.stats.misses += 1
        if len(self.slot_of) < self.capacity:
            slot = len(self.slot_of)
        else:
            _, slot = self.slot_of.popitem(last=False)           # evict the least recently used
            self.stats.evictions += 1
        w1, w2, w3 = source()
        non_blocking = w1.is_pinned() if w1.device.type == "cpu" and self.device.type == "cuda" else False
        for dst, src in ((self.w1, w1), (self.w2, w2), (self.w3, w3)):
            dst[slot].copy_(src, non_blocking=non_blocking)
            self.stats.bytes_copied += src.numel() * src.element_size()
        self.slot_of[key] = slot
        return slot

    def cached_keys(self) -> list:
        """Keys in the cache, least recently used first."""
        return list(self.slot_of)

    def reset_stats(self) -> None:
        self.stats = CacheStats()


class OffloadedExperts(ExpertsBase):
    """One layer's experts kept off the compute device, served through a shared ExpertCache.

    Host copies w1, w3 `[E, I, H]`, w2 `[E, H, I]` (plain tensors, not parameters, so `model.to(...)`
    leaves them where they are). An `ExpertsBase` whose weights are cache slots: the arithmetic is
    the in-memory experts' own.
    """

    def __init__(self, experts: Experts, cache: ExpertCache, layer_idx: int, pin: Optional[bool] = None) -> None:
        super().__init__()
        if pin is None:
            pin = torch.cuda.is_available()
        self.num_experts = experts.num_experts
        self.cache = cache
        self.layer_idx = layer_idx
        self.host = {}
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name).detach().to("cpu", cache.w1.dtype)
            self.host[name] = w.pin_memory() if pin else w.contiguous()

    def _slot(self, e: int) -> int:
        return self.cache.get((self.layer_idx, e), lambda: tuple(self.host[n][e] for n in ("w1", "w2", "w3")))

    def expert_weights(self, expert: int) -> tuple:
        """Expert `expert`'s w1, w2, w3 as views of its cache slot (copied in on a miss)."""
        slot = self._slot(int(expert))
        return self.cache.w1[slot], self.cache.w2[slot], self.cache.w3[slot]

    def gathered_weights(self, expert_ids: torch.Tensor) -> tuple:
        """expert_ids `[tokens, k]` -> the slots' weights `[tokens, k, out, in]`.

        Fetches the distinct experts first (a host sync, unavoidable here: which experts to copy is
        decided on the host), then gathers from the cache slots with ids remapped to slot numbers.
        When the cache holds fewer slots than the distinct experts, each one goes through it in turn
        and its weights are copied out, row by row (the cache still counts each use).
        """
        wanted = torch.unique(expert_ids).tolist()
        if len(wanted) > self.cache.capacity:
            fetched = {e: tuple(w.clone() for w in self.expert_weights(e)) for e in wanted}
            rows = [fetched[int(e)] for e in expert_ids.reshape(-1).tolist()]
            return tuple(torch.stack([r[i] for r in rows]).view(*expert_ids.shape, *rows[0][i].shape)
                         for i in range(3))
        slot_ids = torch.empty_like(expert_ids)
        for e in wanted:
            slot_ids[expert_ids == e] = self._slot(e)
        c = self.cache
        return c.w1[slot_ids], c.w2[slot_ids], c.w3[slot_ids]

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, offloaded (cache of {self.cache.capacity})"


def layer_slots(total: int, num_layers: int) -> list[int]:
    """`total` cache slots shared out over `num_layers` per-layer caches, as evenly as possible."""
    if total < num_layers:
        raise ValueError(f"per-layer caches need at least one slot per layer: {total} slots for {num_layers} layers")
    base, extra = divmod(total, num_layers)
    return [base + (i < extra) for i in range(num_layers)]


class CacheGroup:
    """The expert caches of one offloaded model, read as one: `stats` adds theirs up, `capacity` their slots."""

    def __init__(self, caches: list) -> None:
        self.caches = caches

    @property
    def capacity(self) -> int:
        return sum(c.capacity for c in self.caches)

    @property
    def stats(self) -> CacheStats:
        return CacheStats(*(sum(getattr(c.stats, f) for c in self.caches)
                            for f in ("hits", "misses", "evictions", "bytes_copied")))

    def reset_stats(self) -> None:
        for c in self.caches:
            c.reset_stats()


def replay_hit_rate(expert_ids: torch.Tensor, slots: list[int], tokens_per_step: Optional[list[int]] = None) -> float:
    """Hit rate of per-layer LRU caches of `slots[l]` experts on a routing trace `[L, T, k]`, offline.

    The lookups in the order the model makes them: step by step (tokens_per_step, default one token
    each), layer by layer; a one-token step asks for its k experts in routing order (dispatch_gathered's
    k calls), a longer step for its distinct experts in increasing order (dispatch_grouped).
    """
    num_layers, num_tokens, _ = expert_ids.shape
    steps = tokens_per_step or [1] * num_tokens
    caches = [OrderedDict() for _ in range(num_layers)]
    hits = lookups = start = 0
    for n in steps:
        for layer, cache in enumerate(caches):
            step = expert_ids[layer, start:start + n]
            for e in (dict.fromkeys(step[0].tolist()) if n == 1 else torch.unique(step).tolist()):
                lookups += 1
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                else:
                    if len(cache) == slots[layer]:
                        cache.popitem(last=False)
                    cache[e] = True
        start += n
    return hits / lookups if lookups else 0.0


def expert_caches(num_layers: int, hidden: int, inter: int, device: torch.device | str, capacity: int,
                  dtype: torch.dtype, per_layer: bool = True) -> list:
    """The cache of each of `num_layers` layers: its own of `layer_slots(capacity, num_layers)` slots
    (per_layer), or one of `capacity` slots that all layers share."""
    if per_layer:
        return [ExpertCache(n, hidden, inter, device=device, dtype=dtype) for n in layer_slots(capacity, num_layers)]
    return [ExpertCache(capacity, hidden, inter, device=device, dtype=dtype)] * num_layers


@torch.no_grad()
def offload_layer_(layer: nn.Module, layer_idx: int, cache: ExpertCache, pin: Optional[bool] = None) -> None:
    """One DecoderLayer in place: its experts to host memory behind `cache`, the rest to the cache's device."""
    moe = layer.block_sparse_moe
    moe.experts = OffloadedExperts(moe.experts, cache, layer_idx, pin=pin)   # frees the device copy
    layer.to(cache.device)


@torch.no_grad()
def offload_experts(model: nn.Module, device: torch.device | str, capacity: int,
                    pin: Optional[bool] = None, per_layer: bool = False):
    """Move `model` to `device` except its experts, which go to CPU memory behind LRU caches.

    capacity: experts the device holds at once (`Plan.cache_slots`). per_layer: one LRU per layer,
    `layer_slots(capacity, layers)` slots each (returns a CacheGroup); else one LRU shared by all
    layers (an ExpertCache). Works in place on a `Mixtral` whose experts are `Experts`; read
    `.stats` of the result for hits and misses.
    """
    first = model.layers[0].block_sparse_moe.experts
    if not isinstance(first, Experts):
        raise ValueError(f"offload_experts needs in-memory Experts, found {type(first).__name__}")
    num_experts, inter, hidden = first.w1.shape
    caches = expert_caches(len(model.layers), hidden, inter, device, capacity, first.w1.dtype, per_layer)
    for i, layer in enumerate(model.layers):
        offload_layer_(layer, i, caches[i], pin)
    model.to(device)
    return CacheGroup(caches) if per_layer else caches[0]
