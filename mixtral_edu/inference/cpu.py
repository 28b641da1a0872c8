"""Batch-1 decoding on a CPU with weights stored transposed ("column-major") and a row-sum kernel.

Decoding one token multiplies every weight matrix W `[out, in]` by a single vector x, so a step
is bound by how fast the weights stream from memory (the model's FLOPs are negligible). Two
deliberate choices make that streaming fast with plain PyTorch on a CPU:

1. Store each matrix column-major: W keeps its shape `[out, in]`, but W.T `[in, out]` is the
   contiguous tensor (`column_major`). Only the strides change, so names, `state_dict()`,
   `save_model` and every `F.linear(x, W)` work as before.
2. Compute W x as a weighted sum of the rows of W.T:  W x = sum_i x_i * W.T[i, :].  That is
   exactly what `F.embedding_bag(mode="sum", per_sample_weights=x)` does with W.T as the table
   and every row picked once (`matvec`); its CPU kernel streams the rows at close to memory
   speed, and with the rows split into one bag per thread it uses every core (MKL's float32
   matrix-vector product runs on one). Measured on the 2-core test machine (float32, weights far
   larger than the caches, one thread):

       matrix                  F.linear, row-major   F.linear, column-major   matvec
       [1024, 512] (w1, w3)         16 GB/s               21 GB/s            28 GB/s
       [512, 1024] (w2)             20 GB/s               20 GB/s            35 GB/s
       [32000, 512] (lm_head)       16 GB/s               31 GB/s            45 GB/s

`to_column_major_(model)` applies both: it re-stores every nn.Linear weight and every `Experts`
stack column-major and switches those modules to `ColumnMajorLinear` / `ColumnMajorExperts`,
which use `matvec` when they are given a single vector and the usual code otherwise (prefill,
batches, training). The module objects stay the same (parameters, names, forward hooks), so
routing traces and quantisation work unchanged. It is opt-in because other back ends want the
usual row-major layout (e.g. GPU kernels that read w1[e] row by row):

    model = to_column_major_(load_model(path))
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same matrix (or stack of matrices) `[..., out, in]`, stored with its last two dims swapped.

    Returns a tensor equal to w, of the same shape, whose transpose `w.mT` is contiguous.
    """
    return w.mT.contiguous().mT


def is_column_major(w: torch.Tensor) -> bool:
    """True when the matrices of w `[..., out, in]` are stored transposed (w.mT contiguous)."""
    return w.mT.is_contiguous()


@functools.lru_cache(maxsize=None)
def _bags_of_rows(n: int, num_bags: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices 0 .. n-1 `[n]` and where each of (at most) `num_bags` consecutive bags starts.

    Cached, since every step asks for the same few sizes. Made outside inference mode: a cached
    inference tensor could not be used later in a computation that autograd records.
    """
    per_bag = -(-n // num_bags)                                   # ceil(n / num_bags)
    with torch.inference_mode(False):
        return torch.arange(n, device=device), torch.arange(0, n, per_bag, device=device)


def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W x for one vector: x `[in]`, w `[out, in]` -> `[out]` (equals F.linear(x, w)).

    Computed as the weighted sum of the rows of w.T, weighted by x. The rows are split into one
    bag per thread (the kernel runs the bags in parallel) and the bags' partial sums are added.
    Correct for any strides; fast when w is column-major (w.T contiguous).
    """
    rows, starts = _bags_of_rows(w.shape[1], torch.get_num_threads(), w.device)
    partial = F.embedding_bag(rows, w.mT, starts, mode="sum", per_sample_weights=x)   # [bags, out]
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


class ColumnMajorLinear(nn.Linear):
    """nn.Linear whose weight is stored column-major; one input vector goes through `matvec`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features or self.bias is not None:
            return super().forward(x)
        return matvec(x.reshape(-1), self.weight).view(*x.shape[:-1], self.out_features)


class ColumnMajorExperts(Experts):
    """`Experts` with column-major stacks; one token's products go through `matvec` (the SwiGLU
    formula itself is `ExpertsBase.forward`'s)."""

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return super().linear(x, w)
        return matvec(x.reshape(-1), w).view(*x.shape[:-1], w.shape[0])


@torch.no_grad()
def to_column_major_(model: nn.Module) -> nn.Module:
    """Make every floating-point nn.Linear and `Experts` of `model` column-major, in place.

    Parameters stay the same objects (only `.data` is replaced), so optimisers, hooks and tied
    weights (lm_head sharing embed_tokens' Parameter) keep working; the embedding table itself is
    read by rows and is not converted unless tied. Int8 or offloaded experts are left alone.
    Returns `model`.
    """
    for module in model.modules():
        # Same module object (parameters, hooks, name), new class: it only adds the one-vector path.
        if type(module) in (nn.Linear, ColumnMajorLinear) and module.weight.dtype.is_floating_point:
            params, module.__class__ = [module.weight], ColumnMajorLinear
        elif type(module) in (Experts, ColumnMajorExperts) and module.w1.dtype.is_floating_point:
            params, module.__class__ = [module.w1, module.w2, module.w3], ColumnMajorExperts
        else:
            continue
        for p in params:
            if not is_column_major(p):
                p.data = column_major(p.data)
    return model
