"""Our Mixtral against transformers' MixtralForCausalLM on the CPU: same weights, same threads.

    .venv/bin/python benchmarks/cpu_vs_transformers.py            # the issue-9 config (139M params)
    .venv/bin/python benchmarks/cpu_vs_transformers.py --small    # tiny sizes, seconds (the smoke test)

What happens, in one process:

1. transformers builds a random MixtralForCausalLM (float32) and writes it with `save_pretrained`
   into a temporary folder; ours is loaded from that folder with `mixtral_edu.weights.load.load_model`,
   so both hold the same weights and ours got them the way a user's checkpoint would, with what the
   command line installs on a CPU (`optimize_for`: lm_head stored column-major and the thread
   policy, `mixtral_edu.inference.cpu`), nothing else.
2. Prefill: one forward pass over `--prefill-len` tokens that fills a KV cache and computes the
   last position's logits only (what generation does). Both models, alternating, best of `--repeats`.
3. Decode: `--new-tokens` greedy tokens after a `--prompt-len`-token prompt. Ours through
   `mixtral_edu.inference.generate.generate`, transformers through its own `generate(do_sample=False)` (a
   DynamicCache). A per-token timestamp callback on each side times the steps after the first new
   token, so the prompt's prefill is not counted: tokens/s = (new_tokens - 1) / (t_last - t_first).
4. The bandwidth bound: decoding one token at batch 1 must read every active weight once
   (attention, router, the top-k experts of every layer, lm_head; one embedding row), so
   tokens/s <= read bandwidth / active bytes per token. The read bandwidth is measured in the same
   run (the sum of a tensor much larger than the caches).
5. Both greedy continuations must be identical; the script exits with status 1 when they are not.
6. --opt-in: the same decode through other paths: `to_column_major_` (row-sum products),
   `FastDecoder(model, compile=True)` (the compiled step `generate` switches to when it pays;
   its start-up is timed) and bfloat16 weights, eager and compiled (speed only: bf16 tokens are not
   expected to equal float32 ones).
7. --busy N: decode again with N busy-looping processes beside it (contention), ours, its compiled
   step and transformers, and ours with a fixed thread count (without the thread policy's `DecodeThreads`).

Timings are best-of-N wall-clock times with the two models interleaved, so a busy machine slows
both alike; the ratios are the numbers to compare, the absolute times depend on the load.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from statistics import median
from typing import Optional

import torch

from mixtral_edu.weights import load_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.decode import FastDecoder, cache_length
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.cpu import DecodeThreads, to_column_major_, use_thread_policy_
from mixtral_edu.inference.optimize import optimize_for
from mixtral_edu.params import count_parameters

ISSUE_CONFIG = dict(hidden=512, layers=8, heads=8, kv_heads=2, experts=8, top_k=2, intermediate=1024,
                    vocab=32000, prefill_len=512, prompt_len=32, new_tokens=128)
SMALL_CONFIG = dict(hidden=64, layers=2, heads=4, kv_heads=2, experts=8, top_k=2, intermediate=128,
                    vocab=1000, prefill_len=64, prompt_len=8, new_tokens=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny sizes for a quick check (overridable below)")
    for name, default in ISSUE_CONFIG.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {default}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads for both models (default: torch's, %(default)s here)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timed runs (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt-in", action="store_true",
                   help="also decode with the opt-in paths: row sums, torch.compile, bfloat16")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also decode with N busy-looping processes beside it (default: no contention run)")
    p.add_argument("--init-std", type=float, default=0.1,
                   help="std of the random weights (default %(default)s; transformers' own 0.02 gives a "
                        "model that repeats a few tokens, a weak test of 'identical greedy tokens')")
    args = p.parse_args(argv)
    base = SMALL_CONFIG if args.small else ISSUE_CONFIG
    for name, default in base.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


# ------------------------------------------------------------------ the models

def model_config(args: argparse.Namespace) -> MixtralConfig:
    """The benchmark model's architecture from the command line's sizes."""
    return MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                         max_position_embeddings=max(args.prefill_len, args.prompt_len + args.new_tokens))


def build_models(args: argparse.Namespace, folder: str):
    """A random transformers Mixtral saved with save_pretrained, and ours loaded from that folder."""
    import transformers

    cfg = model_config(args)
    hf_cfg = transformers.MixtralConfig(**cfg.to_hf_config())
    hf_cfg.initializer_range = args.init_std
    torch.manual_seed(args.seed)
    hf = transformers.MixtralForCausalLM(hf_cfg).to(torch.float32).eval()
    # Run to max_new_tokens whatever comes out (a random model may well pick id 2).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(folder)
    return cfg, hf, load_ours(folder)


def load_ours(folder: str):
    """Ours as a user of the command line gets it, from a checkpoint folder: `load_model`, then
    `optimize_for` the CPU (also used by benchmarks/llama_cpp.py). tests/test_benchmarks_smoke.py
    checks it is exactly that."""
    return optimize_for(load_model(folder, dtype=torch.float32, progress=False), "cpu")


def active_bytes_per_token(cfg: MixtralConfig, element_size: int = 4) -> int:
    """Bytes of weights one decoding step reads: the active parameters, but one embedding row, not the table."""
    counts = count_parameters(cfg)
    return (counts["active"] - counts["embeddings"] + cfg.hidden_size) * element_size


def read_bandwidth(repeats: int = 10, nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of reading a float32 tensor of `nbytes` (far larger than the CPU caches) with `sum`; best run."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


# ------------------------------------------------------------------ prefill

@torch.inference_mode()
def prefill_ours(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_kv_cache(1, ids.shape[1])
    return model(ids, cache=cache, last_only=True)[0, -1]


@torch.inference_mode()
def prefill_hf(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=True, logits_to_keep=1).logits[0, -1]


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t, out


# ------------------------------------------------------------------ decode

class Stamps:
    """Records wall-clock and main-thread CPU time per new token.

    Works as our `stream` callback and as transformers' streamer (which first gets the prompt).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.prompt_seen = False

    def __call__(self, token_id) -> None:          # ours: called with each new id
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.thread_time())

    def put(self, value) -> None:                  # transformers: first the prompt, then each new token
        if self.prompt_seen:
            self(value)
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def tokens_per_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def cpu_ms_per_token(self) -> float:
        """Main-thread CPU time per decoding step: what the step costs when the machine is not shared."""
        return (self.cpu_times[-1] - self.cpu_times[0]) / (len(self.cpu_times) - 1) * 1e3


