"""Ours against llama.cpp on the same GGUF files, one row per quantization type.

    .venv/bin/python benchmarks/gguf_vs_llama_cpp.py            # builds llama.cpp once (llama_cpp.py's cache)
    .venv/bin/python benchmarks/gguf_vs_llama_cpp.py --models tiny

Files: the course's tiny model (data/tiny-mixtral, hidden 64) and llama_cpp.py's random 139M model
(hidden 512, so every K-quant applies), converted by llama.cpp's own convert_hf_to_gguf.py to F32, F16
and Q8_0, and re-quantized from F32 by llama-quantize to Q4_0, Q4_K_M, Q5_K_M and Q6_K.

For every file, on one prompt (all positions' logits):
  (a) ours (load_model on the .gguf: streamed, dequantized in torch) against a plain float32 Mixtral
      holding the weights the gguf package's numpy dequantize gives: the same weights, so only float
      rounding may differ;
  (b) ours against llama.cpp through llama-cpp-python (F32 KV cache): max |diff| of the logits, the
      positions whose argmax agrees, and whether 16 greedy tokens are the same.
llama.cpp multiplies quantized weights by activations that it quantizes too (to Q8_0 or Q8_K blocks, in
its vec_dot kernels), and F16 weights by F16 activations; we multiply float32 activations by float32
dequantized weights. So (b) is exact only for F32; for the other types it measures that difference.
To show that this is the whole difference, and how large it is on our side alone:
  (c) ours with every matmul's input rounded as llama.cpp rounds it (`llama_cpp_activations`: each
      weight's `vec_dot_type` from ggml-cpu.c, quantize_row_q8_0 / q8_K as its x86 code computes
      them) against llama.cpp: logits and 16 greedy tokens;
  (d) ours against that same model: the activation rounding's own effect on the logits, and where
      our top-2 margin exceeds twice it (so no such rounding can swap the first two), whether
      llama.cpp's argmax is ours;
  (e) the model of (c) against itself with every matmul input first moved by one float32 rounding
      step: how far this file's logits are defined at all, once activations are rounded to 8 bits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import llama_cpp as lc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))         # gguf_files.reference_state: the gguf package's side
CONVERTED = ("f32", "f16", "q8_0")
QUANTIZED = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
PROMPT = "The capital of France is Paris, and the capital of Italy is"
GREEDY = 16


def quantize(cache: lc.Cache, f32: Path, qtype: str) -> Path:
    """llama-quantize F32 file -> `qtype` file, cached beside it."""
    out = f32.with_name(f32.name.replace("-f32.gguf", f"-{qtype.lower()}.gguf"))
    if out.exists():
        return out
    part = out.with_name(out.stem + ".part.gguf")
    lc.run_logged(f"llama-quantize ({qtype})", [str(cache.bin / "llama-quantize"), str(f32), str(part), qtype, "2"],
                  cache.logs / f"quantize-{out.stem}.log")
    part.rename(out)
    return out


def llama_cpp_run(cache: lc.Cache, path: Path, ids: list, threads: int):
    """llama.cpp's logits `[T, vocab]` for `ids` (F32 KV cache), its greedy continuation, its own tokens."""
    import numpy as np
    sys.path[:0] = [str(lc.bindings(cache)), str(cache.pydeps)]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(cache.bindings / "llama_cpp" / "lib")
    if sys.modules.get("llama_cpp") is lc:        # this script imported benchmarks/llama_cpp.py under that name
        del sys.modules["llama_cpp"]
    import llama_cpp                              # the bindings

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=threads, logits_all=True,
                          verbose=False, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)
    own = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    greedy = []
    for _ in range(GREEDY):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    llm.close()
    return logits, greedy, own


# ggml-cpu.c's type_traits_cpu[type].vec_dot_type: what a matmul rounds its activations to for these weights
# (Q8_1 rounds the values as Q8_0 does; it also stores their sum)
VEC_DOT = {"F32": None, "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q5_0": "Q8_0",
           "Q4_1": "Q8_0", "Q5_1": "Q8_0", "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K",
           "Q6_K": "Q8_K"}


