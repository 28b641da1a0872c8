"""The sparse mixture-of-experts block: route every token to k experts and add up their outputs.

    y(x) = sum over the k chosen experts e of  weight_e(x) * expert_e(x)

Only k of the E experts run per token (Mixtral: 2 of 8), so a token touches about a quarter of
the expert weights. How tokens get to their experts ("dispatch") is an implementation choice
with identical results; two are implemented:

* "grouped": sort the (token, slot) pairs by expert and run each expert once on all of its
  tokens. Each expert's weights are read once however many tokens chose it; best for prefill.
* "gathered": take each token's own k experts directly. For a single token this loops over its
  k slots and uses `w1[e]` etc. as views (no copy, no loop over all E experts); for several
  tokens it gathers the chosen weights `[tokens, k, ...]` and applies them with batched matmuls.

* "sync_free": the gathered weights for every call, one token included, so the chosen expert ids
  never travel to the host: what a captured decoding step needs (FastDecoder passes it; with the
  Triton kernel the weights are read in place instead of gathered).

`dispatch="auto"` uses "gathered" when the call holds exactly one token (batch-1 decoding) and
"grouped" otherwise. Set `block.dispatch` or pass `dispatch=` to override.

The experts are any `ExpertsBase` (dense, int8, offloaded, column-major): the block only calls
`experts(x, e)` and `experts.forward_gathered(x, expert_ids)`.

A dense config (`num_local_experts == 1`, e.g. Mistral-7B) uses this same block with one expert
and no router: `gate` is None, the expert's weight is 1, and the router logits are None. The
parameter count then matches the dense model exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import MixtralConfig
from .experts import ExpertsBase, Experts
from .router import route

DISPATCH_STRATEGIES = ("auto", "grouped", "gathered", "sync_free")


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
    if x.shape[0] == 1:
        # One token: k expert calls on weight views; one host sync for the k ids.
        out = None
        for slot, e in enumerate(expert_ids[0].tolist()):
            y = weights[:, slot, None] * experts(x, e)
            out = y if out is None else out + y
        return out
    return dispatch_sync_free(experts, x, weights, expert_ids)


def dispatch_sync_free(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                       expert_ids: torch.Tensor) -> torch.Tensor:
    """x `[tokens, hidden]`, weights and expert_ids `[tokens, k]` -> `[tokens, hidden]`, without reading
    the expert ids on the host (the weights are gathered on the device)."""
    per_slot = experts.forward_gathered(x, expert_ids)       # [tokens, k, hidden]
    return (per_slot * weights[..., None]).sum(dim=1)


class SparseMoeBlock(nn.Module):
    """Router + experts: `[batch, seq, hidden] -> ([batch, seq, hidden], router_logits [batch*seq, E] or None)`.

    Children (checkpoint names): `gate` = nn.Linear(hidden, num_experts, bias=False), whose output
    is the router logits (a forward hook on it sees `[tokens, E]`); `experts` = stacked `Experts`.
    """

    def __init__(self, cfg: MixtralConfig, dispatch: str = "auto") -> None:
        super().__init__()
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False) if cfg.is_moe else None
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.dispatch = dispatch

    @property
    def dispatch(self) -> str:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, value: str) -> None:
        if value not in DISPATCH_STRATEGIES:
            raise ValueError(f"dispatch must be one of {DISPATCH_STRATEGIES}, got {value!r}")
        self._dispatch = value

    def resolve_dispatch(self, num_tokens: int, dispatch: Optional[str] = None) -> str:
        """The strategy ("grouped" or "gathered") a call with `num_tokens` tokens will use."""
        strategy = self.dispatch if dispatch is None else dispatch
        if strategy not in DISPATCH_STRATEGIES:
            raise ValueError(f"dispatch must be one of {DISPATCH_STRATEGIES}, got {strategy!r}")
        if strategy == "auto":
            return "gathered" if num_tokens == 1 else "grouped"
        return strategy

    def forward(self, x: torch.Tensor, dispatch: Optional[str] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x `[..., hidden]` -> (`[..., hidden]`, router logits `[tokens, E]` or None for a dense block)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                              # [tokens, hidden]
        if self.gate is None:                                     # dense: one expert, weight 1
            return self.experts(x, 0).view(shape), None
        router_logits = self.gate(x)                              # [tokens, E]
        weights, expert_ids = route(router_logits, self.top_k)
        weights = weights.to(x.dtype)
        strategy = self.resolve_dispatch(x.shape[0], dispatch)
        run = {"grouped": dispatch_grouped, "gathered": dispatch_gathered, "sync_free": dispatch_sync_free}[strategy]
        return run(self.experts, x, weights, expert_ids).view(shape), router_logits
