"""Full-size Mixtral models with random weights, built directly on a device: for benchmarks only.

Speed and memory of decoding do not depend on what the weights are, so `benchmarks/decode.py` measures
them on random weights and nobody has to download 93 GB first. It lives here, not in the package: a
learner reading mixtral_edu/ meets the model and the machinery that runs real checkpoints.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.model.norm import RMSNorm
from mixtral_edu.inference.quant import quantize_layer_
from mixtral_edu.model.rope import RotaryEmbedding
from mixtral_edu.weights.load import meta_skeleton


@torch.no_grad()
def random_model(cfg: MixtralConfig, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 quant: Optional[str] = None, seed: int = 0, std: float = 0.02) -> Mixtral:
    """A Mixtral with random normal(0, std) weights built directly on `device` in `dtype`.

    Nothing is ever materialised on the CPU: the model is laid out on the meta device, then each
    part is allocated and filled on `device`. quant="int8": each layer is drawn in `dtype` and
    quantised before the next one is drawn, so peak memory is the int8 model plus one layer.
    """
    if quant not in (None, "int8"):
        raise ValueError(f"quant must be None or 'int8', got {quant!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    model = meta_skeleton(cfg).to(dtype=dtype)      # shapes only: no random init, no RoPE table, nothing allocated

    def materialise(module: nn.Module) -> None:
        module.to_empty(device=device, recurse=True)
        for p in module.parameters():
            p.normal_(0.0, std, generator=gen)
        for m in module.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    for part in (model.embed_tokens, model.norm, model.lm_head):
        materialise(part)
    for layer in model.layers:
        materialise(layer)
        if quant == "int8":
            quantize_layer_(layer)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(
        device=device, dtype=dtype)
    return model.requires_grad_(False).eval()
