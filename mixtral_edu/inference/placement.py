"""Where do the weights go? A planner from sizes alone (no weights, no GPU needed).

Mixtral-8x7B holds 46.7B parameters: 93.4 GB in bf16. `plan_placement` looks at the config, the
weight dtype, the context length, how much memory each GPU has free and (optionally) how much host
memory there is, and picks the first of these that fits:

1. "single":   every weight in bf16 on one GPU (an H200's 141 GB holds it).
2. "split":    bf16, the decoder layers split over the fewest GPUs that hold them, in order; the hidden
               state `[batch, seq, hidden]` hops to the next GPU at each boundary (see split.py).
3. "int8":     experts and attention stored as int8 with one scale per output channel, the
               rest bf16, about 47 GB on one GPU (see quant.py).
4. "offload":  every weight but the experts on the GPU; the experts wait in pinned CPU memory
               and `cache_slots` experts live on the GPU, an LRU cache per layer (offload.py).

The rule: the fastest exact plan first, int8 only when no exact plan fits, offloading last. The exact
plans give the checkpoint's own bf16 results; one GPU is the fastest of them, and a split runs at about
one GPU's speed at batch 1 (the GPUs take turns; FastDecoder keeps the model's own dispatch on a split
model, since gathering each token's experts would only add copies there: split.decode_dispatch_for,
benchmarks/split_decode.py). int8 reads half the bytes per token, so on one GPU it is faster than either,
but its outputs differ slightly; `prefer_one_gpu=True` asks for it before a split. To choose which GPUs
are seen at all, start Python with `CUDA_VISIBLE_DEVICES=0` (or `=2,3`).

Host memory counts too. int8 and offload loads build the model one decoder layer at a time, so
the host holds one layer while it is read; but offloading keeps every expert in pinned host memory,
and PyTorch's pinned allocator rounds each block up to a power of two (a layer's 939,524,096-byte
w1 stack takes 1 GiB: `pinned_block_bytes`), so a 24 GB GPU on a 64 GB desktop cannot offload 8x7B;
`host_bytes_needed` says how much each strategy needs, and `plan_placement(..., host_free_bytes=...)`
refuses what does not fit.

`load_placed(path, plan)` then loads a checkpoint the way a plan says.

At batch 1 decoding is bound by memory bandwidth: each token reads every active weight once.
`active_weight_bytes` counts those bytes, so tokens/s can be compared with bandwidth / bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..config import MixtralConfig
from ..devices import gpu_memory
from ..params import (DTYPE_NAMES, count_parameters, dtype_bytes, kv_cache_bytes_per_token, split_weight_bytes,
                      weight_bytes_per_device)
from .offload import layer_slots, replay_hit_rate

GB = 1e9
GiB = 2 ** 30
# Left free on each GPU for the CUDA context, cuBLAS workspace, activations and logits.
DEFAULT_RESERVE_BYTES = 2 * GiB
STRATEGIES = ("single", "split", "int8", "offload")


# ----------------------------------------------------------------------------- arithmetic
def int8_scale_count(cfg: MixtralConfig, experts_per_layer: int) -> int:
    """Scales quant.py stores (one per output row of each int8 matrix) for the attention projections and
    `experts_per_layer` experts of every layer: all E for the model, the k chosen ones for a decoded token."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return L * experts_per_layer * (I + H + I) + L * (q_out + 2 * kv_out + H)     # w1, w2, w3; q, k, v, o


def int8_breakdown(cfg: MixtralConfig, scale_dtype="bf16") -> dict:
    """The int8 weight-only model's bytes as quant.py stores it: {"codes", "scales", "bf16_rest", "total"}.

    codes: experts and attention, one byte per weight; scales: one per output row of those matrices,
    in `scale_dtype`; bf16_rest: embeddings, lm_head, router and norms, kept in `scale_dtype`.
    """
    p = count_parameters(cfg)
    quantised = p["experts"] + p["attention"]
    scales = int8_scale_count(cfg, cfg.num_local_experts)
    b = dtype_bytes(scale_dtype)
    out = {"codes": int(quantised), "scales": int(scales * b), "bf16_rest": int((p["total"] - quantised) * b)}
    out["total"] = out["codes"] + out["scales"] + out["bf16_rest"]
    return out


