"""Mixtral-8x7B at full size from a GGUF file on this machine: a synthetic Q4_K_M file, routed and decoded.

    .venv/bin/python benchmarks/gguf_full_size.py                        # write the file (once), then measure
    .venv/bin/python benchmarks/gguf_full_size.py --dir /work/gguf-big --memory-budget 4GB --decode 4

1. Write: a GGUF file with Mixtral-8x7B's real tensor names, shapes and metadata (llama.cpp's layout,
   merged experts) and the type mix llama-quantize gives Mixtral for Q4_K_M (llama-quant.cpp, pin of
   llama_cpp.py): token_embd Q4_K, output Q6_K, attn_q Q4_K, attn_k and attn_v Q8_0 (an 8-expert rule),
   attn_output Q5_K, ffn_gate_exps and ffn_up_exps Q4_K, ffn_down_exps Q6_K on the "more bits" layers
   (0-3, 28-31 and every third between) and Q4_K on the others, norms and routers F32. The blocks are
   random (64 MB of random blocks per type, repeated), with float16 scales small enough to keep
   activations finite: the speed and memory of streaming do not depend on what the weights are.
   About 28 GB, written outside git, never by a test.
2. Route: `mixtral-edu route --weights FILE --memory-budget B "<128-token text>"` as a child process:
   wall time and peak RSS (the child's ru_maxrss).
3. Decode: load, then `generate` from BOS alone: the time between new tokens after the first (tokens/s).
4. llama.cpp (llama-bench from llama_cpp.py's build) on the same file, where it runs.
5. Dequantization per expert, side by side (`--skip` everything else to run it alone): gguf_quants.py as of
   commit OLD (fresh float32 per matrix, one thread) against today's StreamedExperts (a DequantCache of
   3 experts whose evicted memory is refilled), alternating expert by expert in one process.
Every number goes with the CPU model, the core count, the total memory and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(HERE)]

TEXT = ("Mixture of experts models route every token to a few of their feed-forward networks. In Mixtral, "
        "each of the thirty-two layers has eight experts and a router that picks two of them for every token. "
        "The paper asks whether experts specialise in topics such as mathematics, biology or philosophy, and "
        "finds little evidence of it; instead, the choice of expert follows syntax, and consecutive tokens "
        "often go to the same expert. Here the weights are random, so the routing says nothing about "
        "language, but the time and memory it takes are those of the real model here, on this two-core computer.")
# (scale of d, scale of dmin) per type: random codes times these keep weights near N(0, 0.02)
POOL_BYTES = 64 * 2 ** 20
SCALES = {"Q4_K": (2e-4, 1.5e-3), "Q5_K": (1e-4, 1.5e-3), "Q6_K": (3e-5, None), "Q8_0": (3e-4, None)}


def more_bits(i: int, n: int = 32) -> bool:
    """llama-quant.cpp's use_more_bits: the layers whose ffn_down gets Q6_K in a Q4_K_M file."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(cfg) -> list:
    """[(GGUF name, torch-order shape, GGML type)] of a Q4_K_M Mixtral-8x7B, in the converter's order."""
    h, i, e, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    plan = [("token_embd.weight", (v, h), "Q4_K")]
    for n in range(cfg.num_hidden_layers):
        b = f"blk.{n}."
        plan += [(b + "attn_norm.weight", (h,), "F32"), (b + "attn_q.weight", (h, h), "Q4_K"),
                 (b + "attn_k.weight", (kv, h), "Q8_0"), (b + "attn_v.weight", (kv, h), "Q8_0"),
                 (b + "attn_output.weight", (h, h), "Q5_K"), (b + "ffn_norm.weight", (h,), "F32"),
                 (b + "ffn_gate_inp.weight", (e, h), "F32"), (b + "ffn_gate_exps.weight", (e, i, h), "Q4_K"),
                 (b + "ffn_down_exps.weight", (e, h, i), "Q6_K" if more_bits(n) else "Q4_K"),
                 (b + "ffn_up_exps.weight", (e, i, h), "Q4_K")]
    plan += [("output_norm.weight", (h,), "F32"), ("output.weight", (v, h), "Q6_K")]
    return plan


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """`[n_blocks, type_size]` uint8: random codes, float16 scales uniform in [0, SCALES[qtype]) (finite)."""
    import gguf
    from gguf_files import F16_FIELDS

    _, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = np.frombuffer(rng.bytes(n_blocks * nbytes), np.uint8).reshape(n_blocks, nbytes).copy()
    for at, scale in zip(F16_FIELDS[qtype], SCALES[qtype]):
        blocks[:, at:at + 2] = (rng.random(n_blocks, np.float32) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks


class Pool:
    """POOL_BYTES of random blocks per type, handed out cyclically: drawing 26 GB of random numbers on
    two shared cores takes an hour, and what the blocks hold changes neither speed nor memory."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.pools, self.at = rng, {}, {}

    def tensor(self, shape: tuple, qtype: str) -> np.ndarray:
        """Bytes of a `qtype` tensor `[..., bytes per row]`; F32: norms 1, routers N(0, 0.02)."""
        import gguf

        if qtype == "F32":
            return np.ones(shape, np.float32) if len(shape) == 1 else \
                (self.rng.standard_normal(shape) * 0.02).astype(np.float32)
        size, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        if qtype not in self.pools:
            self.pools[qtype], self.at[qtype] = random_blocks(qtype, POOL_BYTES // nbytes, self.rng), 0
        pool, n_blocks = self.pools[qtype], int(np.prod(shape)) // size
        index = (self.at[qtype] + np.arange(n_blocks)) % pool.shape[0]
        self.at[qtype] = int(index[-1] + 1) if n_blocks else self.at[qtype]
        return pool[index].reshape(*shape[:-1], shape[-1] // size * nbytes)


def write_file(path: Path, seed: int = 0) -> float:
    """Write the synthetic Q4_K_M file tensor by tensor (never more than one tensor in memory); seconds."""
    import gguf
    from mixtral_edu.weights.gguf_save import add_mixtral_metadata
    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.tokenizer import Tokenizer

    cfg = MixtralConfig.mixtral_8x7b()
    tok = Tokenizer()
    t0 = time.time()
    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(part), "llama")
    add_mixtral_metadata(writer, cfg, tok.pieces(range(tok.vocab_size)), name="Mixtral-8x7B synthetic (random Q4_K_M blocks)")
    writer.add_file_type(15)                      # LLAMA_FTYPE_MOSTLY_Q4_K_M
    plan = tensor_plan(cfg)
    for name, shape, qtype in plan:
        raw = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            size, nbytes = gguf.GGML_QUANT_SIZES[raw]
            byte_shape = (*shape[:-1], shape[-1] // size * nbytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pool = Pool(np.random.default_rng(seed))
    for k, (name, shape, qtype) in enumerate(plan):
        writer.write_tensor_data(pool.tensor(shape, qtype))
        if k % 40 == 0:
            print(f"[gguf_full_size] write: {k}/{len(plan)} tensors, {part.stat().st_size / 1e9:.1f} GB", flush=True)
    writer.close()
    part.rename(path)
    return time.time() - t0


OLD = "f29d66b"          # main before issue 31's faster dequantization


def dequant_side_by_side(path: Path, threads: int) -> str:
    """CPU (user + system) and wall seconds per expert (w1, w2, w3 of 58.7M weights each), old and new."""
    import resource
    import types

    import torch
    from mixtral_edu.inference.gguf_stream import DequantCache, StreamedExperts
    from mixtral_edu.weights.gguf_file import GGUFFile

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD}:mixtral_edu/weights/gguf_quants.py"],
                            capture_output=True, text=True, check=True).stdout
    old = types.ModuleType("gguf_quants_old")
    exec(compile(source, "gguf_quants_old.py", "exec"), old.__dict__)
    torch.set_num_threads(threads)
    f = GGUFFile(path, check_tokenizer=False)
    cache = DequantCache(3 * StreamedExperts(f, 0, DequantCache(0)).nbytes)
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])                # noqa: E731
    times = {"old": [], "new": []}
    for layer in (20, 21, 22, 23):             # ffn_down Q6_K in 21 and 22, Q4_K in 20 and 23
        prefix, streamed = f"layers.{layer}.block_sparse_moe.experts.", StreamedExperts(f, layer, cache)
        for e in range(8):                     # old on even experts, new on odd: each reads its own pages
            c, t = cpu(), time.time()
            if e % 2 == 0:
                for w in ("w1", "w2", "w3"):
                    m = f.matrices[(prefix + w, e)]
                    old.dequantize(f.raw(m), m.qtype)
                    f.release(m)
            else:
                streamed.expert_weights(e)
            times["old" if e % 2 == 0 else "new"].append((cpu() - c, time.time() - t))
    lines = []
    for name, rows in times.items():
        rows = rows[1:]                        # the first of each warms up
        cpu_s, wall_s = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
        lines.append(f"  {name}: CPU {cpu_s:.3f} s, wall {wall_s:.3f} s per expert ({len(rows)} experts)")
    return "\n".join(lines) + f"\n  memory reused by the new loads: {cache.reused} matrices; load average {os.getloadavg()}"


def machine() -> str:
    import llama_cpp as lc
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{lc.cpu_model()}, {os.cpu_count()} cores, {mem:.1f} GiB RAM"


def child(cmd: list) -> dict:
    """Run `cmd` alone; its wall seconds, CPU seconds (user + system), peak RSS (GB) and output. One child at a
    time, so RUSAGE_CHILDREN's maximum is this one's only if no bigger child ran before: each measurement runs
    in a fresh process."""
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys, time, json; t=time.time(); "
               "r=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 'wall': time.time()-t, "
               "'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "'cpu': resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime"
               " + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime, "
               "'out': r.stdout[-3000:], 'err': r.stderr[-3000:]}))"] + cmd
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(wrapper, capture_output=True, text=True, env=env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["rss_gb"] = res.pop("rss_kb") * 1024 / 1e9
    return res


DECODE = """
import sys, time, torch
from mixtral_edu.weights import load_model
from mixtral_edu.inference.generate import generate
path, budget, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.time(); model = load_model(path, memory_budget=budget); load = time.time() - t
times = []                                   # when each new token arrives (generate's stream callback)
t = time.time(); generate(model, [1], n + 1, stream=lambda i: times.append(time.time()))
print(f"load {load:.1f} s; BOS + first token {times[0] - t:.1f} s; then {n} decode steps in {times[-1] - times[0]:.1f} s:"
      f" {n / (times[-1] - times[0]):.4f} tok/s; cache {model.gguf_cache.stats}")
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/work/gguf-big"), help="where the file goes (not in git)")
    p.add_argument("--memory-budget", default="4GB", help="--memory-budget for route and decode")
    p.add_argument("--decode", type=int, default=4, help="tokens to decode after the first (default %(default)s)")
    p.add_argument("--skip", nargs="*", default=[], choices=["route", "decode", "llama.cpp", "dequant"])
    p.add_argument("--repack", nargs="+", type=int, default=[0, 1], choices=[0, 1],
                   help="llama-bench --repack values to run (1, its default, copies the weights into its own "
                        "memory in the layout of its faster kernels; 0 reads them through the mapped file)")
    args = p.parse_args(argv)
    from mixtral_edu.inference.gguf_stream import parse_size
    from mixtral_edu.tokenizer import Tokenizer

    path = args.dir / "mixtral-8x7b-synthetic-Q4_K_M.gguf"
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; load average {os.getloadavg()}", flush=True)
    if not path.exists():
        print(f"write: {path} took {write_file(path):.0f} s", flush=True)
    print(f"file: {path} {path.stat().st_size / 1e9:.2f} GB", flush=True)
    tok = Tokenizer()
    print(f"text: {len(tok.encode(TEXT)) + 1} tokens with BOS", flush=True)
    if "route" not in args.skip:
        r = child([sys.executable, "-m", "mixtral_edu", "route", "--weights", str(path), "--memory-budget",
                   args.memory_budget, "--out", str(args.dir / "route"), TEXT])
        print(f"route: exit {r['rc']}, wall {r['wall']:.0f} s, CPU {r['cpu']:.0f} s, peak RSS {r['rss_gb']:.2f} GB, load average "
              f"{os.getloadavg()}\n{r['out']}{r['err'][-600:]}", flush=True)
    if "decode" not in args.skip:
        r = child([sys.executable, "-c", DECODE, str(path), str(parse_size(args.memory_budget)), str(args.decode)])
        print(f"decode: exit {r['rc']}, wall {r['wall']:.0f} s, CPU {r['cpu']:.0f} s, peak RSS {r['rss_gb']:.2f} GB, "
              "load average "
              f"{os.getloadavg()}\n{r['out']}{r['err'][-600:]}", flush=True)
    if "dequant" not in args.skip:
        for threads in (1, 2):
            print(f"dequantization per expert, torch threads {threads}, old ({OLD}) and new:\n"
                  f"{dequant_side_by_side(path, threads)}", flush=True)
    if "llama.cpp" not in args.skip:
        import llama_cpp as lc
        cache = lc.Cache()
        built = lc.built(cache)
        for repack in args.repack if built else []:
            r = child(["timeout", "600", str(cache.bin / "llama-bench"), "-m", str(path), "-t", "2", "-p", "128",
                       "-n", "2", "-r", "1", "--repack", str(repack), "-o", "json"])
            print(f"llama.cpp llama-bench -p 128 -n 2 --repack {repack} (timeout 600 s): exit {r['rc']}, wall {r['wall']:.0f} s, "
                  f"CPU {r['cpu']:.0f} s, peak RSS {r['rss_gb']:.2f} GB, load average {os.getloadavg()}"
                  f" (its file pages count: it maps the whole file)\n{r['out']}{r['err'][-600:]}", flush=True)
        if not built:
            print("llama.cpp: not built (run benchmarks/llama_cpp.py once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