def decode_ours(model, prompt: torch.Tensor, n: int) -> tuple[Stamps, list[int]]:
    stamps = Stamps()
    ids = generate(model, prompt, n, temperature=0.0, eos_id=None, stream=stamps)
    return stamps, ids


@torch.inference_mode()
def decode_hf(model, prompt: torch.Tensor, n: int) -> tuple[Stamps, list[int]]:
    stamps = Stamps()
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, streamer=stamps)
    return stamps, out[0, prompt.shape[1]:].tolist()


def decode_fast(decoder: FastDecoder, prompt: torch.Tensor, n: int) -> tuple[Stamps, list[int]]:
    """`FastDecoder` step by step, stamped like the others (reading each token is a sync, cheap on a CPU)."""
    stamps = Stamps()
    with torch.inference_mode():
        decoder.prefill(prompt)
        ids = [int(decoder.token)]
        stamps(ids[-1])
        for _ in range(n - 1):
            decoder.step()
            ids.append(int(decoder.token))
            stamps(ids[-1])
    return stamps, ids


# Two greedy continuations computed in different summation orders (other kernels, compiled or not) may part at a
# near-tie, where the top two logits are closer than float32 rounding can separate. The prefill check above shows
# the logits of the two models differ by about 1e-6 here; a tie within NEAR_TIE (100x that) is not a wrong token.
NEAR_TIE = 1e-4


@torch.no_grad()
def token_agreement(model, prompt: torch.Tensor, ids: list[int], ids_ref: list[int]) -> tuple[bool, str]:
    """Do `ids` follow `ids_ref`? Where they part, our eager logits on the reference prefix must be a near-tie."""
    if ids == ids_ref:
        return True, "tokens identical"
    p = next((i for i, (a, b) in enumerate(zip(ids, ids_ref)) if a != b), min(len(ids), len(ids_ref)))
    if p == min(len(ids), len(ids_ref)):
        return False, f"TOKENS DIFFER from transformers': {len(ids)} against {len(ids_ref)} tokens"
    logits = model(torch.cat([prompt, torch.tensor([ids_ref[:p]], dtype=prompt.dtype)], dim=1))[0, -1].float()
    gap = abs(float(logits[ids_ref[p]] - logits[ids[p]]))
    if gap <= NEAR_TIE:
        return True, (f"tokens identical up to a near-tie at token {p} (tokens {ids[p]} and {ids_ref[p]}: logits "
                      f"{gap:.1e} apart, within {NEAR_TIE:.0e})")
    return False, (f"TOKENS DIFFER from transformers' at token {p}: ours {ids[p:p + 8]}, transformers "
                   f"{ids_ref[p:p + 8]} (logits {gap:.1e} apart)")