def int8_weights_bytes(cfg: MixtralConfig, scale_dtype="bf16") -> int:
    """Bytes of the int8 weight-only model (quant.py): experts and attention as int8 plus one
    scale per output channel; embeddings, lm_head, router and norms stay in `scale_dtype`."""
    return int8_breakdown(cfg, scale_dtype)["total"]


def active_weight_bytes(cfg: MixtralConfig, quant: Optional[str] = None, dtype="bf16") -> int:
    """Bytes of weights one decoded token reads: everything but the embedding table (one row of
    it) and the experts not chosen. quant=None: all in `dtype`; quant="int8": as quant.py stores it.
    The KV cache read (131 kB per cached token for 8x7B in bf16) is not included."""
    p = count_parameters(cfg)
    k, E = cfg.num_experts_per_tok, cfg.num_local_experts
    experts_read = p["experts"] * k // E
    other = p["active"] - p["embeddings"] - experts_read       # attention, router, norms, lm_head
    if quant is None:
        return int((p["active"] - p["embeddings"]) * dtype_bytes(dtype))
    if quant != "int8":
        raise ValueError(f"quant must be None or 'int8', got {quant!r}")
    scales = int8_scale_count(cfg, k)
    int8_part = experts_read + p["attention"]
    return int(int8_part + (other - p["attention"] + scales) * dtype_bytes(dtype))


def bandwidth_bound_tokens_per_s(cfg: MixtralConfig, bandwidth_bytes_per_s: float,
                                 quant: Optional[str] = None, dtype="bf16") -> float:
    """The batch-1 ceiling: bandwidth ÷ bytes of active weights per token."""
    return bandwidth_bytes_per_s / active_weight_bytes(cfg, quant, dtype)


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The planner's decision.

    strategy: one of STRATEGIES. devices: the GPUs used, e.g. ["cuda:0", "cuda:1"].
    layers_per_device: decoder layers on each device, in order (split plans; otherwise all on one).
    bytes_per_device: planned GPU bytes (weights + KV cache + reserve) on each device.
    cache_slots: experts the GPU holds at once (offload plans only).
    expected_hit_rate: for an offload plan given a routing trace, the hit rate its per-layer caches have
        on it (offload.replay_hit_rate, one token per step).
    host_bytes: host memory the load needs at its peak (see host_bytes_needed).
    explanation: the reasoning in plain words.
    """

    strategy: str
    devices: list
    weight_dtype: str
    layers_per_device: list
    bytes_per_device: list
    kv_cache_bytes: int
    cache_slots: Optional[int] = None
    explanation: str = ""
    rejected: dict = field(default_factory=dict)   # strategy -> why it did not fit
    host_bytes: int = 0                            # peak host memory while loading (host_bytes_needed)
    expected_hit_rate: Optional[float] = None      # offload: the caches' hit rate on the routing trace given

    def __str__(self) -> str:
        return self.explanation


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _gb2(n: float) -> str:
    """Two decimals: one expert of 8x7B is 0.35 GB, of the tiny model 0.10 MB."""
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 1e6:.2f} MB"


def _split_layers(num_layers: int, capacities: Sequence[float]) -> list:
    """Layers per device, proportional to each device's room (largest remainders get the spares)."""
    total = sum(capacities)
    exact = [num_layers * c / total for c in capacities]
    counts = [int(x) for x in exact]
    spare = num_layers - sum(counts)
    for i in sorted(range(len(counts)), key=lambda i: exact[i] - counts[i], reverse=True)[:spare]:
        counts[i] += 1
    return counts


def pinned_block_bytes(nbytes: int) -> int:
    """Host bytes PyTorch's caching pinned-memory allocator takes for one `nbytes` block: the next power
    of two (its size classes), e.g. 939,524,096 -> 1,073,741,824."""
    return 1 << max(0, nbytes - 1).bit_length()