def _round(x, kind):
    """x `[..., n]` float32 -> the values llama.cpp's CPU backend multiplies instead (n whole blocks).

    Q8_0 (quantize_row_q8_0, x86): per 32, d = amax/127 stored as float16, q = round-half-even(x * 127/amax).
    Q8_K (quantize_row_q8_K_ref): per 256, m = the value of largest magnitude, q = min(127, round(x * -127/m)),
    d = 1 / (-127/m) in float32. F16 / BF16: the activations converted to that type.
    """
    import torch

    if kind is None:
        return x
    if kind in ("F16", "BF16"):
        return x.to(torch.float16 if kind == "F16" else torch.bfloat16).float()
    size = 32 if kind == "Q8_0" else 256
    b = x.reshape(*x.shape[:-1], -1, size)
    if kind == "Q8_0":
        amax = b.abs().amax(-1, keepdim=True)
        q = torch.round(b * torch.where(amax > 0, 127 / amax, 0))
        return (q * (amax / 127).half().float()).reshape(x.shape)
    m = b.gather(-1, b.abs().argmax(-1, keepdim=True))             # first of the largest |x|, with its sign
    iscale = torch.where(m != 0, -127 / m, 0)
    q = torch.round(iscale * b).clamp(max=127)
    return (q * torch.where(m != 0, 1 / iscale, 0)).reshape(x.shape)


