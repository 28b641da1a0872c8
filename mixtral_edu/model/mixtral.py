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

from typing import Optional

import torch
from torch import nn

from .attention import Attention, KVCache
from ..config import MixtralConfig
from .experts import Experts
from .moe import SparseMoeBlock
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """positions: see `Attention.forward`; given, the experts are also picked without a host sync."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions)
        dispatch = None if positions is None else "sync_free"
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(x), dispatch)
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

    def set_dispatch(self, dispatch: str) -> None:
        """Set every MoE block's dispatch strategy: "auto", "grouped" or "gathered" (see moe.py)."""
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
                input_pos: Optional[torch.Tensor] = None):
        """input_ids `[batch, seq]` -> logits `[batch, seq, vocab]` (in the weights' dtype).

        cache: a `KVCache` from `new_kv_cache`; the tokens are placed at positions
        cache.pos .. cache.pos + seq - 1, attend to everything cached, and the position advances.
        last_only: compute logits for the last position only (`[batch, 1, vocab]`).
        return_router_logits: also return a tuple, one entry per layer, of router logits
        `[batch*seq, E]` (None for a dense model's layers).
        input_pos: the tokens' positions as an int64 tensor `[seq]`, with a cache: the static-shape
        step that `FastDecoder` compiles and captures. The same layers run; the cache is written at
        those positions and read whole under a mask, the experts are picked on the device, and nothing
        here waits for it — so the token ids are not checked and `cache.pos` is left to the caller.
        """
        if input_pos is not None:
            if cache is None:
                raise ValueError("input_pos needs a KVCache to write the keys and values into")
            return self._forward(input_ids, *self.rotary_emb.at(input_pos), cache, input_pos,
                                 return_router_logits, last_only)
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq == 0:
            raise ValueError("input_ids has no tokens (seq length 0)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size})")
        start = 0
        if cache is not None:
            cache.check_room(batch, seq)
            start = cache.pos
        out = self._forward(input_ids, *self.rotary_emb(start, seq), cache, None, return_router_logits, last_only)
        if cache is not None:
            cache.advance(seq)
        return out

    def _forward(self, input_ids, cos, sin, cache, positions, return_router_logits, last_only):
        """The layers themselves, for both kinds of call: cos, sin `[seq, head_dim]`; positions `[seq]` or None."""
        h = self.embed_tokens(input_ids)
        all_router_logits = []
        for layer in self.layers:
            h, router_logits = layer(h, cos, sin, cache, positions)
            all_router_logits.append(router_logits)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))
        if return_router_logits:
            return logits, tuple(all_router_logits)
        return logits