def host_bytes_needed(cfg: MixtralConfig, strategy: str, dtype="bf16") -> int:
    """Peak host (CPU) memory that `load_placed` needs for `strategy`, from sizes alone.

    single, split: tensors stream from the files straight to their GPU; the host holds about one
    tensor at a time (the largest is the embedding or lm_head). int8, offload: the model is built one
    decoder layer at a time (`weights.partial.load_by_layer`), so the host holds one layer in `dtype`
    and the tensor being read; int8 quantises that layer onto the GPU before the next one, offload
    keeps its experts in pinned memory (w1, w2, w3 stacks, each rounded up by `pinned_block_bytes`),
    so the pinned experts of every layer come on top.
    """
    p = count_parameters(cfg)
    b = dtype_bytes(dtype)
    largest_tensor = max(p["embeddings"], p["lm_head"]) * b
    if strategy in ("single", "split"):
        return int(largest_tensor)
    one_layer = int(p["per_layer"] * b + largest_tensor)
    if strategy == "int8":
        return one_layer
    if strategy == "offload":
        pinned_layer = 3 * pinned_block_bytes(int(p["experts"] * b / cfg.num_hidden_layers / 3))
        return cfg.num_hidden_layers * pinned_layer + one_layer
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def _state_hit_rate(plan: Plan, cfg: MixtralConfig, expert_ids, expert_bytes: float) -> None:
    """Add to an offload `plan` the hit rate its caches have on routing trace `expert_ids` `[L, T, k]`."""
    layers, tokens, k = expert_ids.shape
    if layers != cfg.num_hidden_layers:
        raise ValueError(f"routing_trace has {layers} layers; this model has {cfg.num_hidden_layers}")
    rate = replay_hit_rate(expert_ids, layer_slots(plan.cache_slots, layers))
    plan.expected_hit_rate = rate
    plan.explanation += (f" On the routing trace given ({tokens} tokens, one at a time) these caches hit {rate:.1%} of "
                         f"the lookups (offload.replay_hit_rate), so a token copies about "
                         f"{_gb((1 - rate) * k * layers * expert_bytes)}.")


