"""Why mixture-of-experts, measured: the tiny MoE against a dense model with the same ACTIVE parameters.

The MoE is `data/tiny-mixtral`'s architecture: 8 SwiGLU experts of inner size I per layer, top-2.
The dense model is the same Mixtral with one expert of inner size 2·I and no router, so each token
goes through exactly as many feed-forward weights (3·H·2I per layer) as a token of the MoE does. The
two train with the same seed on the same batches of the same corpus for the same steps.

What the gap is: the loss a token gets for the same compute per token. What it is not: a win at equal
size. The MoE stores E/k = 4 times the feed-forward weights (and a router of E·H per layer); a
dense model with that many parameters would read all of them for every token.

    python -m mixtral_edu.training.dense_vs_moe --steps 300 --out data/dense_vs_moe/curves.json

writes both loss curves, the held-out losses, the parameter counts and the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import MixtralConfig
from ..params import count_parameters
from .train import evaluate, train

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "dense_vs_moe" / "curves.json"


def model_pair(moe: Optional[MixtralConfig] = None) -> dict[str, MixtralConfig]:
    """{"moe": the tiny MoE's config, "dense": one expert of inner size k·I} with equal active parameters."""
    moe = moe or MixtralConfig.tiny(max_position_embeddings=512, router_aux_loss_coef=0.02)
    dense = MixtralConfig(**{**moe.__dict__, "num_local_experts": 1, "num_experts_per_tok": 1,
                             "intermediate_size": moe.intermediate_size * moe.num_experts_per_tok})
    return {"moe": moe, "dense": dense}


def compare(streams: dict[str, torch.Tensor], heldout: Optional[dict[str, torch.Tensor]] = None,
            steps: int = 300, seed: int = 0, eval_windows: int = 8, **settings) -> dict:
    """Train both models of `model_pair()` on `streams` with the same seed and settings.

    Returns {name: {"step": [...], "loss": [...], "heldout": {domain: loss} or None, "total": n,
    "active": n, "seconds": s}} for name in ("moe", "dense").
    """
    out = {}
    for name, cfg in model_pair().items():
        start = time.time()
        model, history = train(cfg, streams, steps=steps, seed=seed, **settings)
        seconds = time.time() - start
        counts = count_parameters(cfg)
        seq_len = settings.get("seq_len", 128)
        out[name] = {"step": history.step, "loss": history.loss, "total": counts["total"],
                     "active": counts["active"], "seconds": round(seconds, 1),
                     "heldout": None if heldout is None else evaluate(model, heldout, seq_len, eval_windows)}
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m mixtral_edu.training.dense_vs_moe", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.threads < 1:
        print("error: --steps, --batch-size and --threads must be at least 1, --seq-len at least 2", file=sys.stderr)
        return 2
    from .corpus import load_split, token_streams
    from ..tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer()
    streams = token_streams(tokenizer, load_split("train"))
    heldout = token_streams(tokenizer, load_split("heldout"))
    runs = compare(streams, heldout, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                   seq_len=args.seq_len, log_every=args.log_every, warmup_steps=min(30, args.steps))
    command = "python -m mixtral_edu.training.dense_vs_moe " + " ".join(argv)
    record = {"command": command.strip(), "cpu": _cpu_name(), "threads": args.threads,
              "torch": torch.__version__, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)      # atomic: write, then rename
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    for name, run in runs.items():
        print(f"{name}: final train loss {run['loss'][-1]:.3f}, held-out {run['heldout']}, {run['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
