"""Checkers for the build-it-yourself exercises: the learner writes a component, the checker runs it.

Each checker runs the learner's function on seeded random inputs and on the edge cases that break
wrong versions (one token, k = 1, grouped heads with three queries per key, positions past a cache
start, every token picking the same expert), compares with the naive references in `naive.py`, and
refuses answers that call the package's own implementation of the same thing: that code (and
PyTorch's or transformers' ready-made version) is switched off while the learner's code runs. A
wrong answer gets a hint naming the case and, where a known mistake explains it, the mistake. No
report contains a number of the answer.

The functions take plain tensors, so the parts fit together in notebook 06, where they run the
trained tiny model's weights (`model_weights`) and must reproduce its greedy tokens.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import torch

from . import naive
from .checking import Checked, WrongAnswer, blank_function, call, compare, correct, not_attempted, require, switched_off

# Relative tolerance of a float32 answer against the float64 reference: float32 rounding is ~1e-7 per
# operation, and RoPE's float32 angles (position x frequency) are off by up to ~1e-5 rad at the
# positions used; a wrong formula, or the right one times 1.01, is off by 1e-2 or more.
TOL = 2e-4

_F = torch.nn.functional
_NORM_SHORTCUTS = [(torch, "rms_norm"), (_F, "rms_norm"), (torch, "layer_norm"), (_F, "layer_norm"),
                   (torch, "native_layer_norm"), (torch, "group_norm"), (_F, "group_norm"),
                   (torch, "native_group_norm"), (torch, "instance_norm"), (_F, "instance_norm")]
_ATTENTION_SHORTCUTS = [(_F, "scaled_dot_product_attention"), (_F, "multi_head_attention_forward"),
                        (torch, "_scaled_dot_product_attention_math")]
_HF = "transformers.models.mixtral.modeling_mixtral"
_MODEL = ["mixtral_edu.model.norm", "mixtral_edu.model.rope", "mixtral_edu.model.attention",
          "mixtral_edu.model.experts", "mixtral_edu.model.router", "mixtral_edu.model.moe",
          "mixtral_edu.model.mixtral", "mixtral_edu.inference.dispatch", _HF]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(label: str, fn: Callable, cases: list, reference: Callable, modules, shortcuts=(), wrongs=(),
         tol: float = TOL, what: str = "", done: str = "") -> Checked:
    """Run `fn(*args)` on every (case name, args) while the package is switched off; compare with
    `reference(*args)` (computed before). wrongs: (hint, function) pairs of known mistakes.
    Returns a 'not attempted' report for a blank function, `correct(done)` when every case passes."""
    if blank_function(fn):
        return not_attempted(label, f"the body of `{what}`")
    expected = [reference(*args) for _, args in cases]
    diagnoses = [[(hint, wrong(*args)) for hint, wrong in wrongs] for _, args in cases]
    with switched_off(modules, shortcuts):
        for (name, args), want, diag in zip(cases, expected, diagnoses):
            got = call(label, name, fn, *_copies(args))
            if got is None:
                return not_attempted(label, f"the body of `{what}` (it returned None)")
            compare(label, name, got, want, tol, diag)
    return correct(done)


def _copies(args):
    """Fresh copies of tensor arguments, so an answer that writes into its input cannot spoil the next case."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


# ------------------------------------------------------------------------------------- 02 RMSNorm
def check_02_rms_norm(my_rms_norm) -> Checked:
    """`my_rms_norm(x, weight, eps)`: x `[..., H]`, weight `[H]` -> `[..., H]`."""
    label = "build: RMSNorm"
    g = _gen(20)
    cases = [
        ("batch of sequences", (torch.randn(2, 5, 16, generator=g) * 2, torch.rand(16, generator=g) + 0.5, 1e-5)),
        ("one token", (torch.randn(1, 1, 8, generator=g), torch.rand(8, generator=g) + 0.5, 1e-5)),
        ("rows with a large mean", (torch.randn(3, 32, generator=g) + 4.0, torch.rand(32, generator=g) + 0.5, 1e-6)),
        ("tiny rows, where eps matters", (torch.randn(4, 16, generator=g) * 1e-3, torch.rand(16, generator=g) + 0.5, 1e-5)),
    ]
    wrongs = [
        ("eps is missing: it goes inside the square root, added to the mean square",
         lambda x, w, eps: naive.rms_norm(x, w, 0.0)),
        ("the output is not scaled by `weight`", lambda x, w, eps: naive.rms_norm(x, torch.ones_like(w), eps)),
        ("that subtracts the mean first (LayerNorm); RMSNorm does not centre",
         lambda x, w, eps: naive.rms_norm(x - x.mean(-1, keepdim=True), w, eps)),
        ("the square root is missing", lambda x, w, eps: x * w / (x.pow(2).mean(-1, keepdim=True) + eps)),
    ]
    return _run(label, my_rms_norm, cases, naive.rms_norm, ["mixtral_edu.model.norm", _HF], _NORM_SHORTCUTS,
                wrongs, what="my_rms_norm",
                done=f"{label}: correct — {len(cases)} cases (one token, large mean, tiny rows) "
                "agree with the naive reference, without PyTorch's or the package's norm")


