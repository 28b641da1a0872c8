"""Grouped-query attention with a causal (optionally sliding-window) mask and a KV cache.

Each of the `num_attention_heads` query heads attends with one of `num_key_value_heads` key/value
heads; query heads h*g .. h*g+g-1 (g = num_key_value_groups) share key/value head h. Mixtral-8x7B
has 32 query heads and 8 KV heads, so its KV cache is 4x smaller than with one KV head per query head.

A query at position p may attend to a key at position j when j <= p (causal) and, if the config
sets a `sliding_window` W, also p - j < W (Mixtral has no window; Mistral-7B-v0.1 used W = 4096).

Decoding keeps every layer's rotated keys and values in a `KVCache` allocated once for
`max_seq_len` tokens. Each call writes the new tokens' keys and values at their positions and
attends to the layer's whole cache under the same mask rule: slot j holds position j, and the
slots not written yet lie in the future, so the mask hides them. Prefill, decode and a compiled
or captured step all run this one path, with the same shapes at every decoding step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MixtralConfig
from .rope import apply_rope


class KVCache:
    """Pre-allocated keys and values of every layer, each layer's on that layer's device.

    k[i], v[i]: `[batch, num_kv_heads, max_seq_len, head_dim]` for decoder layer i, on
    `layer_devices[i]` (default: all on `device`). `pos`: how many tokens are cached (the position
    of the next one); `next_positions` hands out positions and moves it.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32,
                 layer_devices: Optional[list] = None) -> None:
        if layer_devices is None:
            layer_devices = [device] * num_layers
        if len(layer_devices) != num_layers:
            raise ValueError(f"layer_devices names {len(layer_devices)} devices for {num_layers} layers")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, device=d, dtype=dtype) for d in layer_devices]
        self.v = [torch.zeros(shape, device=d, dtype=dtype) for d in layer_devices]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def check_room(self, batch_size: int, num_new: int) -> None:
        """Raise ValueError unless `num_new` tokens of a `batch_size` batch fit after `pos`."""
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was allocated for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.pos + num_new > self.max_seq_len:
            raise ValueError(
                f"KV cache is full: {self.pos} tokens cached + {num_new} new > max_seq_len {self.max_seq_len}"
            )

    def next_positions(self, batch_size: int, num_new: int) -> torch.Tensor:
        """Positions pos .. pos + num_new - 1 `[num_new]` (int64, on layer 0's device) for new tokens; moves pos."""
        self.check_room(batch_size, num_new)
        positions = torch.arange(self.pos, self.pos + num_new, device=self.k[0].device)
        self.pos += num_new
        return positions

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[batch, kv_heads, new, head_dim]` at `positions` `[new]`; return the layer's
        whole cache K, V `[batch, kv_heads, max_seq_len, head_dim]`, slot j holding position j.

        `index_copy_` reads the positions from device memory, so nothing waits for a GPU.
        """
        self.k[layer_idx].index_copy_(2, positions, k)
        self.v[layer_idx].index_copy_(2, positions, v)
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, num_new: int) -> None:
        self.pos += num_new

    def reset(self) -> None:
        """Forget the cached tokens (the memory stays allocated)."""
        self.pos = 0


def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor,
                   sliding_window: Optional[int] = None) -> torch.Tensor:
    """Boolean mask `[q_len, k_len]`, True where the query at q_positions[i] may see the key at
    k_positions[j]: k <= q, and with a sliding window W also q - k < W."""
    q, k = q_positions[:, None], k_positions[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x `[batch, seq, hidden]`; cos, sin `[seq, head_dim]` and positions `[seq]` of those tokens."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_positions = positions
        if cache is not None:                       # attend to the whole cache: slot j is position j
            k, v = cache.update(self.layer_idx, k, v, positions)
            k_positions = torch.arange(k.shape[2], device=k.device)
        mask = attention_mask(positions, k_positions, self.sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