def llama_cpp_activations(model, nudge: bool = False) -> None:
    """Make a streamed GGUF `model` round every matmul's input as llama.cpp does for that weight's type.

    Pre-hooks on the attention projections, the router and lm_head; each layer's experts get a forward
    that rounds w1's and w3's input and w2's (the SwiGLU product) for their own types. nudge: first
    move every such input by one float32 rounding step (x * (1 +- 2**-23), random signs, seeded), as a
    different summation order in another implementation would: how much that alone changes the logits
    is the floor below which no two implementations of this model can agree.
    """
    import torch
    import torch.nn.functional as F

    file = model.gguf_file
    gen = torch.Generator().manual_seed(0)
    kind = lambda name, expert=None: VEC_DOT[file.matrices[(name, expert)].qtype]            # noqa: E731

    def round_activations(x, k):
        if nudge:
            x = x * (1 + (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1) * 2.0 ** -23)
        return _round(x, k)

    def hook(module, name):
        k = kind(name)
        module.register_forward_pre_hook(lambda m, args: (round_activations(args[0], k),) + args[1:])

    for i, layer in enumerate(model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hook(getattr(layer.self_attn, proj), f"layers.{i}.self_attn.{proj}.weight")
        hook(layer.block_sparse_moe.gate, f"layers.{i}.block_sparse_moe.gate.weight")
        experts = layer.block_sparse_moe.experts
        kinds = [[kind(experts.prefix + w, e) for w in ("w1", "w2", "w3")] for e in range(experts.num_experts)]

        def forward(x, e, experts=experts, kinds=kinds):
            (w1, w2, w3), (k1, k2, k3) = experts.expert_weights(e), kinds[int(e)]
            h = F.silu(F.linear(round_activations(x, k1), w1)) * F.linear(round_activations(x, k3), w3)
            return F.linear(round_activations(h, k2), w2)
        experts.forward = forward
    hook(model.lm_head, "embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight")


def margin_check(ours, rounded, theirs) -> dict:
    """Per position: our top-2 margin against twice |ours - rounded| (the rounding's effect there)."""
    import numpy as np

    top2 = np.sort(ours, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    effect = np.abs(ours - rounded).max(-1)
    safe = margin > 2 * effect
    agree = ours.argmax(-1) == theirs.argmax(-1)
    return {"safe": int(safe.sum()), "safe_agree": bool(agree[safe].all()), "min_margin": float(margin.min())}


def compare(cache: lc.Cache, path: Path, threads: int) -> dict:
    import torch

    from gguf_files import reference_state
    from mixtral_edu.inference.generate import generate
    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.tokenizer import Tokenizer
    from mixtral_edu.weights import load_model

    torch.set_num_threads(threads)
    tok = Tokenizer()
    ids = [tok.bos_id] + tok.encode(PROMPT)
    ours = load_model(path, memory_budget=2 ** 30)
    ref = Mixtral(ours.config).eval()
    ref.load_state_dict(reference_state(path, ours.config), strict=False)
    with torch.no_grad():
        a = ours(torch.tensor([ids]))[0].numpy()
        b = ref(torch.tensor([ids]))[0].numpy()
    ours_greedy = generate(ours, ids, GREEDY)
    rounded = load_model(path, memory_budget=2 ** 30)
    llama_cpp_activations(rounded)
    with torch.no_grad():
        c = rounded(torch.tensor([ids]))[0].numpy()
    rounded_greedy = generate(rounded, ids, GREEDY)
    nudged = load_model(path, memory_budget=2 ** 30)
    llama_cpp_activations(nudged, nudge=True)
    with torch.no_grad():
        e = nudged(torch.tensor([ids]))[0].numpy()
    theirs, their_greedy, their_ids = llama_cpp_run(cache, path, ids, threads)
    import numpy as np
    return {"file": path.name, "MB": path.stat().st_size / 1e6, "types": ours.gguf_file.type_counts(),
            "a": float(np.abs(a - b).max()), "b": float(np.abs(a - theirs).max()), "scale": float(np.abs(a).max()),
            "argmax": float((a.argmax(-1) == theirs.argmax(-1)).mean()), "tokens": len(ids),
            "greedy_equal": ours_greedy == their_greedy, "same_ids": their_ids == ids,
            "c": float(np.abs(c - theirs).max()), "c_greedy_equal": rounded_greedy == their_greedy,
            "c_leading": int(np.cumprod(np.abs(c - theirs).max(-1) < 1e-4).sum()),
            "d": float(np.abs(a - c).max()), "e": float(np.abs(c - e).max()), **margin_check(a, c, theirs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "139m"], choices=["tiny", "139m"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    cache = lc.Cache()
    try:
        lc.build(cache)
        lc.python_deps(cache)
        folders = {"tiny": lc.TINY, "139m": None}
        rows = []
        for name in args.models:
            folder = folders[name] or lc.random_checkpoint(cache)
            files = {t.upper(): lc.convert(cache, folder, t) for t in CONVERTED}
            files.update({q: quantize(cache, files["F32"], q) for q in QUANTIZED})
            for qtype, path in files.items():
                lc.say(f"compare: {name} {qtype}")
                rows.append(dict(model=name, qtype=qtype, **compare(cache, path, args.threads)))
    except lc.StepError as e:
        print(f"gguf_vs_llama_cpp.py: {e}", file=sys.stderr)
        return 1
    print(f"\nCPU: {lc.cpu_model()}; {args.threads} threads; llama-cpp-python {cache.pin}; "
          f"load average {lc.load_average()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"prompt: {PROMPT!r} ({rows[0]['tokens']} tokens, BOS first), every position's logits; "
          f"llama.cpp with an F32 KV cache; greedy: {GREEDY} tokens\n")
    print("| model | type (llama.cpp name) | tensor types in the file | MB | (a) max abs diff vs float32 model "
          "| (b) max abs diff vs llama.cpp | logit scale | argmax agrees | greedy tokens equal "
          "| (c) llama.cpp's rounding: max abs diff vs llama.cpp | (c) first positions within 1e-4 "
          "| (c) greedy tokens equal | (d) the rounding's effect on our logits "
          "| positions with margin > 2 (d): argmax agrees | (e) one-ulp nudge: max abs change |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        print(f"| {r['model']} | {r['qtype']} | {types} | {r['MB']:.1f} | {r['a']:.1e} | {r['b']:.1e} | "
              f"{r['scale']:.1f} | {r['argmax']:.0%} | {'yes' if r['greedy_equal'] else 'NO'} | "
              f"{r['c']:.1e} | {r['c_leading']} of {r['tokens']} | {'yes' if r['c_greedy_equal'] else 'NO'} | "
              f"{r['d']:.1e} | {r['safe']} of {r['tokens']}: {'yes' if r['safe_agree'] else 'NO'} | {r['e']:.1e} |")
    if not all(r["same_ids"] for r in rows):
        print("note: llama.cpp's own tokenizer gave other ids for the prompt than ours on some file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
