"""The sparse mixture-of-experts block: route every token to k experts and add up their outputs.

    y(x) = sum over the k chosen experts e of  weight_e(x) * expert_e(x)

Only k of the E experts run per token (Mixtral: 2 of 8), so a token touches about a quarter of
the expert weights. How tokens get to their experts ("dispatch") changes the speed, never the
result; the block calls whichever dispatch function it holds (`block.dispatch`):

* `dispatch_grouped`: sort the (token, slot) pairs by expert and run each expert once on all of
  its tokens, so each expert's weights are read once however many tokens chose it (prefill, training);
* `dispatch_gathered`: each token through its own k experts (`experts(x, e)` on weight views for a
  single token, a gather of the chosen weights and batched products for several);
* `dispatch_auto` (the default): gathered for one token (batch-1 decoding), grouped otherwise.

`inference/` installs others (a sync-free one for captured decoding steps, a Triton kernel) by
setting `block.dispatch`. The experts are any `ExpertsBase` (dense, int8, offloaded, ...).

A dense config (`num_local_experts == 1`, e.g. Mistral-7B) uses this block with one expert and no
router: `gate` is None, the expert's weight is 1 and the router logits are None.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import MixtralConfig
from .experts import Experts, ExpertsBase
from .router import route


def dispatch_grouped(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                     expert_ids: torch.Tensor) -> torch.Tensor:
    """x `[tokens, hidden]`, weights and expert_ids `[tokens, k]` -> `[tokens, hidden]`.

    Runs each expert once, on the tokens that chose it.
    """
    num_tokens, k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)                         # [tokens * k], slot-major per token
    order = torch.argsort(flat_ids, stable=True)              # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=experts.num_experts).tolist()
    grouped_x = x[order // k]                                 # [tokens * k, hidden]
    grouped_y = torch.empty_like(grouped_x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            grouped_y[start:start + n] = experts(grouped_x[start:start + n], e)
        start += n
    grouped_y = grouped_y * weights.reshape(-1)[order, None]
    per_slot = torch.empty_like(grouped_y)
    per_slot[order] = grouped_y                               # back to [tokens * k] order
    return per_slot.view(num_tokens, k, -1).sum(dim=1)


def dispatch_gathered(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                      expert_ids: torch.Tensor) -> torch.Tensor:
    """x `[tokens, hidden]`, weights and expert_ids `[tokens, k]` -> `[tokens, hidden]`.

    Each token goes through its own k experts; no loop over all experts.
    """
    if x.shape[0] == 1:                                       # k calls on weight views; reads the k ids
        return sum(weights[:, slot, None] * experts(x, e) for slot, e in enumerate(expert_ids[0].tolist()))
    per_slot = experts.forward_gathered(x, expert_ids)        # [tokens, k, hidden]
    return (per_slot * weights[..., None]).sum(dim=1)


def dispatch_auto(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                  expert_ids: torch.Tensor) -> torch.Tensor:
    """Gathered for a single token, grouped for several (same arguments and result)."""
    dispatch = dispatch_gathered if x.shape[0] == 1 else dispatch_grouped
    return dispatch(experts, x, weights, expert_ids)


DISPATCH = {"auto": dispatch_auto, "grouped": dispatch_grouped, "gathered": dispatch_gathered}


class SparseMoeBlock(nn.Module):
    """Router + experts: `[batch, seq, hidden] -> ([batch, seq, hidden], router_logits [batch*seq, E] or None)`.

    Children (checkpoint names): `gate` = nn.Linear(hidden, num_experts, bias=False), whose output
    is the router logits (a forward hook on it sees `[tokens, E]`); `experts` = stacked `Experts`.
    """

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False) if cfg.is_moe else None
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.dispatch = dispatch_auto

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x `[..., hidden]` -> (`[..., hidden]`, router logits `[tokens, E]` or None for a dense block)."""
        tokens = x.reshape(-1, x.shape[-1])                           # [tokens, hidden]
        if self.gate is None:                                         # dense: one expert, weight 1
            return self.experts(tokens, 0).view(x.shape), None
        router_logits = self.gate(tokens)                             # [tokens, E]
        weights, expert_ids = route(router_logits, self.top_k)        # [tokens, k] each
        out = self.dispatch(self.experts, tokens, weights.to(x.dtype), expert_ids)
        return out.view(x.shape), router_logits
