"""Batch-1 decode speed and memory of Mixtral on one device, against the memory-bandwidth bound.

    PYTHONPATH=. python3 benchmarks/decode.py --config full --random-weights --tokens 128        # a GPU
    PYTHONPATH=. python3 benchmarks/decode.py --config full --random-weights --quant int8
    PYTHONPATH=. python3 benchmarks/decode.py --weights /path/to/Mixtral-8x7B-Instruct-v0.1
    .venv/bin/python benchmarks/decode.py --config tiny --device cpu --tokens 16               # smoke test

At batch 1 every decoded token reads every active weight once (attention, router, norms, lm_head
and the 2 chosen experts of each layer), so tokens/s can be no higher than

    bound = memory bandwidth / bytes of active weights per token        (placement.active_weight_bytes)

The script measures the device's copy bandwidth itself (a large device-to-device copy, bytes read
plus written) and reports the fraction of the bound against both that and the vendor's figure.
Modes (--modes, comma-separated):
    eager    Mixtral.forward one token at a time: readable, with host syncs (2 input checks + 1 per layer)
    graph    FastDecoder: the sync-free step (Triton expert kernel on a GPU) captured as a CUDA graph
    compile  the same step through torch.compile, then captured as a CUDA graph
    compile-gather  torch.compile without the Triton kernel: experts gathered with w[ids] (gpt-fast's way)
    fast     the sync-free step without a graph (the CPU's fast path)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # random_weights.py

from mixtral_edu.config import MixtralConfig  # noqa: E402
from mixtral_edu.devices import free_bytes  # noqa: E402
from mixtral_edu.params import count_parameters  # noqa: E402
from mixtral_edu.inference.decode import FastDecoder  # noqa: E402
from random_weights import random_model  # noqa: E402  (benchmarks/random_weights.py, beside this script)
from mixtral_edu.inference.kernels import gathered_glu, gathered_matvec, triton_available  # noqa: E402
from mixtral_edu.inference.placement import active_weight_bytes  # noqa: E402
from mixtral_edu.inference.quant import Int8Experts  # noqa: E402

# Vendors' memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name().
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
                  "L40S": 0.864e12, "RTX 4090": 1.008e12}


def spec_bandwidth(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in SPEC_BANDWIDTH.items():
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median of repeats)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def check_kernel(model, device) -> str:
    """The Triton expert kernel against a PyTorch reference on layer 0's experts (float64 products)."""
    experts = model.layers[0].block_sparse_moe.experts
    x = torch.randn(1, experts.w1.shape[2], device=device, dtype=model.embed_tokens.weight.dtype)
    ids = torch.tensor([experts.num_experts - 1, 0], device=device)
    scale = experts.w1_scale if isinstance(experts, Int8Experts) else None
    out = gathered_matvec(x, experts.w1, ids, scale).double()
    w = experts.w1[ids].double()
    if scale is not None:
        w = w * scale[ids].double()[..., None]
    ref = (w @ x.double()[0])
    rel = ((out - ref).norm() / ref.norm()).item()
    return f"kernel check (layer 0 w1, experts {ids.tolist()}): relative error {rel:.2e} vs float64"


@torch.no_grad()
def eager_decode(model, prompt, tokens, max_len, device, keep_logits: int = 8):
    """Mixtral.forward, one token per call, greedy.

    Returns (new ids, seconds for the decode steps, float32 logits of the first `keep_logits` steps:
    entry i is what the model predicts after reading ids[i])."""
    cache = model.new_kv_cache(1, max_len)
    logits = model(prompt, cache=cache, last_only=True)[:, -1]
    out = [logits.argmax(-1, keepdim=True)]
    model(out[-1], cache=cache)                    # warm-up step (kernels, allocator)
    cache.pos -= 1
    sync(device)
    t0 = time.perf_counter()
    kept = []
    for _ in range(tokens - 1):
        logits = model(out[-1], cache=cache)[:, -1]
        if len(kept) < keep_logits:
            kept.append(logits.float())
        out.append(logits.argmax(-1, keepdim=True))
    sync(device)
    return torch.cat(out, 1)[0].tolist(), time.perf_counter() - t0, kept


