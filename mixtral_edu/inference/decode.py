"""Fast batch-1 decoding: the model's own forward at static shapes, replayed as a CUDA graph.

At batch 1 a decode step does little arithmetic; its time is (a) reading the active weights once,
which the GPU's memory bandwidth bounds, and (b) overhead: Python, ~1,500 kernel launches, and
every point where the CPU waits for the GPU. The model's default MoE dispatch reads a single
token's expert ids on the host (`.tolist()`): a sync per layer, 32 per token for 8x7B.

`FastDecoder` calls the same `Mixtral.forward` with the position as a tensor (`positions=`), so
nothing in a step needs the host (gpt-fast's recipe):

* RoPE's cos/sin are picked on the device, the new key and value go into the static `KVCache`
  at that position, and attention runs over the whole cache under the causal mask — the one path
  of `Attention.forward`, so every step has the same shapes;
* it installs a sync-free dispatch on every MoE block (`dispatch.decode_dispatch`): the chosen
  experts' weights are gathered on the device, or, with `use_kernel`, the Triton kernel
  (`kernels.py`) reads the expert ids inside the kernel; int8 projections get the kernel too;
* greedy sampling (`argmax`) writes the next token into the input buffer, also on the device.

With no syncs the step can be captured once as a CUDA graph (`torch.cuda.CUDAGraph`) and
replayed: one launch per token instead of ~1,500. `torch.compile` can additionally fuse the small
elementwise kernels (norms, RoPE, residuals) before capture. Because it is the model's own forward,
forward hooks on `self_attn`, `block_sparse_moe` or `gate` fire on every eager step (so
`trace_routing`-style hooks see fast decoding too), and int8, offloaded and split models decode
through it unchanged.

On a CPU, `compile=True` is also what `generate` switches to (`DefaultStep`, when the tokens left repay
its start-up): the step with every one-token product and the single query's attention written as sums
(`cpu.py`), compiled by inductor ahead of time into a package kept on disk per model shape and CPU
capability (`PackagedStep`, `aot.py`, `compile_cache_dir`): only the first run on a machine pays the
compile (tens of seconds); every later process loads it in milliseconds. A model with hooks or swapped-in
modules gets `torch.compile` instead (the hooks it saw stay in its step; seconds of tracing per process).

(`benchmarks/random_weights.py` builds full-size models with random weights on the GPU, so the speed of
this can be measured without downloading 93 GB.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..model.attention import Attention, KVCache
from ..model.experts import Experts
from ..model.mixtral import DecoderLayer, Mixtral
from ..model.moe import SparseMoeBlock
from ..model.norm import RMSNorm
from ..model.rope import RotaryEmbedding
from . import aot, background
from .arguments import check_cache_room, check_max_new_tokens, check_max_seq_len
from .cpu import SummedAttention, SummedLinear, use_summed_products_
from .dispatch import decode_dispatch, kernel_weights
from .kernels import KernelInt8Linear, triton_available
from .quant import Int8Linear
from .split import decode_dispatch_for, is_split


def use_kernel_(model: nn.Module) -> nn.Module:
    """Install the Triton kernel on `model` for single tokens: the dispatch of every MoE block whose
    experts it reads (`dispatch.kernel_weights`) and every int8 projection (the module's class is
    swapped; its buffers and hooks stay). Returns the model."""
    for layer in model.layers:
        if kernel_weights(layer.block_sparse_moe.experts) is not None:
            layer.block_sparse_moe.dispatch = decode_dispatch(use_kernel=True)
    for module in model.modules():
        if type(module) is Int8Linear:
            module.__class__ = KernelInt8Linear
    return model


# ----------------------------------------------------------------------------- inductor's cache on disk
@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    """The CPU's flags from /proc/cpuinfo (read once per process: every generation asks for the cache folder)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _inductor_default_dir() -> Path:
    """Where inductor caches when $TORCHINDUCTOR_CACHE_DIR is not set: <tmp>/torchinductor_<user>."""
    import getpass
    import tempfile

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def compile_cache_dir() -> Path:
    """The folder inductor caches this process's compiled kernels in, one per torch version, ATen CPU
    capability, MKL instruction limit and CPU flag set: a kernel built for another instruction set is
    never reused (one reused across capabilities once gave wrong tokens). Under $TORCHINDUCTOR_CACHE_DIR
    when set, else under ~/.cache/mixtral_edu/inductor ($XDG_CACHE_HOME respected); inductor's own default,
    which it puts into $TORCHINDUCTOR_CACHE_DIR once it has run in a process, counts as not set, so that
    every process finds the packages (`aot.py`) earlier ones left."""
    key = "|".join([torch.__version__, torch.backends.cpu.get_cpu_capability(),
                    os.environ.get("ATEN_CPU_CAPABILITY", ""), os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
                    _cpu_flags()])
    name = "mixtral_edu-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if base and Path(base).name == name:
        return Path(base)
    if not base or Path(base) == _inductor_default_dir():
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mixtral_edu",
                            "inductor")
    return Path(base) / name


