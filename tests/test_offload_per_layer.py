"""Per-layer offload caches: with fewer slots than one token's (layer, expert) keys, a shared LRU never hits
while per-layer LRUs hit as often as an offline per-layer LRU replay of the same routing trace says."""

import pytest

from mixtral_edu.analysis.routing import trace_routing
from mixtral_edu.assets import TINY_MODEL_DIR
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.offload import layer_slots, offload_experts, replay_hit_rate
from mixtral_edu.tokenizer import Tokenizer
from mixtral_edu.weights import load_model

TEXT = "And the LORD spake unto Moses, saying, " * 3


def naive_per_layer_lru(expert_ids, slots, steps):
    """The oracle: for each step and layer, the experts the model asks for (one token: its k in routing order;
    a prefill: the distinct ones in increasing order) through a plain list per layer kept least recent
    first. Returns (hits, lookups)."""
    caches = [[] for _ in slots]
    hits = lookups = start = 0
    for n in steps:
        for layer, cache in enumerate(caches):
            ids = expert_ids[layer, start:start + n].reshape(-1).tolist()
            for e in (ids if n == 1 else sorted(set(ids))):
                lookups += 1
                if e in cache:
                    hits += 1
                    cache.remove(e)
                elif len(cache) == slots[layer]:
                    cache.pop(0)
                cache.append(e)
        start += n
    return hits, lookups


@pytest.fixture(scope="module")
def run():
    tok = Tokenizer(TINY_MODEL_DIR / "tokenizer.model")
    prompt = [tok.bos_id] + tok.encode(TEXT)
    plain = load_model(TINY_MODEL_DIR, progress=False)
    new = generate(plain, prompt, 24, eos_id=None)
    trace = trace_routing(plain, prompt + new[:-1]).expert_ids               # [L, T, k]
    return prompt, new, trace


def test_layer_slots_share_the_total_out():
    assert layer_slots(51, 32) == [2] * 19 + [1] * 13 and sum(layer_slots(51, 32)) == 51
    assert layer_slots(6, 4) == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="at least one slot per layer"):
        layer_slots(3, 4)


@pytest.mark.parametrize("capacity", [6, 4])
def test_per_layer_caches_hit_as_the_offline_replay_says(run, capacity):
    prompt, new, trace = run
    L, k = trace.shape[0], trace.shape[2]
    assert capacity < L * k                                   # fewer slots than one token's keys
    steps = [len(prompt)] + [1] * (len(new) - 1)
    hits, lookups = naive_per_layer_lru(trace, layer_slots(capacity, L), steps)
    assert replay_hit_rate(trace, layer_slots(capacity, L), steps) == hits / lookups

    model = load_model(TINY_MODEL_DIR, progress=False)
    caches = offload_experts(model, "cpu", capacity, pin=False, per_layer=True)
    assert generate(model, prompt, len(new), eos_id=None) == new           # the same tokens
    stats = caches.stats
    assert (stats.hits, stats.lookups) == (hits, lookups) and hits > 0
    shared_model = load_model(TINY_MODEL_DIR, progress=False)
    shared = offload_experts(shared_model, "cpu", capacity, pin=False)
    assert generate(shared_model, prompt, len(new), eos_id=None) == new
    print(f"{capacity} slots: per-layer hit rate {stats.hit_rate:.1%} (offline replay {hits / lookups:.1%}), "
          f"shared LRU {shared.stats.hit_rate:.1%}; bytes copied {stats.bytes_copied:,} vs {shared.stats.bytes_copied:,}")
    assert shared.stats.hit_rate < stats.hit_rate and stats.bytes_copied < shared.stats.bytes_copied


def test_a_layer_with_fewer_slots_than_experts_per_token_still_computes_the_same(run):
    prompt, new, _ = run
    model = load_model(TINY_MODEL_DIR, progress=False)
    offload_experts(model, "cpu", 4, pin=False, per_layer=True)              # one slot per layer, top-2
    assert generate(model, prompt, 6, eos_id=None) == new[:6]