# ----------------------------------------------------------------------------------------- 02 RoPE
def _interleaved(x, start, theta):
    """The other convention: pairs (2i, 2i+1)."""
    d = x.shape[-1]
    order = [2 * i for i in range(d // 2)] + [2 * i + 1 for i in range(d // 2)]
    inverse = torch.argsort(torch.tensor(order))
    return naive.rope(x[..., order], start, theta)[..., inverse]


def check_02_rope(my_rope) -> Checked:
    """`my_rope(x, start, theta)`: x `[batch, heads, seq, head_dim]`, token t at position start + t;
    rotate-half convention."""
    label = "build: RoPE"
    g = _gen(21)
    cases = [
        ("prefill from position 0", (torch.randn(1, 2, 6, 8, generator=g), 0, 1e4)),
        ("a chunk past a cache start (positions 37..40)", (torch.randn(2, 3, 4, 16, generator=g), 37, 1e6)),
        ("one token at position 50", (torch.randn(1, 1, 1, 8, generator=g), 50, 1e4)),
        ("head_dim 2 (one pair)", (torch.randn(1, 1, 5, 2, generator=g), 3, 1e6)),
    ]
    wrongs = [
        ("that is the interleaved convention (pairs 2i, 2i+1); here pair i is channels i and i + head_dim/2",
         _interleaved),
        ("the positions must start at `start` (the tokens come after the cached ones), not at 0",
         lambda x, start, theta: naive.rope(x, 0, theta)),
        ("the rotation turns the wrong way: check the signs of the sin terms",
         _backwards),
    ]
    return _run(label, my_rope, cases, naive.rope, ["mixtral_edu.model.rope", _HF], (), wrongs, what="my_rope",
                done=f"{label}: correct — {len(cases)} cases (positions past a cache start, one token, "
                "one pair) agree with the naive rotation, without the package's RoPE")


def _backwards(x, start, theta):
    d = x.shape[-1]
    flipped = torch.cat([x[..., : d // 2], -x[..., d // 2:]], dim=-1)
    out = naive.rope(flipped, start, theta)
    return torch.cat([out[..., : d // 2], -out[..., d // 2:]], dim=-1)


# ------------------------------------------------------------------------------------ 03 attention
def _attention_variant(q, k, v, mask="causal", groups="block", scale=True):
    """Known mistakes, for hints: mask "none" or "top_left" (ignores the cache offset); groups "tile"
    (query head h reads key head h % Hkv); no 1/sqrt(D)."""
    Hq, Hkv, Tq, Tk, D = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    index = torch.arange(Hq) // (Hq // Hkv) if groups == "block" else torch.arange(Hq) % Hkv
    k, v = k.double()[:, index], v.double()[:, index]
    scores = q.double() @ k.transpose(-1, -2) / (math.sqrt(D) if scale else 1.0)
    if mask != "none":
        offset = Tk - Tq if mask == "causal" else 0
        allowed = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + offset
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).to(q.dtype)


def check_03_attention(my_attention) -> Checked:
    """`my_attention(q, k, v)`: q `[B, Hq, Tq, D]`, k and v `[B, Hkv, Tk, D]` (Tk >= Tq; the queries are
    the last Tq positions) -> `[B, Hq, Tq, D]`: causal, grouped-query, scaled by 1/sqrt(D)."""
    label = "build: attention"
    g = _gen(30)

    def qkv(B, Hq, Hkv, Tq, Tk, D):
        return (torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g),
                torch.randn(B, Hkv, Tk, D, generator=g))

    cases = [
        ("prefill, 2 query heads per key/value head", qkv(1, 4, 2, 5, 5, 8)),
        ("one new token after 6 cached", qkv(1, 4, 2, 1, 7, 8)),
        ("3 new tokens after 4 cached, 3 query heads per key/value head", qkv(2, 6, 2, 3, 7, 8)),
        ("one key/value head for all query heads", qkv(1, 3, 1, 4, 4, 8)),
        ("a single token, nothing cached", qkv(1, 2, 2, 1, 1, 4)),
    ]
    wrongs = [
        ("the causal mask is missing: a query must not see later positions",
         lambda q, k, v: _attention_variant(q, k, v, mask="none")),
        ("the mask ignores the cache: query t of Tq sits at position Tk - Tq + t and sees every key up to it",
         lambda q, k, v: _attention_variant(q, k, v, mask="top_left")),
        ("wrong key/value head: consecutive query heads share one (head h reads h // (Hq/Hkv)), "
         "as `repeat_interleave` lays them out, not `repeat`", lambda q, k, v: _attention_variant(q, k, v, groups="tile")),
        ("the scores must be divided by sqrt(head_dim)", lambda q, k, v: _attention_variant(q, k, v, scale=False)),
    ]
    return _run(label, my_attention, cases, naive.attention, ["mixtral_edu.model.attention", _HF],
                _ATTENTION_SHORTCUTS, wrongs, what="my_attention",
                done=f"{label}: correct — {len(cases)} cases (prefill, decode after a cache, uneven "
                "chunks, 3 queries per key head, one key head) agree with the naive loops, without "
                "scaled_dot_product_attention or the package's attention")


def random_layer(cfg, seed: int):
    """Random weights of one decoder layer, named like the checkpoint's keys (see `model_weights`)."""
    g = _gen(seed)
    H, D, E, I = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts, cfg.intermediate_size

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    return SimpleNamespace(
        input_layernorm=torch.rand(H, generator=g) + 0.5, post_attention_layernorm=torch.rand(H, generator=g) + 0.5,
        q_proj=w(cfg.num_attention_heads * D, H), k_proj=w(cfg.num_key_value_heads * D, H),
        v_proj=w(cfg.num_key_value_heads * D, H), o_proj=w(H, cfg.num_attention_heads * D),
        gate=w(E, H) * 3, w1=w(E, I, H), w2=w(E, H, I), w3=w(E, I, H))


def small_config(**overrides):
    """A config small enough for the naive loops: 6 query heads on 2 key/value heads (groups of 3)."""
    from ..config import MixtralConfig

    fields = dict(vocab_size=50, hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=4, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=64, rope_theta=1e4)
    fields.update(overrides)
    return MixtralConfig(**fields)


def _run_chunks(label, fn, chunks, call_learner, call_reference, wrongs=(), what=""):
    """A stateful check: the chunks go through the learner's function one after another with one cache
    (as prefill, then decode steps); each output is compared with the reference run the same way.
    wrongs: (hint, function(chunk_index, reference_args)) giving a wrong output for that chunk."""
    if blank_function(fn):
        return not_attempted(label, f"the body of `{what}`")
    expected = [call_reference(i) for i in range(len(chunks))]
    diagnoses = [[(hint, wrong(i)) for hint, wrong in wrongs] for i in range(len(chunks))]
    with switched_off(_MODEL, _NORM_SHORTCUTS + _ATTENTION_SHORTCUTS):
        for i, (name, _) in enumerate(chunks):
            got = call(label, name, fn, *call_learner(i))
            if got is None:
                return not_attempted(label, f"the body of `{what}` (it returned None)")
            compare(label, name, got, expected[i], TOL, diagnoses[i])
    return None


def _chunk_inputs(cfg, lengths, seed, batch=2):
    g = _gen(seed)
    return [torch.randn(batch, n, cfg.hidden_size, generator=g) for n in lengths]


def _chunk_names(lengths):
    names, done = [], 0
    for n in lengths:
        names.append(f"{n} token(s) after {done} cached" if done else f"prefill of {n} tokens")
        done += n
    return names


def _attention_restarting_positions(x, layer, cfg, cache):
    """A mistake: cached keys are used, but the new tokens are rotated as if they started at position 0."""
    q = naive.rope(naive._heads(x @ layer.q_proj.T, cfg.num_attention_heads), 0, cfg.rope_theta)
    k = naive.rope(naive._heads(x @ layer.k_proj.T, cfg.num_key_value_heads), 0, cfg.rope_theta)
    v = naive._heads(x @ layer.v_proj.T, cfg.num_key_value_heads)
    if cache.get("k") is not None:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    return naive.attention(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ layer.o_proj.T


def check_03_attention_layer(my_attention_layer) -> Checked:
    """`my_attention_layer(x, layer, cfg, cache)`: x `[B, T, H]` -> `[B, T, H]`. `cache` is a dict; it
    starts empty and holds the rotated keys and values ("k", "v": `[B, Hkv, past, D]`) of the tokens so
    far, so that the next call continues at position `past`."""
    label = "build: attention layer with a KV cache"
    cfg = small_config()
    layer = random_layer(cfg, 31)
    lengths = [5, 1, 3, 1]
    xs = _chunk_inputs(cfg, lengths, 32)
    chunks = list(zip(_chunk_names(lengths), xs))
    caches = {"learner": {}, "reference": {}, "restart": {}, "forget": {}}
    wrongs = [
        ("the new tokens must be rotated at their real positions (after the cached ones), not from 0",
         lambda i: _attention_restarting_positions(xs[i], layer, cfg, caches["restart"])),
        ("the new tokens must also attend to the cached keys and values (append to the cache, then attend)",
         lambda i: naive.attention_layer(xs[i], layer, cfg, caches["forget"].clear() or caches["forget"])),
    ]
    report = _run_chunks(label, my_attention_layer, chunks,
                         lambda i: (xs[i].clone(), layer, cfg, caches["learner"]),
                         lambda i: naive.attention_layer(xs[i], layer, cfg, caches["reference"]), wrongs,
                         what="my_attention_layer")
    if report is not None:
        return report
    mine = caches["learner"]
    require(isinstance(mine.get("k"), torch.Tensor) and isinstance(mine.get("v"), torch.Tensor),
            f"{label}: the cache should hold tensors under 'k' and 'v' after the calls")
    want_k = caches["reference"]["k"]
    compare(label, "the cached keys", mine["k"], want_k, TOL,
            [("the cache must hold the keys after RoPE (so they are rotated once, at their own position)",
              naive._heads(torch.cat(xs, 1) @ layer.k_proj.T, cfg.num_key_value_heads))])
    return correct(f"{label}: correct — a prefill, decode steps and a chunk through one cache agree with the "
                   "naive reference, and the cache holds the rotated keys")


# -------------------------------------------------------------------------------------- 04 expert
def check_04_expert(my_expert) -> Checked:
    """`my_expert(x, w1, w2, w3)`: x `[T, H]`, w1 and w3 `[I, H]`, w2 `[H, I]` -> `[T, H]`."""
    label = "build: SwiGLU expert"
    g = _gen(40)

    def case(T, H, I):
        return (torch.randn(T, H, generator=g), torch.randn(I, H, generator=g) / math.sqrt(H),
                torch.randn(H, I, generator=g) / math.sqrt(I), torch.randn(I, H, generator=g) / math.sqrt(H))

    cases = [("8 tokens, I > H", case(8, 16, 40)), ("one token", case(1, 12, 20)), ("I < H", case(5, 16, 8))]
    silu = lambda a: a * torch.sigmoid(a)   # noqa: E731 (for the hints only)
    wrongs = [
        ("the SiLU goes on the w1 ('gate') branch, not on w3", lambda x, w1, w2, w3: naive.expert(x, w3, w2, w1)),
        ("that is ReLU; the expert uses SiLU (x * sigmoid(x))",
         lambda x, w1, w2, w3: (torch.relu(x @ w1.T) * (x @ w3.T)) @ w2.T),
        ("the w3 ('up') branch is missing: it multiplies the SiLU elementwise",
         lambda x, w1, w2, w3: silu(x @ w1.T) @ w2.T),
        ("the weights are [out, in]: multiply by their transposes", None),
    ]
    wrongs = [(h, f) for h, f in wrongs if f is not None]
    return _run(label, my_expert, cases, naive.expert, ["mixtral_edu.model.experts", _HF], (), wrongs,
                what="my_expert",
                done=f"{label}: correct — {len(cases)} cases (one token, I above and below H) agree "
                "with the naive loop, without the package's expert")


# -------------------------------------------------------------------------------------- 05 router
def _router_cases():
    g = _gen(50)
    one_expert = torch.randn(6, 8, generator=g)
    one_expert[:, 3] += 6.0
    return [("top-2 of 8", (torch.randn(7, 8, generator=g) * 2, 2)),
            ("k = 1", (torch.randn(5, 8, generator=g) * 2, 1)),
            ("every token prefers expert 3", (one_expert, 2)),
            ("one token", (torch.randn(1, 8, generator=g), 2)),
            ("top-3 of 4", (torch.randn(4, 4, generator=g), 3))]


def check_05_router(my_router) -> Checked:
    """`my_router(logits, k)`: logits `[T, E]` -> (weights `[T, k]`, expert_ids `[T, k]`), largest first;
    the weights are a softmax over the k chosen logits."""
    label = "build: top-k router"
    if blank_function(my_router):
        return not_attempted(label, "the body of `my_router`")
    cases = _router_cases()
    with switched_off(["mixtral_edu.model.router", "mixtral_edu.model.moe", _HF]):
        for name, (logits, k) in cases:
            got = call(label, name, my_router, logits.clone(), k)
            if got is None:
                return not_attempted(label, "the body of `my_router` (it returned None)")
            require(isinstance(got, (tuple, list)) and len(got) == 2,
                    f"{label}, case '{name}': return two tensors, (weights, expert_ids)")
            weights, ids = got
            want_w, want_ids = naive.router(logits, k)
            require(isinstance(ids, torch.Tensor) and tuple(ids.shape) == tuple(want_ids.shape),
                    f"{label}, case '{name}': expert_ids should be a tensor of shape {tuple(want_ids.shape)}")
            if not torch.equal(ids.long(), want_ids):
                same_sets = torch.equal(ids.long().sort(-1).values, want_ids.sort(-1).values)
                raise WrongAnswer(f"{label}, case '{name}': " + (
                    "the right experts, in the wrong order: largest logit first" if same_sets
                    else "not the k experts with the largest logits"))
            full = torch.softmax(logits.double(), -1).gather(-1, want_ids).float()
            compare(label, name, weights, want_w, TOL, [
                ("that is the softmax over all experts, kept at the chosen ones: renormalise over the k chosen", full),
                ("those are the raw logits: the weights are a softmax over the chosen ones", logits.gather(-1, want_ids))])
    return correct(f"{label}: correct — {len(cases)} cases (k = 1, one token, top-3, every token preferring one "
                   "expert) agree with the naive reference, without the package's router")


# ------------------------------------------------------------------------------------ 05 dispatch
class _CountingExpert:
    """A small nonlinear stand-in expert `[n, H] -> [n, H]` that records how many rows each call gets."""

    def __init__(self, H: int, g: torch.Generator) -> None:
        self.a = torch.randn(H, H, generator=g) / math.sqrt(H)
        self.b = torch.randn(H, H, generator=g) / math.sqrt(H)
        self.calls: list[int] = []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self.calls.append(h.shape[0] if h.dim() == 2 else -1)
        return torch.tanh(h @ self.a) @ self.b


def _dispatch_cases():
    g = _gen(51)
    H, E = 8, 4
    cases = []
    for name, T, k, boost in [("10 tokens, top-2 of 4", 10, 2, None), ("every token picks expert 2 first", 6, 2, 2),
                              ("k = 1", 7, 1, None), ("one token", 1, 2, None)]:
        logits = torch.randn(T, E, generator=g) * 2
        if boost is not None:
            logits[:, boost] += 8.0
        weights, ids = naive.router(logits, k)
        cases.append((name, torch.randn(T, H, generator=g), weights, ids, [_CountingExpert(H, g) for _ in range(E)]))
    return cases


def check_05_dispatch(my_dispatch) -> Checked:
    """`my_dispatch(x, weights, expert_ids, experts)`: x `[T, H]`, weights and expert_ids `[T, k]`,
    experts a list of E functions `[n, H] -> [n, H]` -> `[T, H]`: each expert runs ONCE, on all the
    tokens routed to it; its outputs are weighted and added back at those tokens' rows."""
    label = "build: token dispatch"
    if blank_function(my_dispatch):
        return not_attempted(label, "the body of `my_dispatch`")
    cases = _dispatch_cases()
    with switched_off(["mixtral_edu.model.moe", "mixtral_edu.model.experts", "mixtral_edu.inference.dispatch", _HF]):
        for name, x, weights, ids, experts in cases:
            want = naive.dispatch(x, weights, ids, experts)
            first_only = naive.dispatch(x, torch.ones_like(weights[:, :1]) * weights[:, :1], ids[:, :1], experts)
            unweighted = naive.dispatch(x, torch.ones_like(weights), ids, experts)
            inside = torch.stack([sum(experts[int(e)](x[t:t + 1] * float(w))[0] for w, e in zip(weights[t], ids[t]))
                                  for t in range(x.shape[0])])
            for expert in experts:
                expert.calls.clear()
            got = call(label, name, my_dispatch, x.clone(), weights.clone(), ids.clone(), experts)
            if got is None:
                return not_attempted(label, "the body of `my_dispatch` (it returned None)")
            compare(label, name, got, want, TOL, [
                ("the routing weights are dropped: scale each expert's output by the token's weight for it", unweighted),
                ("only the first choice is used: a token's output adds up all k of its experts", first_only),
                ("the weight multiplies the expert's output, not its input", inside)])
            for e, expert in enumerate(experts):
                routed = int((ids == e).sum())
                require(len(expert.calls) <= 1, f"{label}, case '{name}': expert {e} ran {len(expert.calls)} times; "
                                                "group the tokens by expert and run each expert once on its group")
                require(not expert.calls or expert.calls[0] in (routed,) or (routed == 0 and expert.calls[0] == 0),
                        f"{label}, case '{name}': expert {e} ran on {expert.calls[0] if expert.calls else 0} rows; "
                        f"it should see only the tokens routed to it")
    return correct(f"{label}: correct — {len(cases)} cases (k = 1, one token, every token on one expert): each "
                   "expert ran once on its own tokens, and the weighted sums agree with the naive reference")


# ---------------------------------------------------------------------------- 06 layer and model
def _layer_mistakes(layer, cfg):
    """Wrong decoder layers, for hints: (hint, function(x, cache))."""
    eps = cfg.rms_norm_eps

    def no_residual(x, cache):
        h = naive.attention_layer(naive.rms_norm(x, layer.input_layernorm, eps), layer, cfg, cache)
        return naive.sparse_moe(naive.rms_norm(h, layer.post_attention_layernorm, eps), layer, cfg)

    def one_norm(x, cache):
        h = x + naive.attention_layer(naive.rms_norm(x, layer.input_layernorm, eps), layer, cfg, cache)
        return h + naive.sparse_moe(h, layer, cfg)

    return [("the residual connections are missing: add each sub-block's output to its input", no_residual),
            ("the experts need their own RMSNorm (post_attention_layernorm) before the router", one_norm)]


def check_06_decoder_layer(my_decoder_layer) -> Checked:
    """`my_decoder_layer(x, layer, cfg, cache)`: x `[B, T, H]` -> `[B, T, H]`; pre-norm attention, then
    pre-norm sparse MoE, each added back to its input."""
    label = "build: decoder layer"
    cfg = small_config()
    layer = random_layer(cfg, 60)
    lengths = [4, 1, 2]
    xs = _chunk_inputs(cfg, lengths, 61)
    caches = {"learner": {}, "reference": {}}
    mistake_caches: dict = {}
    wrongs = [(hint, lambda i, f=f, hint=hint: f(xs[i], mistake_caches.setdefault(hint, {})))
              for hint, f in _layer_mistakes(layer, cfg)]
    report = _run_chunks(label, my_decoder_layer, list(zip(_chunk_names(lengths), xs)),
                         lambda i: (xs[i].clone(), layer, cfg, caches["learner"]),
                         lambda i: naive.decoder_layer(xs[i], layer, cfg, caches["reference"]), wrongs,
                         what="my_decoder_layer")
    if report is not None:
        return report
    return correct(f"{label}: correct — a prefill and two later chunks through one cache agree with the "
                             "naive layer, with the package's layer, attention, experts and router switched off")


def random_weights(cfg, seed: int):
    """A random model's weights in the shape `model_weights` gives."""
    g = _gen(seed)
    return SimpleNamespace(embed_tokens=torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g),
                           layers=[random_layer(cfg, seed + 1 + i) for i in range(cfg.num_hidden_layers)],
                           norm=torch.rand(cfg.hidden_size, generator=g) + 0.5,
                           lm_head=torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) / math.sqrt(cfg.hidden_size))


def check_06_forward(my_forward) -> Checked:
    """`my_forward(input_ids, weights, cfg, caches)`: input_ids `[B, T]` -> logits `[B, T, vocab]`;
    caches: one dict per layer, kept between calls."""
    label = "build: forward"
    cfg = small_config()
    weights = random_weights(cfg, 62)
    g = _gen(63)
    lengths = [5, 1, 2]
    ids = [torch.randint(0, cfg.vocab_size, (2, n), generator=g) for n in lengths]
    caches = {"learner": [{} for _ in range(cfg.num_hidden_layers)],
              "reference": [{} for _ in range(cfg.num_hidden_layers)],
              "no_norm": [{} for _ in range(cfg.num_hidden_layers)]}

    def without_final_norm(i):
        h = weights.embed_tokens[ids[i]]
        for layer, cache in zip(weights.layers, caches["no_norm"]):
            h = naive.decoder_layer(h, layer, cfg, cache)
        return h @ weights.lm_head.T

    report = _run_chunks(label, my_forward, list(zip(_chunk_names(lengths), ids)),
                         lambda i: (ids[i].clone(), weights, cfg, caches["learner"]),
                         lambda i: naive.forward(ids[i], weights, cfg, caches["reference"]),
                         [("the final RMSNorm (`weights.norm`) before lm_head is missing", without_final_norm)],
                         what="my_forward")
    if report is not None:
        return report
    return correct(f"{label}: correct — a prefill and two later chunks agree with the naive model "
                             f"({cfg.num_hidden_layers} layers, random weights)")


def model_weights(model) -> SimpleNamespace:
    """A Mixtral's tensors, named like the checkpoint: embed_tokens `[V, H]`, norm `[H]`, lm_head `[V, H]`,
    and layers[i] with input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm,
    gate `[E, H]` and the experts stacked, w1 and w3 `[E, I, H]`, w2 `[E, H, I]`."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config

    def experts(i, name):
        stacked = f"layers.{i}.block_sparse_moe.experts.{name}"
        if stacked in state:
            return state[stacked]
        return torch.stack([state[f"layers.{i}.block_sparse_moe.experts.{e}.{name}.weight"]
                            for e in range(cfg.num_local_experts)])

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        layers.append(SimpleNamespace(
            input_layernorm=state[p + "input_layernorm.weight"],
            q_proj=state[p + "self_attn.q_proj.weight"], k_proj=state[p + "self_attn.k_proj.weight"],
            v_proj=state[p + "self_attn.v_proj.weight"], o_proj=state[p + "self_attn.o_proj.weight"],
            post_attention_layernorm=state[p + "post_attention_layernorm.weight"],
            gate=state[p + "block_sparse_moe.gate.weight"],
            w1=experts(i, "w1"), w2=experts(i, "w2"), w3=experts(i, "w3")))
    return SimpleNamespace(embed_tokens=state["embed_tokens.weight"], layers=layers, norm=state["norm.weight"],
                           lm_head=state["lm_head.weight"])


PARTS_06 = ["my_rms_norm", "my_rope", "my_attention", "my_attention_layer", "my_expert", "my_router",
            "my_dispatch", "my_decoder_layer", "my_forward"]


def check_06_payoff(parts: dict, model, prompt: list[int], new_tokens: int = 20) -> Checked:
    """The payoff: the learner's `my_forward` (built from all of PARTS_06) runs `model`'s weights and
    must pick the same greedy tokens as the package's `generate(model, prompt, new_tokens)`.
    parts: the notebook's globals() (or any dict holding the parts)."""
    label = "payoff"
    missing = [name for name in PARTS_06 if blank_function(parts.get(name))]
    if missing:
        return Checked(False, f"{label}: not attempted yet — still to fill in: {', '.join(missing)}")
    from ..inference.generate import generate

    want = generate(model, list(prompt), new_tokens, eos_id=None)
    weights, cfg = model_weights(model), model.config
    caches = [{} for _ in range(cfg.num_hidden_layers)]
    ids, got = torch.tensor([list(prompt)]), []
    with torch.no_grad(), switched_off(_MODEL + ["mixtral_edu.inference.generate"],
                                       _NORM_SHORTCUTS + _ATTENTION_SHORTCUTS):
        for step in range(new_tokens):
            logits = call(label, f"step {step}", parts["my_forward"], ids, weights, cfg, caches)
            require(isinstance(logits, torch.Tensor) and logits.shape[:2] == ids.shape,
                    f"{label}: my_forward should return logits [batch, seq, vocab]")
            got.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[got[-1]]])
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise WrongAnswer(f"{label}: your model agrees for {first} token(s), then picks another one; check each "
                          "part's exercise, then how my_forward passes the caches from step to step")
    return correct(f"{label}: correct — your Mixtral, every part written by you, runs the trained model's weights and picks "
                   f"the same {new_tokens} greedy tokens as the package's model")


# ------------------------------------------------------------------------------------- 08 top-p
def check_08_top_p(my_top_p) -> Checked:
    """`my_top_p(probs, p)`: probs `[V]` -> `[V]`: keep the most likely tokens, in order, until their mass
    reaches p (the token that crosses p is kept), zero the rest, renormalise."""
    label = "build: top-p"
    g = _gen(80)

    def probs(V, scale=2.0):
        return torch.softmax(torch.randn(V, generator=g) * scale, 0)

    cases = [("10 tokens, p = 0.5", (probs(10), 0.5)), ("50 tokens, p = 0.9", (probs(50), 0.9)),
             ("p below the top token's probability", (probs(20, 3.0), 0.01)),
             ("the crossing token is kept", (torch.tensor([0.1, 0.5, 0.15, 0.25]), 0.6))]

    def strict(p_, top):                 # drops the token that crosses p
        order = torch.argsort(p_, descending=True)
        keep = torch.zeros_like(p_)
        mass = 0.0
        for i in order.tolist():
            if mass + float(p_[i]) > top:
                break
            keep[i], mass = p_[i], mass + float(p_[i])
        return keep / keep.sum() if keep.sum() > 0 else keep

    wrongs = [("the token that crosses p is kept too (so at least one token always survives)", strict),
              ("the kept probabilities must be renormalised to sum to 1",
               lambda p_, top: naive.top_p(p_, top) * p_[naive.top_p(p_, top) > 0].sum())]
    return _run(label, my_top_p, cases, naive.top_p, ["mixtral_edu.inference.generate"], (), wrongs, what="my_top_p",
                done=f"{label}: correct — {len(cases)} cases agree with the reference, without "
                "next_token_probs")


# ------------------------------------------------------------------------ 09 the load-balancing loss
_BALANCING_OFF = ["mixtral_edu.training.losses", "mixtral_edu.training.train", "mixtral_edu.analysis.routing", _HF]


def _balancing_variant(logits, k, P="softmax", f="top-k", scale="E"):
    """Known mistakes, for hints: P from the renormalised top-k weights ("chosen") or the raw logits;
    f counting first choices only ("first"), or the probabilities ("probs"); scale 1, E*T or E*T*T (one
    or both of f and P summed over the tokens, not averaged) or E/k (the Switch normalisation)."""
    T, E = logits.shape
    probs = torch.softmax(logits.double(), -1)
    ids = torch.topk(logits, k, -1).indices
    if P == "chosen":
        mean_p = torch.zeros(T, E, dtype=torch.float64).scatter(1, ids, torch.softmax(
            logits.double().gather(1, ids), -1)).mean(0)
    else:
        mean_p = probs.mean(0) if P == "softmax" else logits.double().mean(0)
    picks = ids[:, :1] if f == "first" else ids
    fraction = probs.mean(0) if f == "probs" else torch.zeros(E, dtype=torch.float64).index_add_(
        0, picks.reshape(-1), torch.ones(picks.numel(), dtype=torch.float64)) / T
    factor = {"E": E, "1": 1, "E*T": E * T, "E*T*T": E * T * T, "E/k": E / k}[scale]
    return (factor * (fraction * mean_p).sum()).to(logits.dtype)


def check_09_balancing_loss(my_balancing_loss) -> Checked:
    """`my_balancing_loss(logits, k)`: one layer's router logits `[T, E]` -> a 0-dim tensor E·Σ_e f_e·P_e in
    Hugging Face's normalisation: f_e = (tokens with e among their top k) / T, P_e = mean over tokens of
    the softmax over all E experts. The gradient must reach `logits` (through P: f is a count)."""
    label = "build: load-balancing loss"
    wrongs = [
        ("P_e averages the softmax over all E experts, not the router's weights renormalised over the chosen k",
         lambda lg, k: _balancing_variant(lg, k, P="chosen")),
        ("the factor E (the number of experts) is missing", lambda lg, k: _balancing_variant(lg, k, scale="1")),
        ("f counts all k picks of every token, not only its first choice",
         lambda lg, k: _balancing_variant(lg, k, f="first")),
        *[("f and P are means over the T tokens: divide the counts and the summed probabilities by T",
           lambda lg, k, s=s: _balancing_variant(lg, k, scale=s)) for s in ("E*T", "E*T*T")],
        ("that is the Switch normalisation (f sums to 1); here f_e = picks / T, so f sums to k and a balanced "
         "router costs k", lambda lg, k: _balancing_variant(lg, k, scale="E/k")),
        ("f counts the top-k picks; it is not the softmax probability", lambda lg, k: _balancing_variant(lg, k, f="probs")),
        ("P averages the softmax probabilities, not the raw logits", lambda lg, k: _balancing_variant(lg, k, P="logits")),
    ]
    cases = _router_cases()                       # the router's edge cases: its logits are what the loss sees
    report = _run(label, my_balancing_loss, cases, naive.load_balancing_loss, _BALANCING_OFF, (), wrongs,
                  what="my_balancing_loss", done="checked")
    if not report:
        return report
    case = "the gradient, 10 tokens, top-2 of 8"
    logits = torch.randn(10, 8, generator=_gen(91)).requires_grad_()
    with switched_off(_BALANCING_OFF):
        loss = call(label, case, my_balancing_loss, logits, 2)
        require(isinstance(loss, torch.Tensor) and loss.requires_grad,
                f"{label}, case '{case}': no gradient reaches the logits: compute P from them with tensor "
                "operations (no .item(), .tolist(), .detach() or torch.no_grad())")
        call(label, case, lambda: loss.sum().backward())
    require(logits.grad is not None, f"{label}, case '{case}': no gradient reaches the logits")
    compare(label, case, logits.grad, naive.load_balancing_loss_grad(logits.detach(), 2), TOL,
            [("the gradient must flow through P only: f is a count of the top-k picks, a constant",
              torch.zeros_like(logits))])
    return correct(f"{label}: correct — {len(cases)} cases (k = 1, one token, every token picking one expert, "
                   "top-3 of 4) and the gradient agree with the naive reference, without the package's or "
                   "transformers' loss")


# ------------------------------------------------------------------------------ 11 expert cache
def _fifo_hit_rates(expert_ids, slots):
    """A mistake, for the hint: first in, first out (a hit does not make an expert recent)."""
    rates = []
    for layer in expert_ids:
        loaded, hits = [], 0
        for expert in layer.flatten().tolist():
            hits += expert in loaded
            if expert not in loaded:
                loaded = (loaded + [expert])[-slots:]
        rates.append(hits / layer.numel())
    return torch.tensor(rates, dtype=torch.float64)


def check_11_cache_hit_rates(my_hit_rates) -> Checked:
    """`my_hit_rates(expert_ids, slots)`: expert_ids `[L, T, k]` -> hit rate per layer `[L]` of a
    least-recently-used cache of `slots` experts per layer (empty at first; first choice looked up first)."""
    label = "build: expert cache hit rate"
    g = _gen(110)
    trace = torch.stack([torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)]) for _ in range(3)])
    skewed = torch.stack([torch.stack([torch.tensor([int(torch.randint(0, 3, (1,), generator=g)), 3 + t % 5])
                                       for t in range(25)]) for _ in range(2)])
    same = torch.tensor([[[4, 6]] * 10, [[1, 2]] * 10])
    cases = [("3 layers, 4 slots of 8 experts", (trace, 4)), ("skewed routing, 3 slots", (skewed, 3)),
             ("one slot, top-2", (trace, 1)), ("as many slots as experts", (trace, 8)),
             ("every token picks the same two experts", (same, 2)), ("one token", (trace[:, :1], 2))]
    wrongs = [("a hit must make the expert the most recently used (that is LRU, not first-in first-out)", _fifo_hit_rates),
              ("each layer has its own cache", lambda ids, slots: naive.cache_hit_rates(
                  ids.reshape(1, -1, ids.shape[-1]), slots).expand(ids.shape[0]))]
    return _run(label, my_hit_rates, cases, naive.cache_hit_rates, ["mixtral_edu.inference.offload"], (), wrongs,
                tol=1e-6, what="my_hit_rates",
                done=f"{label}: correct — {len(cases)} traces (one slot, all experts cached, one token, every token on "
                "the same experts) give the reference's hit rates, without the package's cache")


