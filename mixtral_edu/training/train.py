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
Command line: `python -m mixtral_edu.training.train --out DIR --steps N --seed S` (see `--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..interrupt import exit_on_ctrl_c, ignore_ctrl_c, installed, raising_keyboard_interrupt

if __name__ == "__main__":      # the command line: from here on Ctrl-C is one line and status 130, even in torch's import
    exit_on_ctrl_c("interrupted; nothing was saved")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..analysis.routing import coefficient_of_variation as load_cv  # noqa: E402  (std/mean of a load [..., E])
from ..analysis.routing import expert_usage  # noqa: E402
from ..cli import Parser, error_text, say  # noqa: E402
from ..config import MixtralConfig  # noqa: E402
from .corpus import batches, heldout_windows  # noqa: E402
from .losses import load_balancing_loss, router_z_loss  # noqa: E402
from ..model.mixtral import Mixtral  # noqa: E402
from ..params import count_parameters  # noqa: E402
from ..weights.atomic import replace_folder  # noqa: E402


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
        for name in ("steps", "batch_size", "seq_len", "log_every", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TrainConfig.{name} must be an integer, got {value!r}")
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"TrainConfig.seed must be in [0, 2**63), got {self.seed}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "z_loss_coef",
                     "aux_loss_coef"):
            value = getattr(self, name)
            if value is None and name == "aux_loss_coef":
                continue
            # inf or NaN here trains to a checkpoint full of NaN: refuse before the first step
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"TrainConfig.beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.lr <= 1e6:       # above that AdamW's own arithmetic overflows
            raise ValueError(f"TrainConfig.lr must be in (0, 1e6], got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("z_loss_coef", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise ValueError(f"TrainConfig.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")


class NonFiniteLossError(ValueError):
    """Training met a NaN or infinite loss (or weights); the run stops there."""


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
    expert_ids = torch.stack([torch.topk(logits.detach(), top_k, dim=-1).indices for logits in router_logits])
    return expert_usage(expert_ids, router_logits[0].shape[-1]).float()      # [layers, tokens, k] -> [layers, E]


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
        if not math.isfinite(loss.item()):     # one NaN step poisons every weight through AdamW: stop here
            raise NonFiniteLossError(
                f"step {step + 1}: the loss is {loss.item()} (cross-entropy {ce.item()}, load balancing "
                f"{aux.item()}, z {z.item()}); training stopped. Try a smaller --lr or loss coefficients")
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
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(f"after {tc.steps} steps the weights {bad[:3]} hold NaN or infinity; "
                                 "training stopped. Try a smaller --lr")
    model.eval()
    return model, history


# ----------------------------------------------------------------------------- command line
class UsageError(ValueError):
    """A bad argument, corpus or output folder, found before training starts (exit status 2)."""
def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = Parser(
        prog="python -m mixtral_edu.training.train",
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it already exists (its whole contents); without it an existing, "
                        "non-empty folder is refused")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    try:
        if config_path:
            base = dataclasses.asdict(MixtralConfig.from_hf_config(config_path))
            base.update(values)
            return MixtralConfig(**base)
        return MixtralConfig.tiny(**values)
    except ValueError as err:
        given = ", ".join(f"--set {k}={v!r}" for k, v in values.items())
        raise ValueError(f"{err}{f' (with {given})' if given else ''}") from None


def _model_card(args_line: str, cfg: MixtralConfig, tc: dict, heldout: dict, seconds: float,
                num_params: int) -> str:
    rows = "\n".join(f"| {d} | {v:.3f} |" for d, v in heldout.items())
    return f"""# tiny-mixtral

A tiny Mixtral trained from scratch by mixtral-edu for teaching: the real Mixtral tokenizer
(`tokenizer.model`, 32000 pieces), {cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok} routing, \
{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, expert hidden size {cfg.intermediate_size}, \
{num_params:,} parameters in float32.
Hugging Face layout (`config.json`, `model.safetensors`): `transformers.MixtralForCausalLM.from_pretrained`
reads it, and so does `mixtral_edu.weights.load.load_model`.

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


def training_memory(cfg: MixtralConfig, batch_size: int, seq_len: int) -> dict:
    """About how many bytes of host memory training `cfg` takes, before it starts: {"state", "activations",
    "rope", "total"}.

    state: float32 weights, their gradients and AdamW's two moments, 16 bytes per parameter.
    activations: what backward keeps, per token in float32: per layer about 8 hidden-size vectors, the
        attention probabilities before and after softmax (2 x heads x seq_len) and, for each of the top-k
        experts, 4 vectors of the expert size and 2 of the hidden size; then the logits 3 times (logits,
        log-softmax, gradient).
    rope: the cos/sin tables [max_position_embeddings, head_dim], counted twice (they are built from
        tables of angles of the same size).
    An estimate, not a measurement: it is there to refuse what cannot fit, before the first step.
    """
    params = count_parameters(cfg)["total"]
    k = cfg.num_experts_per_tok if cfg.is_moe else 1
    per_layer = 8 * cfg.hidden_size + 2 * cfg.num_attention_heads * seq_len + k * (4 * cfg.intermediate_size
                                                                                 + 2 * cfg.hidden_size)
    per_token = cfg.num_hidden_layers * per_layer + 3 * cfg.vocab_size
    plan = {"state": 16 * params, "activations": 4 * batch_size * seq_len * per_token,
            "rope": 2 * 2 * cfg.max_position_embeddings * cfg.head_dim * 4}
    plan["total"] = sum(plan.values())
    return plan


def host_free_bytes():       # a name of this module's own: tests replace it
    from ..devices import host_free_bytes as free

    return free()


def _check_memory(cfg: MixtralConfig, tc: "TrainConfig") -> None:
    plan = training_memory(cfg, tc.batch_size, tc.seq_len)
    free = host_free_bytes()
    if free is not None and plan["total"] > free:
        gib = 2 ** 30
        raise UsageError(f"training needs about {plan['total'] / gib:,.1f} GiB (weights, gradients and AdamW state "
                         f"{plan['state'] / gib:,.1f} GiB, activations of --batch-size {tc.batch_size} x --seq-len "
                         f"{tc.seq_len} {plan['activations'] / gib:,.1f} GiB, RoPE tables {plan['rope'] / gib:,.1f} "
                         f"GiB), but only {free / gib:,.1f} GiB of memory is free; use a smaller model, batch or "
                         "sequence")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that training could not (or should not) write, before any step is taken."""
    import tempfile

    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UsageError(f"--out {out} is the current folder or holds it: the finished checkpoint replaces --out "
                         "by a rename, which cannot move the folder you are in; choose another folder")
    if out.is_dir() and os.path.ismount(resolved):
        raise UsageError(f"--out {out} is a mount point: the finished checkpoint replaces --out by a rename, which "
                         "cannot move it; choose a folder inside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} already exists and is not empty (a checkpoint?); pass --overwrite to "
                         "replace it, or choose another folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is not a folder")
    try:                                  # the real test of writability (os.access is wrong for root, ACLs, ...)
        probe = tempfile.mkdtemp(prefix=".mixtral-edu-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {parent} ({err.strerror})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The training command line: 0 when the checkpoint is saved, 2 for bad input found before training,
    1 for a failure during it (e.g. a non-finite loss), 130 for Ctrl-C. Every error is one line on
    stderr (`--debug` adds the traceback), and nothing is left at --out unless the run completed."""
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except KeyboardInterrupt:
        say("interrupted; nothing was saved")
        return 130
    except Exception as err:
        if debug:
            import traceback
            traceback.print_exc()
        message = error_text(err)
        known = isinstance(err, (ValueError, OSError, MemoryError)) or message.startswith("out of memory")
        say(f"error: {message}" if known else f"error: {type(err).__name__}: {message} (unexpected; rerun "
             "with --debug for the traceback)")
        return 2 if isinstance(err, UsageError) else 1
    finally:
        if command_line:
            ignore_ctrl_c()        # done: a late Ctrl-C must not kill the interpreter as it exits


def _main(argv: list) -> int:
    args = _parse_args(argv)
    from ..weights.save import _parse_size
    from .corpus import heldout_windows, load_split, token_streams
    from ..tokenizer import Tokenizer

    # ---- everything is checked before the first step, so no run is lost to a typo
    if not 1 <= args.threads <= 4096:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.eval_windows < 1:
        raise UsageError(f"--eval-windows must be at least 1, got {args.eval_windows}")
    try:
        cfg = model_config_from_args(args.config, args.set)
        _parse_size(args.max_shard_size)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    if cfg.vocab_size < 32000:
        raise UsageError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's 32000 pieces")
    aux = 0.0 if args.no_balance else args.aux_loss_coef
    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
                    min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, aux_loss_coef=aux,
                    z_loss_coef=args.z_loss_coef, log_every=args.log_every)
    try:
        tc = TrainConfig(steps=args.steps, seed=args.seed, **settings)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if tc.seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    _check_memory(cfg, tc)
    torch.set_num_threads(args.threads)

    tokenizer = Tokenizer()
    try:
        train_streams = token_streams(tokenizer, load_split("train", args.corpus))
        heldout_streams = token_streams(tokenizer, load_split("heldout", args.corpus))
        for domain, stream in train_streams.items():
            if stream.numel() < tc.seq_len + 2:
                raise ValueError(f"the {domain} training text has {stream.numel()} tokens, too few for "
                                 f"--seq-len {tc.seq_len}")
        for domain, stream in heldout_streams.items():
            heldout_windows(stream, tc.seq_len, args.eval_windows)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise UsageError(f"corpus: {err}") from None
    print("training tokens: " + ", ".join(f"{d} {s.numel():,}" for d, s in train_streams.items()))

    def log(entry: dict) -> None:
        cv = " ".join(f"{v:.2f}" for v in load_cv(entry["load"]).tolist())
        print(f"step {entry['step']:6d} | lr {entry['lr']:.2e} | loss {entry['loss']:.4f} | "
              f"aux {entry['aux_loss']:.4f} | z {entry['z_loss']:.2f} | load cv per layer {cv}", flush=True)

    start = time.time()
    try:
        model, history = train(cfg, train_streams, steps=args.steps, seed=args.seed, progress=not args.no_progress,
                               log_fn=log, **settings)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err}; nothing was saved") from None
    seconds = time.time() - start
    heldout = evaluate(model, heldout_streams, args.seq_len, args.eval_windows)
    print("held-out loss: " + ", ".join(f"{d} {v:.4f}" for d, v in heldout.items()))
    print(f"training time: {seconds:.0f} s")

    # ---- written beside --out, then renamed into place: a failure or Ctrl-C leaves no partial checkpoint
    with raising_keyboard_interrupt():
        _save(out, argv, model, tokenizer, cfg, tc, args, heldout, history, seconds)
    if installed():
        exit_on_ctrl_c(f"interrupted; the checkpoint was saved to {out}")
    print(f"saved to {out}")
    return 0


def _save(out: Path, argv: list, model, tokenizer, cfg, tc, args, heldout, history, seconds) -> None:
    import tempfile

    from ..weights.save import save_model

    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    try:
        save_model(model, staging, max_shard_size=args.max_shard_size)
        shutil.copyfile(tokenizer.path, staging / "tokenizer.model")
        tc_dict = dataclasses.asdict(tc)
        # --overwrite and --debug change nothing about the weights: the card records the training command
        args_line = "python -m mixtral_edu.training.train " + " ".join(a for a in argv if a not in ("--overwrite", "--debug"))
        num_params = sum(p.numel() for p in model.parameters())
        (staging / "README.md").write_text(_model_card(args_line, cfg, tc_dict, heldout, seconds, num_params),
                                           encoding="utf-8")
        with open(staging / "training_log.json", "w", encoding="utf-8") as f:
            json.dump({"command": args_line, "train_config": tc_dict, "seconds": round(seconds, 1),
                       "heldout_loss": heldout, "history": history.to_dict()}, f)
            f.write("\n")
        replace_folder(staging, out)
    except (OSError, ValueError):
        raise
    except Exception as err:   # safetensors reports a full disk as SafetensorError, not OSError
        raise OSError(f"saving the checkpoint failed ({error_text(err)}); nothing was saved") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
