"""Every claim notebooks 02 (RMSNorm, RoPE), 03 (attention, KV cache) and 04 (SwiGLU experts) make, asserted.

The notebooks print these facts; the tests recompute them independently of the notebooks' outputs so that a
change in the package that makes a notebook's sentence false fails here, not only under nbval.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mixtral_edu.model.attention import Attention, KVCache, attention_mask
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.experts import Experts, swiglu_expert
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.model.norm import RMSNorm, rms_norm
from mixtral_edu.params import count_parameters, kv_cache_bytes_per_token, memory_footprint
from mixtral_edu.model.rope import (apply_rope, apply_rope_interleaved, permute_qk_for_rotate_half, rope_cos_sin,
                              rope_freqs_cis, rope_inv_freq, unpermute_qk_for_rotate_half)

EPS = 1e-5


# ============================================================================ 02 · RMSNorm
def test_nb02_rms_norm_equals_a_python_loop_and_torch_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16) * 2 + 0.5
    g = torch.rand(16) + 0.5
    ours = rms_norm(x, g, EPS)
    for b in range(2):
        for t in range(3):
            row = x[b, t].tolist()
            rms = math.sqrt(sum(v * v for v in row) / len(row) + EPS)
            assert ours[b, t].tolist() == pytest.approx([gi * v / rms for gi, v in zip(g.tolist(), row)], abs=1e-5)
    assert torch.allclose(ours, F.rms_norm(x, (16,), g, EPS), atol=1e-6)
    assert torch.allclose(RMSNorm(16, EPS)(x), rms_norm(x, torch.ones(16), EPS))
    # with gain 1 every output vector has RMS 1 (up to eps)
    unit = rms_norm(x, torch.ones(16), EPS)
    assert torch.allclose(unit.pow(2).mean(-1).sqrt(), torch.ones(2, 3), atol=1e-4)


def test_nb02_rms_norm_differs_from_layer_norm_unless_the_mean_is_zero():
    torch.manual_seed(1)
    x = torch.randn(1000, 64) + 3.0
    ones = torch.ones(64)
    layer_norm = F.layer_norm(x, (64,), eps=EPS)
    assert (rms_norm(x, ones, EPS) - layer_norm).abs().max() > 1.0          # "differ a lot"
    centered = x - x.mean(-1, keepdim=True)
    assert (rms_norm(centered, ones, EPS) - layer_norm).abs().max() < 1e-5  # "the same function"


# ============================================================================ 02 · RoPE
def _wavelengths(theta):
    return 2 * math.pi / rope_inv_freq(128, theta)


def test_nb02_wavelength_table_for_head_dim_128():
    for theta, slowest, beyond_32k in ((1e4, 54_410, 4), (1e6, 5_063_256, 24)):
        wl = _wavelengths(theta)
        assert wl[0].item() == pytest.approx(2 * math.pi)                   # the fastest pair: 1 radian/token
        assert wl[-1].item() == pytest.approx(slowest, rel=1e-5)
        assert wl[-1].item() == pytest.approx(2 * math.pi * theta ** (126 / 128), rel=1e-5)
        assert int((wl > 32768).sum()) == beyond_32k
    # "about a third of the pairs" never complete a turn in 32k tokens with theta 1e6
    assert 0.3 < 24 / 64 < 0.4
    # exercise 2 of notebook 02: Mistral-7B (theta 1e4), 4096-token window
    assert int((_wavelengths(1e4) > 4096).sum()) == 18


def _rotate_by_hand(v, m, theta):
    d = v.shape[0]
    out = v.clone()
    for i in range(d // 2):
        angle = m * theta ** (-2 * i / d)
        a, b = v[i].item(), v[i + d // 2].item()
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + d // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_nb02_apply_rope_is_the_hand_built_rotation_and_scores_depend_on_offset_only():
    torch.manual_seed(2)
    d, theta = 128, 1e6
    cos, sin = rope_cos_sin(d, 4096, theta)
    q, k = torch.randn(d), torch.randn(d)

    def rope_at(v, m):
        return apply_rope(v[None, None, None], cos[m:m + 1], sin[m:m + 1])[0, 0, 0]

    for m in (0, 1, 7, 100, 4095):
        assert (rope_at(q, m).double() - _rotate_by_hand(q.double(), m, theta)).abs().max() < 1e-3
    assert rope_at(q, 4095).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)

    n = 48
    scores = torch.stack([torch.stack([rope_at(q, m) @ rope_at(k, j) for j in range(n)]) for m in range(n)])
    for offset in range(-n + 1, n):
        diag = torch.diagonal(scores, offset)
        assert (diag.max() - diag.min()).item() < 1e-4
    assert abs(scores[10, 3] - scores[10, 4]).item() > 1e-3


def test_nb02_self_score_decays_more_slowly_with_the_larger_base():
    offsets = torch.tensor([100, 1000, 4000])
    decayed = {}
    for theta in (1e4, 1e6):
        c, s = rope_cos_sin(128, 4096, theta)
        rotated = apply_rope(torch.ones(1, 1, 4096, 128), c, s)[0, 0]
        decayed[theta] = (rotated @ rotated[0])[offsets]
        assert (rotated @ rotated[0])[0].item() == pytest.approx(128.0, rel=1e-5)
    assert bool((decayed[1e6] > decayed[1e4]).all())


def test_nb02_interleaved_with_original_weights_equals_rotate_half_with_permuted_weights():
    torch.manual_seed(3)
    n_heads, n_kv_heads, head_dim, hidden, seq = 4, 2, 16, 32, 10
    wq = torch.randn(n_heads * head_dim, hidden) / hidden ** 0.5
    wk = torch.randn(n_kv_heads * head_dim, hidden) / hidden ** 0.5
    x = torch.randn(1, seq, hidden)

    def heads(t, n):
        return t.view(1, seq, n, head_dim).transpose(1, 2)

    def scores_of(q, k):
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        return q @ k.transpose(-1, -2)

    freqs_cis = rope_freqs_cis(head_dim, seq, 1e6)
    q_il = apply_rope_interleaved(heads(x @ wq.T, n_heads), freqs_cis)
    k_il = apply_rope_interleaved(heads(x @ wk.T, n_kv_heads), freqs_cis)
    cos, sin = rope_cos_sin(head_dim, seq, 1e6)
    q_rh = apply_rope(heads(x @ permute_qk_for_rotate_half(wq, n_heads).T, n_heads), cos, sin)
    k_rh = apply_rope(heads(x @ permute_qk_for_rotate_half(wk, n_kv_heads).T, n_kv_heads), cos, sin)
    assert torch.allclose(scores_of(q_il, k_il), scores_of(q_rh, k_rh), atol=1e-5)

    order = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    assert permute_qk_for_rotate_half(torch.arange(16.0)[:, None], 1)[:, 0].long().tolist() == order
    assert torch.allclose(q_il[..., order], q_rh, atol=1e-5)

    # forgetting the permutation gives different scores
    q_wrong = apply_rope(heads(x @ wq.T, n_heads), cos, sin)
    k_wrong = apply_rope(heads(x @ wk.T, n_kv_heads), cos, sin)
    assert not torch.allclose(scores_of(q_il, k_il), scores_of(q_wrong, k_wrong), atol=1e-3)


def test_nb02_permutation_row_order_for_two_heads_of_dim_8():
    rows = torch.arange(16.0)[:, None]
    p = permute_qk_for_rotate_half(rows, n_heads=2)
    assert p[:, 0].int().tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(unpermute_qk_for_rotate_half(p, 2), rows)


# ============================================================================ 03 · attention and KV cache


def _naive_attention(attn, x, cos, sin, window=None):
    """Per-head loop with the KV head h // group, a mask from two Python loops and a hand-written softmax."""
    batch, seq, _ = x.shape
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(batch, seq, nh, d).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(batch, seq, nkv, d).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(batch, seq, nkv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    allowed = torch.tensor([[j <= i and (window is None or i - j < window) for j in range(seq)] for i in range(seq)])
    outs, weights = [], []
    for h in range(nh):
        kv = h // (nh // nkv)
        scores = (q[:, h] @ k[:, kv].transpose(-1, -2) / d ** 0.5).masked_fill(~allowed, float("-inf"))
        p = scores.exp() / scores.exp().sum(-1, keepdim=True)
        weights.append(p)
        outs.append(p @ v[:, kv])
    return torch.cat(outs, dim=-1) @ attn.o_proj.weight.T, torch.stack(weights, dim=1)


def test_nb03_mixtral_8x7b_has_32_query_heads_in_groups_of_4_over_8_kv_heads():
    big = MixtralConfig.mixtral_8x7b()
    assert (big.num_attention_heads, big.num_key_value_heads, big.num_key_value_groups, big.head_dim) == (32, 8, 4, 128)
    assert big.sliding_window is None
    assert MixtralConfig.mistral_7b().sliding_window == 4096


@pytest.mark.parametrize("window", [None, 4])
def test_nb03_gqa_attention_equals_the_naive_per_head_loop(window):
    torch.manual_seed(0)
    cfg = MixtralConfig.tiny(hidden_size=64, num_attention_heads=32, num_key_value_heads=8, head_dim=8,
                             sliding_window=window)
    attn = Attention(cfg)
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        torch.nn.init.normal_(lin.weight, std=0.2)
    x = torch.randn(2, 12, 64)
    cos, sin = rope_cos_sin(8, 12, cfg.rope_theta)
    with torch.no_grad():
        ours = attn(x, cos, sin, torch.arange(12))
        naive, probs = _naive_attention(attn, x, cos, sin, window)
    assert torch.allclose(ours, naive, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 32, 12), atol=1e-5)
    assert probs.triu(1).abs().max() == 0
    if window is not None:
        full = Attention(dataclasses.replace(cfg, sliding_window=None))
        full.load_state_dict(attn.state_dict())
        with torch.no_grad():
            assert not torch.allclose(full(x, cos, sin, torch.arange(12)), ours, atol=1e-3)


