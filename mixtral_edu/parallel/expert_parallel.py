"""Expert parallelism: each of N processes ("ranks") holds E/N experts of every layer.

Mixtral's experts are 96.6% of its weights, so sharding them is what lets several GPUs share
one model. Every rank keeps a full replica of the rest (embeddings, attention, norms, router,
lm_head) and runs it on ITS OWN tokens (its own sequences, as in data parallelism). Only the
MoE layers talk to the other ranks; each one, on every rank at once:

    1. route locally: the replicated router picks each token's k experts (router.route)
    2. exchange counts: rank r tells rank s how many (token, slot) rows it will send to each of
       s's experts                                   -> all_to_all_single, [E] int64 each way
    3. exchange activations: each row goes to the rank that holds its expert
                                                      -> all_to_all_single, variable split sizes
    4. run the local experts on the rows received, grouped by expert (moe.dispatch_grouped)
    5. send the results back the way they came (the same all-to-all, splits swapped), weight
       them and add each token's k slots, as the one-process block does

Rows whose expert lives on the sending rank stay there (all_to_all_single copies its own chunk
locally). Per token and layer a rank sends k * hidden * bytes for each slot routed elsewhere, and
as much comes back: with balanced routing over N ranks, a fraction (N - 1) / N of the k slots.

The arithmetic is the one-process model's (same router, same expert modules, same grouped
dispatch, same order of the final k-way sum), so the logits agree to float32 rounding. Uneven
loads just mean uneven split sizes; a rank can send, or receive, no rows at all. This is for
inference: `dist.all_to_all_single` has no backward, so training through it would need the
differentiable collectives of `torch.distributed.nn`.

On a real checkpoint each rank reads only what it holds: the shared weights and its own experts
(`load_expert_parallel`, through `weights.partial`), so N ranks read the 93 GB once between them, not N
times. `--check` compares with the one-process model without loading a second full model: the
reference holds one decoder layer at a time (`streamed_logits`), and the tolerance follows from the
dtype the ranks ran in (`logit_tolerance`; the check runs in float32 unless told otherwise). The
collectives' timeout grows with the bytes a rank must read before its first collective
(`collective_timeout`), since the slowest loader sets when the others hear from it.

The same code runs on gloo (CPU processes) and NCCL (one GPU per rank):

    python -m mixtral_edu.parallel.expert_parallel --check --nproc 2 --weights data/tiny-mixtral
    torchrun --nproc-per-node 4 -m mixtral_edu.parallel.expert_parallel --weights data/tiny-mixtral --prompt "..."

The first spawns N gloo processes on this machine; the second lets torchrun start them (NCCL when
CUDA is available, one GPU per rank). `spawn` runs any module-level function of this package the
same way from a notebook.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model.experts import Experts
from ..model.moe import SparseMoeBlock, dispatch_grouped
from ..model.router import route

#: float32 logits of order 10 carry rounding of ~1e-6; a wrong expert or a lost token changes them by 0.1
#: or more. The check itself derives its tolerance from the run's dtype: `logit_tolerance`.
LOGIT_TOLERANCE = 1e-4
#: Tolerance in units of the dtype's rounding (eps x the largest |logit|). Measured on the tiny model in
#: float32: 2 and 4 ranks differ from one process by 7.6e-6 at |logit| 13, i.e. 5 units; the one-process
#: model's own grouped vs gathered dispatch, 8.1e-6. 32 units leaves 6x room.
LOGIT_UNITS = 32
TIMEOUT = datetime.timedelta(seconds=120)
#: A slow network disk: the timeout must outlast the slowest rank's read of its share of the weights.
MIN_READ_BYTES_PER_S = 100e6
DEFAULT_PROMPTS = (
    "In the beginning God created the heaven and the earth.",
    "def add(a, b):\n    return a + b\n",
    "12 + 7 = 19",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel,",
    "import os\nimport sys\n\ndef main():",
    "3 * 4 = 12. 5 * 6 =",
    "For God so loved the world",
    "class Stack:\n    def push(self, item):",
)


# ===================================================================== which rank holds which expert
def expert_ranges(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """The experts of each rank as [start, stop) ranges: consecutive blocks, as even as possible.

    8 experts on 2 ranks: [(0, 4), (4, 8)]; on 4 ranks: [(0, 2), (2, 4), (4, 6), (6, 8)].
    """
    if world_size < 1 or world_size > num_experts:
        raise ValueError(f"expert parallelism needs 1 to {num_experts} ranks (one expert each at least), "
                         f"got {world_size}")
    base, extra = divmod(num_experts, world_size)
    sizes = [base + (r < extra) for r in range(world_size)]
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def expert_owner(num_experts: int, world_size: int) -> torch.Tensor:
    """`[num_experts]` int64: the rank that holds each expert."""
    owner = torch.empty(num_experts, dtype=torch.long)
    for rank, (start, stop) in enumerate(expert_ranges(num_experts, world_size)):
        owner[start:stop] = rank
    return owner


# ===================================================================== what went over the wire
@dataclass
class CommRecord:
    """One MoE call on one rank: how many (token, slot) rows went to and came from each rank.

    send_rows[s]: rows this rank sent to rank s for s's experts (send_rows[rank] stayed here);
    recv_rows[s]: rows received from rank s for this rank's experts. Each row is `row_bytes`
    (hidden * element size) and travels twice: there as an activation, back as the expert output.
    """

    rank: int
    tokens: int
    send_rows: list[int]
    recv_rows: list[int]
    row_bytes: int

    @property
    def remote_send_rows(self) -> int:
        """Rows sent to OTHER ranks (the rows for local experts never leave the process)."""
        return sum(self.send_rows) - self.send_rows[self.rank]

    @property
    def remote_recv_rows(self) -> int:
        return sum(self.recv_rows) - self.recv_rows[self.rank]

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank put on the wire: its remote rows out, plus the results it returns."""
        return (self.remote_send_rows + self.remote_recv_rows) * self.row_bytes

    @property
    def expert_rows(self) -> int:
        """Rows this rank's experts processed (its load)."""
        return sum(self.recv_rows)


