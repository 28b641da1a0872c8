"""Naive references for the build-it-yourself exercises: what the checkers compare a learner's code with.

Written on purpose unlike the package (`mixtral_edu.model`): plain loops over tokens, heads, channel
pairs and experts, in float64, so that a mistake shared with the package cannot hide here, and so
that the checkers do not depend on the code they switch off. Slow; only for the small inputs the
checkers use. `tests/test_naive_reference.py` pins each one to the package and to transformers.

Reading this file gives the answers away: write yours first.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`[..., H]`, weight `[H]` -> `[..., H]`: each row divided by sqrt(mean square + eps), times weight."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        mean_square = sum(v * v for v in rows[r].tolist()) / rows.shape[1]
        out[r] = rows[r] / math.sqrt(mean_square + eps) * weight.double()
    return out.reshape(x.shape).to(x.dtype)


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x `[batch, heads, seq, D]`; token t sits at position start + t.

    Channel pair i is (i, i + D/2), turned by (start + t) * theta^(-2i/D).
    """
    d = x.shape[-1]
    src = x.double()
    out = src.clone()
    for t in range(x.shape[2]):
        for i in range(d // 2):
            angle = (start + t) * theta ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = src[:, :, t, i], src[:, :, t, i + d // 2]
            out[:, :, t, i] = a * c - b * s
            out[:, :, t, i + d // 2] = a * s + b * c
    return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention. q `[B, Hq, Tq, D]`; k, v `[B, Hkv, Tk, D]`, Tk >= Tq.

    The Tq queries are the last Tq of the Tk positions; query head h reads key/value head
    h // (Hq / Hkv). Returns `[B, Hq, Tq, D]`.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for t in range(Tq):
                pos = Tk - Tq + t
                scores = [float(q[b, h, t].double() @ k[b, g, j].double()) / math.sqrt(D) for j in range(pos + 1)]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                total = sum(e)
                for j in range(pos + 1):
                    out[b, h, t] += e[j] / total * v[b, g, j].double()
    return out.to(q.dtype)


def expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU: x `[T, H]`, w1 and w3 `[I, H]`, w2 `[H, I]` -> `[T, H]`, token by token."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        gate = w1.double() @ xt
        silu = torch.tensor([g / (1 + math.exp(-g)) for g in gate.tolist()], dtype=torch.float64)
        out[t] = w2.double() @ (silu * (w3.double() @ xt))
    return out.to(x.dtype)


def router(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[T, E]` -> (weights `[T, k]`, expert ids `[T, k]`), largest logit first; the weights
    are a softmax over the k chosen logits."""
    T = logits.shape[0]
    weights, ids = torch.empty(T, k, dtype=torch.float64), torch.empty(T, k, dtype=torch.long)
    for t in range(T):
        row = logits[t].tolist()
        chosen = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        e = [math.exp(row[c] - row[chosen[0]]) for c in chosen]
        for j, c in enumerate(chosen):
            weights[t, j], ids[t, j] = e[j] / sum(e), c
    return weights.float(), ids


def dispatch(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts) -> torch.Tensor:
    """Token by token: sum over its k choices of weight * experts[id](token). x `[T, H]` -> `[T, H]`."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            out[t] += float(weights[t, j]) * experts[int(expert_ids[t, j])](x[t:t + 1]).double()[0]
    return out.to(x.dtype)


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    """`[B, T, n*D]` -> `[B, n, T, D]`."""
    B, T, _ = t.shape
    return t.reshape(B, T, n, -1).transpose(1, 2)


def attention_layer(x: torch.Tensor, layer, cfg, cache: dict) -> torch.Tensor:
    """x `[B, T, H]` -> `[B, T, H]`; `cache` {"k": [B, Hkv, past, D] or None, "v": ...} gets the new
    rotated keys and values appended; the new tokens sit at positions past .. past + T - 1."""
    start = 0 if cache.get("k") is None else cache["k"].shape[2]
    q = rope(_heads(x @ layer.q_proj.T, cfg.num_attention_heads), start, cfg.rope_theta)
    k = rope(_heads(x @ layer.k_proj.T, cfg.num_key_value_heads), start, cfg.rope_theta)
    v = _heads(x @ layer.v_proj.T, cfg.num_key_value_heads)
    if cache.get("k") is not None:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    out = attention(q, k, v)
    return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ layer.o_proj.T


def sparse_moe(x: torch.Tensor, layer, cfg) -> torch.Tensor:
    """x `[B, T, H]` -> `[B, T, H]`: the router on every token, then its top-k experts, weighted."""
    flat = x.reshape(-1, x.shape[-1])
    weights, ids = router(flat @ layer.gate.T, cfg.num_experts_per_tok)
    experts = [lambda h, e=e: expert(h, layer.w1[e], layer.w2[e], layer.w3[e]) for e in range(layer.w1.shape[0])]
    return dispatch(flat, weights, ids, experts).reshape(x.shape)


def decoder_layer(x: torch.Tensor, layer, cfg, cache: dict) -> torch.Tensor:
    """Pre-norm block: h = x + attention(norm(x)); out = h + moe(norm(h)). `[B, T, H]` -> `[B, T, H]`."""
    h = x + attention_layer(rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps), layer, cfg, cache)
    return h + sparse_moe(rms_norm(h, layer.post_attention_layernorm, cfg.rms_norm_eps), layer, cfg)


def forward(input_ids: torch.Tensor, weights, cfg, caches: list) -> torch.Tensor:
    """input_ids `[B, T]` -> logits `[B, T, vocab]`; caches: one dict per layer."""
    h = weights.embed_tokens[input_ids]
    for layer, cache in zip(weights.layers, caches):
        h = decoder_layer(h, layer, cfg, cache)
    return rms_norm(h, weights.norm, cfg.rms_norm_eps) @ weights.lm_head.T


def top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """probs `[V]` -> `[V]`: keep the most likely tokens, in order, until the kept mass reaches p
    (the token that crosses p is kept), zero the rest, renormalise."""
    order = sorted(range(probs.shape[0]), key=lambda i: -float(probs[i]))
    out = torch.zeros(probs.shape, dtype=torch.float64)
    mass = 0.0
    for i in order:
        if mass >= p:
            break
        out[i] = float(probs[i])
        mass += float(probs[i])
    return (out / out.sum()).to(probs.dtype)


def cache_hit_rates(expert_ids: torch.Tensor, slots: int) -> torch.Tensor:
    """expert_ids `[L, T, k]` (a routing trace) -> hit rate per layer `[L]` of an LRU cache of `slots`
    experts per layer, empty at the start; each token's k experts are looked up first choice first."""
    rates = []
    for layer in expert_ids.tolist():
        cache: list[int] = []               # least recently used first
        hits = uses = 0
        for token in layer:
            for expert in token:
                uses += 1
                if expert in cache:
                    hits += 1
                    cache.remove(expert)
                elif len(cache) == slots:
                    cache.pop(0)
                cache.append(expert)
        rates.append(hits / uses)
    return torch.tensor(rates, dtype=torch.float64)


def count_exchange(expert_ids: list, ranges: list) -> list:
    """expert_ids: one `[T_r, k]` tensor per rank (its tokens' experts); ranges: each rank's experts
    [start, stop) -> per rank s a `[world, stop_s - start_s]` int64 tensor: entry [r, j] counts the
    (token, slot) rows rank r routes to expert start_s + j."""
    received = [torch.zeros(len(expert_ids), stop - start, dtype=torch.long) for start, stop in ranges]
    for sender, ids in enumerate(expert_ids):
        for token in ids.tolist():
            for expert in token:
                for owner, (start, stop) in enumerate(ranges):
                    if start <= expert < stop:
                        received[owner][sender, expert - start] += 1
    return received


def load_balancing_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """One layer's router logits `[T, E]` -> a 0-dim tensor E * sum_e f_e * P_e, in Hugging Face's
    normalisation: f_e = (number of tokens with e among their top k) / T, so sum_e f_e = k;
    P_e = mean over tokens of the softmax over all E experts."""
    T, E = logits.shape
    picks, probs = [0] * E, [0.0] * E
    for row in logits.tolist():
        for e in sorted(range(E), key=lambda e: -row[e])[:k]:
            picks[e] += 1
        exps = [math.exp(v - max(row)) for v in row]
        for e in range(E):
            probs[e] += exps[e] / sum(exps) / T
    return torch.tensor(E * sum(picks[e] / T * probs[e] for e in range(E)), dtype=torch.float64).to(logits.dtype)


def load_balancing_loss_grad(logits: torch.Tensor, k: int) -> torch.Tensor:
    """d load_balancing_loss / d logits `[T, E]`, by hand: f is a count, so only P carries a gradient;
    with s the softmax of token t, d/d logit[t, j] = E / T * s_j * (f_j - sum_e f_e s_e)."""
    T, E = logits.shape
    rows = logits.double().tolist()
    f = [0.0] * E
    for row in rows:
        for e in sorted(range(E), key=lambda e: -row[e])[:k]:
            f[e] += 1 / T
    grad = torch.empty(T, E, dtype=torch.float64)
    for t, row in enumerate(rows):
        exps = [math.exp(v - max(row)) for v in row]
        s = [x / sum(exps) for x in exps]
        mean_f = sum(f[e] * s[e] for e in range(E))
        for j in range(E):
            grad[t, j] = E / T * s[j] * (f[j] - mean_f)
    return grad.to(logits.dtype)
