"""One weight matrix times one vector on the CPU, each way the package can store and multiply it.

    .venv/bin/python benchmarks/cpu_products.py                 # 1 and 2 threads, the 139M config's shapes
    .venv/bin/python benchmarks/cpu_products.py --threads 2 --mib 64

A decode step is ~90 such products, so their bandwidth decides the CPU defaults of
mixtral_edu/inference/cpu.py: which layout lm_head gets, and whether the row-sum kernel pays.
Each product runs over a ring of distinct matrices of the same shape (--mib in all, larger than the
caches), so the weights come from memory as in decoding. GB/s counts the matrix's bytes once;
best of 5 passes of --reps products.

  row          F.linear(x, W), W row-major (contiguous) — plain PyTorch
  column       F.linear(x, W), W column-major (W.T contiguous) — load_model's lm_head on a CPU
  row sums     matvec(x, W), W column-major — the opt-in to_column_major_
  bf16 row     F.linear in bfloat16, row-major (half the bytes)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mixtral_edu.inference.cpu import column_major, matvec

SHAPES = [(1024, 512), (512, 1024), (3072, 512), (32000, 512)]   # w1/w3, w2, 6 experts' worth, lm_head


def gb_per_s(product, ring: list[torch.Tensor], x: torch.Tensor, reps: int) -> float:
    """Best bandwidth over 5 passes of `reps` products, cycling through `ring`."""
    for w in ring[:3]:
        product(x, w)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(reps):
            product(x, ring[i % len(ring)])
        best = min(best, (time.perf_counter() - t) / reps)
    return ring[0].numel() * ring[0].element_size() / best / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mib", type=int, default=256, help="total size of each ring of matrices (default %(default)s)")
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print("threads | matrix | row | column | row sums | bf16 row   (GB/s)")
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for out, inp in SHAPES:
                n = max(2, args.mib * 2**20 // (out * inp * 4))
                ring = [torch.randn(out, inp) for _ in range(n)]
                col = [column_major(w) for w in ring]
                x = torch.randn(1, inp)
                rates = [gb_per_s(F.linear, ring, x, args.reps), gb_per_s(F.linear, col, x, args.reps),
                         gb_per_s(lambda v, w: matvec(v[0], w), col, x, args.reps)]
                del col
                bf16 = [w.to(torch.bfloat16) for w in ring[: max(2, n // 2)]]
                rates.append(gb_per_s(F.linear, bf16, x.to(torch.bfloat16), args.reps))
                print(f"{threads} | [{out}, {inp}] | " + " | ".join(f"{r:.1f}" for r in rates), flush=True)
                del ring, bf16


if __name__ == "__main__":
    main()