def test_nb03_mask_rows_count_the_visible_keys():
    p12, p20 = torch.arange(12), torch.arange(20)
    assert attention_mask(p12, p12).sum(-1).tolist() == list(range(1, 13))
    assert attention_mask(p12, p12, sliding_window=4).sum(-1).tolist() == [1, 2, 3] + [4] * 9
    assert attention_mask(p20, p20, sliding_window=6).sum(-1).tolist() == [min(i + 1, 6) for i in range(20)]


def test_nb03_kv_cache_sizes():
    big = MixtralConfig.mixtral_8x7b()
    assert kv_cache_bytes_per_token(big, "bf16") == 131_072 == 128 * 1024 == 2 * 32 * 8 * 128 * 2
    full = memory_footprint(big, "bf16", context_len=32768)
    assert full["kv_cache_bytes"] == 4_294_967_296 == 4 * 2 ** 30
    assert f"{full['weights_bytes'] / 2**30:.2f}" == "86.99"
    mha = dataclasses.replace(big, num_key_value_heads=32)
    assert kv_cache_bytes_per_token(mha) * 32768 == 16 * 2 ** 30
    assert kv_cache_bytes_per_token(MixtralConfig.mistral_7b(), "bf16") == 131_072
    model_cfg = MixtralConfig.tiny()
    cache = Mixtral(model_cfg).new_kv_cache(batch_size=1, max_seq_len=256)
    assert len(cache.k) == 4 and tuple(cache.k[0].shape) == (1, 2, 256, 16)
    assert cache.nbytes == 262_144 == kv_cache_bytes_per_token(model_cfg, "float32") * 256


