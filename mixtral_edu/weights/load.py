"""Load a checkpoint of any published layout as a Mixtral, one tensor at a time, and check everything.

Loading never holds two copies of the model. The model is built on the "meta" device (no memory),
then given uninitialised storage in the target dtype on the target device; each tensor is read
from the memory-mapped file (safetensors_reader.py), converted (names, q/k permutation, fused
experts; convert.py), copied into place by the one `WeightFiller`, and its file pages released.
Peak host memory is the final model plus one tensor: .pt files of the original release are read by
pt_header.py's restricted unpickler (tensor records only), each tensor mapped on its own.

Everything is checked: each key must be known and fill a parameter exactly once, with the shape the
config implies; every parameter must be filled; weights holding NaN or infinity are refused by
name unless `allow_non_finite=True`. Problems raise CheckpointError naming the file and the tensor.
Before loading, the weights' bytes on each device (`params.weight_bytes_per_device`, the one
count the placement planner uses too) plus the RoPE tables are compared with the device's free
memory, and loading is refused (InsufficientMemoryError) unless told to go ahead.

`load_hf_state_dict` puts an in-memory Hugging Face state dict into a model through the same filler.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..config import MixtralConfig
from ..devices import free_bytes as available_memory      # a module name of its own: tests replace it
from ..model.mixtral import Mixtral
from ..model import rope
from ..model.rope import RotaryEmbedding
from ..params import weight_bytes_per_device
from .convert import mistral_to_hf_tensors
from .errors import CheckpointError
from .gguf_file import is_gguf
from .keys import hf_to_ours_key, is_stacked_expert, ours_to_hf_key, split_fused_experts
from .layouts import LAYOUT_NAMES, PathLike, checkpoint_dtype, detect_layout, read_config, weight_files
from .publish import read_whole


class InsufficientMemoryError(MemoryError):
    """The model would not fit in the free memory of the target device (see `memory_plan`)."""


# ============================================================================= memory plan
def memory_plan(cfg: MixtralConfig, dtype: torch.dtype, device: Union[str, torch.device] = "cpu") -> dict:
    """What loading needs against what `device` has: {"needed_bytes", "available_bytes", "fits"}.

    needed_bytes is the weights in `dtype` (`params.weight_bytes_per_device`) plus the RoPE cos/sin
    tables `[max_position_embeddings, head_dim]` the model builds (`rope_table_bytes`); the file is
    memory-mapped and streamed, so nothing else of the model's size is held. available_bytes is
    None (and fits True) for devices that cannot be asked (e.g. "meta").
    """
    plan = memory_plans(cfg, dtype, [torch.device(device)] * cfg.num_hidden_layers)[0]
    del plan["device"]
    return plan


def memory_plans(cfg: MixtralConfig, dtype: torch.dtype, devices: Sequence[torch.device]) -> list[dict]:
    """`memory_plan` for a model whose decoder layer i goes on `devices[i]`, one plan per distinct device:
    {"device", "needed_bytes", "available_bytes", "fits"}. The embedding and RoPE tables go with the
    first layers, the final norm and lm_head with the last (`params.weight_bytes_per_device`)."""
    runs = [(device, len(list(run))) for device, run in itertools.groupby(devices)]
    shares = weight_bytes_per_device(cfg, [n for _, n in runs], dtype)
    shares[0] += rope_table_bytes(cfg, dtype)
    needed: dict[torch.device, int] = {}
    for (device, _), share in zip(runs, shares):
        needed[device] = needed.get(device, 0) + share
    plans = []
    for device, n in needed.items():
        available = available_memory(device)
        plans.append({"device": device, "needed_bytes": n, "available_bytes": available,
                      "fits": available is None or n <= available})
    return plans


def rope_table_bytes(cfg: MixtralConfig, dtype: torch.dtype) -> int:
    """Bytes of the cos and sin tables, each `[max_position_embeddings, head_dim]` in `dtype`."""
    return 2 * cfg.max_position_embeddings * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def _refusal(plan: dict, dtype: torch.dtype, device) -> str:
    """One line of under 300 characters: the numbers, then the ways out (a smaller dtype only where there is one)."""
    smaller = ", bf16 instead" if torch.empty((), dtype=dtype).element_size() > 2 else ""
    return (f"loading needs {_size(plan['needed_bytes'])} (weights and RoPE tables, {dtype}) on {device}, but only "
            f"{_size(plan['available_bytes'])} is free; ways out: int8, offload experts to CPU memory, more GPUs "
            f"(plan_placement, load_placed){smaller}, or ignore_memory_check=True (--ignore-memory-check)")


def _size(n: int) -> str:
    """GiB to two decimals; MiB or bytes below 0.01 GiB, and three digits past a million GiB, so the line stays short."""
    gib = n / 2 ** 30
    if gib >= 1e6:
        return f"{gib:.3g} GiB"
    return f"{gib:.2f} GiB" if gib >= 0.01 else f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 14 else f"{n} bytes"


# ============================================================================= load
def meta_skeleton(cfg: MixtralConfig) -> Mixtral:
    """Mixtral(cfg) on the meta device, shapes only: its random init and its RoPE table are skipped.

    Both would be thrown away (weights come from a file, the table is rebuilt on the real device), and
    torch runs init and table ops on meta tensors through torch._refs, which imports the compiler: about
    a second of every command that loads a model. Mixtral's own code stays as a learner reads it.
    """
    no_op = lambda tensor, *args, **kwargs: tensor                                  # noqa: E731
    saved = nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, rope.rope_cos_sin
    nn.init.normal_ = nn.init.uniform_ = nn.init.kaiming_uniform_ = no_op
    rope.rope_cos_sin = lambda head_dim, max_positions, rope_theta: (torch.empty(max_positions, head_dim),) * 2
    try:
        with torch.device("meta"):
            return Mixtral(cfg)
    finally:
        nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, rope.rope_cos_sin = saved


def _empty_model(cfg: MixtralConfig, devices: list[torch.device], dtype: torch.dtype) -> Mixtral:
    """A Mixtral with uninitialised weights of `dtype`, never materialised anywhere but their device.

    devices: one device per decoder layer; the embeddings go with the first layer, the final norm
    and lm_head with the last (as `inference.split.split_by_layers` places them).
    """
    model = meta_skeleton(cfg).to(dtype=dtype)
    model.embed_tokens.to_empty(device=devices[0])
    for layer, device in zip(model.layers, devices):
        layer.to_empty(device=device)
    model.norm.to_empty(device=devices[-1])
    model.lm_head.to_empty(device=devices[-1])
    if cfg.tie_word_embeddings:      # to_empty made a new Parameter for each module, undoing the tie
        model.lm_head.weight = model.embed_tokens.weight
    # The cos/sin table is not in the checkpoint: compute it (as Mixtral(cfg).to(device, dtype) has it).
    model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(
        device=devices[0], dtype=dtype)
    return model


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in float tensor `t`. Two reductions, no temporary of t's size (which would
    add to the load's peak memory): min and max are NaN when any value is, infinite when any is."""
    if t.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(t)
    except RuntimeError:            # dtypes without aminmax (float8): the plain way
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


