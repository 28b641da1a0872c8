"""The SwiGLU expert: `w2(silu(w1 x) * w3 x)`.

w1 ("gate") and w3 ("up") both map hidden -> intermediate; the SiLU of one gates the other
elementwise, and w2 ("down") maps back. An 8x7B expert has 3 * 4096 * 14336 = 176,160,768
parameters, and 8 of them per layer make up 96.6% of the model.

`Experts` keeps all experts of a layer as three STACKED parameters, w1 `[E, I, H]`, w2 `[E, H, I]`,
w3 `[E, I, H]`: `w1[e]` is expert e's matrix as a view (no copy), and a batch of tokens can pick
their experts' weights with one gather (`w1[expert_ids]`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert on x `[..., hidden]`: w1, w3 `[intermediate, hidden]`, w2 `[hidden, intermediate]`.

    Returns `[..., hidden]`.
    """
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class Experts(nn.Module):
    """All experts of one layer, stacked.

    w1, w3 `[num_experts, intermediate, hidden]`; w2 `[num_experts, hidden, intermediate]`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) initialisation, as the reference uses for random models."""
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Run expert number `expert` on x `[..., hidden]` -> `[..., hidden]` (weights used as views)."""
        return swiglu_expert(x, self.w1[expert], self.w2[expert], self.w3[expert])

    def forward_gathered(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each token through each of its own experts at once.

        x `[tokens, hidden]`, expert_ids `[tokens, k]` -> `[tokens, k, hidden]`. The chosen experts'
        weights are gathered into `[tokens, k, ...]` copies, then applied with batched matmuls.
        """
        x = x[:, None, :, None]                                   # [T, 1, H, 1]
        w1, w3, w2 = self.w1[expert_ids], self.w3[expert_ids], self.w2[expert_ids]  # [T, k, I, H], [T, k, H, I]
        h = F.silu(torch.matmul(w1, x)) * torch.matmul(w3, x)    # [T, k, I, 1]
        return torch.matmul(w2, h).squeeze(-1)                   # [T, k, H]

    def extra_repr(self) -> str:
        e, i, h = self.w1.shape
        return f"num_experts={e}, hidden={h}, intermediate={i}"
