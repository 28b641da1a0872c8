"""The top-k router: which k experts see each token, and with what weights.

The router is one linear layer, `gate` `[num_experts, hidden]` (no bias); its output is the
token's router logits `[tokens, num_experts]`. Mixtral keeps the k largest logits and turns
just those into weights with a softmax:

    weights = softmax(top_k(logits))                      (sum to 1 over the k chosen experts)

This equals taking the softmax over ALL experts, keeping the top k probabilities and dividing by
their sum (the Hugging Face implementation), because the common factor sum_all exp(l) cancels.
The full softmax is still worth keeping: it is what the load-balancing loss and routing plots use.
"""

from __future__ import annotations

import torch


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top-k experts and their combine weights.

    router_logits `[tokens, num_experts]` -> (weights `[tokens, k]` float32, summing to 1 per token;
    expert_ids `[tokens, k]` int64), both ordered from the largest logit down.
    """
    top_logits, expert_ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(top_logits.float(), dim=-1), expert_ids


def route_via_full_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same routing computed the long way: softmax over all experts -> top-k -> renormalise.

    Same shapes as `route`; kept to show (and test) that the two agree.
    """
    probs = router_probs(router_logits)
    top_probs, expert_ids = torch.topk(probs, top_k, dim=-1)
    return top_probs / top_probs.sum(dim=-1, keepdim=True), expert_ids


def router_probs(router_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over all experts, in float32: `[tokens, num_experts]`."""
    return torch.softmax(router_logits.float(), dim=-1)