def best_decode(decode, model, prompt, n: int, repeats: int) -> tuple[float, list[int]]:
    """Best tokens/s of `repeats` decodes after a short warm-up, and the last run's ids."""
    decode(model, prompt, 2)
    runs = [decode(model, prompt, n) for _ in range(repeats)]
    return max(s.tokens_per_s() for s, _ in runs), runs[-1][1]


def fixed_threads() -> DecodeThreads:
    """Stands in for the thread policy's `DecodeThreads`: with nothing to sample, the thread count stays as set."""
    return DecodeThreads(sample=lambda: None)


def opt_in_runs(ours, prompt: torch.Tensor, args, ids_hf: list[int], best_hf: float, bound: float) -> None:
    """Decode through each opt-in path; print tokens/s, the ratio to transformers and to the bound."""
    n = args.new_tokens

    def report(name: str, tps: float, ids: Optional[list[int]], extra: str = "") -> None:
        same = "tokens not compared" if ids is None else token_agreement(ours, prompt, ids, ids_hf)[1]
        print(f"opt-in {name}: {tps:.1f} tok/s, {tps / best_hf:.2f}x transformers, {tps / bound:.0%} of the "
              f"bound; {same}{extra}")

    rowsum = to_column_major_(copy.deepcopy(ours))
    report("to_column_major_ (row sums)", *best_decode(decode_ours, rowsum, prompt, n, args.repeats))
    del rowsum
    decoder, warmup = compiled_decoder(ours, prompt.shape[1] + n, prompt)
    tps, ids = best_decode(decode_fast, decoder, prompt, n, args.repeats)
    report("FastDecoder(compile=True)", tps, ids, f"; compile warm-up {warmup:.1f} s")
    del decoder
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    tps, _ = best_decode(decode_ours, bf16, prompt, n, args.repeats)
    report("bfloat16 weights (default path)", tps, None, f"; bound at bf16 bytes {2 * bound:.1f} tok/s")
    decoder, warmup = compiled_decoder(bf16, prompt.shape[1] + n, prompt)
    tps, _ = best_decode(decode_fast, decoder, prompt, n, args.repeats)
    report("bfloat16 weights, FastDecoder(compile=True)", tps, None,
           f"; compile warm-up {warmup:.1f} s; bound at bf16 bytes {2 * bound:.1f} tok/s")


def compiled_decoder(model, max_seq_len: int, prompt: torch.Tensor) -> tuple[FastDecoder, float]:
    """The compiled step `generate` switches to when it pays, on a copy of `model`, with the cache length
    `generate` would pick; and the seconds its first steps took (building its package, or loading it)."""
    decoder = FastDecoder(copy.deepcopy(model), max_seq_len=cache_length(model, max_seq_len), compile=True)
    t = time.perf_counter()
    decode_fast(decoder, prompt, 3)
    return decoder, time.perf_counter() - t