def plan_placement(cfg: MixtralConfig, free_bytes: Sequence[float], dtype="bf16", context_len: int = 4096,
                   batch_size: int = 1, reserve_bytes: float = DEFAULT_RESERVE_BYTES,
                   allow_int8: bool = True, device_names: Optional[Sequence[str]] = None,
                   host_free_bytes: Optional[float] = None, prefer_one_gpu: bool = False,
                   routing_trace=None) -> Plan:
    """Choose how to place `cfg`'s weights on GPUs with `free_bytes[i]` free bytes each.

    dtype: the unquantised weight dtype (bf16). context_len × batch_size tokens of KV cache are
    budgeted on the GPUs. reserve_bytes stay free on every GPU for activations and workspaces.
    host_free_bytes: host memory available (None: not checked); a strategy whose load needs more
    (host_bytes_needed) is refused. prefer_one_gpu: try int8 on one GPU (faster, not exact) before a bf16
    split; by default the exact plans come first (the module's docstring states the rule).
    routing_trace: expert ids `[layers, tokens, k]` of this model (`trace_routing(...).expert_ids`); an offload
    plan then states the hit rate its caches have on it, and the bytes a token copies at that rate.
    Returns a Plan; raises ValueError when nothing fits.
    """
    if not free_bytes:
        raise ValueError("free_bytes is empty: the planner needs at least one GPU")
    if any(f <= 0 for f in free_bytes):
        raise ValueError(f"free_bytes must all be positive, got {list(free_bytes)}")
    names = list(device_names) if device_names is not None else [f"cuda:{i}" for i in range(len(free_bytes))]
    if len(names) != len(free_bytes):
        raise ValueError(f"{len(names)} device names for {len(free_bytes)} devices")
    kv_dtype = "bf16" if str(dtype) in ("int8",) else dtype
    kv = int(kv_cache_bytes_per_token(cfg, kv_dtype) * context_len * batch_size)
    p = count_parameters(cfg)
    b = dtype_bytes(dtype)
    bf16_weights = int(p["total"] * b)
    order = sorted(range(len(free_bytes)), key=lambda i: free_bytes[i], reverse=True)
    biggest = order[0]
    rejected = {}
    need_line = f"KV cache for {context_len} tokens × batch {batch_size} = {_gb(kv)}, reserve {_gb(reserve_bytes)} per GPU"

    # Each candidate returns a Plan or records in `rejected` why it does not fit.
    def single():
        need = bf16_weights + kv + reserve_bytes
        if need <= free_bytes[biggest]:
            return Plan("single", [names[biggest]], str(dtype), [cfg.num_hidden_layers], [int(need)], kv,
                        explanation=(f"{dtype} on one device: the {_gb(bf16_weights)} of {dtype} weights plus "
                                     f"{need_line} need {_gb(need)}, and {names[biggest]} has {_gb(free_bytes[biggest])} free. "
                                     "Nothing is quantised or moved, so this is exact and the fastest option."))
        rejected["single"] = f"needs {_gb(need)} but the largest GPU has {_gb(free_bytes[biggest])} free"

    def split():
        # layers split over the fewest GPUs that hold them (largest first)
        parts = split_weight_bytes(cfg, dtype)                 # embed_tokens with the first GPU, lm_head the last
        kv_per_layer = kv / cfg.num_hidden_layers
        per_layer = parts["per_layer"] + kv_per_layer
        for n in range(2, len(free_bytes) + 1):
            used = order[:n]
            room = [free_bytes[i] - reserve_bytes for i in used]
            room[0] -= parts["first"]
            room[-1] -= parts["last"]
            if min(room) <= 0:
                continue
            counts = _split_layers(cfg.num_hidden_layers, room)
            if all(c * per_layer <= r for c, r in zip(counts, room)) and min(counts) > 0:
                planned = [int(w + c * kv_per_layer + reserve_bytes)
                           for w, c in zip(weight_bytes_per_device(cfg, counts, dtype), counts)]
                where = ", ".join(f"layers {sum(counts[:j])}-{sum(counts[:j + 1]) - 1} on {names[i]}"
                                  for j, i in enumerate(used))
                return Plan("split", [names[i] for i in used], str(dtype), counts, planned, kv,
                            explanation=(f"{dtype} split by layers over {n} GPUs: {_gb(bf16_weights)} of weights do not fit "
                                         f"one GPU ({_gb(free_bytes[biggest])} free at most) but fit {n} together. {where}; "
                                         f"the embedding sits with the first layers and lm_head with the last. {need_line}. "
                                         "Each token's hidden state hops GPU to GPU, so the GPUs work one after another: "
                                         f"exact {dtype} results, at about the speed of one GPU."))
        rejected["split"] = ("only one GPU" if len(free_bytes) == 1 else
                             f"{_gb(bf16_weights)} of weights do not fit even all {len(free_bytes)} GPUs together")

    def int8():
        int8_bytes = int8_weights_bytes(cfg, dtype)
        need = int8_bytes + kv + reserve_bytes
        if allow_int8 and need <= free_bytes[biggest]:
            return Plan("int8", [names[biggest]], "int8", [cfg.num_hidden_layers], [int(need)], kv,
                        explanation=(f"int8 weight-only on one GPU: {dtype} needs {_gb(bf16_weights)}, more than the "
                                     f"{_gb(free_bytes[biggest])} free on {names[biggest]}. Storing the experts and attention as "
                                     f"int8 with one scale per output channel (embeddings, router, norms, lm_head stay bf16) "
                                     f"takes {_gb(int8_bytes)}; with the {need_line} that is {_gb(need)}. "
                                     "Each token reads half the bytes, so it is also faster; outputs differ slightly from bf16."))
        rejected["int8"] = ("not allowed" if not allow_int8 else
                            f"needs {_gb(need)} but the largest GPU has {_gb(free_bytes[biggest])} free")

    def offload():
        # non-expert weights + KV on the GPU, experts cached LRU
        expert_bytes = p["one_expert"] * b
        resident = int((p["total"] - p["experts"]) * b)
        room = free_bytes[biggest] - reserve_bytes - resident - kv
        total_experts = cfg.num_hidden_layers * cfg.num_local_experts
        slots = min(int(room // expert_bytes) if room > 0 else 0, total_experts)
        if slots >= cfg.num_hidden_layers:                   # at least one slot per layer's cache
            planned = int(resident + kv + reserve_bytes + slots * expert_bytes)
            plan = Plan("offload", [names[biggest]], str(dtype), [cfg.num_hidden_layers], [planned], kv,
                        cache_slots=slots,
                        explanation=(f"expert offloading: neither {dtype} ({_gb(bf16_weights)}) nor int8 "
                                     f"({_gb(int8_weights_bytes(cfg, dtype))}{'' if allow_int8 else ', not allowed'}) fits "
                                     f"the {_gb(free_bytes[biggest])} free on {names[biggest]}. Everything but the experts "
                                     f"({_gb(resident)}) and the {need_line} stay on the GPU; the {total_experts} experts "
                                     f"({_gb(p['experts'] * b)}) wait in pinned CPU memory, and the GPU holds "
                                     f"{slots} of them ({_gb2(expert_bytes)} each, {100 * slots / total_experts:.0f}%) "
                                     f"as one LRU cache per layer of {min(layer_slots(slots, cfg.num_hidden_layers))}-"
                                     f"{max(layer_slots(slots, cfg.num_hidden_layers))} experts: a token finds its expert there "
                                     "when that layer used it lately (offload.replay_hit_rate measures it on a routing trace). "
                                     f"Results are exact; each miss copies {_gb2(expert_bytes)} over PCIe."))
            if routing_trace is not None:
                _state_hit_rate(plan, cfg, routing_trace, expert_bytes)
            return plan
        rejected["offload"] = (f"after {_gb(resident)} of non-expert weights and the KV cache, room for {slots} experts; "
                               f"at least {cfg.num_hidden_layers} are needed (one per layer's cache)")

    candidates = [single, int8, split, offload] if prefer_one_gpu else [single, split, int8, offload]
    for candidate in candidates:
        plan = candidate()
        if plan is None:
            continue
        plan.host_bytes = host_bytes_needed(cfg, plan.strategy, dtype)
        if host_free_bytes is not None and plan.host_bytes > host_free_bytes:
            rejected[plan.strategy] = (f"fits the GPU, but loading it needs about {_gb(plan.host_bytes)} of host "
                                       f"memory and {_gb(host_free_bytes)} is available")
            continue
        plan.rejected = rejected
        if host_free_bytes is not None:
            plan.explanation += (f" Loading needs about {_gb(plan.host_bytes)} of host memory; "
                                 f"{_gb(host_free_bytes)} is available.")
        return plan
    raise ValueError("no placement fits: " + "; ".join(f"{k}: {v}" for k, v in rejected.items()))


def free_gpu_bytes() -> list:
    """Free bytes on each visible CUDA device right now (not pure: asks the driver). Empty without CUDA."""
    return [free for free, _total in gpu_memory()]


def load_placed(path, plan: Plan, dtype=None, pin: Optional[bool] = None, progress: bool = True):
    """Load the checkpoint in folder `path` as `plan` says. Returns (model, expert cache or None).

    "single" and "split" stream every tensor straight to its device (for "split", each layer's own
    GPU). "int8" and "offload" build the model one decoder layer at a time (`load_by_layer`): the
    embeddings, final norm and lm_head go straight to the GPU, and each layer is read into host memory
    in `dtype` and placed before the next is read, so the host never holds all layers. "int8"
    quantises the layer onto the GPU (peak GPU memory: the int8 model plus one layer); "offload" keeps
    its experts in (pinned) host memory behind per-layer LRU caches of `plan.cache_slots` experts in
    all, and moves the rest of the layer to the GPU.
    The device's decoding machinery is installed (`optimize_for`). progress: a tqdm bar while loading.
    """
    import torch

    from ..weights.load import load_model
    from ..weights.partial import load_by_layer
    from .optimize import optimize_for

    if dtype is None:       # an int8 plan loads bf16 and quantises
        name = str(plan.weight_dtype).removeprefix("torch.")
        dtype = getattr(torch, "bfloat16" if name == "int8" else DTYPE_NAMES.get(name, name))
    cache = None
    if plan.strategy == "single":
        model = load_model(path, device=plan.devices[0], dtype=dtype, progress=progress)
    elif plan.strategy == "split":
        from .split import load_split
        model = load_split(path, plan.devices, plan.layers_per_device, dtype=dtype, progress=progress)
    elif plan.strategy == "int8":
        from .quant import quantize_layer_
        device = plan.devices[0]
        model = load_by_layer(path, dtype, device, lambda i, layer: quantize_layer_(layer, device), progress)
    elif plan.strategy == "offload":
        from ..weights.layouts import read_config
        from .offload import CacheGroup, expert_caches, offload_layer_
        cfg = read_config(path)
        caches = expert_caches(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, plan.devices[0],
                               plan.cache_slots, dtype)
        model = load_by_layer(path, dtype, plan.devices[0], lambda i, layer: offload_layer_(layer, i, caches[i], pin),
                              progress)
        cache = CacheGroup(caches)
    else:
        raise ValueError(f"unknown plan strategy {plan.strategy!r}; expected one of {STRATEGIES}")
    return optimize_for(model, plan.devices[0]), cache