def test_nb03_incremental_decoding_equals_the_full_forward_pass():
    torch.manual_seed(2)
    model = Mixtral(MixtralConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        full_logits = model(ids)
        cache = model.new_kv_cache(batch_size=2, max_seq_len=64)
        steps = [model(ids[:, :8], cache=cache)]
        for t in range(8, 40):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    assert cache.pos == 40
    assert (cached - full_logits).abs().max() < 1e-5
    assert torch.equal(cached.argmax(-1), full_logits.argmax(-1))



def test_nb03_one_attention_layer_with_a_cache_equals_the_full_pass():
    """Notebook 03 section 5: the cache check on the attention module alone (the model's is in 06)."""
    torch.manual_seed(2)
    one = MixtralConfig.tiny()
    layer_attn = Attention(one).eval()
    for lin in (layer_attn.q_proj, layer_attn.k_proj, layer_attn.v_proj, layer_attn.o_proj):
        torch.nn.init.normal_(lin.weight, std=0.2)
    x = torch.randn(2, 40, one.hidden_size)
    cos, sin = rope_cos_sin(one.head_dim, 64, one.rope_theta)
    with torch.no_grad():
        full = layer_attn(x, cos[:40], sin[:40], torch.arange(40))
        cache = KVCache(1, 2, one.num_key_value_heads, 64, one.head_dim)
        steps = [layer_attn(x[:, :8], cos[:8], sin[:8], cache.next_positions(2, 8), cache)]
        for t in range(8, 40):
            steps.append(layer_attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache.next_positions(2, 1), cache))
        forgetful = layer_attn(x[:, 39:40], cos[39:40], sin[39:40], torch.tensor([39]))   # without its cache
    cached = torch.cat(steps, dim=1)
    assert cache.pos == 40
    assert (cached - full).abs().max() < 1e-5 and full.std() > 0.1
    assert (forgetful - full[:, 39:40]).abs().max() > 1e-3            # the cache is what makes them equal


