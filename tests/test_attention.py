import math

import pytest
import torch

from mixtral_edu.model.attention import Attention, KVCache, attention_mask
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.rope import apply_rope, rope_cos_sin


def small_cfg(**overrides):
    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=64)
    fields.update(overrides)
    return MixtralConfig(**fields)


def naive_attention(attn, x, cos, sin, window=None):
    """Loop-free but explicit: repeat each KV head for its query heads, mask, softmax."""
    b, t, _ = x.shape
    d, h, kvh = attn.head_dim, attn.num_heads, attn.num_kv_heads
    q = apply_rope((x @ attn.q_proj.weight.T).view(b, t, h, d).transpose(1, 2), cos, sin)
    k = apply_rope((x @ attn.k_proj.weight.T).view(b, t, kvh, d).transpose(1, 2), cos, sin)
    v = (x @ attn.v_proj.weight.T).view(b, t, kvh, d).transpose(1, 2)
    k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(b, t, h * d) @ attn.o_proj.weight.T


@pytest.mark.parametrize("window", [None, 5])
def test_grouped_query_attention_matches_naive(window):
    torch.manual_seed(0)
    cfg = small_cfg(sliding_window=window)
    attn = Attention(cfg)
    x = torch.randn(2, 13, cfg.hidden_size)
    cos, sin = rope_cos_sin(cfg.head_dim, 13, cfg.rope_theta)
    assert torch.allclose(attn(x, cos, sin, torch.arange(13)), naive_attention(attn, x, cos, sin, window), atol=1e-5)


def test_attention_mask_causal_and_window():
    assert attention_mask(torch.arange(3), torch.arange(3)).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # two new tokens at positions 3 and 4 after 3 cached ones, window 2
    assert attention_mask(torch.tensor([3, 4]), torch.arange(5), sliding_window=2).int().tolist() == \
        [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize("window,batch", [(None, 1), (None, 3), (4, 2)])
def test_incremental_decoding_equals_full_forward(window, batch):
    torch.manual_seed(1)
    cfg = small_cfg(sliding_window=window)
    attn = Attention(cfg)
    x = torch.randn(batch, 12, cfg.hidden_size)
    cos, sin = rope_cos_sin(cfg.head_dim, 12, cfg.rope_theta)
    full = attn(x, cos, sin, torch.arange(12))
    cache = KVCache(1, batch, cfg.num_key_value_heads, 16, cfg.head_dim)
    pieces = []
    for start, end in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:   # prefill, a chunk, then 1 by 1
        positions = cache.next_positions(batch, end - start)
        pieces.append(attn(x[:, start:end], cos[start:end], sin[start:end], positions, cache))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    assert cache.pos == 12


def test_kv_cache_checks_and_size():
    cache = KVCache(2, 1, 2, 4, 8)
    cache.check_room(1, 4)
    with pytest.raises(ValueError, match="full"):
        cache.check_room(1, 5)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.check_room(2, 1)
    assert cache.next_positions(1, 3).tolist() == [0, 1, 2] and cache.pos == 3
    k = torch.ones(1, 2, 3, 8)
    k_all, _ = cache.update(0, k, k, torch.arange(3))
    assert k_all.shape == (1, 2, 4, 8) and k_all.data_ptr() == cache.k[0].data_ptr()   # the cache itself, no copy
    cache.reset()
    assert cache.pos == 0
    # Mixtral-8x7B: 32 layers x 8 KV heads x 128 x (K and V) x 2 bytes = 131,072 bytes per token in bf16
    cfg = MixtralConfig.mixtral_8x7b()
    one_token = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 1, cfg.head_dim, dtype=torch.bfloat16)
    assert one_token.nbytes == 131072


def test_kv_cache_places_each_layer_and_writes_at_tensor_positions():
    cache = KVCache(2, 1, 2, 6, 4, layer_devices=["cpu", "meta"])
    assert [t.device.type for t in cache.k] == ["cpu", "meta"] and cache.nbytes == 2 * 2 * 2 * 6 * 4 * 4
    k = torch.arange(16.0).view(1, 2, 2, 4)
    k_all, v_all = cache.update(0, k, -k, torch.tensor([3, 1]))
    assert k_all.shape == (1, 2, 6, 4) and cache.pos == 0                  # the whole layer; pos untouched
    assert torch.equal(k_all[:, :, 3], k[:, :, 0]) and torch.equal(k_all[:, :, 1], k[:, :, 1])
    assert torch.equal(v_all[:, :, 1], -k[:, :, 1]) and k_all[:, :, [0, 2, 4, 5]].abs().sum() == 0
    with pytest.raises(ValueError, match="3 devices for 2 layers"):
        KVCache(2, 1, 2, 6, 4, layer_devices=["cpu"] * 3)


def test_a_decoding_step_attends_to_the_cache_like_the_full_sequence():
    """Prefill into a cache, then one token at a time with the positions given (what FastDecoder does):
    the same result as attending over the whole sequence at once, with and without a window."""
    torch.manual_seed(2)
    for window in (None, 3):
        cfg = small_cfg(sliding_window=window)
        attn = Attention(cfg)
        x = torch.randn(1, 9, cfg.hidden_size)
        cos, sin = rope_cos_sin(cfg.head_dim, 9, cfg.rope_theta)
        full = attn(x, cos, sin, torch.arange(9))
        cache = KVCache(1, 1, cfg.num_key_value_heads, 12, cfg.head_dim)
        attn(x[:, :5], cos[:5], sin[:5], cache.next_positions(1, 5), cache)
        for p in range(5, 9):
            got = attn(x[:, p:p + 1], cos[p:p + 1], sin[p:p + 1], torch.tensor([p]), cache)
            assert torch.allclose(got, full[:, p:p + 1], atol=1e-6), (window, p)
