"""Router losses that keep a mixture of experts healthy during training.

Load-balancing (auxiliary) loss (Switch Transformer, eq. 4-6; the form transformers'
MixtralForCausalLM adds, times `router_aux_loss_coef`: 0.02 in Mixtral's published config.json, 0.001 as
the default of transformers' own MixtralConfig. What Mixtral itself was trained with is not published:
the paper gives no training loss and Mistral's training code is not public):
with T tokens, E experts and top-k routing,

    f_e = fraction of routing decisions that picked expert e
    P_e = mean over tokens of the full softmax probability of expert e
    loss = E * sum_e f_e * P_e

It is smallest when both are uniform. Two normalisations of f_e are in use:

* Hugging Face Mixtral (`load_balancing_loss_func`): f_e = (count of top-k picks of e) / T, so
  sum_e f_e = k and the loss is k at perfect balance (2.0 for Mixtral).
* Switch Transformer: f_e = (count of picks of e) / (T * k), so sum_e f_e = 1 and the loss is 1
  at perfect balance.

When every token sends all its picks to the same k experts with probability ~1 ("collapse"),
the HF loss approaches E (and the Switch loss E / k).

Router z-loss (ST-MoE): the mean over tokens of logsumexp(logits)^2; it keeps the logits small
so the softmax stays numerically tame.

Both accept one layer's logits `[tokens, E]` or a sequence of per-layer logits (what
`Mixtral(..., return_router_logits=True)` returns); layers are pooled as extra tokens, like the
reference does.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..analysis.routing import expert_counts

RouterLogits = Union[torch.Tensor, Sequence[torch.Tensor]]


def _pool_layers(router_logits: RouterLogits) -> torch.Tensor:
    if isinstance(router_logits, torch.Tensor):
        logits = router_logits
    else:
        layers = [t for t in router_logits if t is not None]
        if not layers:
            raise ValueError("no router logits given (a dense model has no router)")
        logits = torch.cat(layers, dim=0)
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, num_experts], got shape {tuple(logits.shape)}")
    return logits.float()


def expert_load(router_logits: RouterLogits, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts `[E]` of top-k picks per expert, mean full-softmax probability P `[E]`), pooled over layers."""
    logits = _pool_layers(router_logits)
    expert_ids = torch.topk(logits.detach(), top_k, dim=-1).indices                   # [tokens, k]
    counts = expert_counts(expert_ids, logits.shape[-1]).to(logits.dtype)
    return counts, torch.softmax(logits, dim=-1).mean(dim=0)


def load_balancing_loss(router_logits: RouterLogits, top_k: int, normalization: str = "hf") -> torch.Tensor:
    """E * sum_e f_e * P_e (a scalar tensor).

    normalization="hf": f_e = picks / tokens (k at perfect balance; equals transformers'
    `load_balancing_loss_func`); "switch": f_e = picks / (tokens * k) (1 at perfect balance).
    """
    if normalization not in ("hf", "switch"):
        raise ValueError(f"normalization must be 'hf' or 'switch', got {normalization!r}")
    logits = _pool_layers(router_logits)
    num_tokens, num_experts = logits.shape
    counts, mean_probs = expert_load(logits, top_k)
    fraction = counts / (num_tokens * (top_k if normalization == "switch" else 1))
    return num_experts * torch.sum(fraction * mean_probs)


def router_z_loss(router_logits: RouterLogits) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2 (a scalar tensor)."""
    logits = _pool_layers(router_logits)
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