# ------------------------------------------------------------------------- 12 the count exchange
def _count_cases():
    from ..parallel.expert_parallel import expert_ranges        # which rank holds which experts: given, not asked

    g = _gen(120)

    def routed(T, k, experts=range(8)):
        experts = torch.tensor(list(experts))
        return torch.stack([experts[torch.randperm(len(experts), generator=g)[:k]] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.long)

    return [("2 ranks of 4 experts, top-2", ([routed(7, 2), routed(5, 2)], expert_ranges(8, 2))),
            ("3 ranks holding 3, 3 and 2 experts", ([routed(6, 2), routed(9, 2), routed(4, 2)], expert_ranges(8, 3))),
            ("a rank with no tokens", ([routed(5, 2), routed(0, 2), routed(3, 2)], expert_ranges(8, 3))),
            ("every token routed to rank 1's experts", ([routed(6, 2, range(4, 8)), routed(4, 2, range(4, 8))],
                                                        expert_ranges(8, 2))),
            ("k = 1 on 4 ranks", ([routed(5, 1) for _ in range(4)], expert_ranges(8, 4))),
            ("8 ranks of one expert each", ([routed(3, 2) for _ in range(8)], expert_ranges(8, 8)))]


def _compare_counts(label: str, case: str, got, want: list, diagnoses=()) -> None:
    """Whole-number tensors, one per rank, equal to `want`; a known mistake gets its hint. No number is shown."""
    require(isinstance(got, (list, tuple)) and len(got) == len(want),
            f"{label}, case '{case}': expected a list with one tensor per rank ({len(want)})")
    for s, (g_s, w_s) in enumerate(zip(got, want)):
        require(isinstance(g_s, torch.Tensor) and not g_s.is_floating_point() and not g_s.is_complex(),
                f"{label}, case '{case}': rank {s}'s counts must be a tensor of whole numbers (an integer dtype)")
        require(tuple(g_s.shape) == tuple(w_s.shape),
                f"{label}, case '{case}': rank {s}'s counts must have one row per sending rank and one column per "
                f"expert it holds: shape {tuple(w_s.shape)}, got {tuple(g_s.shape)}")
    if all(torch.equal(g_s.long(), w_s) for g_s, w_s in zip(got, want)):
        return
    for hint, wrong in diagnoses:
        if all(torch.equal(g_s.long(), w_s) for g_s, w_s in zip(got, wrong)):
            raise WrongAnswer(f"{label}, case '{case}': {hint}")
    bad = next(s for s, (g_s, w_s) in enumerate(zip(got, want)) if not torch.equal(g_s.long(), w_s))
    raise WrongAnswer(f"{label}, case '{case}': the counts rank {bad} receives are not the rows routed to its experts")


def check_12_count_exchange(my_count_exchange) -> Checked:
    """`my_count_exchange(expert_ids, ranges)`: expert_ids a list of one `[T_r, k]` tensor per rank r (the
    experts its router chose for its tokens), ranges each rank's experts as (start, stop) -> a list of one
    integer tensor per rank s, `[world, stop_s - start_s]`: entry [r, j] is the number of (token, slot) rows
    rank r sends to expert start_s + j, i.e. what the count all-to-all delivers to rank s."""
    label = "build: the count exchange"
    if blank_function(my_count_exchange):
        return not_attempted(label, "the body of `my_count_exchange`")
    cases = _count_cases()
    for name, (ids, ranges) in cases:
        want = naive.count_exchange(ids, ranges)
        first_only = naive.count_exchange([i[:, :1] for i in ids], ranges)
        own_zeroed = [w.clone().index_fill_(0, torch.tensor([s]), 0) for s, w in enumerate(want)]
        with switched_off(["mixtral_edu.parallel.expert_parallel"]):
            got = call(label, name, my_count_exchange, [i.clone() for i in ids], list(ranges))
        if got is None:
            return not_attempted(label, "the body of `my_count_exchange` (it returned None)")
        _compare_counts(label, name, got, want, [
            ("count every slot: a token sends one row to each of its k experts, not only to its first choice",
             first_only),
            ("a rank's rows for its own experts are counted too (all_to_all_single copies that chunk locally, "
             "but it is part of the exchange)", own_zeroed)])
    return correct(f"{label}: correct — {len(cases)} cases (uneven expert blocks, a rank with no tokens, every token "
                   "on one rank, k = 1, one expert per rank) deliver the reference's counts, without the package's "
                   "expert-parallel code")
