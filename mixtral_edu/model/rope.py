"""Rotary position embeddings (RoPE), in both conventions found in Mixtral checkpoints.

RoPE rotates pairs of query/key channels by an angle proportional to the token's position m:
pair i turns by m * theta_i with theta_i = rope_theta^(-2i / head_dim), i = 0 .. head_dim/2 - 1.
A query at position m and a key at position n then score q_m . k_n = f(q, k, m - n): attention
sees only the relative offset.

Which channels form a pair is a convention:

* rotate-half (Hugging Face checkpoints, and this model): channel i pairs with channel
  i + head_dim/2, so  x' = x * cos + rotate_half(x) * sin  with rotate_half([a, b]) = [-b, a].
* interleaved (Mistral's and Meta's reference code): channels 2i and 2i+1 are one complex
  number, multiplied by exp(1j * m * theta_i).

The two give the same attention scores when the rows of the q and k projection weights are
permuted head by head: within each head, rotate-half wants the even rows of the interleaved
weight first, then the odd rows (`permute_qk_for_rotate_half`); `unpermute_qk_for_rotate_half`
undoes it. This is why Hugging Face's q_proj/k_proj differ from Mistral's wq/wk.
"""

from __future__ import annotations

import torch
from torch import nn


# ----------------------------------------------------------------------------- frequencies
def rope_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """theta_i = rope_theta^(-2i/head_dim) for i < head_dim/2: `[head_dim // 2]`, float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(head_dim: int, max_positions: int, rope_theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta_i for positions m < max_positions, rotate-half layout.

    Returns two float32 tensors `[max_positions, head_dim]`; column j uses frequency j mod head_dim/2
    (the frequencies are repeated for the two halves).
    """
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(head_dim, rope_theta))
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------- rotate-half
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] along the last dimension (halves of size head_dim/2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys, rotate-half convention.

    x: `[batch, heads, seq, head_dim]`; cos, sin: `[seq, head_dim]` for those tokens' positions.
    Returns `[batch, heads, seq, head_dim]`.
    """
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """The cos/sin table, computed once for every position up to `max_positions`.

    Buffers `cos`, `sin` `[max_positions, head_dim]` are non-persistent: they are not part of the
    state dict (checkpoints do not carry them), and `model.to(dtype)` casts them like the reference
    casts its cos/sin to the activations' dtype.
    """

    def __init__(self, head_dim: int, max_positions: int, rope_theta: float) -> None:
        super().__init__()
        cos, sin = rope_cos_sin(head_dim, max_positions, rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[seq, head_dim]` for the positions in an int64 tensor `[seq]` (picked on the device)."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


# ----------------------------------------------------------------------------- interleaved
def rope_freqs_cis(head_dim: int, max_positions: int, rope_theta: float) -> torch.Tensor:
    """exp(1j * m * theta_i) for m < max_positions: complex64 `[max_positions, head_dim // 2]`."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(head_dim, rope_theta))
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_interleaved(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys, interleaved convention (Mistral's reference code).

    x: `[batch, heads, seq, head_dim]` where channels (2i, 2i+1) are the real and imaginary parts
    of one complex number; freqs_cis: complex `[seq, head_dim // 2]`. Returns x's shape and dtype.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- q/k permutation
def _check_qk_weight(w: torch.Tensor, n_heads: int) -> int:
    if w.dim() != 2:
        raise ValueError("expected a 2-D q/k projection weight [n_heads * head_dim, hidden], "
                         f"got shape {tuple(w.shape)}")
    if n_heads <= 0 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(
            f"q/k weight with {w.shape[0]} rows cannot be split into {n_heads} heads of even head_dim"
        )
    return w.shape[0] // n_heads


def permute_qk_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-convention q/k weight -> rotate-half weight (Mistral `wq`/`wk` -> HF `q_proj`/`k_proj`).

    w: `[n_heads * head_dim, hidden]`. Within each head, output row j < head_dim/2 is input row 2j
    and output row head_dim/2 + j is input row 2j + 1. Use n_heads = num_attention_heads for q and
    num_key_value_heads for k. Returns a new contiguous tensor of the same shape.
    """
    head_dim = _check_qk_weight(w, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def unpermute_qk_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk_for_rotate_half`: rotate-half q/k weight -> interleaved weight.

    w: `[n_heads * head_dim, hidden]`; returns a new contiguous tensor of the same shape.
    """
    head_dim = _check_qk_weight(w, n_heads)
    return w.reshape(n_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
