"""Grouped-query attention with a causal (optionally sliding-window) mask and a static KV cache.

Each of the `num_attention_heads` query heads attends with one of `num_key_value_heads` key/value
heads; query heads h*g .. h*g+g-1 (g = num_key_value_groups) share key/value head h. Mixtral-8x7B
has 32 query heads and 8 KV heads, so its KV cache is 4x smaller than with one KV head per query head.

Token at position p may attend to key position j when j <= p (causal) and, if the config sets a
`sliding_window` W, also p - j < W (Mixtral has no window; Mistral-7B-v0.1 used W = 4096).

Incremental decoding keeps every layer's rotated keys and values in a `KVCache` allocated once
for `max_seq_len` tokens; each call writes the new tokens' K/V at the cache position and attends
to everything written so far. All sequences of a batch share that position (no padding). The same
forward also runs with the positions given as a tensor (`positions=`): then the cache is written with
`index_copy_` and the queries attend to the whole cache under a mask, so every decoding step has the
same shapes and needs nothing from the host — what torch.compile and CUDA graphs capture.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MixtralConfig
from .rope import apply_rope


class KVCache:
    """Pre-allocated keys and values of every layer, each layer's on that layer's device.

    k[i], v[i]: `[batch, num_kv_heads, max_seq_len, head_dim]` for decoder layer i, on
    `layer_devices[i]` (default: all on `device`), so a model split over GPUs by layers keeps
    each layer's cache beside its weights. `pos` is the number of tokens already written (the
    position of the next token). Layers write with `update` (eager) or `write_at` (a step with
    tensor positions, see `Attention.forward`); the model calls `advance` after an eager forward.
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

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[batch, kv_heads, new, head_dim]` at `pos`; return all cached K, V so far.

        The returned tensors `[batch, kv_heads, pos + new, head_dim]` are views into the cache (no copy).
        """
        end = self.pos + k.shape[2]
        self.k[layer_idx][:, :, self.pos:end] = k
        self.v[layer_idx][:, :, self.pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def write_at(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[batch, kv_heads, new, head_dim]` at the positions in tensor `[new]`; return the
        layer's whole cache `[batch, kv_heads, max_seq_len, head_dim]` (always the same shape).

        `index_copy_` takes the positions from device memory: no host sync, capturable in a CUDA graph.
        Does not move `pos`.
        """
        self.k[layer_idx].index_copy_(2, positions, k)
        self.v[layer_idx].index_copy_(2, positions, v)
        return self.k[layer_idx], self.v[layer_idx]

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
    return attention_mask_at(torch.arange(start, start + q_len, device=device), kv_len, sliding_window)


def attention_mask_at(positions: torch.Tensor, kv_len: int, sliding_window: Optional[int] = None) -> torch.Tensor:
    """The same mask for queries at the positions in an int64 tensor `[q_len]` -> `[q_len, kv_len]`."""
    q_pos = positions[:, None]
    k_pos = torch.arange(kv_len, device=positions.device)[None, :]
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

    # fuse_qkv_ may store q, k and v as one product here; kept out of the module tree (a plain attribute),
    # so state_dict(), checkpoints and hooks still see q_proj, k_proj and v_proj.
    fused_qkv: Optional[nn.Module] = None

    def fuse_qkv_(self) -> None:
        """Store q, k and v's weights as one tensor `[(heads + 2 kv_heads) * head_dim, hidden]` and
        make q_proj/k_proj/v_proj's weights views of it: one product instead of three per call, no extra
        memory, the same values. Works for nn.Linear and Int8Linear projections (after quantising)."""
        if self.fused_qkv is not None:
            return
        mods = (self.q_proj, self.k_proj, self.v_proj)
        fused = copy.copy(self.q_proj)                       # same class (nn.Linear or Int8Linear)
        fused._parameters, fused._buffers = dict(fused._parameters), dict(fused._buffers)
        start = 0
        for name in [n for n in ("weight", "scale") if hasattr(self.q_proj, n)]:
            whole = torch.cat([getattr(m, name).detach() for m in mods])
            start = 0
            for m in mods:
                n = getattr(m, name).shape[0]
                part = whole[start:start + n]
                setattr(m, name, nn.Parameter(part, requires_grad=False) if name in m._parameters else part)
                start += n
            setattr(fused, name, nn.Parameter(whole, requires_grad=False) if name in fused._parameters else whole)
        fused.out_features = start
        self.__dict__["fused_qkv"] = fused

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x `[batch, seq, hidden]`; cos, sin `[seq, head_dim]` for the tokens' positions.

        With a cache the new keys/values are stored at `cache.pos` (the caller advances it) and
        the queries attend to all cached tokens.
        positions: the tokens' positions as an int64 tensor `[seq]` — the static-shape step of
        `FastDecoder`: keys/values go into the cache at those positions and the queries attend to the
        whole cache under a mask, so every step has the same shapes and never waits for the device.
        """
        batch, seq, _ = x.shape
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x).split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask, is_causal = None, False
        if positions is not None:                                  # static shapes: the whole cache, masked
            k, v = cache.write_at(self.layer_idx, k, v, positions)
            mask = attention_mask_at(positions, k.shape[2], self.sliding_window)
        else:
            start = 0
            if cache is not None:
                start = cache.pos
                k, v = cache.update(self.layer_idx, k, v)
            kv_len = k.shape[2]
            # Cheapest correct mask: SDPA's built-in causal mask only fits when queries and keys start
            # together; a single new token without a window sees every cached key; otherwise build one.
            window_matters = self.sliding_window is not None and kv_len > self.sliding_window
            if not window_matters and start == 0 and seq > 1:
                is_causal = True
            elif window_matters or seq > 1:
                mask = attention_mask(seq, start, kv_len, self.sliding_window, device=x.device)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
