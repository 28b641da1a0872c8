"""Expert offloading on a device: cache hit rate, bytes copied per token and tokens/s, random weights.

    PYTHONPATH=. python3 benchmarks/offload_check.py --layers 8 --slots 13 --tokens 32        # a GPU
    PYTHONPATH=. python3 benchmarks/offload_check.py --config tiny --device cpu --slots 6     # smoke test
    PYTHONPATH=. python3 benchmarks/offload_check.py --weights data/tiny-mixtral --device cpu --slots 6 --policy shared

The model (full-width Mixtral-8x7B layers, `--layers` of them) is drawn on the device, its experts go to
(pinned) host memory behind the offload cache of `--slots` experts (inference/offload.py), and greedy
decoding runs at batch 1. The plan gives a 24 GB GPU 51 slots for 32 layers; 13 for 8 layers keeps that
ratio. Random routers spread tokens evenly over the experts, so the hit rate here is a floor: real
routing repeats experts between consecutive tokens (the paper's Section 5), which the cache exploits.
With --weights the model is loaded from a checkpoint and decodes a repetitive text instead.
--policy: per-layer LRUs (what load_placed uses) or the one shared LRU, to compare.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.offload import offload_experts
from random_weights import random_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("full", "tiny"), default="full")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--slots", type=int, default=13, help="experts the device caches")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    p.add_argument("--weights", default=None, help="a checkpoint folder instead of random weights")
    p.add_argument("--policy", choices=("per-layer", "shared"), default="per-layer")
    args = p.parse_args(argv)
    if args.weights:
        from mixtral_edu.tokenizer import Tokenizer
        from mixtral_edu.weights import load_model

        model = load_model(args.weights, progress=False)
        args.layers = model.config.num_hidden_layers
        tok = Tokenizer()
        prompt = [tok.bos_id] + tok.encode("And the LORD spake unto Moses, saying, " * 3)
    else:
        cfg = MixtralConfig.mixtral_8x7b() if args.config == "full" else MixtralConfig.tiny()
        cfg.num_hidden_layers = args.layers
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model = random_model(cfg, args.device, dtype)
        prompt = list(range(1, 17))
    cache = offload_experts(model, args.device, args.slots, per_layer=args.policy == "per-layer")
    generate(model, prompt, 2, eos_id=None)                       # warm-up
    cache.reset_stats()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, prompt, args.tokens, eos_id=None)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = cache.stats
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "layers": args.layers, "slots": args.slots, "policy": args.policy, "tokens": args.tokens,
              "hit_rate": stats.hit_rate,
              "bytes_per_token": stats.bytes_copied / args.tokens, "tokens_per_s": args.tokens / seconds}
    print(f"[offload] {result['device']}: {args.layers} layers, {args.slots} slots ({args.policy}): "
          f"hit rate {stats.hit_rate:.1%}, "
          f"{result['bytes_per_token'] / 1e6:.2f} MB copied per token, {result['tokens_per_s']:.2f} tokens/s "
          f"(prefill of {len(prompt)} tokens included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