class WeightFiller:
    """Puts Hugging Face-named tensors (per-expert form) into a model's parameters: the one place that
    maps a key to its parameter, checks it fills that parameter exactly once with the model's shape,
    and copies it in (converting dtype and moving it to the parameter's device). `load_model` feeds
    it tensors from files, `load_hf_state_dict` from a state dict.

    source: what the model's shapes come from, for messages ("config.json", "the model").
    """

    def __init__(self, model: nn.Module, source: str) -> None:
        self.cfg = model.config
        self.source = source
        self.params = dict(model.named_parameters())
        self.filled: dict[tuple[str, Optional[int]], str] = {}     # (name, expert) -> where it came from
        self.tied_lm_head: Optional[tuple[str, torch.Tensor]] = None

    def fill(self, hf_key: str, tensor: torch.Tensor, where: str, origin: str = "") -> Optional[tuple[str, torch.Tensor]]:
        """Copy `tensor` into the parameter `hf_key` names; returns (our name, the filled parameter or
        expert row), or None for the lm_head of a model that ties it to the embeddings (kept for
        `check_tied`). where: names the tensor in messages; origin: recorded for "already loaded from".
        Raises UnexpectedKey when the model has no such tensor, CheckpointError for a second copy,
        another shape or a dtype that is not a float."""
        try:
            name, expert = hf_to_ours_key(hf_key)
        except KeyError:
            raise UnexpectedKey(f"{where}: unexpected key, not a weight of this model") from None
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            self.tied_lm_head = (where, tensor.clone())
            return None
        if (name, expert) in self.filled:
            raise CheckpointError(f"{where}: {hf_key} was already loaded from {self.filled[(name, expert)]}")
        param = self.params.get(name)
        if param is None or (expert is not None and expert >= param.shape[0]):
            raise UnexpectedKey(f"{where}: unexpected key, the model in {self.source} has no {hf_key}")
        target = param if expert is None else param[expert]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{where}: shape {tuple(tensor.shape)}, but {self.source} implies "
                                  f"{tuple(target.shape)} for {hf_key}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: dtype {tensor.dtype} is not a float weight")
        target.copy_(tensor)
        self.filled[(name, expert)] = origin or where
        return name, target

    def missing(self) -> list[str]:
        """HF keys of the parameters (and expert rows) not filled yet."""
        missing = []
        for name, param in self.params.items():
            experts = range(param.shape[0]) if is_stacked_expert(name) else [None]
            missing += [ours_to_hf_key(name, j, dense=not self.cfg.is_moe) for j in experts if (name, j) not in self.filled]
        return missing

    def check_complete(self, folder) -> None:
        """CheckpointError unless every parameter (and expert row) has been filled."""
        missing = self.missing()
        if missing:
            raise CheckpointError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model in "
                                  f"{self.source} needs (HF names): {missing[:8]}")

    def check_tied(self, embed_tokens: torch.Tensor) -> None:
        """A tied model's lm_head, if the tensors held one, must equal the embeddings it is tied to."""
        if self.tied_lm_head is None:
            return
        where, t = self.tied_lm_head
        if t.shape != embed_tokens.shape or not torch.equal(t.to(embed_tokens), embed_tokens):
            raise CheckpointError(f"{where}: {self.source} ties lm_head to the embeddings, but this tensor "
                                  "differs from them")