def can_compile_on_cpu() -> bool:
    """Inductor builds C++ for this CPU: ATen's vector capability is not the generic one (torch 2.13's
    generated C++ does not build under ATEN_CPU_CAPABILITY=default) and a C++ compiler is on PATH."""
    import shutil

    return torch.backends.cpu.get_cpu_capability() != "DEFAULT" and any(
        shutil.which(c) for c in ("g++", "c++", "clang++"))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _restart_threads(model: nn.Module) -> None:
    """A generation begins: the model's thread policy (`cpu.DecodeThreads`, where installed) looks at the
    machine from now on."""
    threads = getattr(model, "decode_threads", None)
    if threads is not None:
        threads.restart()


# ----------------------------------------------------------------------------- the decoder
def weights_of(model: nn.Module) -> tuple:
    """Which tensors the model's parameters are now (address and dtype of each): a compiled package reads
    the ones it was given, so a model whose parameters were replaced since needs a new decoder."""
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def decode_step(model: nn.Module, cache: KVCache, token: torch.Tensor,
                pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `Mixtral.forward`: token `[1, 1]` at position pos `[1]` (its key and value written into
    `cache`) -> (logits `[1, vocab]`, the greedy next token `[1, 1]`)."""
    logits = model(token, cache=cache, positions=pos)[:, -1]
    return logits, logits.argmax(dim=-1, keepdim=True)


class PackagedStep(nn.Module):
    """The compiled CPU step as the one module `aot.py` exports: (token, pos, every layer's keys, then every
    layer's values) -> `decode_step`'s outputs, the cache tensors written in place; the single query's
    attention as sums (`SummedAttention`), the products as sums (`use_summed_products_`, installed first)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, pos: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache.__new__(KVCache)             # a cache over the given tensors, nothing allocated
        cache.k, cache.v, cache.pos = list(kv[:len(kv) // 2]), list(kv[len(kv) // 2:]), 0
        with SummedAttention():
            return decode_step(self.model, cache, token, pos)


# inductor's options for the compiled CPU step: the generated kernels read the thread count when they run
# (so DecodeThreads applies), and the per-step wrapper neither checks its ~100 inputs' strides nor runs in
# Python (benchmarks/README.md, "The default decode path", has the measurements).
CPU_COMPILE_OPTIONS = {"cpp.dynamic_threads": True, "size_asserts": False, "alignment_asserts": False,
                       "cpp_wrapper": True}


class FastDecoder:
    """Greedy batch-1 generation through `model(token, cache, positions=pos)`, optionally compiled and
    captured as a CUDA graph.

    decoder = FastDecoder(model, max_seq_len=512)
    new_ids = decoder.generate(prompt_ids, max_new_tokens=128)        # list of ints

    use_kernel: the Triton expert kernel (default: when available for the model's device).
    cuda_graph: capture the step once and replay it (default: on CUDA, one device). compile: compile the
    step first (fuses the small kernels; the first call takes a while, announced through `progress`;
    on a CPU the one-token products become sums, `cpu.use_summed_products_`, the plain model's step is the
    AOTInductor package `PackagedStep` (built once per machine), any other's torch.compile, and the kernels
    read the thread count at run time, so the model's `DecodeThreads` still applies). The dispatch (and the
    kernel) stay installed on the model for its later calls too (same results).
    """

    def __init__(self, model: Mixtral, max_seq_len: int, use_kernel: Optional[bool] = None,
                 cuda_graph: Optional[bool] = None, compile: bool = False,
                 progress: Optional[Callable[[str], None]] = _say) -> None:
        check_max_seq_len(max_seq_len, model.config.max_position_embeddings)
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.use_kernel = triton_available(self.device) if use_kernel is None else use_kernel
        split = is_split(model)     # hops devices: not graphed unless asked; ungraphed, its own dispatch (split.py)
        self.cuda_graph = self.device.type == "cuda" and not split if cuda_graph is None else cuda_graph
        model.set_dispatch(decode_dispatch_for(model) if split and not self.cuda_graph else decode_dispatch(use_kernel=False))
        if self.use_kernel:
            use_kernel_(model)
        self.cache = model.new_kv_cache(1, max_seq_len)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)   # static input buffers
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits = None
        self.graph = None
        self.threads = None           # a compiled CPU step ticks the model's DecodeThreads itself
        self.progress = progress
        self.compile_seconds: Optional[float] = None
        self.weights: Optional[tuple] = None    # the tensors a compiled step reads (`weights_of`), once installed
        self._run = self._step
        self._packaged: Optional[PackagedStep] = None
        if compile:
            self._run = self._first_compiled_call
            if self.device.type == "cpu":
                use_summed_products_(model)
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
                self.threads = getattr(model, "decode_threads", None)
                self.weights = weights_of(model)
            if self.device.type == "cpu" and compiles_well(model):
                self._packaged = PackagedStep(model)      # compiled ahead of time, kept on disk (aot.py)
                return
            # Dynamo reuses a compiled step across models and does not guard on hooks, so a step compiled
            # for another model would skip this one's hooks: start from an empty cache. Hooks registered
            # before the first step are compiled in; one added later needs a new FastDecoder.
            torch._dynamo.reset()
            cpu = self.device.type == "cpu"
            self._compiled = torch.compile(self._cpu_step if cpu else self._step, fullgraph=True, dynamic=False,
                                           options=CPU_COMPILE_OPTIONS if cpu else None)

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_step(self.model, self.cache, token, pos)

    def _cpu_step(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with SummedAttention():              # the single query's attention fused into the layer's loops
            return self._step(token, pos)

    def _first_compiled_call(self, token: torch.Tensor, pos: torch.Tensor):
        start = time.perf_counter()
        if self._packaged is not None:
            out, cold = self._load_package(token, pos)
        else:
            if self.progress is not None:
                where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "inductor's cache")
                self.progress(f"compiling the decode step with torch.compile: up to a minute the first time on a "
                              f"machine, seconds once its kernels are cached ({where}) ...")
            misses = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]
            out = self._compiled(token, pos)
            cold = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"] > misses
        self.compile_seconds = time.perf_counter() - start
        if self.progress is not None and (cold or self._packaged is None):
            self.progress(f"compiled in {self.compile_seconds:.1f} s")
        if self.device.type == "cpu":      # what generate's rule expects next time (DefaultStep)
            _record(self.model, self.cache.max_seq_len, "cold_s" if cold else "warm_s", self.compile_seconds)
        self._run = self._compiled
        return out

    def _load_package(self, token: torch.Tensor, pos: torch.Tensor):
        """The compiled CPU step from its package (built first when this machine has none): (the first
        step's outputs, whether it was built)."""
        kv = self.cache.k + self.cache.v
        path = aot.package_path(compile_cache_dir(), self._packaged, (token, pos, *kv), CPU_COMPILE_OPTIONS)
        cold = not path.exists()
        if cold:
            if self.progress is not None:
                self.progress(f"compiling the decode step (torch.export + AOTInductor): up to a minute, once per "
                              f"model shape on a machine; later runs load it in well under a second ({path.parent}) ...")
            aot.build_package(self._packaged, (token, pos, *kv), path, CPU_COMPILE_OPTIONS)
        start = time.perf_counter()
        run = aot.load_package(path, self._packaged)
        self._compiled = lambda token, pos: tuple(run(token, pos, *kv))
        out = self._compiled(token, pos)
        if cold:     # what loading it takes, the start-up of every later process: the rule's estimate
            _record(self.model, self.cache.max_seq_len, "warm_s", time.perf_counter() - start)
        return out, cold

    def _eager_step(self) -> torch.Tensor:
        if self.threads is not None:
            self.threads.tick()
        logits, next_token = self._run(self.token, self.pos)
        self.token.copy_(next_token)
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def capture(self, warmup: int = 3) -> None:
        """Run the step a few times (compiles, autotunes), then record it as a CUDA graph.

        The warm-up steps write into the cache at and after the current position; those entries
        are rewritten before any later step can attend to them, and token/pos are restored.
        """
        saved_token, saved_pos = self.token.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._eager_step()
                self.pos.copy_(saved_pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._eager_step()
        self.token.copy_(saved_token)
        self.pos.copy_(saved_pos)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids `[1, seq]`: run the prompt through `model.forward` (grouped experts, one pass),
        fill the cache, and set the next input to the greedy token. Returns logits `[1, vocab]`."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"FastDecoder decodes one sequence: input_ids must be [1, seq], got {tuple(input_ids.shape)}")
        self.cache.reset()
        _restart_threads(self.model)
        logits = self.model(input_ids.to(self.device), cache=self.cache, last_only=True)[:, -1]
        self.pos.fill_(self.cache.pos)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        return logits

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode the token in the input buffer: logits `[1, vocab]` (a static buffer when graphed);
        the greedy next token goes into the input buffer. No host sync."""
        if self.cache.pos + 1 > self.cache.max_seq_len:
            raise ValueError(f"KV cache is full: {self.cache.pos} tokens of max_seq_len {self.cache.max_seq_len}")
        if self.cuda_graph:
            if self.graph is None:
                self.capture()
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._eager_step()
        self.cache.advance(1)
        return logits

    @torch.no_grad()
    def adopt(self, cache: KVCache) -> None:
        """Continue from another cache of the same model (eager steps so far): copy its `pos` cached
        keys and values into this decoder's cache and move the position there."""
        n = cache.pos
        if n > self.cache.max_seq_len:
            raise ValueError(f"KV cache is full: {n} tokens to adopt, max_seq_len {self.cache.max_seq_len}")
        for mine, theirs in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            mine[:, :, :n].copy_(theirs[:, :, :n])
        self.cache.pos = n

    @torch.no_grad()
    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The step `generate.sample_loop` calls: ids `[1, seq]`, the prompt when the cache is empty
        (prefill), else the one new token -> logits `[1, vocab]` of the last position."""
        if self.cache.pos == 0:
            return self.prefill(ids)
        self.token.copy_(ids)
        self.pos.fill_(self.cache.pos)
        return self.step()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> list:
        """Greedy: the prompt's next token, then `max_new_tokens - 1` more decode steps. Returns ids
        (none for max_new_tokens=0, as `generate`)."""
        from .generate import sample_loop

        check_max_new_tokens(max_new_tokens)
        check_cache_room(input_ids.shape[-1], max_new_tokens, self.cache.max_seq_len)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"FastDecoder decodes one sequence: input_ids must be [1, seq], got {tuple(input_ids.shape)}")
        self.cache.reset()
        with background.generating(compile_cache_dir()):      # a background build pauses meanwhile
            return sample_loop(self.next_logits, input_ids, max_new_tokens)[0]


# ----------------------------------------------------------------------------- generate's step: eager or compiled
# When compiling pays (measured, benchmarks/README.md "The default decode path"): the compiled CPU step
# saves at least SAVED_FRACTION of an eager step's time; its start-up once compiled on this machine is the
# last one measured here (a package's load time is recorded when it is built), WARM_START_S where none was,
# and the first compile on a machine is expected to take COLD_START_S.
SAVED_FRACTION = 0.3
WARM_START_S = 10.0
COLD_START_S = 60.0
PROBE_STEPS = 3                                     # eager steps timed before deciding
# A generation that stays eager starts a background build (`background.py`) only where its own saving would
# repay loading a package: 0.1 s measured for the benchmark's model, twice that for margin. (A toy model's
# generations save milliseconds: no builder.)
WORTH_BUILDING_S = 0.2


class _CompiledSlot:
    """Holds generate's compiled decoder on its model (`model.compiled_step`); a copy of the model
    (copy.deepcopy) starts with an empty slot, since the compiled code belongs to the original."""

    def __init__(self) -> None:
        self.decoder: Optional[FastDecoder] = None

    def __deepcopy__(self, memo) -> "_CompiledSlot":
        return _CompiledSlot()


def _has_hooks(model: nn.Module) -> bool:
    """Any forward hook on the model or its modules (a compiled step keeps only those it saw), other
    than the thread policy's own pre-hook."""
    from torch.nn.modules import module as nn_module

    own = getattr(model, "thread_policy", None)
    for m in model.modules():
        pre = [k for k in m._forward_pre_hooks if not (m is model and own is not None and k == own.id)]
        if pre or m._forward_hooks:
            return True
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def compiles_well(model: nn.Module) -> bool:
    """The compiled CPU step applies: the plain model's modules (no int8, offloaded, streamed or other
    swapped-in storage), every weight a float tensor on the CPU, no hooks, and inductor builds C++ here."""
    plain = (Mixtral, DecoderLayer, Attention, SparseMoeBlock, Experts, RMSNorm, RotaryEmbedding,
             nn.Linear, SummedLinear, nn.Embedding, nn.ModuleList)
    return (isinstance(model, Mixtral) and all(type(m) in plain for m in model.modules())
            and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) for p in model.parameters())
            and not _has_hooks(model) and can_compile_on_cpu())


def _startup_record() -> Path:
    return compile_cache_dir() / "mixtral_edu_startup.json"


def _graph_key(model: nn.Module, max_seq_len: int) -> str:
    """Names what is recorded for a model shape and cache length; with the code's own key, so that after an
    update of torch or of the course's sources no package is expected where none is built yet."""
    key = f"{aot.code_key()}|{model.config}|{model.embed_tokens.weight.dtype}|{max_seq_len}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _recorded(model: nn.Module, max_seq_len: int) -> dict:
    """What this machine measured for the model and cache length (`_record`), {} where nothing."""
    try:
        return json.loads(_startup_record().read_text()).get(_graph_key(model, max_seq_len)) or {}
    except (OSError, ValueError):
        return {}


def built_here(model: nn.Module, max_seq_len: int) -> bool:
    """A compiled step for this model and cache length was built on this machine (its start-up recorded)."""
    known = _recorded(model, max_seq_len)
    return "cold_s" in known or "warm_s" in known


def expected_startup(model: nn.Module, max_seq_len: int) -> float:
    """Seconds a new compiled step for this model and cache length is expected to take before its first token."""
    known = _recorded(model, max_seq_len)
    if "cold_s" not in known and "warm_s" not in known:       # not `built_here`
        return COLD_START_S
    return known.get("warm_s", WARM_START_S)                   # a load can round to 0.0 s


def _record(model: nn.Module, max_seq_len: int, what: str, seconds: float) -> None:
    """Note in the cache folder a time measured here for the model and cache length: the compiled step's first
    start-up with an empty cache ("cold_s") or with its package built ("warm_s"), an eager step ("eager_step_s")."""
    path = _startup_record()
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record.setdefault(_graph_key(model, max_seq_len), {})[what] = round(seconds, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part")      # a builder and a generation may both write
    part.write_text(json.dumps(record, indent=1))
    part.replace(path)


def cache_length(model: nn.Module, needed: int) -> int:
    """A compiled step's cache length: the next power of two >= needed (at least 256, at most the context),
    so that generations of similar lengths share one compiled step."""
    return max(needed, min(model.config.max_position_embeddings, max(256, 1 << (needed - 1).bit_length())))


class DefaultStep:
    """`generate`'s step (`next_logits` for `sample_loop`): `Mixtral.forward` with a KV cache, switched
    to the compiled `FastDecoder` step on a CPU when the tokens left repay its start-up.

    The prompt runs eagerly. Where `compiles_well(model)`, it switches when  tokens left x eager step x
    SAVED_FRACTION  exceeds the expected start-up: 0 when this process already compiled a step for this model
    with room enough, else `expected_startup`. Right after the prompt, that is decided with the eager step
    this machine recorded (and always yes for a reusable step); where none was recorded, the first
    PROBE_STEPS tokens run eagerly too, timed, and the fastest is recorded. The eager cache is copied into
    the decoder's (`FastDecoder.adopt`). Used as a context (`with DefaultStep(...) as step:`): where it
    stays eager and no step was ever built on this machine, its end starts a low-priority process that
    builds the package for the next calls (`background.py`).
    """

    def __init__(self, model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
        self.model, self.max_new_tokens = model, max_new_tokens
        self.device = model.embed_tokens.weight.device
        # The last new token is returned, never fed back, so the cache needs one slot less.
        self.cache = model.new_kv_cache(1, prompt_len + max_new_tokens - 1)
        self.may_compile = self.device.type == "cpu" and compiles_well(model)
        # a new compiled step's cache length
        self.length = cache_length(model, self.cache.max_seq_len) if self.may_compile else None
        self.step_times: list[float] = []
        self.decoder: Optional[FastDecoder] = None
        self.build_aside = False          # build the package in the background after the last token

    def __enter__(self) -> "DefaultStep":
        """Generating: any background build pauses meanwhile (`background.generating`)."""
        _restart_threads(self.model)
        self._generating = background.generating(compile_cache_dir())
        self._generating.__enter__()
        return self

    def __exit__(self, kind, *details) -> None:
        """After the last token: start the background build the rule asked for (none started mid-generation,
        so it never competes with this generation's steps)."""
        self._generating.__exit__(kind, *details)
        if kind is None and self.build_aside:
            background.start(self.model, self.length, compile_cache_dir(), _graph_key(self.model, self.length))
            self.build_aside = False

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.next_logits(ids)
        start = time.perf_counter()
        logits = self.model(ids.to(self.device), cache=self.cache, last_only=True)[:, -1]   # [batch, vocab]
        if not self.may_compile:
            return logits
        if self.cache.pos == ids.shape[1]:              # the prompt
            self.decoder = self.compiled_decoder(_recorded(self.model, self.length).get("eager_step_s"))
        else:
            self.step_times.append(time.perf_counter() - start)
            if len(self.step_times) == PROBE_STEPS:
                _record(self.model, self.length, "eager_step_s", min(self.step_times))
                self.decoder = self.compiled_decoder(min(self.step_times))
        return logits

    def compiled_decoder(self, eager_step: Optional[float]) -> Optional[FastDecoder]:
        """The compiled decoder to continue with, or None where the eager steps left, of `eager_step` seconds
        each, are cheaper (with no eager step known, only a decoder this process has already is taken)."""
        steps_left = self.max_new_tokens - 1 - len(self.step_times)
        if steps_left <= 0:
            return None
        slot = self.model.__dict__.setdefault("compiled_step", _CompiledSlot())
        decoder = slot.decoder
        if (decoder is None or decoder.cache.max_seq_len < self.cache.max_seq_len
                or decoder.weights != weights_of(self.model)):        # cast or given other tensors since
            if eager_step is None:
                return None
            saving = steps_left * eager_step * SAVED_FRACTION
            if saving <= expected_startup(self.model, self.length):
                # never built on this machine, and a generation like this one would repay loading it:
                # build it aside once this generation is done (`__exit__`)
                self.build_aside = saving > WORTH_BUILDING_S and not built_here(self.model, self.length)
                return None
            decoder = slot.decoder = FastDecoder(self.model, self.length, compile=True)
        decoder.adopt(self.cache)
        return decoder
