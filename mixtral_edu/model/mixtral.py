"""The assembled Mixtral: token embeddings, `num_hidden_layers` decoder layers, a final RMSNorm, lm_head.

    h = embed_tokens(input_ids)
    for each layer:
        h = h + self_attn(input_layernorm(h))                 # grouped-query attention with RoPE
        h = h + block_sparse_moe(post_attention_layernorm(h)) # top-k mixture of SwiGLU experts
    logits = lm_head(norm(h))

Module and parameter names follow the Hugging Face checkpoint keys (without the `model.`
prefix, see `weights/keys.py`), except that each layer's experts are stored stacked
(`block_sparse_moe.experts.w1 [E, I, H]` instead of `experts.{j}.w1.weight`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ..config import MixtralConfig
from .attention import Attention, KVCache
from .experts import Experts
from .moe import DISPATCH, SparseMoeBlock
from .norm import RMSNorm
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """One pre-norm block: `[batch, seq, hidden] -> ([batch, seq, hidden], router_logits [batch*seq, E] or None)`."""

    def __init__(self, cfg: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """cos, sin, positions, cache: see `Attention.forward`."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + moe_out, router_logits


class Mixtral(nn.Module):
    """Mixtral (or, with one expert, Mistral) decoder-only language model.

    Children: `embed_tokens` (nn.Embedding), `layers` (nn.ModuleList of DecoderLayer), `norm`
    (RMSNorm), `lm_head` (nn.Linear, no bias; the same Parameter as `embed_tokens.weight` when
    `cfg.tie_word_embeddings`), `rotary_emb` (cos/sin table, non-persistent buffers).
    Weights start random (normal, std 0.02; norms 1), like the reference's random init.
    """

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Re-draw every weight: normal(0, std) for matrices, ones for norm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, Experts):
                module.reset_parameters(std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def set_dispatch(self, dispatch: Union[str, Callable]) -> None:
        """Give every MoE block this dispatch: "auto", "grouped", "gathered" (see moe.py) or a function."""
        if isinstance(dispatch, str):
            if dispatch not in DISPATCH:
                raise ValueError(f"dispatch must be one of {tuple(DISPATCH)} or a function, got {dispatch!r}")
            dispatch = DISPATCH[dispatch]
        for layer in self.layers:
            layer.block_sparse_moe.dispatch = dispatch

    def new_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None,
                     device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty `KVCache` for `batch_size` sequences of up to `max_seq_len` tokens.

        Defaults: max_seq_len = config.max_position_embeddings; each layer's part on the device of that
        layer's weights (so a model split over devices gets a cache split the same way), in the
        weights' dtype.
        """
        cfg = self.config
        if device is None:
            layer_devices = [layer.input_layernorm.weight.device for layer in self.layers]
        else:
            layer_devices = [torch.device(device)] * cfg.num_hidden_layers
        return KVCache(
            cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads,
            cfg.max_position_embeddings if max_seq_len is None else max_seq_len, cfg.head_dim,
            dtype=self.embed_tokens.weight.dtype if dtype is None else dtype, layer_devices=layer_devices,
        )

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None,
                return_router_logits: bool = False, last_only: bool = False,
                positions: Optional[torch.Tensor] = None):
        """input_ids `[batch, seq]` -> logits `[batch, seq, vocab]` (in the weights' dtype).

        cache: a `KVCache` from `new_kv_cache`; the tokens attend to everything cached before them.
        positions: the tokens' positions `[seq]` (int64); default: right after what the cache holds
        (0 .. seq-1 without one), and the cache's `pos` moves past them.
        last_only: logits for the last position only (`[batch, 1, vocab]`).
        return_router_logits: also return a tuple, one entry per layer, of router logits `[batch*seq, E]`.
        """
        h = self.embed_tokens(input_ids)                                          # [batch, seq, hidden]
        if positions is None:
            batch, seq = input_ids.shape
            positions = torch.arange(seq, device=h.device) if cache is None else cache.next_positions(batch, seq)
        cos, sin = self.rotary_emb(positions)                                     # [seq, head_dim] each
        router_logits = []
        for layer in self.layers:
            h, layer_router_logits = layer(h, cos, sin, positions, cache)
            router_logits.append(layer_router_logits)
        logits = self.lm_head(self.norm(h[:, -1:] if last_only else h))           # [batch, seq or 1, vocab]
        return (logits, tuple(router_logits)) if return_router_logits else logits
