"""Weight memory layout for fast batch-1 decoding on a CPU: store each matrix transposed.

Decoding one token multiplies every weight matrix W `[out, in]` by a single vector, so the step
is bound by how fast the weights stream from memory. PyTorch's float32 matrix-vector product on
the CPU (MKL) reads W noticeably faster when W is stored column-major, i.e. when W.T `[in, out]`
is the contiguous tensor: on the 2-core test machine about 21 GB/s instead of 15 GB/s for an
expert's matrices, and 28 instead of 15 GB/s for the 32000-row lm_head.

`to_column_major_` changes only the strides: every matrix keeps its shape `[out, in]` (w1
`[E, I, H]` etc.), its values and its name, so the forward code, `state_dict()` and
`save_model` are unchanged (`F.linear(x, W)` computes x @ W.T either way). Prefill (many tokens
at once, a matrix-matrix product) runs at the same speed in either layout.

It is opt-in because other back ends want the usual row-major layout (e.g. GPU kernels that
read w1[e] row by row). Call it once after loading, before generating on the CPU:

    model = to_column_major_(load_model(path))
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import Experts


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same matrix (or stack of matrices) `[..., out, in]`, stored with its last two dims swapped.

    Returns a tensor equal to w, of the same shape, whose transpose `w.mT` is contiguous.
    """
    return w.mT.contiguous().mT


def is_column_major(w: torch.Tensor) -> bool:
    """True when the matrices of w `[..., out, in]` are stored transposed (w.mT contiguous)."""
    return w.mT.is_contiguous()


@torch.no_grad()
def to_column_major_(model: nn.Module) -> nn.Module:
    """Re-store, in place, every nn.Linear weight and every `Experts` stack of `model` column-major.

    Parameters stay the same objects (only `.data` is replaced), so optimisers, hooks and tied
    weights (lm_head sharing embed_tokens' Parameter) keep working. Int8 or offloaded experts and
    anything that is not a floating-point nn.Linear / Experts are left alone. Returns `model`.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            params = [module.weight]
        elif isinstance(module, Experts):
            params = [module.w1, module.w2, module.w3]
        else:
            continue
        for p in params:
            if p.dtype.is_floating_point and not is_column_major(p):
                p.data = column_major(p.data)
    return model
