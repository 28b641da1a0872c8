"""Expert offloading gives exactly the in-memory model's outputs, and its LRU counters are right."""

import copy

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.inference.offload import ExpertCache, OffloadedExperts, offload_experts


def tiny_model(seed=0):
    cfg = MixtralConfig.tiny(vocab_size=256, num_hidden_layers=3, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Mixtral(cfg).eval()
    model.init_weights(std=0.08)            # sharper routing than 0.02: many different experts get used
    return model


def fetch(tag):
    """A source for ExpertCache.get: w1, w2, w3 filled with `tag`, and a log of the fetches."""
    def source():
        fetched.append(tag)
        return torch.full((4, 3), float(tag)), torch.full((3, 4), float(tag)), torch.full((4, 3), float(tag))
    return source


fetched = []


def test_lru_counters_and_eviction_order():
    fetched.clear()
    cache = ExpertCache(capacity=2, hidden_size=3, intermediate_size=4)
    sequence = [1, 2, 1, 3, 2, 2, 1]
    slots = [cache.get(key, fetch(key)) for key in sequence]
    # 1 miss, 2 miss, 1 hit, 3 miss (evicts 2, the least recent), 2 miss (evicts 1), 2 hit, 1 miss (evicts 3)
    assert fetched == [1, 2, 3, 2, 1]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 5, 3)
    assert cache.stats.lookups == 7 and cache.stats.hit_rate == pytest.approx(2 / 7)
    assert cache.cached_keys() == [2, 1]                  # least recently used first
    assert slots[:2] == [0, 1] and slots[3] == 1          # 3 took the slot 2 had
    for key in (2, 1):                                    # each slot holds the weights of its key
        slot = cache.slot_of[key]
        assert torch.equal(cache.w1[slot], torch.full((4, 3), float(key)))
        assert torch.equal(cache.w2[slot], torch.full((3, 4), float(key)))
    assert cache.stats.bytes_copied == 5 * 3 * 12 * 4     # 5 fetches of three 12-element float32 matrices


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        ExpertCache(0, 3, 4)


@pytest.mark.parametrize("capacity", [2, 5, 24])
def test_offloaded_model_equals_in_memory_model_exactly(capacity):
    model = tiny_model()
    offloaded = copy.deepcopy(model)
    cache = offload_experts(offloaded, "cpu", capacity, pin=False)
    assert all(isinstance(layer.block_sparse_moe.experts, OffloadedExperts) for layer in offloaded.layers)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # prefill (grouped dispatch, several tokens), then one-token decode steps (gathered dispatch)
        c1, c2 = model.new_kv_cache(1, 32), offloaded.new_kv_cache(1, 32)
        a, b = model(ids, cache=c1), offloaded(ids, cache=c2)
        assert torch.equal(a, b)
        token = a[:, -1:].argmax(-1)
        for _ in range(8):
            a, b = model(token, cache=c1), offloaded(token, cache=c2)
            assert torch.equal(a, b)
            token = a[:, -1:].argmax(-1)
        # several tokens through the gathered path too (needs as many slots as distinct experts)
        if capacity >= 8:
            for m in (model, offloaded):
                m.set_dispatch("gathered")
            assert torch.equal(model(ids[:, :3]), offloaded(ids[:, :3]))
    s = cache.stats
    assert s.misses >= min(capacity, 8) and s.hits + s.misses == s.lookups > 0
    assert s.evictions == max(0, s.misses - capacity)


def test_counters_count_every_expert_call():
    model = tiny_model()
    cache = offload_experts(model, "cpu", capacity=3 * 8, pin=False)   # everything fits: no evictions
    ids = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        model(ids)
        first = cache.stats.lookups
        assert first == 3 * 2                              # 3 layers x top-2, one token
        assert cache.stats.misses == 6 and cache.stats.hits == 0
        model(ids)                                         # the same token again: same experts, all hits
    assert cache.stats.hits == 6 and cache.stats.misses == 6 and cache.stats.evictions == 0
