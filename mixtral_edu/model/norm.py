"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel gain.

    rms(x)  = sqrt(mean_i x_i^2 + eps)
    y       = weight * x / rms(x)

Unlike LayerNorm there is no mean subtraction and no bias. Mixtral applies it before attention
(`input_layernorm`), before the experts (`post_attention_layernorm`) and once at the end (`norm`).
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dimension of x `[..., hidden]` and scale by weight `[hidden]`.

    The statistics are computed in float32 even for bf16/fp16 inputs (as the reference does);
    for float32 inputs `.float()` returns the same tensor, so there is no round trip.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: `[..., hidden] -> [..., hidden]`; parameter `weight [hidden]` (ones at init)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