# ===================================================================== the expert-parallel MoE block
class ExpertParallelMoe(nn.Module):
    """A SparseMoeBlock whose experts are spread over the ranks of a process group.

    `[batch, seq, hidden] -> ([batch, seq, hidden], router_logits [batch*seq, E])`, like
    SparseMoeBlock, and a drop-in replacement for `DecoderLayer.block_sparse_moe`. Every rank of
    the group must call it the same number of times (it holds collectives); the token counts may
    differ, zero included.

    Children: `gate`, the block's own router nn.Linear (a full replica, so routing hooks such as
    `routing.trace_routing` still see `[tokens, E]` logits); `experts`, an `Experts` holding only
    this rank's experts `first_expert .. first_expert + n - 1` as local numbers 0 .. n - 1
    (w1, w3 `[n, I, H]`, w2 `[n, H, I]`, copied out of the block's stacked weights).
    Set `record = True` to append a `CommRecord` to `comm_log` on every call.
    """

    def __init__(self, block: SparseMoeBlock, rank: int, world_size: int,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        if block.gate is None:
            raise ValueError("a dense block (one expert, no router) has nothing to shard over ranks")
        self.num_experts = block.num_experts
        self.top_k = block.top_k
        self.rank, self.world_size, self.group = rank, world_size, group
        ranges = expert_ranges(self.num_experts, world_size)
        self.experts_per_rank = [stop - start for start, stop in ranges]
        self.first_expert, stop = ranges[rank]
        self.gate = block.gate
        full = block.experts
        _, intermediate, hidden = full.w1.shape
        # An Experts of no experts (nothing to allocate or initialise), then this rank's slices;
        # clone, so the full stack's storage is freed with the block.
        self.experts = Experts(0, hidden, intermediate)
        for name in ("w1", "w2", "w3"):
            weight = getattr(full, name)
            setattr(self.experts, name, nn.Parameter(weight[self.first_expert:stop].detach().clone(),
                                                     requires_grad=weight.requires_grad))
        self.experts.num_experts = stop - self.first_expert
        self.record = False
        self.comm_log: list[CommRecord] = []

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[..., hidden]` -> (`[..., hidden]`, router logits `[tokens, E]`); the all-to-all below is
        this block's dispatch."""
        shape = x.shape
        hidden = shape[-1]
        x = x.reshape(-1, hidden)                                 # [tokens, hidden]
        router_logits = self.gate(x)                              # [tokens, E]
        weights, expert_ids = route(router_logits, self.top_k)    # [tokens, k] each
        weights = weights.to(x.dtype)
        num_tokens, k = expert_ids.shape
        n_local, world = self.num_local_experts, self.world_size

        # (token, slot) rows sorted by expert: experts are consecutive per rank, so this also
        # groups them by destination rank, the order all_to_all_single sends its chunks in.
        flat_ids = expert_ids.reshape(-1)                         # [tokens * k]
        order = torch.argsort(flat_ids, stable=True)
        send_x = x[order // k]                                    # [tokens * k, hidden]

        # 1. counts: rank s receives the counts of its own experts from every rank -> [world, n_local]
        counts = torch.bincount(flat_ids, minlength=self.num_experts)            # [E]
        recv_counts = counts.new_empty(world * n_local)
        dist.all_to_all_single(recv_counts, counts, output_split_sizes=[n_local] * world,
                               input_split_sizes=self.experts_per_rank, group=self.group)
        recv_counts = recv_counts.view(world, n_local)
        send_rows = [int(c.sum()) for c in counts.split(self.experts_per_rank)]
        recv_rows = recv_counts.sum(dim=1).tolist()

        # 2. activations to the ranks that hold their experts
        recv_x = x.new_empty(sum(recv_rows), hidden)                             # [received, hidden]
        dist.all_to_all_single(recv_x, send_x, output_split_sizes=recv_rows, input_split_sizes=send_rows,
                               group=self.group)

        # 3. local experts; rows arrive by source rank, then by expert: number each row's local expert
        local_ids = torch.arange(n_local, device=x.device).repeat(world).repeat_interleave(recv_counts.reshape(-1))
        if recv_x.shape[0]:
            ones = torch.ones(recv_x.shape[0], 1, dtype=x.dtype, device=x.device)
            recv_y = dispatch_grouped(self.experts, recv_x, ones, local_ids[:, None])
        else:
            recv_y = recv_x

        # 4. results back to the ranks the rows came from
        back_y = torch.empty_like(send_x)                                        # [tokens * k, hidden]
        dist.all_to_all_single(back_y, recv_y, output_split_sizes=send_rows, input_split_sizes=recv_rows,
                               group=self.group)

        # 5. weight, undo the sort, add the k slots (the same steps, in the same order, as dispatch_grouped)
        back_y = back_y * weights.reshape(-1)[order, None]
        per_slot = torch.empty_like(back_y)
        per_slot[order] = back_y
        out = per_slot.view(num_tokens, k, hidden).sum(dim=1)
        if self.record:
            self.comm_log.append(CommRecord(self.rank, num_tokens, send_rows, recv_rows,
                                            hidden * x.element_size()))
        return out.view(shape), router_logits

    def extra_repr(self) -> str:
        stop = self.first_expert + self.num_local_experts
        return f"rank={self.rank}/{self.world_size}, experts={self.first_expert}..{stop - 1} of {self.num_experts}"


# ===================================================================== a whole model
def current_rank_and_size(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """(rank, world size) of `group` (default: the initialised default group)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first "
                           "(or start the processes with torchrun or expert_parallel.spawn)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_experts(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Swap every layer's `block_sparse_moe` of `model` (a Mixtral) for an ExpertParallelMoe, in place.

    This rank keeps only its experts of every layer (see `expert_ranges`); all else is untouched.
    """
    rank, world = current_rank_and_size(group)
    for layer in model.layers:
        layer.block_sparse_moe = ExpertParallelMoe(layer.block_sparse_moe, rank, world, group)
    return model


def load_expert_parallel(path, device="cpu", dtype: Optional[torch.dtype] = None,
                         group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """This rank's part of the checkpoint in `path`: the shared weights and its own experts, nothing more.

    The model is built on the meta device (no memory) and sharded there (`shard_experts`), then given
    storage on `device` for what this rank holds; `weights.partial.read_into` copies in exactly those
    tensors, so the other ranks' experts are never read. dtype: None keeps the checkpoint's.
    """
    from ..model.rope import RotaryEmbedding
    from ..weights.keys import is_stacked_expert
    from ..weights.layouts import checkpoint_dtype, detect_layout, read_config, weight_files
    from ..weights.load import meta_skeleton
    from ..weights.partial import missing, read_into

    cfg = read_config(path)
    layout = detect_layout(path)
    dtype = dtype or checkpoint_dtype(Path(path), layout, weight_files(Path(path), layout)[0])
    model = meta_skeleton(cfg).to(dtype)
    shard_experts(model, group)
    model.to_empty(device=device)
    model.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(device, dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())
    first = moe_layers(model)[0].first_expert
    needed = set()
    for name, p in params.items():
        needed |= {(name, first + j) for j in range(p.shape[0])} if is_stacked_expert(name) else {(name, None)}

    def target(name: str, expert: Optional[int]) -> Optional[torch.Tensor]:
        if name not in params or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            return None
        if expert is None:
            return params[name]
        local = expert - first
        return params[name][local] if 0 <= local < params[name].shape[0] else None

    missing(needed, read_into(path, target), path)
    return model.eval()


def moe_layers(model: nn.Module) -> list[ExpertParallelMoe]:
    return [layer.block_sparse_moe for layer in model.layers]


def set_recording(model: nn.Module, on: bool = True) -> None:
    """Start (or stop) recording a CommRecord per MoE call; starting clears the logs."""
    for block in moe_layers(model):
        block.record = on
        if on:
            block.comm_log = []


# ===================================================================== starting the processes
def _gloo_loopback() -> None:
    """Keep gloo on the loopback interface for processes on one machine."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        name = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def collective_timeout(cfg, dtype: torch.dtype, world_size: int) -> datetime.timedelta:
    """How long a rank waits in a collective: TIMEOUT plus its share of the weights read at
    MIN_READ_BYTES_PER_S (ranks load at their own pace; the first MoE layer waits for the slowest).
    Mixtral-8x7B in bf16 over 2 ranks: 48.3 GB -> 120 + 483 s."""
    from ..params import count_parameters

    counts = count_parameters(cfg)
    share = (counts["experts"] / world_size + counts["total"] - counts["experts"]) * dtype.itemsize
    return TIMEOUT + datetime.timedelta(seconds=share / MIN_READ_BYTES_PER_S)


def rss_bytes() -> tuple[Optional[int], Optional[int]]:
    """(resident bytes now, peak resident bytes of this process) where the system says; else None.

    The peak is Linux's VmHWM, which starts afresh with each program; getrusage's ru_maxrss does not
    (a spawned child starts from its parent's peak), so it is only the fallback (macOS).
    """
    try:
        import psutil
        now = int(psutil.Process().memory_info().rss)
    except ImportError:
        now = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return now, int(line.split()[1]) * 1024           # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:                                   # Windows
        return now, None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return now, peak * (1 if sys.platform == "darwin" else 1024)


def _spawned(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str,
             timeout: datetime.timedelta) -> None:
    """Entry point of each spawned process: join the group, run fn(*args), save its result (a dict
    result also gets "rss_at_start" and "peak_rss", bytes)."""
    torch.set_num_threads(1)          # N processes share the machine's cores
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        at_start, _ = rss_bytes()
        result = fn(*args)
        if isinstance(result, dict):
            result.update(rss_at_start=at_start, peak_rss=rss_bytes()[1])
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(nproc: int, fn: Callable, *args, timeout: datetime.timedelta = TIMEOUT) -> list:
    """Run `fn(*args)` in `nproc` new CPU processes joined in one gloo group; return their results by rank.

    fn must be importable (a module-level function of a package, not one defined in a notebook).
    The rendezvous store lives in this process on a port the OS picks, so parallel runs never
    collide; gloo stays on the loopback interface. timeout: of every collective (see
    collective_timeout). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    _gloo_loopback()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="expert-parallel-") as out_dir:
        mp.start_processes(_spawned, args=(nproc, store.port, fn, args, out_dir, timeout), nprocs=nproc,
                           join=True, start_method="spawn")
        # our own files, written just now by our own processes: full unpickling is safe
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def init_from_torchrun(timeout: datetime.timedelta = TIMEOUT) -> tuple[str, torch.device]:
    """Join the group torchrun set up (env://): NCCL and this rank's GPU when CUDA is there, else gloo."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timeout)
    return backend, device


# ===================================================================== workers (run on every rank)
@dataclass
class RunJob:
    """What every rank runs: rank r takes prompts[r] (token ids), prefills it, decodes greedily.

    model: a loaded one-process Mixtral to shard instead of loading `weights` in every rank (spawn
    shares its tensors with the processes, each keeps its own experts); quicker for a notebook.
    """

    weights: str
    prompts: list[list[int]]
    max_new_tokens: int = 8
    dtype: Optional[torch.dtype] = None
    device: Optional[str] = None           # None: the default device of the group's backend
    model: Optional[nn.Module] = field(default=None, repr=False)


def run_worker(job: RunJob) -> dict:
    """On each rank: the expert-parallel model on this rank's prompt.

    Returns {"rank", "prompt" [T] ids, "logits" [T, vocab] float32 CPU, "new_tokens" list of ids,
    "prefill" and "decode": per layer, the list of CommRecords of those calls (decode: the
    max_new_tokens - 1 one-token steps)}. Decoding never stops at EOS, so every rank makes the same
    number of MoE calls.
    """
    from ..inference.generate import generate

    rank, _ = current_rank_and_size()
    device = job.device or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    if job.model is not None:
        model = shard_experts(job.model).to(device)     # this process's own copy of the module
    else:
        model = load_expert_parallel(job.weights, device=device, dtype=job.dtype)
    prompt = job.prompts[rank]
    set_recording(model)
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device))[0]                  # [T, vocab]
    prefill = [block.comm_log for block in moe_layers(model)]
    set_recording(model)
    new_tokens = generate(model, prompt, job.max_new_tokens, eos_id=None)
    decode = [block.comm_log[1:] for block in moe_layers(model)]   # generate's own prefill comes first
    set_recording(model, False)
    return {"rank": rank, "prompt": list(prompt), "logits": logits.float().cpu(), "new_tokens": new_tokens,
            "prefill": prefill, "decode": decode}


def moe_layer_worker(block: SparseMoeBlock, inputs: Sequence[torch.Tensor]) -> dict:
    """On each rank: one MoE layer, expert-parallel, on inputs[rank] `[tokens_r, hidden]` (tokens_r may be 0).

    Returns {"out" [tokens_r, hidden], "record" CommRecord}.
    """
    rank, world = current_rank_and_size()
    layer = ExpertParallelMoe(block, rank, world)
    layer.record = True
    with torch.no_grad():
        out, _ = layer(inputs[rank])
    return {"out": out, "record": layer.comm_log[0]}


# ===================================================================== the check against one process
@dataclass
class CheckReport:
    """The expert-parallel run beside the one-process model, prompt by prompt (one per rank).

    reference_logits: the one-process logits `[T, vocab]` of each rank's prompt; reference_tokens: its
    greedy choice after the prompt and after each token the rank generated (teacher-forced);
    tolerance: `logit_tolerance` of the run's dtype at the largest reference |logit|.
    """

    nproc: int
    max_logit_diff: float
    tokens_agree: bool
    results: list[dict] = field(repr=False)
    reference_logits: list[torch.Tensor] = field(repr=False)
    reference_tokens: list[list[int]] = field(repr=False)
    tolerance: float = LOGIT_TOLERANCE
    dtype: torch.dtype = torch.float32

    @property
    def passed(self) -> bool:
        return self.max_logit_diff <= self.tolerance and self.tokens_agree


def logit_tolerance(dtype: torch.dtype, largest_logit: float) -> float:
    """LOGIT_UNITS units of `dtype`'s rounding at the largest |logit|: float32 at 13 -> 5.0e-5, bfloat16
    at 13 -> 3.2 (bf16 logits of 10 are 0.06 apart; a bf16 check can only catch gross faults, hence the
    float32 default of --check)."""
    return LOGIT_UNITS * torch.finfo(dtype).eps * max(1.0, largest_logit)


@torch.no_grad()
def streamed_logits(path, sequences: Sequence[Sequence[int]], dtype: Optional[torch.dtype] = None,
                    device="cpu") -> list[torch.Tensor]:
    """The one-process model's logits, float32 `[T, vocab]` per sequence, one decoder layer in memory at a time.

    The reference for `--check` on real weights: the embeddings, final norm and lm_head stay (0.5 GB
    for the 8x7B in bf16); each decoder layer is read (weights.partial), run on every sequence, and
    dropped. The same modules in the same order as `Mixtral.forward`, so no second full model is needed.
    """
    from ..model.rope import RotaryEmbedding
    from ..weights.layouts import checkpoint_dtype, detect_layout, read_config, weight_files
    from ..weights.load import meta_skeleton
    from ..weights.partial import fill_modules

    cfg = read_config(path)
    layout = detect_layout(path)
    dtype = dtype or checkpoint_dtype(Path(path), layout, weight_files(Path(path), layout)[0])
    model = meta_skeleton(cfg).to(dtype)

    ends = {"embed_tokens": model.embed_tokens, "norm": model.norm, "lm_head": model.lm_head}
    if cfg.tie_word_embeddings:
        del ends["lm_head"]
    fill_modules(path, ends, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(device, dtype)
    hidden = [model.embed_tokens(torch.tensor([list(ids)], device=device)) for ids in sequences]
    for i, layer in enumerate(model.layers):
        fill_modules(path, {f"layers.{i}": layer}, device)
        for j, h in enumerate(hidden):
            positions = torch.arange(h.shape[1], device=device)
            hidden[j] = layer(h, *rope(positions), positions)[0]
        layer.to("meta")                                    # its storage goes
    return [model.lm_head(model.norm(h))[0].float().cpu() for h in hidden]


def default_prompts(weights, nproc: int, texts: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Token ids of one prompt per rank: the texts given (cycled) or DEFAULT_PROMPTS, with BOS."""
    from ..tokenizer import Tokenizer

    tok_file = Path(weights) / "tokenizer.model"
    tok = Tokenizer(tok_file if tok_file.exists() else None)
    texts = list(texts) if texts else list(DEFAULT_PROMPTS)
    return [[tok.bos_id] + tok.encode(texts[r % len(texts)]) for r in range(nproc)]


def run_dtype(job: RunJob) -> torch.dtype:
    """The dtype the ranks compute in: the shared model's, else job.dtype, else the checkpoint's."""
    from ..weights.layouts import checkpoint_dtype, detect_layout, weight_files

    if job.model is not None:
        return next(job.model.parameters()).dtype
    if job.dtype is not None:
        return job.dtype
    layout = detect_layout(job.weights)
    return checkpoint_dtype(Path(job.weights), layout, weight_files(Path(job.weights), layout)[0])


def compare_with_single_process(job: RunJob, results: list[dict], model: Optional[nn.Module] = None,
                                device="cpu") -> CheckReport:
    """Each rank's prompt and greedy tokens through the one-process model: logits and choices compared.

    model: a one-process Mixtral already in memory; None streams the checkpoint one layer at a time
    (`streamed_logits`, on `device`), in the dtype the ranks ran in. One forward per rank of its prompt
    plus the tokens it generated: the logits over the prompt must agree within `logit_tolerance`, and
    each generated token must be the reference's greedy choice, or tie with it within that tolerance.
    """
    dtype = run_dtype(job)
    sequences = [r["prompt"] + r["new_tokens"][:-1] for r in results]
    if model is None:
        reference = streamed_logits(job.weights, sequences, dtype, device)
    else:
        with torch.no_grad():
            reference = [model(torch.tensor([s], device=next(model.parameters()).device))[0].float().cpu()
                         for s in sequences]
    tolerance = logit_tolerance(dtype, max(float(ref.abs().max()) for ref in reference))
    ref_logits, ref_tokens, diff, agree = [], [], 0.0, True
    for result, ref in zip(results, reference):
        n = len(result["prompt"])
        diff = max(diff, float((ref[:n] - result["logits"]).abs().max()))
        chosen = ref[n - 1:]                                     # [new tokens, vocab]
        for row, token in zip(chosen, result["new_tokens"]):
            agree = agree and bool(row[token] >= row.max() - tolerance)
        ref_logits.append(ref[:n])
        ref_tokens.append(chosen.argmax(dim=-1).tolist()[:len(result["new_tokens"])])
    return CheckReport(len(results), diff, agree, results, ref_logits, ref_tokens, tolerance, dtype)


def check(weights, nproc: int = 2, prompts: Optional[Sequence[str]] = None, max_new_tokens: int = 8,
          model: Optional[nn.Module] = None, share_model: bool = False,
          dtype: Optional[torch.dtype] = torch.float32) -> CheckReport:
    """Spawn `nproc` gloo processes, run one prompt per rank expert-parallel, compare with one process.

    prompts: texts, rank r takes prompts[r % len] (default: DEFAULT_PROMPTS); model: the one-process
    reference if already loaded (else streamed from the checkpoint); share_model: hand that model to
    the ranks to shard (see RunJob) instead of each rank reading its part of the checkpoint. dtype: of
    the ranks' weights (float32 by default: the tightest tolerance; None keeps the checkpoint's).
    """
    from ..weights.layouts import read_config

    job = RunJob(str(weights), default_prompts(weights, nproc, prompts), max_new_tokens, dtype=dtype)
    _check_job(job)
    if share_model:
        if model is None:
            raise ValueError("share_model=True needs the loaded model")
        job.model = model
    timeout = collective_timeout(read_config(weights), run_dtype(job), nproc)
    return compare_with_single_process(job, spawn(nproc, run_worker, job, timeout=timeout), model)


def _check_job(job: RunJob) -> None:
    """Fail here, in one process, before the ranks start (an error on one rank would hang the others)."""
    from ..weights.layouts import read_config

    cfg = read_config(job.weights)
    expert_ranges(cfg.num_local_experts, len(job.prompts))
    for ids in job.prompts:
        if len(ids) + job.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"a prompt of {len(ids)} tokens + {job.max_new_tokens} new tokens exceeds the "
                             f"context of {cfg.max_position_embeddings}")


def report_lines(report: CheckReport) -> list[str]:
    lines = [f"expert parallel on {report.nproc} processes vs one process, {len(report.results)} prompts "
             f"({', '.join(str(len(r['prompt'])) for r in report.results)} tokens)",
             f"largest logit difference: {report.max_logit_diff:.3g} (tolerance {report.tolerance:.3g}: "
             f"{LOGIT_UNITS} x {str(report.dtype).removeprefix('torch.')} eps x the largest |logit|)",
             f"greedy tokens agree: {report.tokens_agree}"]
    sent = sum(rec.bytes_sent for r in report.results for layer in r["prefill"] for rec in layer)
    tokens = sum(len(r["prompt"]) for r in report.results)
    layers = len(report.results[0]["prefill"])
    lines.append(f"prefill: {sent / (tokens * layers):.1f} bytes sent per token per layer (both directions)")
    peaks = [r.get("peak_rss") for r in report.results]
    if all(p is not None for p in peaks):
        lines.append("peak resident memory per rank: " + ", ".join(f"{p / 2**20:.0f} MiB" for p in peaks))
    lines.append("PASS" if report.passed else "FAIL")
    return lines


# ===================================================================== command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixtral_edu.parallel.expert_parallel",
                                description="Expert parallelism over torch.distributed (gloo or NCCL).")
    p.add_argument("--weights", default=None, help="checkpoint folder (default: data/tiny-mixtral)")
    p.add_argument("--nproc", type=int, default=None,
                   help="spawn this many CPU processes (default 2); not used under torchrun")
    p.add_argument("--check", action="store_true",
                   help="compare with the one-process model; exit 1 if logits or greedy tokens differ")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat the option for more; rank r takes prompt r, cycling)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="weights' dtype on the ranks (default: float32 with --check, for a tight tolerance; "
                        "else the checkpoint's)")
    return p


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..assets import default_weights_dir
    from ..weights.errors import CheckpointError
    from ..weights.layouts import read_config

    args = _parser().parse_args(argv)
    weights = str(args.weights or default_weights_dir())
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and args.nproc is not None:
        print("error: --nproc spawns processes; under torchrun set --nproc-per-node instead", file=sys.stderr)
        return 2
    nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun else (args.nproc or 2)
    try:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        dtype = _DTYPES[args.dtype] if args.dtype else (torch.float32 if args.check else None)
        job = RunJob(weights, default_prompts(weights, nproc, args.prompt), args.max_new_tokens, dtype=dtype)
        _check_job(job)
        timeout = collective_timeout(read_config(weights), run_dtype(job), nproc)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    device = "cpu"
    if under_torchrun:
        _, rank_device = init_from_torchrun(timeout)
        device = rank_device if rank_device.type == "cuda" else "cpu"     # rank 0 streams the reference there
        try:
            at_start = rss_bytes()[0]
            result = run_worker(job)
            result.update(rss_at_start=at_start, peak_rss=rss_bytes()[1])
            gathered = [None] * nproc if dist.get_rank() == 0 else None
            dist.gather_object(result, gathered, dst=0)
            if dist.get_rank() != 0:
                return 0
            results = gathered
        finally:
            dist.destroy_process_group()
    else:
        results = spawn(nproc, run_worker, job, timeout=timeout)

    from ..tokenizer import Tokenizer
    tok_file = Path(weights) / "tokenizer.model"
    tok = Tokenizer(tok_file if tok_file.exists() else None)
    for r in results:
        print(f"rank {r['rank']}: {tok.decode(r['prompt'][1:])!r} -> {tok.decode(r['new_tokens'])!r}")
    if not args.check:
        return 0
    report = compare_with_single_process(job, results, device=device)
    print("\n".join(report_lines(report)))
    return 0 if report.passed else 1


if __name__ == "__main__":
    # Run the package's module (not this file as __main__), so spawned processes find its functions.
    from mixtral_edu.parallel import expert_parallel
    sys.exit(expert_parallel.main())