@torch.no_grad()
def teacher_forced_check(decoder, prompt, ref_ids, ref_logits) -> tuple:
    """Feed the fast decoder eager's tokens and compare its logits with eager's at each step.

    Returns (largest relative error ||fast - eager|| / ||eager||, steps whose argmax agrees, steps)."""
    decoder.prefill(prompt)
    worst, agree = 0.0, 0
    for i, ref in enumerate(ref_logits):
        decoder.token.fill_(ref_ids[i])
        logits = decoder.step().float()
        worst = max(worst, ((logits - ref).norm() / ref.norm()).item())
        agree += int(logits.argmax() == ref.argmax())
    return worst, agree, len(ref_logits)


def kernel_bench(device, bw: float) -> None:
    """Bandwidth of the decode step's big matrix-vector products, alone (CUDA events, median of 20)."""
    H, I, E = 4096, 14336, 8
    ids = torch.tensor([5, 2], device=device)

    def timed(fn, nbytes, label):
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        t = sorted(times)[10]
        print(f"  {label:<46} {t * 1e6:8.1f} us  {nbytes / t / 1e12:5.2f} TB/s  ({nbytes / t / bw:.0%} of copy)")

    print("kernel bench (weights read once per call):")
    x = torch.randn(1, H, device=device, dtype=torch.bfloat16)
    for wdtype in ("bf16", "int8"):
        def make(shape):
            w = torch.randn(shape, device=device, dtype=torch.bfloat16)
            if wdtype == "bf16":
                return w, None
            return (w * 40).clamp(-127, 127).to(torch.int8), torch.rand(shape[:2], device=device, dtype=torch.bfloat16) / 100
        w1, s1 = make((E, I, H))
        w3, s3 = make((E, I, H))
        w2, s2 = make((E, H, I))
        one = w1.element_size()
        h = torch.randn(2, I, device=device, dtype=torch.bfloat16)
        timed(lambda: gathered_glu(x, w1, w3, ids, s1, s3), 2 * 2 * I * H * one, f"{wdtype} w1+w3 of 2 experts (glu)")
        timed(lambda: gathered_matvec(x, w1, ids, s1), 2 * I * H * one, f"{wdtype} w1 of 2 experts")
        timed(lambda: gathered_matvec(h, w2, ids, s2), 2 * I * H * one, f"{wdtype} w2 of 2 experts")
        if wdtype == "bf16":
            timed(lambda: w1[ids] @ x[0], 2 * I * H * one * 3, "bf16 w1[ids] @ x (gather copies: 3x bytes)")
        w1 = w2 = w3 = None                          # free the device memory before the next size
    for n in (6144, 4096, 32000):
        w = torch.randn(n, H, device=device, dtype=torch.bfloat16)
        timed(lambda: torch.nn.functional.linear(x, w), n * H * 2, f"bf16 F.linear (cuBLAS) [{n}, {H}]")
        wk = w[None]
        zero = torch.zeros(1, dtype=torch.long, device=device)
        timed(lambda: gathered_matvec(x, wk, zero), n * H * 2, f"bf16 kernel [{n}, {H}]")
        w = wk = None
    kern = gathered_matvec.__globals__["_gathered_matvec_kernel"]
    for key, cfg in getattr(kern, "cache", {}).items():
        print(f"  autotuned {key}: {cfg}")


