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
    theirs, their_greedy, their_ids = llama_cpp_run(cache, path, ids, threads)
    import numpy as np
    return {"file": path.name, "MB": path.stat().st_size / 1e6, "types": ours.gguf_file.type_counts(),
            "a": float(np.abs(a - b).max()), "b": float(np.abs(a - theirs).max()), "scale": float(np.abs(a).max()),
            "argmax": float((a.argmax(-1) == theirs.argmax(-1)).mean()), "tokens": len(ids),
            "greedy_equal": ours_greedy == their_greedy, "same_ids": their_ids == ids}


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
          "| (b) max abs diff vs llama.cpp | logit scale | argmax agrees | greedy tokens equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        print(f"| {r['model']} | {r['qtype']} | {types} | {r['MB']:.1f} | {r['a']:.1e} | {r['b']:.1e} | "
              f"{r['scale']:.1f} | {r['argmax']:.0%} | {'yes' if r['greedy_equal'] else 'NO'} |")
    if not all(r["same_ids"] for r in rows):
        print("note: llama.cpp's own tokenizer gave other ids for the prompt than ours on some file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
