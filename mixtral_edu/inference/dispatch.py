"""MoE dispatch functions for decoding, installed onto a model's MoE blocks (`block.dispatch`).

The model's own dispatch (model/moe.py) reads a single token's k expert ids on the host
(`.tolist()`) to take views of their weights: a host sync per layer, which stops a GPU's queue
and cannot be captured in a CUDA graph. These compute the same sum without it:

* `dispatch_sync_free`: gather the chosen experts' weights on the device (`forward_gathered`);
* `dispatch_kernel`: for one token, the Triton kernel (kernels.py) reads the ids on the GPU and
  streams only the chosen experts' rows, with no gathered copy (float or int8 experts);
* `dispatch_summed`: for one token on a CPU under torch.compile, each product written as an
  elementwise product and a sum over the input dimension, which inductor fuses with the gather
  into one pass over the chosen experts' rows (no copy, no BLAS call).

`decode_dispatch(use_kernel)` is what FastDecoder and `decode.use_kernel_` install: grouped for a
prompt, one of these for a single token.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..model.experts import Experts, ExpertsBase, swiglu_expert
from ..model.moe import dispatch_auto, dispatch_grouped
from .cpu import summed_linear
from .kernels import gathered_glu, gathered_matvec
from .quant import Int8Experts


def dispatch_sync_free(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                       expert_ids: torch.Tensor) -> torch.Tensor:
    """x `[tokens, hidden]`, weights and expert_ids `[tokens, k]` -> `[tokens, hidden]`; the ids stay on the device."""
    return (experts.forward_gathered(x, expert_ids) * weights[..., None]).sum(dim=1)


def kernel_weights(experts: ExpertsBase) -> Optional[tuple]:
    """(w1, w2, w3, s1, s2, s3) as the Triton kernel reads them (scales None for float), or None
    for a storage the kernel does not read (offloaded, column-major)."""
    if isinstance(experts, Int8Experts):
        return experts.w1, experts.w2, experts.w3, experts.w1_scale, experts.w2_scale, experts.w3_scale
    if isinstance(experts, Experts) and experts.w1.stride(-1) == 1:
        return experts.w1, experts.w2, experts.w3, None, None, None
    return None


def dispatch_kernel(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                    expert_ids: torch.Tensor) -> torch.Tensor:
    """One token (x `[1, hidden]`) through its k experts by the Triton kernel; the storage must be one
    `kernel_weights` reads. Same arguments and result as `dispatch_sync_free`."""
    w1, w2, w3, s1, s2, s3 = kernel_weights(experts)
    h = gathered_glu(x, w1, w3, expert_ids[0], s1, s3)                              # [k, intermediate]
    per_slot = gathered_matvec(h, w2, expert_ids[0], s2)                            # [k, hidden]
    return (per_slot * weights[0, :, None]).sum(dim=0, keepdim=True)


def dispatch_summed(experts: ExpertsBase, x: torch.Tensor, weights: torch.Tensor,
                    expert_ids: torch.Tensor) -> torch.Tensor:
    """One token (x `[1, hidden]`) through its k float experts with `cpu.summed_linear` products:
    under torch.compile each becomes one loop that reads each chosen row once. Outside a compile
    trace (where it would build `[k, out, in]` temporaries) and for several tokens it is the model's
    `dispatch_auto`; other storages (int8, offloaded) go through `dispatch_sync_free`. Installed
    whole by `cpu.use_summed_products_`. Same arguments and result as `dispatch_sync_free`."""
    if not torch.compiler.is_compiling() or x.shape[0] != 1:    # eager calls and prompts: the model's own
        return dispatch_auto(experts, x, weights, expert_ids)
    if type(experts) is not Experts:
        return dispatch_sync_free(experts, x, weights, expert_ids)
    per_slot = swiglu_expert(x[0], *experts.gathered_weights(expert_ids[0]), summed_linear)   # [k, hidden]
    return (per_slot * weights[0, :, None]).sum(dim=0, keepdim=True)


def decode_dispatch(use_kernel: bool) -> Callable:
    """Grouped for several tokens (a prompt), sync-free (or the kernel) for one."""
    one_token = dispatch_kernel if use_kernel else dispatch_sync_free

    def dispatch(experts, x, weights, expert_ids):
        return (one_token if x.shape[0] == 1 else dispatch_grouped)(experts, x, weights, expert_ids)
    return dispatch