@torch.no_grad()
def fast_decode(model, prompt, tokens, max_len, device, mode, reference=None):
    use_kernel = triton_available(device) and mode in ("graph", "compile", "fast")
    decoder = FastDecoder(model, max_len, use_kernel=use_kernel, cuda_graph=mode != "fast",
                          compile=mode.startswith("compile"))
    t_setup = time.perf_counter()
    decoder.prefill(prompt)
    decoder.step()                                  # compiles / captures / warms up
    sync(device)
    t_setup = time.perf_counter() - t_setup
    decoder.prefill(prompt)
    out = [decoder.token.clone()]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        decoder.step()
        out.append(decoder.token.clone())
    sync(device)
    seconds = time.perf_counter() - t0
    ids = torch.cat(out, 1)[0].tolist()
    check = teacher_forced_check(decoder, prompt, *reference) if reference else None
    del decoder
    return ids, seconds, t_setup, check


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["full", "tiny"], default="full", help="8x7B or the tiny config")
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights built on the device (default without --weights)")
    ap.add_argument("--weights", help="a checkpoint folder (any layout load_model reads)")
    ap.add_argument("--quant", default="none", help="comma-separated: none, int8")
    ap.add_argument("--modes", default=None, help="comma-separated (default: eager,graph,compile on CUDA; eager,fast on CPU)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens to decode (greedy)")
    ap.add_argument("--layers", type=int, default=None,
                    help="override num_hidden_layers (e.g. 2 layers in float32 for a decisive logits check)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--eager-tokens", type=int, default=32, help="tokens for the slow eager mode")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; later modes are skipped past it")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--kernel-bench", action="store_true", help="time the big matrix-vector products alone first")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = MixtralConfig.mixtral_8x7b() if args.config == "full" else MixtralConfig.tiny()
    if args.layers:
        cfg.num_hidden_layers = args.layers
    modes = (args.modes or ("eager,graph,compile" if device.type == "cuda" else "eager,fast")).split(",")
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "config": args.config, "dtype": str(dtype).removeprefix("torch."),
               "tokens": args.tokens, "prompt_len": args.prompt_len, "runs": []}
    print(f"device: {results['device']}   torch {torch.__version__}   config {args.config}   "
          f"triton kernel: {triton_available(device)}")
    free = free_bytes(device)
    if device.type == "cuda":
        print(f"GPU memory: {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB total, "
              f"{free / 2**30:.1f} GiB free")
    if not args.weights and free is not None:            # random weights: refuse, in one line, a model the device cannot hold
        per_param = dtype.itemsize if "none" in args.quant.split(",") else 1   # int8: a byte a weight, plus scales
        need = count_parameters(cfg)["total"] * per_param
        if need > 0.9 * free:
            print(f"error: the {args.config} config with random {'int8' if per_param == 1 else dtype} weights needs "
                  f"{need / 2**30:.1f} GiB on {device}, and {free / 2**30:.1f} GiB is free: try --layers 2, "
                  "--config tiny or a bigger device", file=sys.stderr)
            return 2

    bw = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (256 << 20))
    spec = spec_bandwidth(device)
    results.update(copy_bandwidth=bw, spec_bandwidth=spec)
    print(f"copy bandwidth (read + write): {bw / 1e12:.3f} TB/s"
          + (f"   vendor spec: {spec / 1e12:.2f} TB/s ({bw / spec:.0%} of it)" if spec else ""))

    if args.kernel_bench and triton_available(device) and device.type == "cuda":
        try:
            kernel_bench(device, bw)
        except Exception as err:  # a measurement aid only: report and carry on
            print(f"kernel bench FAILED: {type(err).__name__}: {err}")
        torch.cuda.empty_cache()

    max_len = args.prompt_len + args.tokens + 8
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).to(device)

    for quant in args.quant.split(","):
        q = None if quant == "none" else quant
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if args.weights:
            from mixtral_edu.weights import load_model
            from mixtral_edu.inference.quant import quantize_model
            if q is None:
                model = load_model(args.weights, device=device, dtype=dtype)
            else:
                model = quantize_model(load_model(args.weights, device="cpu", dtype=dtype), device=device, progress=True)
            cfg = model.config
        else:
            model = random_model(cfg, device, dtype, quant=q, seed=0)
        sync(device)
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        nbytes = active_weight_bytes(cfg, q, dtype=str(dtype).removeprefix("torch."))
        print(f"\n== weights {quant if q else str(dtype).removeprefix('torch.')}: {weights / 1e9:.2f} GB on {device} "
              f"(built in {time.perf_counter() - t0:.1f} s); active weights per token {nbytes / 1e9:.3f} GB; "
              f"bound {bw / nbytes:.1f} tokens/s at the measured bandwidth"
              + (f", {spec / nbytes:.1f} at the spec" if spec else ""))
        if triton_available(device):
            try:
                print(check_kernel(model, device))
            except Exception as err:  # report and go on: the other modes still measure something
                print(f"kernel check FAILED: {type(err).__name__}: {err}")
        reference, eager_ids = None, None
        if "eager" not in modes:                          # a short eager run to check the fast modes against
            ids, _, kept = eager_decode(model, prompt, 9, max_len, device)
            reference = (ids, kept)
        for mode in modes:
            if time.perf_counter() - start > args.time_budget:
                print(f"[{mode}] skipped: past the time budget of {args.time_budget:.0f} s")
                continue
            try:
                if mode == "eager":
                    n = min(args.eager_tokens, args.tokens)
                    ids, seconds, kept = eager_decode(model, prompt, n, max_len, device)
                    setup, check = 0.0, None
                    reference, eager_ids = (ids, kept), ids
                else:
                    n = args.tokens
                    ids, seconds, setup, check = fast_decode(model, prompt, n, max_len, device, mode, reference)
            except Exception as err:
                print(f"[{mode}] FAILED: {type(err).__name__}: {err}")
                traceback.print_exc(limit=3)
                continue
            tps = (n - 1) / seconds
            same = None
            if eager_ids is not None and mode != "eager":
                m = min(len(eager_ids), len(ids))
                same = next((i for i in range(m) if ids[i] != eager_ids[i]), m)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            run = dict(quant=quant, mode=mode, tokens=n, tokens_per_s=tps, ms_per_token=1e3 * seconds / (n - 1),
                       setup_s=setup, peak_memory_bytes=peak, weights_bytes=weights,
                       active_bytes_per_token=nbytes, fraction_of_measured_bound=tps * nbytes / bw,
                       fraction_of_spec_bound=tps * nbytes / spec if spec else None,
                       agrees_with_eager_for=same,
                       teacher_forced=None if check is None else
                       dict(max_rel_error=check[0], argmax_agree=check[1], steps=check[2]))
            results["runs"].append(run)
            print(f"[{mode}] {tps:.1f} tokens/s ({run['ms_per_token']:.2f} ms/token, setup {setup:.1f} s); "
                  f"{run['fraction_of_measured_bound']:.0%} of the measured-bandwidth bound"
                  + (f", {run['fraction_of_spec_bound']:.0%} of the spec bound" if spec else "")
                  + (f"; peak memory {peak / 2**30:.2f} GiB" if peak else "")
                  + (f"; greedy tokens equal eager's for the first {same} of {min(len(eager_ids), len(ids))}"
                     if same is not None else "")
                  + (f"; fed eager's tokens: logits within {check[0]:.1e} (relative), argmax agrees {check[1]}/{check[2]}"
                     if check else ""))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| weights | mode | tokens/s | ms/token | peak GiB | of measured bound | of spec bound |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        peak = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "-"
        spec_frac = f"{r['fraction_of_spec_bound']:.0%}" if r["fraction_of_spec_bound"] else "-"
        print(f"| {r['quant'] if r['quant'] != 'none' else results['dtype']} | {r['mode']} | {r['tokens_per_s']:.1f} "
              f"| {r['ms_per_token']:.2f} | {peak} | {r['fraction_of_measured_bound']:.0%} | {spec_frac} |")
    print(f"total time {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
