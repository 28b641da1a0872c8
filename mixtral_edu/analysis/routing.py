"""Which experts each token went to: a routing trace, and the statistics of the paper's Section 5.

`trace_routing(model, input_ids)` runs ONE normal forward pass with a forward hook on every
chosen layer's router (`layers[i].block_sparse_moe.gate`, whose output is the router logits
`[tokens, E]`). For each hooked layer it keeps

    probs      [L, T, E]   softmax over all E experts (what plots and the balancing loss look at)
    expert_ids [L, T, k]   the k chosen experts, largest weight first  (router.route: the model's own choice)
    weights    [L, T, k]   their combine weights, summing to 1 per token

on the CPU in float32, so a trace of the full model on a GPU costs (E + 2k) numbers per token per
recorded layer and nothing on the GPU once the pass is over.

Statistics on a trace (or on plain tensors, so they can be checked by hand):

* expert usage: the share of tokens whose FIRST choice is expert e, or the share of all T*k
  assignments that go to e ("any" of the k choices). Both sum to 1 over the experts; uniform is 1/E
  (the dashed line of the paper's Figure 7).
* repetition (paper Table 5): over consecutive token pairs (t, t+1), the "first choice" rate is the
  fraction whose first choices are equal; the "first or second" rate is the fraction whose chosen
  sets of k experts share at least one expert. Random routing gives 1/E and
  1 - C(E-k, k) / C(E, k)  (E=8, k=2: 12.5% and 1 - (6/8)(5/7) = 46.4%).
* load balance: the coefficient of variation std/mean of the usage (0 = perfectly even) and its
  normalised entropy H(p) / log E (1 = perfectly even, 0 = one expert takes everything).

Several texts per domain: `trace_domains` traces each text on its own, and `domain_usage` /
`domain_repetition_rates` pool tokens and pairs per domain (a pair never spans two texts);
`evenly_spaced_windows` samples a long token stream. `PAPER_TABLE5` holds the paper's own numbers,
for comparison only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..model.router import route, router_probs

TokenIds = Union[torch.Tensor, Sequence[int]]
CHOICES = ("first", "any")

# The paper's own numbers, NOT measured by this project: Mixtral of Experts (Jiang et al., 2024,
# arXiv:2401.04088), Table 5, "Percentage of expert assignment repetitions", Mixtral-8x7B on The Pile
# validation subsets. {subset: {layer: (first choice %, first or second choice %)}}.
PAPER_TABLE5_LAYERS = (0, 15, 31)
PAPER_TABLE5 = {
    "ArXiv":            {0: (14.0, 46.5), 15: (27.9, 62.3), 31: (22.7, 52.9)},
    "DM Mathematics":   {0: (14.1, 44.9), 15: (28.4, 67.0), 31: (19.7, 44.5)},
    "Github":           {0: (14.9, 49.9), 15: (28.1, 66.9), 31: (19.7, 49.2)},
    "Gutenberg":        {0: (13.9, 49.5), 15: (26.1, 63.1), 31: (26.3, 52.2)},
    "PhilPapers":       {0: (13.6, 46.9), 15: (25.3, 61.9), 31: (22.1, 51.3)},
    "PubMed Abstracts": {0: (14.2, 48.6), 15: (24.6, 61.6), 31: (22.0, 51.8)},
    "StackExchange":    {0: (13.6, 48.2), 15: (27.2, 64.6), 31: (23.6, 53.6)},
    "Wikipedia (en)":   {0: (14.4, 49.8), 15: (23.6, 62.1), 31: (25.3, 51.8)},
}


# ---------------------------------------------------------------------------------------- the trace
@dataclass
class RoutingTrace:
    """The router's decisions for one token sequence at the recorded layers (CPU tensors).

    probs `[L, T, E]` float32, expert_ids `[L, T, k]` int64 (largest weight first), weights
    `[L, T, k]` float32, token_ids `[T]` int64; `layers` are the model layer numbers of the L rows.
    """

    probs: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    token_ids: torch.Tensor
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        L, T, E = self.probs.shape
        k = self.expert_ids.shape[-1]
        for name, shape in (("expert_ids", (L, T, k)), ("weights", (L, T, k)), ("token_ids", (T,))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"RoutingTrace.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if len(self.layers) != L:
            raise ValueError(f"RoutingTrace.layers names {len(self.layers)} layers but probs holds {L}")
        self.layers = tuple(int(i) for i in self.layers)

    @property
    def num_layers(self) -> int:
        return self.probs.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[1]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[2]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def row(self, layer: int) -> int:
        """Row of model layer `layer` in the `[L, ...]` tensors."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not recorded; this trace holds layers {list(self.layers)}")
        return self.layers.index(layer)

    def select(self, layers: Iterable[int]) -> "RoutingTrace":
        """The same trace restricted to some of its layers (model layer numbers)."""
        rows = [self.row(i) for i in layers]
        return RoutingTrace(self.probs[rows], self.expert_ids[rows], self.weights[rows], self.token_ids,
                            tuple(self.layers[r] for r in rows))

    def usage(self, choice: str = "any") -> torch.Tensor:
        """Expert usage per recorded layer, `[L, E]`, rows summing to 1 (see `expert_usage`)."""
        return expert_usage(self.expert_ids, self.num_experts, choice)

    def repetition_rates(self) -> torch.Tensor:
        """`[L, 2]`: (first-choice rate, first-or-second rate) per recorded layer."""
        return torch.tensor([repetition_rates(ids) for ids in self.expert_ids], dtype=torch.float64)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """First, middle and last layer, as the paper picks 0, 15 and 31 of Mixtral's 32."""
    return tuple(sorted({0, (num_layers - 1) // 2, num_layers - 1}))


def _as_sequence(input_ids: TokenIds) -> torch.Tensor:
    """Token ids of ONE sequence as `[1, T]` int64 (accepts `[T]`, `[1, T]` or a list)."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), dtype=torch.long)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"trace_routing takes one sequence, [T] or [1, T]; got shape {tuple(ids.shape)} "
                         "(trace several texts one by one, e.g. with trace_domains)")
    if ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens")
    return ids.long()


class RoutingRecorder:
    """Forward hooks on the routers (`layers[i].block_sparse_moe.gate`) of the chosen layers that keep
    every call's routing, in call order: a prefill, then each decoded token, whatever runs the model
    (`model(...)`, `generate`, `FastDecoder` without compile or graphs, int8, offloaded or split).

        with record_routing(model) as recorder:
            new_ids = FastDecoder(model, 256).generate(prompt, 32)
        trace = recorder.trace(prompt + new_ids[:-1])   # the tokens that went through the model

    The hook turns router logits `[tokens, E]` into the model's own routing (`router.route`) and moves
    it to the CPU straight away. Hooks are removed on leaving the `with` block.
    """

    def __init__(self, model, layers: Optional[Iterable[int]] = None) -> None:
        num_layers = len(model.layers)
        chosen = tuple(range(num_layers)) if layers is None else tuple(int(i) for i in layers)
        if not chosen:
            raise ValueError("layers is empty: name at least one layer to record")
        for i in chosen:
            if not 0 <= i < num_layers:
                raise ValueError(f"layer {i} does not exist; the model has layers 0..{num_layers - 1}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {list(chosen)} names a layer twice")
        gates = [model.layers[i].block_sparse_moe.gate for i in chosen]
        if any(g is None for g in gates):
            raise ValueError("this model is dense (one expert per layer, no router): there is no routing to trace")
        self.layers = chosen
        self.top_k = model.config.num_experts_per_tok
        self.pieces: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in chosen]
        self.handles = [g.register_forward_hook(self._hook(s)) for s, g in enumerate(gates)]

    def _hook(self, slot: int):
        @torch.no_grad()
        def hook(module, args, logits):
            weights, expert_ids = route(logits, self.top_k)
            self.pieces[slot].append((router_probs(logits).cpu(), expert_ids.cpu(), weights.float().cpu()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "RoutingRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def trace(self, token_ids: TokenIds) -> RoutingTrace:
        """The recorded routing as a RoutingTrace over `token_ids`, the tokens that went through the model."""
        ids = _as_sequence(token_ids)[0].cpu()
        probs, expert_ids, weights = (torch.stack([torch.cat([p[j] for p in layer_pieces]) for layer_pieces in self.pieces])
                                      for j in range(3))
        if probs.shape[1] != ids.shape[0]:
            raise ValueError(f"{probs.shape[1]} tokens were routed but {ids.shape[0]} token ids were given")
        return RoutingTrace(probs, expert_ids, weights, ids, self.layers)


def record_routing(model, layers: Optional[Iterable[int]] = None) -> RoutingRecorder:
    """Start recording the routing of `layers` (default: all); use as a `with` block (see RoutingRecorder)."""
    return RoutingRecorder(model, layers)


@torch.no_grad()          # a trace never trains: no autograd graph is built beside the activations
def trace_routing(model, input_ids: TokenIds, layers: Optional[Iterable[int]] = None,
                  chunk_size: Optional[int] = None) -> RoutingTrace:
    """Record every chosen layer's routing during one forward pass of `model` over `input_ids`.

    model: a `Mixtral` (any module with `.layers[i].block_sparse_moe.gate` and `.config`).
    input_ids: one sequence, `[T]` or `[1, T]` (tensor or list of ints).
    layers: model layer numbers to record (default: all); only these are hooked and stored.
    chunk_size: feed the sequence in chunks of this many tokens through a KV cache (same result,
        bounded activation memory for long texts on a big model); default: all at once.
    Returns a `RoutingTrace` on the CPU, float32.
    """
    ids = _as_sequence(input_ids).to(model.embed_tokens.weight.device)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    with record_routing(model, layers) as recorder:
        if chunk_size is None:
            model(ids, last_only=True)                 # logits of the last position only: routing is all we keep
        else:
            cache = model.new_kv_cache(1, max_seq_len=ids.shape[1])
            for start in range(0, ids.shape[1], chunk_size):
                model(ids[:, start:start + chunk_size], cache=cache, last_only=True)
    return recorder.trace(ids)


def trace_domains(model, texts_by_domain: Mapping[str, Sequence[Union[str, TokenIds]]], tokenizer=None,
                  layers: Optional[Iterable[int]] = None, bos: bool = True,
                  progress: bool = True) -> dict[str, list[RoutingTrace]]:
    """Trace several texts per domain: {domain: [text, ...]} -> {domain: [RoutingTrace, ...]}.

    A text is a string (needs `tokenizer`; BOS is prepended when `bos`) or its token ids.
    Each text is its own sequence, so no consecutive pair ever spans two texts.
    """
    from tqdm import tqdm

    jobs = [(d, t) for d, texts in texts_by_domain.items() for t in texts]
    out: dict[str, list[RoutingTrace]] = {d: [] for d in texts_by_domain}
    for domain, text in tqdm(jobs, desc="tracing", disable=not progress):
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError(f"domain {domain!r} holds text strings: pass tokenizer= to encode them")
            ids = ([tokenizer.bos_id] if bos else []) + tokenizer.encode(text)
        else:
            ids = text
        out[domain].append(trace_routing(model, ids, layers))
    for domain, traces in out.items():
        if not traces:
            raise ValueError(f"domain {domain!r} has no texts")
    return out


def evenly_spaced_windows(stream: torch.Tensor, window: int, count: int) -> list[torch.Tensor]:
    """`count` windows of `window` tokens spread evenly along a 1-D token stream `[N]` (first starts at 0,
    last ends at N), so a sample covers the whole held-out text rather than its first document."""
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D token ids, got shape {tuple(stream.shape)}")
    if window < 2 or count < 1:
        raise ValueError(f"need window >= 2 and count >= 1, got window={window}, count={count}")
    if stream.numel() < window:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than one window of {window}")
    starts = torch.linspace(0, stream.numel() - window, count).long().tolist()
    return [stream[s:s + window] for s in starts]


# ---------------------------------------------------------------------------------------- usage
def expert_counts(expert_ids: torch.Tensor, num_experts: int, choice: str = "any") -> torch.Tensor:
    """expert_ids `[..., T, k]` -> how many picks each expert got, `[..., E]` float64.

    The one place the picks are counted: `expert_usage`, the trainer's logged load
    (`training.train.layer_load`) and the balancing loss's f (`training.losses.expert_load`) all call it.
    choice="first" counts only each token's first choice; "any" counts all k.
    """
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    chosen = expert_ids[..., :1] if choice == "first" else expert_ids
    flat = chosen.reshape(*chosen.shape[:-2], -1)                          # [..., T*k']
    if flat.shape[-1] == 0:
        raise ValueError("expert_ids holds no tokens")
    if int(flat.min()) < 0 or int(flat.max()) >= num_experts:
        raise ValueError(f"expert_ids holds ids outside 0..{num_experts - 1}")
    counts = torch.zeros(*flat.shape[:-1], num_experts, dtype=torch.float64, device=flat.device)
    return counts.scatter_add_(-1, flat.long(), torch.ones_like(flat, dtype=torch.float64))


def expert_usage(expert_ids: torch.Tensor, num_experts: int, choice: str = "any") -> torch.Tensor:
    """expert_ids `[..., T, k]` -> usage `[..., E]` float64, summing to 1 over experts.

    choice="first": share of tokens whose first choice is e.
    choice="any": share of all T*k assignments that go to e (so the share of tokens that use e
    at all is k times this).
    """
    counts = expert_counts(expert_ids, num_experts, choice)
    return counts / counts.sum(-1, keepdim=True)


def pooled_usage(traces: Sequence[RoutingTrace], choice: str = "any") -> torch.Tensor:
    """Usage `[L, E]` over all tokens of several traces (each token counts once, long texts weigh more)."""
    if not traces:
        raise ValueError("no traces to pool")
    ids = torch.cat([t.expert_ids for t in traces], dim=1)                 # [L, sum T, k]
    return expert_usage(ids, traces[0].num_experts, choice)


def domain_usage(traces_by_domain: Mapping[str, Sequence[RoutingTrace]], choice: str = "any"
                 ) -> dict[str, torch.Tensor]:
    """{domain: [traces]} -> {domain: usage [L, E]} (the data of the paper's Figure 7)."""
    return {d: pooled_usage(ts, choice) for d, ts in traces_by_domain.items()}


# ---------------------------------------------------------------------------------------- repetition
def repetition_counts(expert_ids: torch.Tensor) -> tuple[int, int, int]:
    """expert_ids of one layer `[T, k]` -> (pairs with equal first choice, pairs whose chosen sets
    intersect, number of consecutive pairs T-1)."""
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [T, k] for one layer, got shape {tuple(expert_ids.shape)}")
    if expert_ids.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens for a consecutive pair, got {expert_ids.shape[0]}")
    prev, nxt = expert_ids[:-1], expert_ids[1:]
    first_equal = prev[:, 0] == nxt[:, 0]
    # [T-1, k, k]: does slot i of token t hold the same expert as slot j of token t+1?
    shared = (prev[:, :, None] == nxt[:, None, :]).flatten(1).any(dim=1)
    return int(first_equal.sum()), int(shared.sum()), prev.shape[0]


def repetition_rates(expert_ids: torch.Tensor) -> tuple[float, float]:
    """expert_ids of one layer `[T, k]` (largest weight first) -> (first-choice rate, first-or-second rate).

    As the Mixtral paper's Table 5: over the T-1 consecutive pairs (t, t+1), the share whose first
    choices are equal, and the share where some expert is chosen (first or second) by both.
    """
    first, either, pairs = repetition_counts(expert_ids)
    return first / pairs, either / pairs


def pooled_repetition_rates(traces: Sequence[RoutingTrace]) -> torch.Tensor:
    """`[L, 2]` repetition rates over all consecutive pairs of several traces (pairs never span two texts)."""
    if not traces:
        raise ValueError("no traces to pool")
    totals = torch.zeros(traces[0].num_layers, 3, dtype=torch.float64)
    for trace in traces:
        for row, ids in enumerate(trace.expert_ids):
            totals[row] += torch.tensor(repetition_counts(ids), dtype=torch.float64)
    return totals[:, :2] / totals[:, 2:]


def domain_repetition_rates(traces_by_domain: Mapping[str, Sequence[RoutingTrace]]) -> dict[str, torch.Tensor]:
    """{domain: [traces]} -> {domain: `[L, 2]` (first-choice, first-or-second) rates} (paper Table 5)."""
    return {d: pooled_repetition_rates(ts) for d, ts in traces_by_domain.items()}


def random_repetition_baselines(num_experts: int, top_k: int) -> tuple[float, float]:
    """Expected repetition rates when every token picks k distinct experts uniformly at random.

    first choice: 1/E. Chosen sets intersect: 1 - P(disjoint) = 1 - C(E-k, k) / C(E, k),
    i.e. 1 - (E-k)/E * (E-k-1)/(E-1) * ... (k factors); E=8, k=2: 1 - (6/8)(5/7) = 0.4643.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    return 1.0 / num_experts, 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


# ---------------------------------------------------------------------------------------- balance
def _check_usage(usage: torch.Tensor) -> torch.Tensor:
    usage = torch.as_tensor(usage, dtype=torch.float64)
    if usage.shape[-1] < 2:
        raise ValueError(f"usage needs at least 2 experts on its last axis, got shape {tuple(usage.shape)}")
    if bool((usage < 0).any()) or bool((usage.sum(-1) <= 0).any()):
        raise ValueError("usage must be non-negative counts or shares with a positive total")
    return usage


def coefficient_of_variation(usage: torch.Tensor) -> torch.Tensor:
    """usage (counts or shares) `[..., E]` -> std/mean over experts `[...]` (population std; 0 = even)."""
    usage = _check_usage(usage)
    return usage.std(dim=-1, correction=0) / usage.mean(dim=-1)


def normalized_entropy(usage: torch.Tensor) -> torch.Tensor:
    """usage (counts or shares) `[..., E]` -> H(p) / log E `[...]` (1 = even, 0 = one expert only)."""
    usage = _check_usage(usage)
    p = usage / usage.sum(dim=-1, keepdim=True)
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))      # 0 log 0 = 0
    return -plogp.sum(dim=-1) / math.log(usage.shape[-1])
