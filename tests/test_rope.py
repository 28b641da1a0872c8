import math

import pytest
import torch
import torch.nn.functional as F

from mixtral_edu.model.rope import (RotaryEmbedding, apply_rope, apply_rope_interleaved, permute_qk_for_rotate_half,
                              rope_cos_sin, rope_freqs_cis, rope_inv_freq, rotate_half,
                              unpermute_qk_for_rotate_half)


def test_inverse_frequencies_follow_the_formula():
    inv = rope_inv_freq(8, 1e6)
    expected = torch.tensor([1e6 ** (-2 * i / 8) for i in range(4)])
    assert torch.allclose(inv, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(7, 1e4)


def test_cos_sin_table_equals_transformers_exactly():
    from transformers import MixtralConfig as HFConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
    hf_cfg = HFConfig(hidden_size=64, num_attention_heads=4, head_dim=24, max_position_embeddings=300,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ref = MixtralRotaryEmbedding(hf_cfg)
    positions = torch.arange(300)[None]
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.float32), positions)
    rotary = RotaryEmbedding(24, 300, 1e6)
    cos, sin = rotary(torch.arange(300))
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    assert "cos" not in rotary.state_dict()          # non-persistent: not a checkpoint tensor
    assert torch.equal(rotary(torch.arange(5, 8))[0], cos[5:8])
    with pytest.raises(IndexError):                  # beyond the table (generate refuses it first, by name)
        rotary(torch.tensor([299, 300]))


def test_rotation_keeps_norms_and_scores_depend_only_on_offset():
    torch.manual_seed(0)
    d = 16
    cos, sin = rope_cos_sin(d, 64, 1e4)
    q, k = torch.randn(d), torch.randn(d)

    def rotated(x, m):
        return apply_rope(x[None, None, None], cos[m:m + 1], sin[m:m + 1])[0, 0, 0]

    assert torch.allclose(rotated(q, 9).norm(), q.norm(), atol=1e-5)
    score = lambda m, n: torch.dot(rotated(q, m), rotated(k, n)).item()  # noqa: E731
    assert score(10, 7) == pytest.approx(score(3, 0), abs=1e-5)
    assert score(43, 40) == pytest.approx(score(3, 0), abs=1e-5)
    assert abs(score(3, 0) - score(12, 0)) > 0.1      # a different offset, a different score
    assert torch.equal(rotate_half(torch.tensor([1.0, 2, 3, 4])), torch.tensor([-3.0, -4, 1, 2]))


def test_interleaved_rope_is_a_2x2_rotation_of_adjacent_pairs():
    torch.manual_seed(1)
    d, m = 8, 5
    x = torch.randn(1, 1, 1, d)
    out = apply_rope_interleaved(x, rope_freqs_cis(d, 16, 1e4)[m:m + 1])
    inv = rope_inv_freq(d, 1e4)
    for i in range(d // 2):
        a, b = x[0, 0, 0, 2 * i].item(), x[0, 0, 0, 2 * i + 1].item()
        c, s = math.cos(m * inv[i].item()), math.sin(m * inv[i].item())
        assert out[0, 0, 0, 2 * i].item() == pytest.approx(a * c - b * s, abs=1e-5)
        assert out[0, 0, 0, 2 * i + 1].item() == pytest.approx(a * s + b * c, abs=1e-5)


def test_permutation_rows_and_inverse():
    n_heads, head_dim, hidden = 2, 6, 3
    w = torch.arange(n_heads * head_dim, dtype=torch.float32)[:, None].repeat(1, hidden)
    p = permute_qk_for_rotate_half(w, n_heads)
    assert p[:, 0].tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    assert torch.equal(unpermute_qk_for_rotate_half(p, n_heads), w)
    with pytest.raises(ValueError, match="heads"):
        permute_qk_for_rotate_half(torch.zeros(10, 4), 4)
    with pytest.raises(ValueError, match="2-D"):
        permute_qk_for_rotate_half(torch.zeros(12), 2)


def test_interleaved_attention_with_unpermuted_weights_equals_rotate_half_with_permuted():
    """Mistral's wq/wk + interleaved RoPE compute the same attention as HF's q_proj/k_proj + rotate-half."""
    torch.manual_seed(2)
    hidden, n_heads, n_kv, d, seq = 24, 4, 2, 8, 11
    x = torch.randn(1, seq, hidden)
    v = torch.randn(1, n_kv, seq, d)
    wq, wk = torch.randn(n_heads * d, hidden), torch.randn(n_kv * d, hidden)   # interleaved layout

    def heads(w, n):
        return (x @ w.T).view(1, seq, n, d).transpose(1, 2)

    q_i = apply_rope_interleaved(heads(wq, n_heads), rope_freqs_cis(d, seq, 1e6))
    k_i = apply_rope_interleaved(heads(wk, n_kv), rope_freqs_cis(d, seq, 1e6))
    cos, sin = rope_cos_sin(d, seq, 1e6)
    q_h = apply_rope(heads(permute_qk_for_rotate_half(wq, n_heads), n_heads), cos, sin)
    k_h = apply_rope(heads(permute_qk_for_rotate_half(wk, n_kv), n_kv), cos, sin)
    out_i = F.scaled_dot_product_attention(q_i, k_i, v, is_causal=True, enable_gqa=True)
    out_h = F.scaled_dot_product_attention(q_h, k_h, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out_i, out_h, atol=1e-5)
    # without the permutation the two conventions disagree
    q_wrong = apply_rope(heads(wq, n_heads), cos, sin)
    k_wrong = apply_rope(heads(wk, n_kv), cos, sin)
    out_wrong = F.scaled_dot_product_attention(q_wrong, k_wrong, v, is_causal=True, enable_gqa=True)
    assert not torch.allclose(out_i, out_wrong, atol=1e-2)
