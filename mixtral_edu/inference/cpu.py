"""Batch-1 decoding on a CPU: the measured defaults (lm_head layout, thread count) and one opt-in trick.

Decoding one token multiplies every weight matrix W `[out, in]` by a single vector x, so a step
is bound by how fast the weights stream from memory (the model's FLOPs are negligible).
`optimize.optimize_for(model, "cpu")` installs the two measured defaults (benchmarks/README.md has the runs):

1. `use_cpu_layout_` stores lm_head column-major: W keeps its shape `[out, in]`, but W.T
   `[in, out]` is the contiguous tensor (`column_major`). Only the strides change, so names,
   `state_dict()`, `save_model` and every `F.linear(x, W)` work as before; MKL's product then
   streams the largest matrix (35% of the bytes a step reads in the benchmark's config) faster.
   Measured, float32, [32000, 512]: Intel Xeon (AVX-512), 2 threads, 26 -> 37 GB/s; AMD EPYC,
   1 thread, 16 -> 31 GB/s. The other matrices stay row-major: column-major was no faster there
   on the Xeon (w2 [512, 1024] a little slower).
2. `use_thread_policy_` picks the thread count before every forward call (`DecodeThreads`): every
   ~0.2 s it reads how much CPU time other processes took (/proc/stat minus this process's own
   time) and uses only the cores they leave free. With a busy process beside it on 2 cores, 2
   threads wait for each other at every product (28-40 tokens/s measured on the Xeon, against 102
   quiet); 1 thread kept 58 (measured on the Xeon only). Where /proc/stat is missing (macOS,
   Windows) the thread count is left alone.

Under torch.compile (the compiled step `generate` switches to for long generations, decode.py),
`use_summed_products_` writes one token's products W x as `(W * x).sum(-1)` (`summed_linear`):
inductor fuses that into one loop over W's rows, which streamed a [14336, 4096] float32 matrix at
25.9 GB/s on this AMD EPYC (2 threads) against 17.3 for MKL's `F.linear`.
The single query's attention is written the same way (`summed_attention`, through the `SummedAttention`
mode while the step is traced): ATen's attention kernel cost about 65 us a layer at this size, the fused
loops next to nothing (bfloat16 step 2.81 -> 2.27 ms, AMD EPYC, 2 threads).

Opt-in, because it wins on one CPU and loses on another: `to_column_major_(model)` stores every
matrix column-major and computes a single vector's product as a weighted sum of the rows of W.T,
W x = sum_i x_i * W.T[i, :], which is `F.embedding_bag(mode="sum", per_sample_weights=x)` with
one bag of rows per thread (`matvec`). On the AMD EPYC that decoded 2.1-2.6x transformers'
speed (1.6x without it); on the Intel Xeon it is 0.8x of the default path (embedding_bag streams
at 22-24 GB/s there, below MKL's 25-27).

    model = optimize_for(load_model(path))    # lm_head column-major, thread policy
    model = to_column_major_(model)           # opt-in: every matrix, row-sum products
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, Optional

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


@torch.no_grad()
def use_cpu_layout_(model: nn.Module) -> nn.Module:
    """The default CPU layout (point 1 above): lm_head's weight stored column-major, in place.

    Left alone when lm_head is not a floating-point matrix on the CPU, or is tied to the
    embedding table (which is read by rows). The Parameter stays the same object (`.data` is
    replaced). Returns `model`.
    """
    w = model.lm_head.weight
    if (w.device.type == "cpu" and w.dtype.is_floating_point and w is not model.embed_tokens.weight
            and not is_column_major(w)):
        w.data = column_major(w.data)
    return model


# ----------------------------------------------------------------------------- threads
def _usable_cpus() -> Optional[set[int]]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def _cpu_seconds() -> Optional[tuple[float, float]]:
    """(busy CPU seconds since boot of the CPUs this process may run on, CPU seconds of this
    process), or None where /proc/stat cannot be read."""
    usable = _usable_cpus()
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    if not lines:
        return None
    busy = 0
    for fields in lines:
        if usable is None or int(fields[0][3:]) in usable:
            jiffies = [int(v) for v in fields[1:]]
            busy += sum(jiffies) - jiffies[3] - (jiffies[4] if len(jiffies) > 4 else 0)   # minus idle, iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def free_cores(others_busy: float, cores: int) -> int:
    """Cores left when other processes keep `others_busy` cores busy (at least 1)."""
    return max(1, min(cores, math.floor(cores - others_busy + 0.5)))


class DecodeThreads:
    """Fits torch's thread count to the cores other processes leave free, while decoding.

    threads = DecodeThreads()        # remembers torch.get_num_threads() as the most to use
    threads.restart()                # at the start of each generation
    for ...: threads.tick()          # once per token; looks at the machine every `interval` s
    threads.close()                  # the thread count as it was

    sample: a function returning `_cpu_seconds()`-like pairs (tests pass their own).
    """

    def __init__(self, interval: float = 0.2, sample: Callable[[], Optional[tuple[float, float]]] = _cpu_seconds,
                 cores: Optional[int] = None) -> None:
        self.most = torch.get_num_threads()
        self.cores = cores or len(_usable_cpus() or range(os.cpu_count() or 1))
        self.interval, self.sample = interval, sample
        self.last, self.when = sample(), time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is None or now - self.when < self.interval:
            return
        current = self.sample()
        if current is None:
            return
        others = max(0.0, (current[0] - self.last[0]) - (current[1] - self.last[1])) / (now - self.when)
        threads = min(self.most, free_cores(others, self.cores))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.last, self.when = current, now

    def restart(self) -> None:
        """A new generation begins: look at the machine from now on, not since the last generation's last token
        (a busy spell long over would count as now). The thread count stays as it is until the next look."""
        self.last, self.when = self.sample(), time.perf_counter()

    def close(self) -> None:
        if torch.get_num_threads() != self.most:
            torch.set_num_threads(self.most)


def use_thread_policy_(model: nn.Module, threads: Optional[DecodeThreads] = None) -> nn.Module:
    """Tick `threads` (default: a new `DecodeThreads`) before every forward call of `model`, in place.

    A forward pre-hook (`model.thread_policy` holds its handle; installing again replaces it). Inside a
    torch.compile trace it does nothing: the compiled code leaves the thread count alone.
    """
    threads = threads or DecodeThreads()

    def tick(module, args):                 # the module's own policy: a deepcopy of the model ticks its copy
        if not torch.compiler.is_compiling():
            module.decode_threads.tick()
    if getattr(model, "thread_policy", None) is not None:
        model.thread_policy.remove()
    model.thread_policy = model.register_forward_pre_hook(tick)
    model.decode_threads = threads          # a compiled step ticks it itself, outside the compiled code
    return model


# ----------------------------------------------------------------------------- compiled: products as sums
def summed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x `[..., in]`, w `[..., out, in]` (a matrix, or one per leading index) -> `[..., out]`, as
    elementwise products summed over `in`."""
    return (w * x[..., None, :]).sum(-1)


