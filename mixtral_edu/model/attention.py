"""Grouped-query attention with a causal (optionally sliding-window) mask and a static KV cache.

Each of the `num_attention_heads` query heads attends with one of `num_key_value_heads` key/value
heads; query heads h*g .. h*g+g-1 (g = num_key_value_groups) share key/value head h. Mixtral-8x7B
has 32 query heads and 8 KV heads, so its KV cache is 4x smaller than with one KV head per query head.

Token at position p may attend to key position j when j <= p (causal) and, if the config sets a
`sliding_window` W, also p - j < W (Mixtral has no window; Mistral-7B-v0.1 used W = 4096).

Incremental decoding keeps every layer's rotated keys and values in a `KVCache` allocated once
for `max_seq_len` tokens; each call writes the new tokens' K/V at the cache position and attends
to everything written so far. All sequences of a batch share that position (no padding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MixtralConfig
from .rope import apply_rope


class KVCache:
    """Pre-allocated keys and values of every layer.

    k, v: `[num_layers, batch, num_kv_heads, max_seq_len, head_dim]`; `pos` is the number of tokens
    already written (the position of the next token). Layers write with `update`; the model calls
    `advance` once after all layers have run.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return self.k.numel() * self.k.element_size() * 2

    def check_room(self, batch_size: int, num_new: int) -> None:
        """Raise ValueError unless `num_new` tokens of a `batch_size` batch fit after `pos`."""
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was allocated for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.pos + num_new > self.max_seq_len:
            raise ValueError(
                f"KV cache is full: {self.pos} tokens cached + {num_new} new > max_seq_len {self.max_seq_len}"
            )

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[batch, kv_heads, new, head_dim]` at `pos`; return all cached K, V so far.

        The returned tensors `[batch, kv_heads, pos + new, head_dim]` are views into the cache (no copy).
        """
        end = self.pos + k.shape[2]
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, num_new: int) -> None:
        self.pos += num_new

    def reset(self) -> None:
        """Forget the cached tokens (the memory stays allocated)."""
        self.pos = 0


def attention_mask(q_len: int, start: int, kv_len: int, sliding_window: Optional[int] = None,
                   device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Boolean mask `[q_len, kv_len]`, True where query i (position start+i) may attend to key j.

    Allowed: j <= start + i, and with a sliding window W also start + i - j < W.
    """
    q_pos = torch.arange(start, start + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    return allowed


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE: `[batch, seq, hidden] -> [batch, seq, hidden]`.

    Parameters (names as in Hugging Face checkpoints, no biases):
    q_proj `[heads * head_dim, hidden]`, k_proj and v_proj `[kv_heads * head_dim, hidden]`,
    o_proj `[hidden, heads * head_dim]`. Scores are scaled by 1/sqrt(head_dim).
    """

    def __init__(self, cfg: MixtralConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x `[batch, seq, hidden]`; cos, sin `[seq, head_dim]` for the tokens' positions.

        With a cache the new keys/values are stored at `cache.pos` (the caller advances it) and
        the queries attend to all cached tokens.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
        kv_len = k.shape[2]

        # Cheapest correct mask: SDPA's built-in causal mask only fits when queries and keys start
        # together; a single new token without a window sees every cached key; otherwise build one.
        window_matters = self.sliding_window is not None and kv_len > self.sliding_window
        mask, is_causal = None, False
        if not window_matters and start == 0 and seq > 1:
            is_causal = True
        elif window_matters or seq > 1:
            mask = attention_mask(seq, start, kv_len, self.sliding_window, device=x.device)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
