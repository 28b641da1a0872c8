"""A model split by layers over two devices: is FastDecoder's step slower than `generate`? Side by side, on the CPU.

    python benchmarks/split_decode.py [--hidden 1024 --intermediate 3584 --layers 4 --tokens 24 --repeats 3]

The model (random weights, float32) is split over two CPU "devices" ("cpu", "cpu": the same hooks and per-layer
caches as two GPUs, `inference/split.py`). Three decoders run the same greedy tokens, in turn, `--repeats` times:

* generate: `Mixtral.forward` with the model's own dispatch (one token: its k experts' weights as views);
* FastDecoder, sync-free: the decode dispatch FastDecoder installs on one device (one token: the k experts'
  w1, w2, w3 gathered, i.e. copied, so no host sync is needed; what a CUDA graph requires), forced here;
* FastDecoder, split rule: what FastDecoder installs on a split model (`split.decode_dispatch_for`: the
  model's own dispatch).

tokens/s per run is printed (best of the repeats in the summary); the machine's load is printed too, since other
processes share the cores. No timed assertion anywhere: tests/test_layer_split.py checks that the outputs agree.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.decode import FastDecoder
from mixtral_edu.inference.dispatch import decode_dispatch
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.split import split_by_layers
from mixtral_edu.model.mixtral import Mixtral


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = MixtralConfig.tiny(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=args.hidden // 8, vocab_size=1024,
                             max_position_embeddings=256)
    torch.manual_seed(0)
    model = split_by_layers(Mixtral(cfg).eval(), ["cpu", "cpu"])
    prompt = torch.randint(0, cfg.vocab_size, (1, 16)).tolist()[0]
    max_len = len(prompt) + args.tokens + 1
    gathered_mb = 2 * 3 * args.hidden * args.intermediate * 4 / 1e6
    print(f"config: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers split 2 + 2 over "
          f"('cpu', 'cpu'), float32, {args.threads} thread(s); one token's 2 experts are {gathered_mb:.0f} MB per layer")
    print(f"load average before: {os.getloadavg()}")

    def run_generate():
        return generate(model, prompt, args.tokens, eos_id=None)

    def fast(rule: bool):
        decoder = FastDecoder(model, max_len, use_kernel=False, cuda_graph=False)
        if not rule:                                               # what it installed before the rule
            model.set_dispatch(decode_dispatch(use_kernel=False))
        out = decoder.generate(torch.tensor([prompt]), args.tokens)
        model.set_dispatch("auto")
        return out

    runs = {"generate": run_generate, "FastDecoder, sync-free": lambda: fast(False),
            "FastDecoder, split rule": lambda: fast(True)}
    results = {name: [] for name in runs}
    outputs = {}
    with torch.no_grad():
        for name, fn in runs.items():
            outputs[name] = fn()                                   # warm-up, and the tokens to compare
        for _ in range(args.repeats):
            for name, fn in runs.items():                          # interleaved: load changes hit all alike
                t0 = time.perf_counter()
                fn()
                results[name].append(args.tokens / (time.perf_counter() - t0))
    tokens = {name: [int(t) for t in torch.as_tensor(o).reshape(-1).tolist()][-args.tokens:] for name, o in outputs.items()}
    print("same greedy tokens:", len({tuple(t) for t in tokens.values()}) == 1)
    for name, rates in results.items():
        print(f"  {name:26} best {max(rates):7.2f} tokens/s   runs {[round(r, 2) for r in rates]}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
