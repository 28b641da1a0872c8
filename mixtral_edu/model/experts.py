"""The SwiGLU expert: `w2(silu(w1 x) * w3 x)`, and the one interface every storage of experts implements.

w1 ("gate") and w3 ("up") both map hidden -> intermediate; the SiLU of one gates the other
elementwise, and w2 ("down") maps back. An 8x7B expert has 3 * 4096 * 14336 = 176,160,768
parameters, and 8 of them per layer make up 96.6% of the model.

The formula is written once, in `swiglu_expert`. Every way of storing experts (this module's
float `Experts`; int8, offloaded and column-major ones in `inference/`) is an `ExpertsBase`: it says
how to get an expert's weights (`expert_weights`, `gathered_weights`) and how to multiply by one
(`linear`, `batched_linear`); `forward` and `forward_gathered`, which the MoE block calls, are here once.

`Experts` keeps all experts of a layer as three STACKED parameters, w1 `[E, I, H]`, w2 `[E, H, I]`,
w3 `[E, I, H]`: `w1[e]` is expert e's matrix as a view (no copy), and a batch of tokens can pick
their experts' weights with one gather (`w1[expert_ids]`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_expert(x: torch.Tensor, w1, w2, w3, linear: Callable = F.linear) -> torch.Tensor:
    """One expert on x `[..., hidden]`: `w2(silu(w1 x) * w3 x)`.

    w1, w3 `[intermediate, hidden]` and w2 `[hidden, intermediate]` (or whatever `linear` takes:
    int8 codes with scales, gathered `[tokens, k, out, in]` stacks). Returns `[..., hidden]`.
    """
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def gathered_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each token times its own matrices: x `[T, k or 1, in]`, w `[T, k, out, in]` -> `[T, k, out]`."""
    return torch.matmul(w, x[..., None])[..., 0]


class ExpertsBase(nn.Module):
    """The interface of one layer's experts, whatever their storage.

    Subclasses give `num_experts`, `expert_weights(e)` -> (w1, w2, w3) and `gathered_weights(ids)`,
    and may override `linear` / `batched_linear` (the product with one such weight).
    """

    num_experts: int

    def expert_weights(self, expert: int) -> tuple:
        raise NotImplementedError

    def gathered_weights(self, expert_ids: torch.Tensor) -> tuple:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        return F.linear(x, w)

    def batched_linear(self, x: torch.Tensor, w) -> torch.Tensor:
        return gathered_linear(x, w)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Run expert number `expert` on x `[..., hidden]` -> `[..., hidden]`."""
        return swiglu_expert(x, *self.expert_weights(expert), self.linear)

    def forward_gathered(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each token through each of its own experts at once, with no host sync.

        x `[tokens, hidden]`, expert_ids `[tokens, k]` -> `[tokens, k, hidden]`. The chosen experts'
        weights are gathered into `[tokens, k, ...]` copies, then applied with batched products.
        """
        return swiglu_expert(x[:, None, :], *self.gathered_weights(expert_ids), self.batched_linear)


class Experts(ExpertsBase):
    """All experts of one layer, stacked, in float.

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

    def expert_weights(self, expert: int) -> tuple:
        return self.w1[expert], self.w2[expert], self.w3[expert]          # views, no copy

    def gathered_weights(self, expert_ids: torch.Tensor) -> tuple:
        return self.w1[expert_ids], self.w2[expert_ids], self.w3[expert_ids]   # [T, k, out, in] copies

    def extra_repr(self) -> str:
        e, i, h = self.w1.shape
        return f"num_experts={e}, hidden={h}, intermediate={i}"