class UnexpectedKey(CheckpointError):
    """A tensor the model has no place for."""


def _to_hf_tensors(layout: str, key: str, tensor: torch.Tensor, cfg: MixtralConfig):
    """Any layout's (key, tensor) -> per-expert HF (key, tensor) pairs."""
    if layout.startswith("mistral"):
        return mistral_to_hf_tensors(key, tensor, cfg)
    return list(split_fused_experts({key: tensor}).items())   # also accepts transformers-5 fused tensors


@torch.no_grad()
def load_model(path: PathLike, device: Union[str, torch.device, Sequence] = "cpu", dtype: Optional[torch.dtype] = None,
               *, progress: bool = True, ignore_memory_check: bool = False,
               on_layer_loaded: Optional[Callable[[int, torch.nn.Module], None]] = None,
               allow_non_finite: bool = False, memory_budget: Optional[int] = None) -> Mixtral:
    """Load the checkpoint in folder `path` (any layout, see `detect_layout`) as a Mixtral in eval mode.

    A `.gguf` file is not loaded but streamed (`inference/gguf_stream.py`): on the CPU, in float32,
    its dequantized weights bounded by `memory_budget` bytes (default: half the free memory).

    device: where the weights go ("cpu", "cuda", "cuda:1", ...); each tensor is copied there directly.
        A list names one device per decoder layer: each layer's tensors go straight to their own
        device (the embeddings with the first layer, the final norm and lm_head with the last), so no
        device ever holds the whole model; `inference.split.load_split` uses it and adds the hooks
        that carry the hidden state from device to device.
    dtype: the weights' dtype; None keeps the checkpoint's (config.json's `dtype`, else the tensors').
    progress: a tqdm bar over the tensors (on stderr).
    ignore_memory_check: load even when `memory_plan` says the weights will not fit.
    on_layer_loaded: called as `on_layer_loaded(i, model.layers[i])` as soon as every tensor of
        decoder layer i is in place (e.g. to quantise it and move it to a GPU); the loader then
        holds no reference to that layer's old weights, so CPU pages it released are not needed
        again: the host holds a few layers at a time, not the whole model.
    allow_non_finite: load weights holding NaN or infinity (after conversion to `dtype`); by default
        such a tensor is refused by name, since a model with them only ever predicts NaN.
    Raises CheckpointError (file and tensor named) for anything wrong with the files, and
    InsufficientMemoryError when the weights would not fit. A save publishing into the folder meanwhile
    makes it read again (publish.read_whole): the model is the old checkpoint or the new one, whole, and
    `on_layer_loaded` may then see a layer twice.
    """
    folder = Path(path)
    if is_gguf(folder):
        from ..inference.gguf_stream import load_gguf
        if torch.device(device) != torch.device("cpu") or dtype not in (None, torch.float32):
            raise ValueError(f"{folder}: a GGUF file streams on the CPU in float32 only (got {device}, {dtype})")
        return load_gguf(folder, memory_budget=memory_budget)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r:.80}")
    # One whole checkpoint even while a save publishes a new one (publish.py): read again if it changed.
    return read_whole(folder, lambda source: _load_folder(source, device, dtype, progress, ignore_memory_check,
                                                          on_layer_loaded, allow_non_finite))


