"""Pure conversions between Mistral's checkpoint layouts and the Hugging Face one.

Mistral ships Mixtral in two layouts of its own, both named after its reference code
(mistral-inference), and both with q/k rows in the INTERLEAVED RoPE order (see rope.py):

    params.json + consolidated.safetensors          HF key (model.layers.{i}. abbreviated L.)
    tok_embeddings.weight                           model.embed_tokens.weight
    norm.weight                                     model.norm.weight
    output.weight                                   lm_head.weight
    layers.{i}.attention.w{q,k,v,o}.weight          L.self_attn.{q,k,v,o}_proj.weight   (q, k permuted)
    layers.{i}.attention_norm.weight                L.input_layernorm.weight
    layers.{i}.ffn_norm.weight                      L.post_attention_layernorm.weight
    layers.{i}.feed_forward.gate.weight             L.block_sparse_moe.gate.weight
    layers.{i}.feed_forward.experts.{j}.w{1,2,3}.weight   L.block_sparse_moe.experts.{j}.w{1,2,3}.weight
    layers.{i}.feed_forward.w{1,2,3}.weight         L.mlp.{gate,down,up}_proj.weight   (dense Mistral)

The original release (`consolidated.00.pt` ... `07.pt`) uses the same names except that each
layer's router is `layers.{i}.block_sparse_moe.gate.weight` and its experts are FUSED into three
tensors without a `.weight` suffix: `layers.{i}.block_sparse_moe.w1`, `w2`, `w3`, each of shape
`[E * I, H]`: expert j owns rows j*I .. (j+1)*I - 1. For w1 and w3 that block is the expert's
`[I, H]` matrix; for w2 it is the TRANSPOSE of the expert's `[H, I]` matrix.

Every function here is pure (tensors in, tensors out; views where possible, no copies of whole
models) so the loader can stream one tensor at a time through them.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from ..config import MixtralConfig
from ..model.rope import permute_qk_for_rotate_half, unpermute_qk_for_rotate_half

# ----------------------------------------------------------------------------- key names
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_TOP_BACK = {hf: mistral for mistral, hf in _TOP.items()}
# (Mistral suffix after `layers.{i}.`, HF suffix after `model.layers.{i}.`)
_LAYER_PAIRS = [
    (r"attention\.w([qkvo])\.weight", r"self_attn.\1_proj.weight"),
    (r"attention_norm\.weight", "input_layernorm.weight"),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight"),
    (r"feed_forward\.gate\.weight", "block_sparse_moe.gate.weight"),
    (r"block_sparse_moe\.gate\.weight", "block_sparse_moe.gate.weight"),     # original .pt release
    (r"feed_forward\.experts\.(\d+)\.(w[123])\.weight", r"block_sparse_moe.experts.\1.\2.weight"),
    (r"feed_forward\.w1\.weight", "mlp.gate_proj.weight"),
    (r"feed_forward\.w2\.weight", "mlp.down_proj.weight"),
    (r"feed_forward\.w3\.weight", "mlp.up_proj.weight"),
]
_HF_LAYER_PAIRS = [
    (r"self_attn\.([qkvo])_proj\.weight", r"attention.w\1.weight"),
    (r"input_layernorm\.weight", "attention_norm.weight"),
    (r"post_attention_layernorm\.weight", "ffn_norm.weight"),
    (r"block_sparse_moe\.gate\.weight", "feed_forward.gate.weight"),
    (r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", r"feed_forward.experts.\1.\2.weight"),
    (r"mlp\.gate_proj\.weight", "feed_forward.w1.weight"),
    (r"mlp\.down_proj\.weight", "feed_forward.w2.weight"),
    (r"mlp\.up_proj\.weight", "feed_forward.w3.weight"),
]
_FUSED_ORIGINAL = re.compile(r"layers\.(\d+)\.block_sparse_moe\.(w[123])$")


def _map_layer_key(key: str, prefix: str, new_prefix: str, pairs) -> "str | None":
    """`{prefix}{i}.{suffix}` -> `{new_prefix}{i}.{new suffix}` by the first matching (pattern, replacement)."""
    m = re.match(re.escape(prefix) + r"(\d+)\.(.+)$", key)
    if m:
        layer, rest = m.groups()
        for pattern, replacement in pairs:
            if re.fullmatch(pattern, rest):
                return f"{new_prefix}{layer}." + re.sub(pattern, replacement, rest)
    return None


def mistral_to_hf_key(key: str) -> str:
    """One Mistral key (either Mistral layout, except the fused experts) -> its Hugging Face key.

    `layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`.
    Raises KeyError naming the key when it is not a Mistral/Mixtral weight.
    """
    if key in _TOP:
        return _TOP[key]
    mapped = _map_layer_key(key, "layers.", "model.layers.", _LAYER_PAIRS)
    if mapped is not None:
        return mapped
    if _FUSED_ORIGINAL.match(key):
        raise KeyError(f"{key}: fused expert tensor of the original release; use mistral_to_hf_tensors()")
    raise KeyError(f"{key}: not a Mistral checkpoint key")


def hf_to_mistral_key(key: str) -> str:
    """Inverse of `mistral_to_hf_key` (consolidated.safetensors names). Raises KeyError when unknown."""
    if key in _TOP_BACK:
        return _TOP_BACK[key]
    mapped = _map_layer_key(key, "model.layers.", "layers.", _HF_LAYER_PAIRS)
    if mapped is not None:
        return mapped
    raise KeyError(f"{key}: not a Hugging Face Mixtral checkpoint key")


# ----------------------------------------------------------------------------- fused experts
def split_original_experts(fused: torch.Tensor, num_experts: int, w: str) -> list[torch.Tensor]:
    """Original-release fused experts -> one matrix per expert (views, no copy).

    fused: `[E * I, H]`. Returns E tensors: `[I, H]` for w1 and w3, `[H, I]` for w2 (each block
    of w2 is stored transposed, so it is transposed back here).
    """
    if w not in ("w1", "w2", "w3"):
        raise ValueError(f"w must be 'w1', 'w2' or 'w3', got {w!r}")
    if fused.dim() != 2 or fused.shape[0] % num_experts:
        raise ValueError(f"fused {w} of shape {tuple(fused.shape)} cannot be split into {num_experts} experts "
                         "of shape [I, H]")
    blocks = list(fused.chunk(num_experts, dim=0))
    return [b.t() for b in blocks] if w == "w2" else blocks


def fuse_original_experts(experts: Iterable[torch.Tensor], w: str) -> torch.Tensor:
    """Inverse of `split_original_experts`: E matrices (`[I, H]`, or `[H, I]` for w2) -> `[E * I, H]`."""
    experts = list(experts)
    if w == "w2":
        experts = [e.t() for e in experts]
    return torch.cat(experts, dim=0)


# ----------------------------------------------------------------------------- whole tensors
def _qk_heads(hf_key: str, cfg: MixtralConfig):
    """Heads to (un)permute for a q/k projection key, else None."""
    if hf_key.endswith("self_attn.q_proj.weight"):
        return cfg.num_attention_heads
    if hf_key.endswith("self_attn.k_proj.weight"):
        return cfg.num_key_value_heads
    return None


def mistral_to_hf_tensors(key: str, tensor: torch.Tensor, cfg: MixtralConfig) -> list[tuple[str, torch.Tensor]]:
    """One tensor of either Mistral layout -> [(HF key, tensor), ...] in the HF (rotate-half) convention.

    wq/wk rows are permuted from interleaved to rotate-half RoPE order; a fused original-release
    expert tensor `[E * I, H]` becomes E per-expert tensors (w2 transposed back). Other tensors
    pass through unchanged (same object).
    """
    m = _FUSED_ORIGINAL.match(key)
    if m:
        layer, w = m.groups()
        return [(f"model.layers.{layer}.block_sparse_moe.experts.{j}.{w}.weight", t)
                for j, t in enumerate(split_original_experts(tensor, cfg.num_local_experts, w))]
    hf_key = mistral_to_hf_key(key)
    heads = _qk_heads(hf_key, cfg)
    if heads is not None:
        tensor = permute_qk_for_rotate_half(tensor, heads)
    return [(hf_key, tensor)]


def hf_to_mistral_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: MixtralConfig) -> dict[str, torch.Tensor]:
    """Per-expert HF state dict -> `consolidated.safetensors` state dict (q/k rows un-permuted)."""
    out = {}
    for key, tensor in hf_state.items():
        heads = _qk_heads(key, cfg)
        out[hf_to_mistral_key(key)] = tensor if heads is None else unpermute_qk_for_rotate_half(tensor, heads)
    return out


def hf_to_original_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: MixtralConfig) -> dict[str, torch.Tensor]:
    """Per-expert HF state dict -> the original release's names, experts fused per layer.

    Keys as in consolidated.safetensors, except `layers.{i}.block_sparse_moe.gate.weight` and
    `layers.{i}.block_sparse_moe.w{1,2,3}` `[E * I, H]` (w2 blocks transposed).
    """
    mistral = hf_to_mistral_state_dict(hf_state, cfg)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in mistral.items():
        m = re.match(r"layers\.(\d+)\.feed_forward\.(gate\.weight|experts\.(\d+)\.(w[123])\.weight)$", key)
        if m is None:
            out[key] = tensor
        elif m.group(2) == "gate.weight":
            out[f"layers.{m.group(1)}.block_sparse_moe.gate.weight"] = tensor
    for layer in range(cfg.num_hidden_layers):
        for w in ("w1", "w2", "w3"):
            names = [f"layers.{layer}.feed_forward.experts.{j}.{w}.weight" for j in range(cfg.num_local_experts)]
            if all(n in mistral for n in names):
                out[f"layers.{layer}.block_sparse_moe.{w}"] = fuse_original_experts((mistral[n] for n in names), w)
    return out
