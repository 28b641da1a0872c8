"""Hugging Face checkpoint keys <-> this model's parameter names.

A Hugging Face Mixtral checkpoint (`model-000NN-of-000MM.safetensors`, what `save_pretrained`
writes) names its tensors like this; ours are the same without the `model.` prefix, except that
the experts of a layer are stacked into one parameter each:

    HF key                                                  ours
    model.embed_tokens.weight                               embed_tokens.weight
    model.layers.{i}.input_layernorm.weight                 layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight        layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.post_attention_layernorm.weight        layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.block_sparse_moe.gate.weight           layers.{i}.block_sparse_moe.gate.weight
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight layers.{i}.block_sparse_moe.experts.w1[j]
      (same for w2, w3)
    model.norm.weight                                       norm.weight
    lm_head.weight                                          lm_head.weight (absent when tied to embed_tokens)

A dense Mistral checkpoint has `model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight`
instead of the router and experts; they map to expert 0's w1, w3, w2.

transformers 5 keeps experts FUSED in memory (`MixtralForCausalLM.state_dict()`):
`model.layers.{i}.mlp.gate.weight` (the router), `model.layers.{i}.mlp.experts.gate_up_proj`
`[E, 2I, H]` = w1 (gate) rows then w3 (up) rows per expert, and `mlp.experts.down_proj` `[E, H, I]`
= w2. Its `save_pretrained` still writes the per-expert keys above. `split_fused_experts` turns
the fused form into the per-expert form; `load.load_hf_state_dict` accepts either.

The q/k rows in HF checkpoints are already permuted for rotate-half RoPE (see rope.py), which is
the convention this model uses, so no permutation happens here.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import nn

_LAYER = r"model\.layers\.(\d+)\."
_EXPERT = re.compile(_LAYER + r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_DENSE_MLP = re.compile(_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_DENSE_TO_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_W_TO_DENSE = {w: name for name, w in _DENSE_TO_W.items()}
_LAYER_PLAIN = re.compile(
    _LAYER + r"(input_layernorm\.weight|post_attention_layernorm\.weight|self_attn\.[qkvo]_proj\.weight"
    r"|block_sparse_moe\.gate\.weight|mlp\.gate\.weight)$"
)
_FUSED = re.compile(_LAYER + r"mlp\.experts\.(gate_up_proj|down_proj)$")
_TOP_LEVEL = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}


def is_stacked_expert(name: str) -> bool:
    """True for a layer's stacked expert weights (`layers.{i}.block_sparse_moe.experts.w1` ...), which
    hold one row per expert: `[E, ...]`."""
    return re.search(r"\.experts\.w[123]$", name) is not None


def hf_to_ours_key(hf_key: str) -> tuple[str, Optional[int]]:
    """Map one per-expert HF key to (our parameter name, expert index or None).

    `model.layers.3.block_sparse_moe.experts.5.w1.weight` -> (`layers.3.block_sparse_moe.experts.w1`, 5).
    Raises KeyError naming the key when it is not a Mixtral/Mistral weight.
    """
    if hf_key in _TOP_LEVEL:
        return _TOP_LEVEL[hf_key], None
    m = _EXPERT.match(hf_key)
    if m:
        layer, expert, w = m.groups()
        return f"layers.{layer}.block_sparse_moe.experts.{w}", int(expert)
    m = _DENSE_MLP.match(hf_key)
    if m:
        layer, proj = m.groups()
        return f"layers.{layer}.block_sparse_moe.experts.{_DENSE_TO_W[proj]}", 0
    m = _LAYER_PLAIN.match(hf_key)
    if m:
        layer, rest = m.groups()
        return f"layers.{layer}.{rest.replace('mlp.gate.', 'block_sparse_moe.gate.')}", None
    if _FUSED.match(hf_key):
        raise KeyError(f"{hf_key}: fused transformers-5 expert tensor; convert with split_fused_experts() first")
    raise KeyError(f"{hf_key}: not a Mixtral checkpoint key")


def ours_to_hf_key(name: str, expert: Optional[int] = None, dense: bool = False) -> str:
    """Inverse of `hf_to_ours_key` (the checkpoint-file form). `dense=True` gives Mistral's mlp names."""
    m = re.match(r"layers\.(\d+)\.block_sparse_moe\.experts\.(w[123])$", name)
    if m:
        layer, w = m.groups()
        if dense:
            return f"model.layers.{layer}.mlp.{_W_TO_DENSE[w]}.weight"
        if expert is None:
            raise ValueError(f"{name}: an expert index is needed for a stacked expert parameter")
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
    if name == "lm_head.weight":
        return name
    return "model." + name


def split_fused_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 in-memory keys -> per-expert checkpoint keys (views, no copy).

    `mlp.gate.weight` -> `block_sparse_moe.gate.weight`; `mlp.experts.gate_up_proj [E, 2I, H]`
    -> `experts.{j}.w1.weight` (first I rows) and `.w3.weight` (last I rows); `mlp.experts.down_proj
    [E, H, I]` -> `experts.{j}.w2.weight`. Other keys pass through unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _FUSED.match(key)
        if m:
            layer, kind = m.groups()
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            if tensor.dim() != 3:
                raise ValueError(f"{key}: expected a 3-D fused expert tensor, got shape {tuple(tensor.shape)}")
            if kind == "gate_up_proj":
                if tensor.shape[1] % 2:
                    raise ValueError(f"{key}: gate_up_proj needs an even number of rows, got {tensor.shape[1]}")
                w1, w3 = tensor.chunk(2, dim=1)
                for j in range(tensor.shape[0]):
                    out[f"{prefix}.{j}.w1.weight"] = w1[j]
                    out[f"{prefix}.{j}.w3.weight"] = w3[j]
            else:
                for j in range(tensor.shape[0]):
                    out[f"{prefix}.{j}.w2.weight"] = tensor[j]
        elif re.match(_LAYER + r"mlp\.gate\.weight$", key):
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = tensor
        else:
            out[key] = tensor
    return out


def to_hf_state_dict(model: nn.Module, clone: bool = False) -> dict[str, torch.Tensor]:
    """Our model's weights under per-expert HF checkpoint keys (Mistral mlp keys for a dense model).

    The tensors are views sharing memory with the model (`w1[j]` etc.); pass clone=True to get
    independent copies (safetensors refuses to save tensors that share memory). lm_head.weight is
    left out when tied to the embeddings, as `save_pretrained` does.
    """
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():     # a tied lm_head is listed once, as embed_tokens
        tensor = param.detach()
        if re.search(r"\.experts\.w[123]$", name):
            if not cfg.is_moe:
                out[ours_to_hf_key(name, dense=True)] = tensor[0]
            else:
                for j in range(tensor.shape[0]):
                    out[ours_to_hf_key(name, j)] = tensor[j]
        else:
            out[ours_to_hf_key(name)] = tensor
    if clone:
        out = {k: v.clone() for k, v in out.items()}
    return out
