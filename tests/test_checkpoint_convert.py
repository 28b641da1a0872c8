"""The pure layout conversions of convert.py, each against a naive computation."""

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.convert import (fuse_original_experts, hf_to_mistral_key, hf_to_mistral_state_dict,
                                 hf_to_original_state_dict, mistral_to_hf_key, mistral_to_hf_tensors,
                                 split_original_experts)
from mixtral_edu.weights.keys import to_hf_state_dict
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.model.rope import apply_rope, apply_rope_interleaved, rope_cos_sin, rope_freqs_cis

CFG = MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


@pytest.mark.parametrize("mistral, hf", [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.7.attention.wq.weight", "model.layers.7.self_attn.q_proj.weight"),
    ("layers.7.attention.wo.weight", "model.layers.7.self_attn.o_proj.weight"),
    ("layers.0.attention_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("layers.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
    ("layers.31.feed_forward.gate.weight", "model.layers.31.block_sparse_moe.gate.weight"),
    ("layers.2.feed_forward.experts.5.w2.weight", "model.layers.2.block_sparse_moe.experts.5.w2.weight"),
    ("layers.2.feed_forward.w1.weight", "model.layers.2.mlp.gate_proj.weight"),
    ("layers.2.feed_forward.w2.weight", "model.layers.2.mlp.down_proj.weight"),
    ("layers.2.feed_forward.w3.weight", "model.layers.2.mlp.up_proj.weight"),
])
def test_key_names_both_ways(mistral, hf):
    assert mistral_to_hf_key(mistral) == hf
    assert hf_to_mistral_key(hf) == mistral


def test_original_router_key_and_unknown_keys():
    assert mistral_to_hf_key("layers.4.block_sparse_moe.gate.weight") == "model.layers.4.block_sparse_moe.gate.weight"
    for bad in ["layers.1.attention.wx.weight", "rope.freqs", "layers.1.block_sparse_moe.w1"]:
        with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
            mistral_to_hf_key(bad)
    with pytest.raises(KeyError, match="not a Hugging Face"):
        hf_to_mistral_key("model.layers.0.mlp.experts.gate_up_proj")


def test_every_model_key_round_trips():
    state = to_hf_state_dict(Mixtral(CFG))
    for key in state:
        assert mistral_to_hf_key(hf_to_mistral_key(key)) == key


def test_split_original_experts_naive():
    E, I, H = 3, 5, 4
    torch.manual_seed(0)
    fused = torch.randn(E * I, H)
    for w in ("w1", "w3"):
        parts = split_original_experts(fused, E, w)
        for j in range(E):
            assert torch.equal(parts[j], fused[j * I:(j + 1) * I])           # rows j*I .. (j+1)*I-1
        assert torch.equal(fuse_original_experts(parts, w), fused)
    parts = split_original_experts(fused, E, "w2")
    for j in range(E):
        assert parts[j].shape == (H, I)
        for r in range(H):
            for c in range(I):
                assert parts[j][r, c] == fused[j * I + c, r]                # stored transposed
    assert torch.equal(fuse_original_experts(parts, "w2"), fused)
    with pytest.raises(ValueError, match="cannot be split into 4 experts"):
        split_original_experts(fused, 4, "w1")


def test_unpermute_matches_naive_interleaving():
    torch.manual_seed(0)
    state = to_hf_state_dict(Mixtral(CFG))
    mistral = hf_to_mistral_state_dict(state, CFG)
    d = CFG.head_dim
    for hf_key, mkey, heads in [("model.layers.1.self_attn.q_proj.weight", "layers.1.attention.wq.weight",
                                 CFG.num_attention_heads),
                                ("model.layers.1.self_attn.k_proj.weight", "layers.1.attention.wk.weight",
                                 CFG.num_key_value_heads)]:
        hf, ms = state[hf_key], mistral[mkey]
        for h in range(heads):
            for j in range(d // 2):   # interleaved row 2j is rotate-half row j; 2j+1 is row d/2 + j
                assert torch.equal(ms[h * d + 2 * j], hf[h * d + j])
                assert torch.equal(ms[h * d + 2 * j + 1], hf[h * d + d // 2 + j])
    assert torch.equal(mistral["layers.1.attention.wv.weight"], state["model.layers.1.self_attn.v_proj.weight"])


def test_permutation_makes_the_two_rope_conventions_agree():
    """Mistral's wq/wk with interleaved RoPE score like the permuted weights with rotate-half RoPE."""
    torch.manual_seed(0)
    H, heads, d, T = 32, 4, 8, 6
    wq, wk = torch.randn(heads * d, H), torch.randn(heads * d, H)
    x = torch.randn(1, T, H)
    hf_q = mistral_to_hf_tensors("layers.0.attention.wq.weight", wq, CFG)[0][1]
    cfg_k = MixtralConfig(**{**CFG.__dict__, "num_key_value_heads": heads})
    hf_k = mistral_to_hf_tensors("layers.0.attention.wk.weight", wk, cfg_k)[0][1]

    def heads_of(w):
        return (x @ w.T).view(1, T, heads, d).transpose(1, 2)        # [1, heads, T, d]
    cos, sin = rope_cos_sin(d, T, 1e6)
    freqs = rope_freqs_cis(d, T, 1e6)
    scores_mistral = apply_rope_interleaved(heads_of(wq), freqs) @ apply_rope_interleaved(heads_of(wk), freqs).transpose(-1, -2)
    scores_hf = apply_rope(heads_of(hf_q), cos, sin) @ apply_rope(heads_of(hf_k), cos, sin).transpose(-1, -2)
    assert torch.allclose(scores_mistral, scores_hf, atol=1e-4)
    scores_unpermuted = apply_rope(heads_of(wq), cos, sin) @ apply_rope(heads_of(wk), cos, sin).transpose(-1, -2)
    assert not torch.allclose(scores_mistral, scores_unpermuted, atol=1e-2)   # skipping it is a silent error


def test_original_state_dict_shapes_and_round_trip():
    torch.manual_seed(0)
    state = to_hf_state_dict(Mixtral(CFG))
    original = hf_to_original_state_dict(state, CFG)
    E, I, H = CFG.num_local_experts, CFG.intermediate_size, CFG.hidden_size
    for w in ("w1", "w2", "w3"):
        assert original[f"layers.0.block_sparse_moe.{w}"].shape == (E * I, H)
    assert "layers.0.block_sparse_moe.gate.weight" in original
    assert not any("feed_forward" in k for k in original)
    back = {}
    for key, tensor in original.items():
        back.update(mistral_to_hf_tensors(key, tensor, CFG))
    assert sorted(back) == sorted(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
