"""The build-it-yourself checkers (mixtral_edu/course/build.py): each accepts a worked solution and
refuses its output times 1.01, a zero output, the known shortcut (the package's or PyTorch's own
implementation) and at least two plausible mistakes, naming the case and the mistake."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from mixtral_edu.course import build, naive
from mixtral_edu.course.checking import WrongAnswer, blank_function, switched_off
from mixtral_edu.model import norm as package_norm

# ------------------------------------------------------------------ worked solutions (as in notebooks/solutions)


def sol_rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sol_rope(x, start, theta):
    d, T = x.shape[-1], x.shape[-2]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(start, start + T, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + half * sin


def sol_attention(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
    return torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v


def sol_attention_layer(x, layer, cfg, cache):
    B, T, _ = x.shape
    start = 0 if cache.get("k") is None else cache["k"].shape[2]

    def heads(t, n):
        return t.view(B, T, n, -1).transpose(1, 2)

    q = sol_rope(heads(x @ layer.q_proj.T, cfg.num_attention_heads), start, cfg.rope_theta)
    k = sol_rope(heads(x @ layer.k_proj.T, cfg.num_key_value_heads), start, cfg.rope_theta)
    v = heads(x @ layer.v_proj.T, cfg.num_key_value_heads)
    if cache.get("k") is not None:
        k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    cache["k"], cache["v"] = k, v
    return sol_attention(q, k, v).transpose(1, 2).reshape(B, T, -1) @ layer.o_proj.T


def sol_expert(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def sol_router(logits, k):
    top, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(top, -1), ids


def sol_dispatch(x, weights, expert_ids, experts):
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(expert_ids == e)
        if len(token):
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
    return out


def sol_decoder_layer(x, layer, cfg, cache):
    h = x + sol_attention_layer(sol_rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps), layer, cfg, cache)
    y = sol_rms_norm(h, layer.post_attention_layernorm, cfg.rms_norm_eps).reshape(-1, h.shape[-1])
    weights, ids = sol_router(y @ layer.gate.T, cfg.num_experts_per_tok)
    experts = [lambda t, e=e: sol_expert(t, layer.w1[e], layer.w2[e], layer.w3[e]) for e in range(len(layer.w1))]
    return h + sol_dispatch(y, weights, ids, experts).reshape(h.shape)


def sol_forward(input_ids, weights, cfg, caches):
    h = weights.embed_tokens[input_ids]
    for layer, cache in zip(weights.layers, caches):
        h = sol_decoder_layer(h, layer, cfg, cache)
    return sol_rms_norm(h, weights.norm, cfg.rms_norm_eps) @ weights.lm_head.T


def sol_top_p(probs, p):
    sorted_p, order = torch.sort(probs, descending=True)
    keep = (torch.cumsum(sorted_p, 0) - sorted_p) < p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def sol_balancing_loss(logits, k):
    T, E = logits.shape
    picks = torch.topk(logits, k, dim=-1).indices                       # [T, k]
    f = torch.bincount(picks.reshape(-1), minlength=E) / T               # sums to k
    P = torch.softmax(logits, dim=-1).mean(dim=0)                        # sums to 1
    return E * (f * P).sum()


def scaled(fn, factor):
    def wrapped(*args):
        out = fn(*args)
        if isinstance(out, tuple):
            return (out[0] * factor,) + tuple(out[1:])
        return out * factor
    return wrapped


SOLUTIONS = {build.check_02_rms_norm: sol_rms_norm, build.check_02_rope: sol_rope,
             build.check_03_attention: sol_attention, build.check_03_attention_layer: sol_attention_layer,
             build.check_04_expert: sol_expert, build.check_05_router: sol_router,
             build.check_05_dispatch: sol_dispatch, build.check_06_decoder_layer: sol_decoder_layer,
             build.check_06_forward: sol_forward, build.check_08_top_p: sol_top_p,
             build.check_09_balancing_loss: sol_balancing_loss}
CHECKS = list(SOLUTIONS)
IDS = [c.__name__ for c in CHECKS]


@pytest.mark.parametrize("check", CHECKS, ids=IDS)
def test_solution_passes(check):
    result = check(SOLUTIONS[check])
    assert result and ": correct —" in repr(result)


@pytest.mark.parametrize("check", CHECKS, ids=IDS)
def test_output_times_1_01_and_zero_are_refused(check):
    with pytest.raises(WrongAnswer):
        check(scaled(SOLUTIONS[check], 1.01))
    with pytest.raises(WrongAnswer):
        check(scaled(SOLUTIONS[check], 0.0))


@pytest.mark.parametrize("check", CHECKS, ids=IDS)
def test_blank_is_not_attempted(check):
    def blank(*args):
        ...

    def documented_blank(*args):
        """Your answer here."""
        pass

    for answer in (blank, documented_blank, ..., None):
        result = check(answer)
        assert not result and "not attempted yet" in repr(result)


def test_blank_function_detection():
    def filled(x):
        return x

    assert blank_function(...) and not blank_function(filled) and not blank_function(lambda x: x)


# --------------------------------------------------------------------------- mistakes and shortcuts, one by one
def test_rms_norm_mistakes_and_shortcuts():
    check = build.check_02_rms_norm
    with pytest.raises(WrongAnswer, match="eps is missing"):
        check(lambda x, w, eps: w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True)))
    with pytest.raises(WrongAnswer, match="LayerNorm"):
        check(lambda x, w, eps: sol_rms_norm(x - x.mean(-1, keepdim=True), w, eps))
    with pytest.raises(WrongAnswer, match="weight"):
        check(lambda x, w, eps: sol_rms_norm(x, torch.ones_like(w), eps))
    for shortcut in (lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
                     lambda x, w, eps: torch.rms_norm(x, (x.shape[-1],), w, eps),
                     lambda x, w, eps: package_norm.rms_norm(x, w, eps),
                     lambda x, w, eps: torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)[0] * w,
                     lambda x, w, eps: torch.nn.RMSNorm(x.shape[-1], eps)(x) * w):
        with pytest.raises(WrongAnswer, match="switched off"):
            check(shortcut)


def test_rms_norm_shortcut_imported_before_the_check_is_refused():
    from mixtral_edu.model.norm import rms_norm   # bound before the check, as a notebook's import is
    with pytest.raises(WrongAnswer, match="switched off"):
        build.check_02_rms_norm(lambda x, w, eps: rms_norm(x, w, eps))
    x = torch.randn(2, 4)
    assert torch.allclose(rms_norm(x, torch.ones(4), 1e-5), naive.rms_norm(x, torch.ones(4), 1e-5), atol=1e-6)


def test_rope_mistakes_and_shortcut():
    from mixtral_edu.model.rope import apply_rope, rope_cos_sin

    check = build.check_02_rope
    with pytest.raises(WrongAnswer, match="interleaved"):
        check(build._interleaved)
    with pytest.raises(WrongAnswer, match="start"):
        check(lambda x, start, theta: sol_rope(x, 0, theta))
    with pytest.raises(WrongAnswer, match="wrong way"):
        check(build._backwards)

    def package(x, start, theta):
        cos, sin = rope_cos_sin(x.shape[-1], start + x.shape[2], theta)
        return apply_rope(x, cos[start:], sin[start:])

    with pytest.raises(WrongAnswer, match="switched off"):
        check(package)


def test_attention_mistakes_and_shortcut():
    check = build.check_03_attention
    with pytest.raises(WrongAnswer, match="mask is missing"):
        check(lambda q, k, v: build._attention_variant(q, k, v, mask="none"))
    with pytest.raises(WrongAnswer, match="ignores the cache"):
        check(lambda q, k, v: build._attention_variant(q, k, v, mask="top_left"))
    with pytest.raises(WrongAnswer, match="repeat_interleave"):
        check(lambda q, k, v: build._attention_variant(q, k, v, groups="tile"))
    with pytest.raises(WrongAnswer, match="sqrt"):
        check(lambda q, k, v: build._attention_variant(q, k, v, scale=False))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    with pytest.raises(WrongAnswer, match="switched off"):
        check(sdpa)


def test_attention_layer_mistakes():
    check = build.check_03_attention_layer

    def restarts(x, layer, cfg, cache):
        past = cache.get("k")
        fresh = {}
        out = sol_attention_layer(x, layer, cfg, fresh)           # rotated from 0, attends to itself only
        cache["k"] = fresh["k"] if past is None else torch.cat([past, fresh["k"]], 2)
        cache["v"] = fresh["v"] if past is None else torch.cat([cache["v"], fresh["v"]], 2)
        return out

    with pytest.raises(WrongAnswer, match="cached keys"):
        check(restarts)
    with pytest.raises(WrongAnswer, match="real positions"):
        check(lambda x, layer, cfg, cache: build._attention_restarting_positions(x, layer, cfg, cache))


def test_expert_mistakes_and_shortcut():
    from mixtral_edu.model.experts import swiglu_expert

    check = build.check_04_expert
    with pytest.raises(WrongAnswer, match="w1"):
        check(lambda x, w1, w2, w3: sol_expert(x, w3, w2, w1))
    with pytest.raises(WrongAnswer, match="ReLU"):
        check(lambda x, w1, w2, w3: (torch.relu(x @ w1.T) * (x @ w3.T)) @ w2.T)
    with pytest.raises(WrongAnswer, match="w3"):
        check(lambda x, w1, w2, w3: F.silu(x @ w1.T) @ w2.T)
    with pytest.raises(WrongAnswer, match="switched off"):
        check(lambda x, w1, w2, w3: swiglu_expert(x, w1, w2, w3))


def test_router_mistakes_and_shortcut():
    from mixtral_edu.model.router import route

    check = build.check_05_router

    def all_eight(logits, k):                       # softmax over all experts, not renormalised
        probs = torch.softmax(logits, -1)
        return torch.topk(probs, k, -1)

    with pytest.raises(WrongAnswer, match="renormalise"):
        check(all_eight)
    with pytest.raises(WrongAnswer, match="wrong order"):
        check(lambda logits, k: tuple(t.flip(-1) for t in sol_router(logits, k)))
    with pytest.raises(WrongAnswer, match="largest logits"):
        check(lambda logits, k: torch.topk(logits, k, -1, largest=False))
    with pytest.raises(WrongAnswer, match="switched off"):
        check(route)


def test_dispatch_mistakes_and_shortcut():
    check = build.check_05_dispatch

    def per_token(x, weights, ids, experts):          # right numbers, but no grouping
        return torch.stack([sum(w * experts[int(e)](x[t:t + 1])[0] for w, e in zip(weights[t], ids[t]))
                            for t in range(x.shape[0])])

    def unweighted(x, weights, ids, experts):
        return sol_dispatch(x, torch.ones_like(weights), ids, experts)

    def first_only(x, weights, ids, experts):
        return sol_dispatch(x, weights[:, :1], ids[:, :1], experts)

    def overwrite(x, weights, ids, experts):
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            token, slot = torch.where(ids == e)
            if len(token):
                out[token] = expert(x[token]) * weights[token, slot, None]
        return out

    with pytest.raises(WrongAnswer, match="ran 2 times|ran [0-9]+ times"):
        check(per_token)
    with pytest.raises(WrongAnswer, match="weights are dropped"):
        check(unweighted)
    with pytest.raises(WrongAnswer, match="first choice"):
        check(first_only)
    with pytest.raises(WrongAnswer):
        check(overwrite)

    def package(x, weights, ids, experts):
        from mixtral_edu.model import moe
        fn = next(v for n, v in vars(moe).items() if n.startswith("dispatch") and callable(v))
        return fn(experts, x, weights, ids)

    with pytest.raises(WrongAnswer, match="switched off"):
        check(package)


def test_decoder_layer_mistakes():
    check = build.check_06_decoder_layer

    def no_residual(x, layer, cfg, cache):
        return sol_decoder_layer(x, layer, cfg, cache) - x - sol_attention_layer(
            sol_rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps), layer, cfg, {"k": None})

    def no_weights(x, layer, cfg, cache):
        h = x + sol_attention_layer(sol_rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps), layer, cfg, cache)
        y = sol_rms_norm(h, layer.post_attention_layernorm, cfg.rms_norm_eps).reshape(-1, h.shape[-1])
        weights, ids = sol_router(y @ layer.gate.T, cfg.num_experts_per_tok)
        experts = [lambda t, e=e: sol_expert(t, layer.w1[e], layer.w2[e], layer.w3[e]) for e in range(len(layer.w1))]
        return h + sol_dispatch(y, torch.ones_like(weights), ids, experts).reshape(h.shape)

    with pytest.raises(WrongAnswer):
        check(no_residual)
    with pytest.raises(WrongAnswer):
        check(no_weights)
    from mixtral_edu.model.norm import rms_norm

    def package_norm_inside(x, layer, cfg, cache):
        h = x + sol_attention_layer(rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps), layer, cfg, cache)
        return h

    with pytest.raises(WrongAnswer, match="switched off"):
        check(package_norm_inside)


def test_forward_mistakes():
    check = build.check_06_forward

    def no_final_norm(input_ids, weights, cfg, caches):
        h = weights.embed_tokens[input_ids]
        for layer, cache in zip(weights.layers, caches):
            h = sol_decoder_layer(h, layer, cfg, cache)
        return h @ weights.lm_head.T

    def no_cache(input_ids, weights, cfg, caches):
        return sol_forward(input_ids, weights, cfg, [{} for _ in caches])

    with pytest.raises(WrongAnswer, match="final RMSNorm"):
        check(no_final_norm)
    with pytest.raises(WrongAnswer):
        check(no_cache)


def test_top_p_mistakes_and_shortcut():
    from mixtral_edu.inference.generate import next_token_probs

    check = build.check_08_top_p

    def strict(probs, p):
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) <= p
        keep[0] = True
        out = torch.zeros_like(probs)
        out[order[keep]] = sorted_p[keep]
        return out / out.sum()

    with pytest.raises(WrongAnswer, match="crosses"):
        check(strict)
    with pytest.raises(WrongAnswer, match="renormalised"):
        check(lambda probs, p: sol_top_p(probs, p) * probs[sol_top_p(probs, p) > 0].sum())
    with pytest.raises(WrongAnswer, match="switched off"):
        check(lambda probs, p: next_token_probs(probs.log(), top_p=p))


def test_balancing_loss_mistakes_and_shortcuts():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mixtral_edu.training.losses import load_balancing_loss
    from mixtral_edu.training.train import balance_loss

    check = build.check_09_balancing_loss

    def over_the_chosen(logits, k):            # P from the router's weights, renormalised over the top k
        top, ids = torch.topk(logits, k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, ids, torch.softmax(top, -1))
        return logits.shape[1] * (torch.bincount(ids.reshape(-1), minlength=logits.shape[1]) / len(logits)
                                  * weights.mean(0)).sum()

    def sums(logits, k):                       # sums over the tokens, not means
        picks = torch.topk(logits, k, dim=-1).indices
        return logits.shape[1] * (torch.bincount(picks.reshape(-1), minlength=logits.shape[1])
                                  * torch.softmax(logits, -1).sum(0)).sum()

    def detached(logits, k):
        return sol_balancing_loss(logits.detach(), k)

    for answer, hint in [(over_the_chosen, "renormalised over the chosen k"),
                         (lambda logits, k: sol_balancing_loss(logits, k) / logits.shape[1], "factor E"),
                         (lambda logits, k: sol_balancing_loss(logits, 1), "not only its first choice"),
                         (sums, "means over the T tokens"),
                         (lambda logits, k: sol_balancing_loss(logits, k) / k, "Switch normalisation"),
                         (lambda logits, k: logits.shape[1] * (torch.softmax(logits, -1).mean(0) ** 2).sum(),
                          "not the softmax probability"),
                         (lambda logits, k: logits.shape[1] * (torch.bincount(torch.topk(logits, k).indices.reshape(-1),
                                                                               minlength=logits.shape[1])
                                                               / len(logits) * logits.mean(0)).sum(), "raw logits"),
                         (detached, "no gradient reaches the logits")]:
        with pytest.raises(WrongAnswer, match=hint) as info:
            check(answer)
        assert "case '" in str(info.value)                                  # the hint names the failed case
    for shortcut in (load_balancing_loss, lambda logits, k: balance_loss([logits], k),
                     lambda logits, k: load_balancing_loss_func((logits,), num_experts=logits.shape[1], top_k=k)):
        with pytest.raises(WrongAnswer, match="switched off"):
            check(shortcut)
    assert load_balancing_loss(torch.zeros(4, 8), 2).item() > 0                  # restored after the check


def test_balancing_loss_report_shows_no_number():
    report = repr(build.check_09_balancing_loss(sol_balancing_loss))
    assert not re.search(r"\d\.\d", report), report


def test_switched_off_restores_everything():
    from mixtral_edu.model.norm import RMSNorm, rms_norm

    x = torch.randn(3, 8)
    before = (rms_norm(x, torch.ones(8), 1e-5), F.rms_norm(x, (8,)), RMSNorm(8)(x))
    with switched_off(["mixtral_edu.model.norm"], [(F, "rms_norm")]):
        with pytest.raises(RuntimeError, match="switched off"):
            rms_norm(x, torch.ones(8), 1e-5)
        with pytest.raises(RuntimeError, match="switched off"):
            F.rms_norm(x, (8,))
    after = (rms_norm(x, torch.ones(8), 1e-5), F.rms_norm(x, (8,)), RMSNorm(8)(x))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------------------------------ the payoff
@pytest.fixture(scope="module")
def tiny_trained():
    from pathlib import Path

    from mixtral_edu.weights import load_model
    folder = Path(__file__).resolve().parent.parent / "data" / "tiny-mixtral"
    return load_model(folder)


def test_payoff_with_the_solutions(tiny_trained):
    parts = {"my_rms_norm": sol_rms_norm, "my_rope": sol_rope, "my_attention": sol_attention,
             "my_attention_layer": sol_attention_layer, "my_expert": sol_expert, "my_router": sol_router,
             "my_dispatch": sol_dispatch, "my_decoder_layer": sol_decoder_layer, "my_forward": sol_forward}
    prompt = [1, 415, 2936, 9060, 285, 1142]
    assert build.check_06_payoff(parts, tiny_trained, prompt, 12)
    missing = dict(parts, my_rope=lambda x, start, theta: ...)
    missing["my_rope"] = _blank_rope
    result = build.check_06_payoff(missing, tiny_trained, prompt, 12)
    assert not result and "my_rope" in repr(result) and "my_forward" not in repr(result)
    broken = dict(parts, my_forward=lambda ids, w, cfg, caches: sol_forward(ids, w, cfg, [{} for _ in caches]))
    with pytest.raises(WrongAnswer, match="agrees for"):
        build.check_06_payoff(broken, tiny_trained, prompt, 12)


def _blank_rope(x, start, theta):
    ...


def test_model_weights_follow_the_model(tiny_trained):
    w = build.model_weights(tiny_trained)
    cfg = tiny_trained.config
    assert len(w.layers) == cfg.num_hidden_layers
    assert w.layers[0].w1.shape == (cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size)
    ids = torch.tensor([[1, 415, 2936]])
    with torch.no_grad():
        ours = naive.forward(ids, w, cfg, [{} for _ in range(cfg.num_hidden_layers)])
        package = tiny_trained(ids)
    assert (ours - package).abs().max() < 1e-4


def sol_hit_rates(expert_ids, slots):
    from collections import OrderedDict

    rates = []
    for layer in expert_ids:                      # [T, k]; row-major order is first choice first
        cache, hits = OrderedDict(), 0
        for e in layer.flatten().tolist():
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
                if len(cache) > slots:
                    cache.popitem(last=False)
        rates.append(hits / layer.numel())
    return torch.tensor(rates)


def test_expert_cache_checker():
    check = build.check_11_cache_hit_rates
    assert check(sol_hit_rates)
    for factor in (1.01, 0.0):
        with pytest.raises(WrongAnswer):
            check(scaled(sol_hit_rates, factor))
    with pytest.raises(WrongAnswer, match="LRU"):
        check(build._fifo_hit_rates)
    with pytest.raises(WrongAnswer, match="own cache"):
        check(lambda ids, slots: sol_hit_rates(ids.reshape(1, -1, ids.shape[-1]), slots).expand(ids.shape[0]))
    with pytest.raises(WrongAnswer):                          # counts the first choice only
        check(lambda ids, slots: sol_hit_rates(ids[..., :1], slots))
    assert not check(_blank_rope)


def sol_count_exchange(expert_ids, ranges):
    E = ranges[-1][1]
    counts = torch.stack([torch.bincount(ids.reshape(-1), minlength=E) for ids in expert_ids])   # [world, E]
    return [counts[:, start:stop] for start, stop in ranges]


def test_count_exchange_checker():
    from mixtral_edu.parallel import expert_parallel as ep

    check = build.check_12_count_exchange
    result = check(sol_count_exchange)
    assert result and ": correct —" in repr(result)
    for factor in (1.01, 0.0):
        with pytest.raises(WrongAnswer):
            check(lambda ids, ranges: [t * factor for t in sol_count_exchange(ids, ranges)])
    with pytest.raises(WrongAnswer, match="whole numbers"):
        check(lambda ids, ranges: [t.double() for t in sol_count_exchange(ids, ranges)])
    with pytest.raises(WrongAnswer, match="count every slot"):
        check(lambda ids, ranges: sol_count_exchange([i[:, :1] for i in ids], ranges))
    with pytest.raises(WrongAnswer, match="own experts are counted too"):
        check(lambda ids, ranges: [t.index_fill(0, torch.tensor([s]), 0)
                                   for s, t in enumerate(sol_count_exchange(ids, ranges))])
    with pytest.raises(WrongAnswer, match="not the rows routed to its experts"):      # sender and receiver swapped
        check(lambda ids, ranges: [t.flip(0) for t in sol_count_exchange(ids, ranges)])
    with pytest.raises(WrongAnswer, match="switched off"):                            # the package's own ranges
        check(lambda ids, ranges: sol_count_exchange(ids, ep.expert_ranges(ranges[-1][1], len(ranges))))
    assert not check(_blank_rope) and "not attempted yet" in repr(check(...))
    for answer in (sol_count_exchange, lambda ids, ranges: [t * 0 for t in sol_count_exchange(ids, ranges)]):
        try:
            message = repr(check(answer))
        except WrongAnswer as err:
            message = str(err)
        assert not re.search(r"\[\s*\d+,", message), message                         # no counts in any report