class SummedLinear(nn.Linear):
    """nn.Linear whose single-vector product, inside a torch.compile trace, is `summed_linear`;
    everywhere else (eager, several tokens) it is `F.linear`. Installed by swapping the class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.numel() == self.in_features and self.bias is None:
            return summed_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def summed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """One query per head against the whole cache, written as elementwise products and sums (the same
    formula as `F.scaled_dot_product_attention`), so that inductor fuses it into the layer's loops instead
    of calling ATen's attention kernel (about 65 us a call at this size, most of it set-up).

    q `[batch, heads, 1, head_dim]`; k, v `[batch, kv_heads, slots, head_dim]` (each kv head serves
    heads / kv_heads query heads); mask `[1, slots]`, True where the query may look. Returns q's shape."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim)                 # the query heads of each kv head
    scores = (q * k[:, :, None]).sum(-1).float() * (scale or head_dim ** -0.5)       # [batch, kv_heads, group, slots]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
    return (probs[..., None] * v[:, :, None]).sum(-2).reshape(batch, heads, 1, head_dim)


class SummedAttention(torch.overrides.TorchFunctionMode):
    """While a compiled step is traced, a single query's `F.scaled_dot_product_attention` (boolean mask, no
    dropout) becomes `summed_attention`; every other call, and everything outside a trace, is untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and torch.compiler.is_compiling():
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask")
            if (q.shape[-2] == 1 and len(args) == 3 and mask is not None and mask.dtype == torch.bool
                    and not kwargs.get("dropout_p") and not kwargs.get("is_causal")):
                return summed_attention(q, k, v, mask, kwargs.get("scale"))
        return func(*args, **kwargs)


def use_summed_products_(model: nn.Module) -> nn.Module:
    """For a compiled CPU step: every float nn.Linear becomes a `SummedLinear` (same object, weights
    and hooks), stored row-major (the compiled sum reads lm_head's rows at 7.4 ms a step against
    13.0 column-major, AMD EPYC, 1 thread, the benchmark's model), and every MoE block gets the
    summed one-token dispatch. Returns `model`."""
    from .dispatch import dispatch_summed     # dispatch.py imports this module

    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype.is_floating_point:
            module.__class__ = SummedLinear
            if not module.weight.is_contiguous():
                with torch.inference_mode(False):     # an ordinary tensor even inside generate: export needs one
                    module.weight.data = module.weight.data.contiguous()
    for layer in model.layers:
        layer.block_sparse_moe.dispatch = dispatch_summed
    return model


# ----------------------------------------------------------------------------- opt-in: row sums
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
