"""Train a Mixtral from scratch on the corpus: next-token cross-entropy plus the router losses.

    loss = cross_entropy(logits, next tokens)
         + aux_loss_coef * mean over layers of load_balancing_loss(layer's router logits)   (2.0 at balance)
         + z_loss_coef   * router_z_loss(all router logits)

The load-balancing loss is applied per layer and averaged (each MoE layer has its own loss, as in
the Switch Transformer), so no layer can hide an imbalance behind another; Hugging Face's
`load_balancing_loss_func` pools the layers instead. With `aux_loss_coef=0` ("--no-balance") nothing
stops the rich-get-richer loop: an expert that is picked gets trained, gets better, and is picked more.

Optimiser: AdamW, learning rate warmed up linearly then decayed along a cosine to `min_lr_ratio` of the
peak; gradients clipped by global norm. Everything random (weights, batches) comes from `seed`, so
two runs with the same arguments give the same weights.

Python: `train(cfg, streams, steps=..., seed=...) -> (model, history)`.
Command line: `python -m mixtral_edu.train --out DIR --steps N --seed S` (see `--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .config import MixtralConfig
from .corpus import batches, heldout_windows
from .losses import load_balancing_loss, router_z_loss
from .model import Mixtral


@dataclass
class TrainConfig:
    """Optimisation settings (the model's architecture lives in MixtralConfig)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: Optional[float] = None   # None: the model config's router_aux_loss_coef
    z_loss_coef: float = 0.0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("z_loss_coef", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise ValueError(f"TrainConfig.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


@dataclass
class History:
    """What `train` logged, one entry per `log_every` steps (each a mean over those steps).

    step `[n]`; lr, loss (cross-entropy), aux_loss (per-layer mean load-balancing loss), z_loss `[n]`;
    load `[n, layers, experts]`: the share of the top-k picks that went to each expert (rows sum to 1).
    """

    step: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    z_loss: list = field(default_factory=list)
    load: list = field(default_factory=list)

    def load_tensor(self) -> torch.Tensor:
        """The logged loads stacked: `[n, layers, experts]`."""
        return torch.stack(self.load) if self.load else torch.empty(0)

    def to_dict(self) -> dict:
        return {"step": self.step, "lr": self.lr, "loss": self.loss, "aux_loss": self.aux_loss,
                "z_loss": self.z_loss, "load": [t.tolist() for t in self.load]}


# ----------------------------------------------------------------------------- pieces
def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warm-up to tc.lr, then cosine down to min_lr_ratio*lr."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    floor = tc.lr * tc.min_lr_ratio
    return floor + (tc.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_load(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Per-layer router logits (each `[tokens, E]`) -> share of top-k picks per expert `[layers, E]`."""
    rows = []
    for logits in router_logits:
        ids = torch.topk(logits.detach(), top_k, dim=-1).indices
        counts = torch.bincount(ids.reshape(-1), minlength=logits.shape[-1]).float()
        rows.append(counts / counts.sum())
    return torch.stack(rows)


def load_cv(load: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation std/mean over experts of a load `[..., E]` -> `[...]` (0 = even;
    sqrt(E/k - 1) = 1.73 when top-2 of 8 always picks the same two experts)."""
    return load.std(dim=-1, correction=0) / load.mean(dim=-1)


def balance_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Mean over layers of the Hugging Face-normalised load-balancing loss (2.0 at perfect balance for k=2)."""
    return torch.stack([load_balancing_loss(layer, top_k) for layer in router_logits]).mean()


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, projections, experts, gates), none on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


@torch.no_grad()
def evaluate(model: Mixtral, streams: dict[str, torch.Tensor], seq_len: int = 128,
             max_windows: Optional[int] = 16, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token cross-entropy (nats per token) per domain on deterministic held-out windows.

    streams: {domain: 1-D token stream}; windows are `corpus.heldout_windows(stream, seq_len, max_windows)`.
    """
    was_training = model.training
    model.eval()
    out = {}
    for domain, stream in streams.items():
        windows = heldout_windows(stream, seq_len, max_windows)
        total, count = 0.0, 0
        for chunk in windows.split(batch_size):
            logits = model(chunk[:, :-1])
            targets = chunk[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                     reduction="sum").item()
            count += targets.numel()
        out[domain] = total / count
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the loop
def train(cfg: MixtralConfig, streams: dict[str, torch.Tensor], steps: int = 1000, seed: int = 0,
          progress: bool = False, log_fn=None, **settings) -> tuple[Mixtral, History]:
    """Train a fresh `Mixtral(cfg)` on training token streams {domain: 1-D LongTensor}.

    steps, seed and any TrainConfig field (batch_size, seq_len, lr, aux_loss_coef, z_loss_coef,
    log_every, ...) as keywords. progress: show a tqdm bar. log_fn: called with a dict after each
    logged interval (the CLI prints it). Returns (model in eval mode, History).
    """
    tc = TrainConfig(steps=steps, seed=seed, **settings)
    aux_coef = cfg.router_aux_loss_coef if tc.aux_loss_coef is None else tc.aux_loss_coef
    if not cfg.is_moe and (aux_coef or tc.z_loss_coef):
        aux_coef, tc.z_loss_coef = 0.0, 0.0   # a dense model has no router to balance
    if tc.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {tc.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")

    torch.manual_seed(tc.seed)
    model = Mixtral(cfg)
    model.train()
    optimizer = make_optimizer(model, tc)
    data = batches(streams, tc.batch_size, tc.seq_len, torch.Generator().manual_seed(tc.seed))
    history = History()
    sums = {"loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0}
    load_sum = None

    from tqdm.auto import tqdm

    bar = tqdm(range(tc.steps), desc="training", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(data)
        logits, router_logits = model(batch[:, :-1], return_router_logits=True)
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), batch[:, 1:].reshape(-1))
        loss = ce
        if cfg.is_moe:
            aux = balance_loss(router_logits, cfg.num_experts_per_tok)
            z = router_z_loss(router_logits)
            loss = loss + aux_coef * aux + tc.z_loss_coef * z
            load = layer_load(router_logits, cfg.num_experts_per_tok)
        else:
            aux = z = torch.zeros(())
            load = torch.zeros(cfg.num_hidden_layers, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()

        sums["loss"] += ce.item()
        sums["aux_loss"] += aux.item()
        sums["z_loss"] += z.item()
        load_sum = load if load_sum is None else load_sum + load
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            n = (step % tc.log_every) + 1
            history.step.append(step + 1)
            history.lr.append(lr)
            for key in sums:
                getattr(history, key).append(sums[key] / n)
                sums[key] = 0.0
            history.load.append(load_sum / n)
            load_sum = None
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", aux=f"{history.aux_loss[-1]:.3f}")
            if log_fn is not None:
                log_fn({"step": step + 1, "lr": lr, "loss": history.loss[-1], "aux_loss": history.aux_loss[-1],
                        "z_loss": history.z_loss[-1], "load": history.load[-1]})
    model.eval()
    return model, history


# ----------------------------------------------------------------------------- command line
def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mixtral_edu.train",
        description="Train a Mixtral from scratch on the shipped corpus (python, prose, arithmetic) and save it "
                    "in the Hugging Face layout, with a copy of the tokenizer and a model card.",
    )
    p.add_argument("--out", required=True, help="output folder for the checkpoint")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the batches (default 0)")
    p.add_argument("--config", default=None,
                   help="a Hugging Face config.json to train (default: MixtralConfig.tiny())")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a MixtralConfig field, e.g. --set num_hidden_layers=6 (repeatable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-coef", type=float, default=None,
                   help="load-balancing loss coefficient (default: the config's router_aux_loss_coef)")
    p.add_argument("--no-balance", action="store_true", help="ablation: no load-balancing loss (coefficient 0)")
    p.add_argument("--z-loss-coef", type=float, default=0.0, help="router z-loss coefficient (default 0)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=32,
                   help="held-out windows per domain for the final evaluation (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--corpus", default=None, help="corpus folder (default: data/corpus)")
    p.add_argument("--max-shard-size", default="50MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def model_config_from_args(config_path: Optional[str], overrides: Sequence[str]) -> MixtralConfig:
    """MixtralConfig.tiny() (or a config.json) with FIELD=VALUE overrides applied."""
    fields = {f.name for f in dataclasses.fields(MixtralConfig)}
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        values[key] = _parse_value(raw)
    if config_path:
        base = dataclasses.asdict(MixtralConfig.from_hf_config(config_path))
        base.update(values)
        return MixtralConfig(**base)
    return MixtralConfig.tiny(**values)


def _model_card(args_line: str, cfg: MixtralConfig, tc: dict, heldout: dict, seconds: float,
                num_params: int) -> str:
    rows = "\n".join(f"| {d} | {v:.3f} |" for d, v in heldout.items())
    return f"""# tiny-mixtral

A tiny Mixtral trained from scratch by mixtral-edu for teaching: the real Mixtral tokenizer
(`tokenizer.model`, 32000 pieces), {cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok} routing, \
{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, expert hidden size {cfg.intermediate_size}, \
{num_params:,} parameters in float32.
Hugging Face layout (`config.json`, `model.safetensors`): `transformers.MixtralForCausalLM.from_pretrained`
reads it, and so does `mixtral_edu.checkpoint.load_model`.

It has seen about {tc['steps'] * tc['batch_size'] * tc['seq_len']:,} tokens of three domains (Python standard-library
source, King James Bible prose, arithmetic drills; see data/README.md). It continues text in those
styles; it knows no facts and follows no instructions.

Trained with:

    {args_line}

Training settings: {json.dumps(tc)}

Wall-clock time: {seconds / 60:.1f} minutes on this machine's CPU.

Held-out loss (nats per token; uniform guessing is ln 32000 = 10.37):

| domain | loss |
|---|---|
{rows}

Licences: weights Apache-2.0 (this project); tokenizer.model is Mistral AI's, Apache-2.0 (shipped in
mistral-common); training text: PSF licence (Python code), public domain (KJV), generated (arithmetic).
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    from .checkpoint import save_model
    from .corpus import load_split, token_streams
    from .tokenizer import Tokenizer

    try:
        cfg = model_config_from_args(args.config, args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.vocab_size < 32000:
        print(f"error: vocab_size {cfg.vocab_size} is smaller than the tokenizer's 32000 pieces", file=sys.stderr)
        return 2
    aux = 0.0 if args.no_balance else args.aux_loss_coef
    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                    min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, aux_loss_coef=aux,
                    z_loss_coef=args.z_loss_coef, log_every=args.log_every)
    try:
        TrainConfig(steps=args.steps, seed=args.seed, **settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    tokenizer = Tokenizer()
    train_streams = token_streams(tokenizer, load_split("train", args.corpus))
    heldout_streams = token_streams(tokenizer, load_split("heldout", args.corpus))
    print("training tokens: " + ", ".join(f"{d} {s.numel():,}" for d, s in train_streams.items()))

    def log(entry: dict) -> None:
        cv = " ".join(f"{v:.2f}" for v in load_cv(entry["load"]).tolist())
        print(f"step {entry['step']:6d} | lr {entry['lr']:.2e} | loss {entry['loss']:.4f} | "
              f"aux {entry['aux_loss']:.4f} | z {entry['z_loss']:.2f} | load cv per layer {cv}", flush=True)

    start = time.time()
    model, history = train(cfg, train_streams, steps=args.steps, seed=args.seed, progress=not args.no_progress,
                           log_fn=log, **settings)
    seconds = time.time() - start
    heldout = evaluate(model, heldout_streams, args.seq_len, args.eval_windows)
    print("held-out loss: " + ", ".join(f"{d} {v:.4f}" for d, v in heldout.items()))
    print(f"training time: {seconds:.0f} s")

    out = Path(args.out)
    save_model(model, out, max_shard_size=args.max_shard_size)
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    tc = dataclasses.asdict(TrainConfig(steps=args.steps, seed=args.seed, **settings))
    args_line = "python -m mixtral_edu.train " + " ".join(argv if argv is not None else sys.argv[1:])
    num_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(_model_card(args_line, cfg, tc, heldout, seconds, num_params), encoding="utf-8")
    with open(out / "training_log.json", "w", encoding="utf-8") as f:
        json.dump({"command": args_line, "train_config": tc, "seconds": round(seconds, 1),
                   "heldout_loss": heldout, "history": history.to_dict()}, f)
        f.write("\n")
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