def _load_folder(folder: Path, device, dtype, progress, ignore_memory_check, on_layer_loaded,
                 allow_non_finite) -> Mixtral:
    """load_model's work on one checkpoint folder, as it stands."""
    from tqdm.auto import tqdm

    layout = detect_layout(folder)
    cfg = read_config(folder, layout)
    files, tensors_of = weight_files(folder, layout)
    dtype = dtype or checkpoint_dtype(folder, layout, files)
    if isinstance(device, (list, tuple)):
        if len(device) != cfg.num_hidden_layers:
            raise ValueError(f"device names {len(device)} devices; a list needs one per decoder layer "
                             f"({cfg.num_hidden_layers})")
        devices = [torch.device(d) for d in device]
    else:
        devices = [torch.device(device)] * cfg.num_hidden_layers
    if not ignore_memory_check:          # each device must hold its own share
        for plan in memory_plans(cfg, dtype, devices):
            if not plan["fits"]:
                raise InsufficientMemoryError(_refusal(plan, dtype, plan["device"]))

    model = _empty_model(cfg, devices, dtype)   # meta -> empty storage only: nothing is allocated twice
    config_name = "config.json" if layout.startswith("hf") else "params.json"
    filler = WeightFiller(model, config_name)
    # tensors still to come per decoder layer (a stacked expert parameter counts once per expert)
    pending = [0] * cfg.num_hidden_layers
    for name, param in filler.params.items():
        if name.startswith("layers."):
            pending[int(name.split(".")[1])] += param.shape[0] if is_stacked_expert(name) else 1
    bar = tqdm(total=sum(p.numel() for p in filler.params.values()), unit="param", unit_scale=True,
               desc=f"reading {LAYOUT_NAMES[layout]} weights", disable=not progress)
    for file in files:
        for key, tensor in tensors_of(file):
            where = f"{file}: tensor {key}"
            try:
                pairs = _to_hf_tensors(layout, key, tensor, cfg)
            except (KeyError, ValueError, RuntimeError) as err:   # RuntimeError: torch refused a reshape
                raise CheckpointError(f"{where}: {err.args[0] if err.args else err}") from None
            for hf_key, t in pairs:
                filled = filler.fill(hf_key, t, where, origin=file.name)
                if filled is None:
                    continue
                name, target = filled
                if not allow_non_finite and target.device.type != "meta" and not _all_finite(target):
                    bad = int(target.numel() - torch.isfinite(target).sum())
                    raise CheckpointError(f"{where}: {bad} of {target.numel()} values of {hf_key} are NaN or "
                                          f"infinite in {target.dtype}; pass allow_non_finite=True to load anyway")
                bar.update(t.numel())
                if name.startswith("layers."):
                    layer = int(name.split(".")[1])
                    pending[layer] -= 1
                    if pending[layer] == 0 and on_layer_loaded is not None:
                        del target, filled
                        for done in [n for n in filler.params if n.startswith(f"layers.{layer}.")]:
                            del filler.params[done]       # complete: let the callback free it
                        on_layer_loaded(layer, model.layers[layer])
            del tensor, pairs, t
    bar.close()

    filler.check_complete(folder)
    filler.check_tied(model.embed_tokens.weight)
    return model.eval()


class LoadResult(NamedTuple):
    missing: list[str]      # HF keys the model needs but the state dict lacks
    unexpected: list[str]   # state-dict keys the model has no place for


@torch.no_grad()
def load_hf_state_dict(model: nn.Module, hf_state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Copy a Hugging Face state dict (per-expert file form or transformers-5 fused form) into `model`.

    Each tensor goes through the loader's `WeightFiller` (converted to the parameter's dtype and
    device). A shape mismatch always raises CheckpointError (a ValueError) naming the tensor. With
    strict=True, missing or unexpected keys raise KeyError listing them; otherwise they are returned.
    When the model ties lm_head to the embeddings, an `lm_head.weight` in the state dict must equal
    `model.embed_tokens.weight`.
    """
    filler = WeightFiller(model, "the model")
    unexpected: list[str] = []
    for key, tensor in sorted(split_fused_experts(hf_state_dict).items()):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(tensor).__name__}")
        try:
            filler.fill(key, tensor, where=key)
        except UnexpectedKey:
            unexpected.append(key)
    missing = filler.missing()
    if ("embed_tokens.weight", None) in filler.filled:
        filler.check_tied(model.embed_tokens.weight)
    if strict and (missing or unexpected):
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        problems = []
        if missing:
            problems.append(f"missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {show(unexpected)}")
        raise KeyError("state dict does not fit the model: " + "; ".join(problems))
    return LoadResult(missing, unexpected)