def test_nb03_trained_first_layer_attention_map():
    """Notebook 03 section 3: the shipped model's layer-0 attention equals the naive loop; rows sum to 1,
    nothing above the diagonal."""
    from mixtral_edu.assets import default_weights_dir
    from mixtral_edu.weights import load_model
    from mixtral_edu.tokenizer import Tokenizer

    trained = load_model(default_weights_dir(), progress=False)
    tok = Tokenizer()
    ids = torch.tensor([[tok.bos_id] + tok.encode("def add(a, b):\n    return a + b")])
    T = ids.shape[1]
    attn = trained.layers[0].self_attn
    with torch.no_grad():
        h = trained.layers[0].input_layernorm(trained.embed_tokens(ids))
        c, s = trained.rotary_emb(torch.arange(T))
        q = apply_rope(attn.q_proj(h).view(1, T, 4, -1).transpose(1, 2), c, s)
        k = apply_rope(attn.k_proj(h).view(1, T, 2, -1).transpose(1, 2), c, s).repeat_interleave(2, dim=1)
        logits = (q @ k.transpose(-1, -2)) / attn.head_dim ** 0.5
        probs = torch.softmax(logits.masked_fill(~attention_mask(torch.arange(T), torch.arange(T)), float("-inf")), dim=-1)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, T))
    assert probs[0].triu(1).abs().max() == 0
    assert probs[0].tril(-1).max() > 0.1                               # a trained layer does not spread evenly

