"""One Triton kernel for batch-1 decoding: a matrix-vector product whose weight is picked on the GPU.

    out[s] = W[ids[s]] @ x[s]            (times scale[ids[s]] per output row when W is int8)

W holds all experts of a layer `[E, N, K]`; ids `[k]` are the token's chosen experts, still on the
GPU. Plain PyTorch has two ways to do this and both cost something:

* `W[ids[0].item()] @ x` reads only the chosen weights, but `.item()` waits for the GPU (a host
  sync), which stops the CPU from queuing work ahead and cannot be captured in a CUDA graph;
* `W[ids] @ x` stays on the GPU but first COPIES the chosen experts (2 x 352 MB per layer for
  8x7B in bf16), so the weights cross the memory bus three times instead of once.

Here each program reads its expert id from GPU memory and streams that expert's rows once,
so the only traffic is the weights themselves — what the bandwidth bound assumes. With
`TRITON_INTERPRET=1` the same kernel runs on the CPU (slowly), which is how it is checked
without a GPU. Triton is optional: without it `triton_available()` is False and callers fall back
to PyTorch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .quant import Int8Linear

try:  # Triton ships with CUDA builds of PyTorch; the CPU build has none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the kernel can run for tensors on `device` (a CUDA device, or the interpreter)."""
    if triton is None:
        return False
    if INTERPRET:
        return True
    return device is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _gathered_matvec_kernel(x_ptr, w_ptr, v_ptr, ids_ptr, scale_ptr, vscale_ptr, out_ptr, N, K,
                                x_slot_stride, w_expert_stride, w_row_stride,
                                HAS_SCALE: tl.constexpr, GLU: tl.constexpr, EVEN: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        slot = tl.program_id(0)                                  # which of the k chosen experts
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        expert = tl.load(ids_ptr + slot).to(tl.int64)            # read on the GPU: no host sync
        offsets = expert * w_expert_stride + rows[:, None].to(tl.int64) * w_row_stride
        x_row = x_ptr + slot * x_slot_stride
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)   # GLU: the second matrix (w3)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            if EVEN:                                             # no masks: full-width vector loads
                xk = tl.load(x_row + c).to(tl.float32)
                w = tl.load(w_ptr + offsets + c[None, :])
                if GLU:
                    v = tl.load(v_ptr + offsets + c[None, :])
            else:
                m = (rows[:, None] < N) & (c[None, :] < K)
                xk = tl.load(x_row + c, mask=c < K, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + offsets + c[None, :], mask=m, other=0.0)
                if GLU:
                    v = tl.load(v_ptr + offsets + c[None, :], mask=m, other=0.0)
            acc += w.to(tl.float32) * xk[None, :]
            if GLU:
                acc_v += v.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)                                  # [BLOCK_N], float32
        if HAS_SCALE:                                            # int8: one scale per output row
            y = y * tl.load(scale_ptr + expert * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        if GLU:                                                  # silu(w1 x) * (w3 x)
            y_v = tl.sum(acc_v, axis=1)
            if HAS_SCALE:
                y_v = y_v * tl.load(vscale_ptr + expert * N + rows, mask=rows < N, other=0.0).to(tl.float32)
            y = y * tl.sigmoid(y) * y_v
        tl.store(out_ptr + slot * N + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)

    _gathered_matvec_kernel = triton.heuristics(
        {"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0})(_gathered_matvec_kernel)
    if not INTERPRET:
        # (BLOCK_N, BLOCK_K, warps, stages); the larger BLOCK_K ones keep enough bytes in flight for int8
        CONFIGS = [(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3),
                   (16, 1024, 8, 3), (32, 1024, 8, 2), (8, 2048, 8, 2), (64, 256, 8, 3)]
        _gathered_matvec_kernel = triton.autotune(
            configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                     for n, k, w, st in CONFIGS],
            key=["N", "K", "HAS_SCALE", "GLU"],
        )(_gathered_matvec_kernel)


def _launch(x, w, v, ids, scale, vscale, glu: bool) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the gathered kernels need Triton (a CUDA build of PyTorch, or TRITON_INTERPRET=1)")
    E, N, K = w.shape
    k = ids.shape[0]
    if x.dim() != 2 or x.shape[1] != K or x.shape[0] not in (1, k):
        raise ValueError(f"x must be [1 or {k}, {K}], got {tuple(x.shape)}")
    if w.stride(2) != 1 or x.stride(1) != 1 or (v is not None and v.stride() != w.stride()):
        raise ValueError("weights and x must be contiguous in their last dimension (and w1, w3 alike)")
    if (w.dtype == torch.int8) != (scale is not None):
        raise ValueError("int8 weights need a scale [E, N]; float weights take none")
    if scale is not None and not (scale.is_contiguous() and (vscale is None or vscale.is_contiguous())):
        raise ValueError("scales must be contiguous [E, N]")
    out = torch.empty(k, N, device=x.device, dtype=x.dtype)
    x_slot_stride = 0 if x.shape[0] == 1 else x.stride(0)
    args = (x, w, v if v is not None else w, ids, scale if scale is not None else out,
            vscale if vscale is not None else out, out, N, K, x_slot_stride, w.stride(0), w.stride(1))
    if INTERPRET:
        _gathered_matvec_kernel[(k, triton.cdiv(N, 16))](*args, HAS_SCALE=scale is not None, GLU=glu,
                                                         BLOCK_N=16, BLOCK_K=32)
    else:
        grid = lambda meta: (k, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _gathered_matvec_kernel[grid](*args, HAS_SCALE=scale is not None, GLU=glu)
    return out


def gathered_glu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, ids: torch.Tensor,
                 s1: Optional[torch.Tensor] = None, s3: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first half of each chosen expert in one pass: out[s] = silu(w1[ids[s]] @ x) * (w3[ids[s]] @ x).

    x `[1, H]`, w1 and w3 `[E, I, H]` (int8 with scales s1, s3 `[E, I]`), ids `[k]` -> `[k, I]`.
    """
    if w3.shape != w1.shape or w3.dtype != w1.dtype:
        raise ValueError(f"w1 and w3 must match, got {tuple(w1.shape)} {w1.dtype} and {tuple(w3.shape)} {w3.dtype}")
    return _launch(x, w1, w3, ids, s1, s3, glu=True)


def gathered_matvec(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                    scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out `[k, N]` with out[s] = w[ids[s]] @ x[s] (x `[k, K]`) or w[ids[s]] @ x[0] (x `[1, K]`).

    w `[E, N, K]` (bf16/fp16/fp32, or int8 with scale `[E, N]`), ids `[k]` int64 on w's device.
    Accumulates in float32; returns x's dtype.
    """
    return _launch(x, w, None, ids, scale, None, glu=False)


class KernelInt8Linear(Int8Linear):
    """`Int8Linear` whose product with a single vector runs the kernel (one expert, id 0): int8 rows
    read once, no float copy of the codes. Installed by swapping the class (`decode.use_kernel_`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return super().forward(x)
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        return gathered_matvec(x.reshape(1, -1), self.weight[None], zero, self.scale[None]).view(*x.shape[:-1], -1)