def busy_runs(ours, hf, prompt: torch.Tensor, args, quiet_ours: float, quiet_hf: float) -> None:
    """Decode while `args.busy` other processes spin; print each rate against its quiet one."""
    n, r = args.new_tokens, args.repeats
    decoder, _ = compiled_decoder(ours, prompt.shape[1] + n, prompt)
    quiet_compiled, _ = best_decode(decode_fast, decoder, prompt, n, r)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)
        tps_ours, _ = best_decode(decode_ours, ours, prompt, n, r)
        tps_compiled, _ = best_decode(decode_fast, decoder, prompt, n, r)
        tps_hf, _ = best_decode(decode_hf, hf, prompt, n, r)
        use_thread_policy_(ours, fixed_threads())
        try:
            tps_fixed, _ = best_decode(decode_ours, ours, prompt, n, r)
        finally:
            use_thread_policy_(ours)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    print(f"under contention ({args.busy} busy process(es) beside it): ours {tps_ours:.1f} tok/s "
          f"({tps_ours / quiet_ours:.0%} of quiet), transformers {tps_hf:.1f} ({tps_hf / quiet_hf:.0%} of quiet), "
          f"ours with a fixed {args.threads} threads {tps_fixed:.1f} ({tps_fixed / quiet_ours:.0%} of quiet), "
          f"ours compiled step {tps_compiled:.1f} ({tps_compiled / quiet_compiled:.0%} of its quiet {quiet_compiled:.1f})")


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        cfg, hf, ours = build_models(args, folder)
    counts = count_parameters(cfg)
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
          f"{cfg.num_key_value_heads} KV heads, {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, "
          f"expert size {cfg.intermediate_size}, vocab {cfg.vocab_size}, float32, weights ~ N(0, {args.init_std}); "
          f"{counts['total'] / 1e6:.1f}M parameters, {counts['active'] / 1e6:.1f}M active")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"transformers attention {hf.config._attn_implementation!r}, "
          f"experts {getattr(hf.config, '_experts_implementation', 'n/a')!r}; best of {args.repeats} runs")

    gen = torch.Generator().manual_seed(args.seed + 1)
    prefill_ids = torch.randint(3, cfg.vocab_size, (1, args.prefill_len), generator=gen)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=gen)

    # Prefill. One untimed warm-up each, then alternate.
    prefill_ours(ours, prefill_ids), prefill_hf(hf, prefill_ids)
    times_ours, times_hf = [], []
    for _ in range(args.repeats):
        t, logits_ours = timed(prefill_ours, ours, prefill_ids)
        times_ours.append(t)
        t, logits_hf = timed(prefill_hf, hf, prefill_ids)
        times_hf.append(t)
    prefill_diff = (logits_ours - logits_hf).abs().max().item()

    # Decode. A short warm-up each, then alternate.
    decode_ours(ours, prompt, 2), decode_hf(hf, prompt, 2)
    stamps_ours, stamps_hf = [], []
    for _ in range(args.repeats):
        stamps, ids_ours = decode_ours(ours, prompt, args.new_tokens)
        stamps_ours.append(stamps)
        stamps, ids_hf = decode_hf(hf, prompt, args.new_tokens)
        stamps_hf.append(stamps)
    tps_ours = [s.tokens_per_s() for s in stamps_ours]
    tps_hf = [s.tokens_per_s() for s in stamps_hf]
    cpu_ours = min(s.cpu_ms_per_token() for s in stamps_ours)
    cpu_hf = min(s.cpu_ms_per_token() for s in stamps_hf)

    bandwidth = read_bandwidth()
    weight_bytes = active_bytes_per_token(cfg)
    bound = bandwidth / weight_bytes

    t_ours, t_hf = min(times_ours), min(times_hf)
    print(f"prefill {args.prefill_len} tokens: ours {t_ours * 1e3:.1f} ms, transformers {t_hf * 1e3:.1f} ms, "
          f"ours/transformers time {t_ours / t_hf:.2f} (medians {median(times_ours) * 1e3:.1f} / "
          f"{median(times_hf) * 1e3:.1f} ms; last-position logits max |diff| {prefill_diff:.1e})")
    best_ours, best_hf = max(tps_ours), max(tps_hf)
    print(f"decode {args.new_tokens} greedy tokens after {args.prompt_len}: ours {best_ours:.1f} tok/s, "
          f"transformers (generate, DynamicCache) {best_hf:.1f} tok/s, ours/transformers {best_ours / best_hf:.2f}x "
          f"(medians {median(tps_ours):.1f} / {median(tps_hf):.1f} tok/s)")
    print(f"decode main-thread CPU time per token: ours {cpu_ours:.2f} ms, transformers {cpu_hf:.2f} ms, "
          f"transformers/ours {cpu_hf / cpu_ours:.2f}x (less sensitive to other processes on the machine)")
    print(f"bandwidth bound: {weight_bytes / 1e6:.1f} MB of active weights per token, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> at most {bound:.1f} tok/s; ours at {best_ours / bound:.0%} of it, "
          f"transformers at {best_hf / bound:.0%}")

    agree, how = token_agreement(ours, prompt, ids_ours, ids_hf)
    if not agree:
        print(f"FAIL: greedy {how}")
        return 1
    print(f"greedy {how} ({len(ids_ours)} tokens)")
    if args.opt_in:
        opt_in_runs(ours, prompt, args, ids_hf, best_hf, bound)
    if args.busy:
        busy_runs(ours, hf, prompt, args, best_ours, best_hf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