# ============================================================================ 04 · SwiGLU experts
def test_nb04_silu_is_z_sigmoid_z_with_its_minimum_near_minus_0_278():
    z = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    assert torch.allclose(F.silu(z), z / (1 + torch.exp(-z)))
    fine = torch.linspace(-3, 0, 300001, dtype=torch.float64)
    i = F.silu(fine).argmin()
    assert f"{F.silu(fine)[i]:.4f}" == "-0.2785" and f"{fine[i]:.4f}" == "-1.2785"
    # close to relu far from 0, and below it in between
    t = torch.tensor([-2.0, 0.0, 1.0, 4.0])
    assert [f"{v:.4f}" for v in F.silu(t)] == ["-0.2384", "0.0000", "0.7311", "3.9281"]
    assert [f"{v:.4f}" for v in F.gelu(t)] == ["-0.0455", "0.0000", "0.8413", "3.9999"]


def test_nb04_expert_equals_the_unit_by_unit_sum():
    torch.manual_seed(0)
    experts = Experts(8, 16, 32)
    x = torch.randn(3, 16)

    def by_hand(row, w1, w2, w3):
        out = torch.zeros(w2.shape[0])
        for i in range(w1.shape[0]):
            a, b = w1[i] @ row, w3[i] @ row
            out += (a / (1 + torch.exp(-a))) * b * w2[:, i]
        return out

    with torch.no_grad():
        for e in range(8):
            naive = torch.stack([by_hand(r, experts.w1[e], experts.w2[e], experts.w3[e]) for r in x])
            assert torch.allclose(experts(x, e), naive, atol=1e-6)
            assert torch.allclose(swiglu_expert(x, experts.w1[e], experts.w2[e], experts.w3[e]), naive, atol=1e-6)
        assert not torch.allclose(experts(x, 0), experts(x, 5))
    assert experts.w1[5].untyped_storage().data_ptr() == experts.w1.untyped_storage().data_ptr()


def test_nb04_one_8x7b_expert_and_the_meta_built_model_match_count_parameters():
    big = MixtralConfig.mixtral_8x7b()
    p = count_parameters(big)
    assert p["one_expert"] == 3 * 4096 * 14336 == 176_160_768
    with torch.device("meta"):
        layer_experts = Experts(8, 4096, 14336)
        model = Mixtral(big)
    assert sum(t.numel() for t in layer_experts.parameters()) == 8 * 176_160_768 == 1_409_286_144
    assert sum(t.numel() for t in model.parameters()) == p["total"] == 46_702_792_704


def test_nb04_why_experts_are_96_6_percent_of_the_model():
    big = MixtralConfig.mixtral_8x7b()
    p = count_parameters(big)
    parts = ["experts", "attention", "embeddings", "lm_head", "router", "norms"]
    assert sum(p[name] for name in parts) == p["total"]
    shares = {name: 100 * p[name] / p["total"] for name in parts}
    assert {k: f"{v:.4f}" for k, v in shares.items()} == {
        "experts": "96.5620", "attention": "2.8739", "embeddings": "0.2807", "lm_head": "0.2807",
        "router": "0.0022", "norms": "0.0006"}
    assert f"{shares['experts']:.1f}" == "96.6"
    assert f"{shares['embeddings'] + shares['lm_head']:.2f}" == "0.56"
    H = big.hidden_size
    attn_per_layer = p["attention"] // big.num_hidden_layers
    assert attn_per_layer == 2.5 * H * H                 # GQA: W_k, W_v are H x H/4
    assert p["one_expert"] == 10.5 * H * H                # I = 3.5 H, three matrices
    assert f"{p['one_expert'] / attn_per_layer:.2f}" == "4.20"
    assert f"{8 * p['one_expert'] / attn_per_layer:.1f}" == "33.6"
    assert p["active"] == 12_879_925_248 and f"{100 * p['active'] / p['total']:.1f}" == "27.6"


def test_nb04_exercises():
    q = count_parameters(MixtralConfig.mistral_7b())
    assert q["total"] == 7_241_732_096
    assert f"{100 * q['experts'] / q['total']:.1f}" == "77.8"
    I_equal = 8 * 4096 / 3
    assert f"{I_equal:.2f}" == "10922.67" and MixtralConfig.mixtral_8x7b().intermediate_size == 3.5 * 4096
