"""Parameter and memory arithmetic, from the config alone (no weights are built).

`count_parameters(cfg)` counts every weight matrix of the architecture; "active" counts what one
token uses: all of attention, embeddings, norms and router, but only `num_experts_per_tok` of the
experts. `memory_footprint(cfg, dtype, context_len)` adds the KV cache to the weights.
"""

from __future__ import annotations

from typing import Sequence

from .config import MixtralConfig

# The short names people write for the float dtypes, and torch's names for them.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Bytes per element by name (either name); a torch.dtype is also accepted (its `itemsize` is used).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
DTYPE_BYTES.update({short: DTYPE_BYTES[name] for short, name in DTYPE_NAMES.items()})


def dtype_bytes(dtype) -> float:
    """Bytes per element of `dtype`: a name such as "bf16" or a torch.dtype."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
        return DTYPE_BYTES[key]
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    return itemsize


def count_parameters(cfg: MixtralConfig) -> dict:
    """Count the parameters of `cfg` by component.

    Returns a dict with "total", "active" (per token) and the breakdown "embeddings", "lm_head",
    "attention", "experts", "router", "norms" (each summed over all layers), plus
    "one_expert" (w1, w2 and w3 of a single expert in one layer) and "per_layer".
    A dense config (`num_local_experts == 1`) has one feed-forward block and no router.
    """
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim

    embeddings = cfg.vocab_size * H
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * H
    # q and o are [heads*head_dim, H] and its transpose; k and v are [kv_heads*head_dim, H].
    attention_per_layer = 2 * q_out * H + 2 * kv_out * H
    one_expert = 3 * H * I  # w1 [I, H], w3 [I, H], w2 [H, I]
    router_per_layer = E * H if cfg.is_moe else 0
    norms_per_layer = 2 * H  # input_layernorm and post_attention_layernorm

    per_layer = attention_per_layer + E * one_expert + router_per_layer + norms_per_layer
    total = embeddings + lm_head + L * per_layer + H  # + the final norm
    active = total - L * (E - k) * one_expert
    return {
        "total": total,
        "active": active,
        "embeddings": embeddings,
        "lm_head": lm_head,
        "attention": L * attention_per_layer,
        "experts": L * E * one_expert,
        "router": L * router_per_layer,
        "norms": L * norms_per_layer + H,
        "one_expert": one_expert,
        "per_layer": per_layer,
    }


def split_weight_bytes(cfg: MixtralConfig, dtype="bf16") -> dict:
    """Where a model split by layers keeps its weights, in bytes: {"first": the embedding, which goes
    with the first layers; "per_layer": one decoder layer; "last": the final norm and lm_head, with the
    last layers}. first + num_hidden_layers * per_layer + last is the whole model."""
    p = count_parameters(cfg)
    b = dtype_bytes(dtype)
    return {"first": p["embeddings"] * b, "per_layer": p["per_layer"] * b, "last": (p["lm_head"] + cfg.hidden_size) * b}


def weight_bytes_per_device(cfg: MixtralConfig, layers_per_device: Sequence[int], dtype="bf16") -> list[int]:
    """Bytes of weights on each device when device j holds `layers_per_device[j]` consecutive decoder
    layers (`split_weight_bytes` says where the rest goes). The one count that both loading
    (`weights.load.memory_plan`) and the placement planner use; `[num_hidden_layers]` is one device."""
    if sum(layers_per_device) != cfg.num_hidden_layers or min(layers_per_device, default=-1) < 0:
        raise ValueError(f"layers_per_device {list(layers_per_device)} must be counts >= 0 that add up to "
                         f"the {cfg.num_hidden_layers} layers")
    parts = split_weight_bytes(cfg, dtype)
    shares = [n * parts["per_layer"] for n in layers_per_device]
    shares[0] += parts["first"]
    shares[-1] += parts["last"]
    return [int(s) for s in shares]


def kv_cache_bytes_per_token(cfg: MixtralConfig, dtype="bf16") -> float:
    """Bytes of K and V that one token adds to the cache, over all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes(dtype)


def memory_footprint(cfg: MixtralConfig, dtype="bf16", context_len: int = 0, batch_size: int = 1,
                     kv_dtype=None) -> dict:
    """Memory for weights plus a full KV cache, in bytes.

    Args:
        dtype: weight dtype ("float32", "bf16", "int8", … or a torch.dtype).
        context_len: tokens held in the KV cache per sequence.
        kv_dtype: KV cache dtype; defaults to `dtype`, or bf16 when the weights are integer.
    Returns {"weights_bytes", "kv_cache_bytes", "total_bytes"}. Activations are not counted:
    at batch 1 they are small next to the weights (a few hundred MB for a long prefill).
    """
    if context_len < 0 or batch_size < 1:
        raise ValueError(f"context_len must be >= 0 and batch_size >= 1, got {context_len}, {batch_size}")
    if kv_dtype is None:
        kv_dtype = "bf16" if str(dtype).lower().removeprefix("torch.") in ("int8", "int4") else dtype
    weights = count_parameters(cfg)["total"] * dtype_bytes(dtype)
    kv = kv_cache_bytes_per_token(cfg, kv_dtype) * context_len * batch_size
    return {"weights_bytes": int(weights), "kv_cache_bytes": int(kv), "total_bytes": int(weights + kv)}
