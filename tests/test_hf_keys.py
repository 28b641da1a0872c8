import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.keys import hf_to_ours_key, ours_to_hf_key, split_fused_experts, to_hf_state_dict
from mixtral_edu.weights import load_hf_state_dict
from mixtral_edu.model.mixtral import Mixtral


def cfg(**overrides):
    fields = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                  num_experts_per_tok=2, max_position_embeddings=32)
    fields.update(overrides)
    return MixtralConfig(**fields)


def test_key_mapping_examples():
    assert hf_to_ours_key("model.layers.3.block_sparse_moe.experts.5.w1.weight") == \
        ("layers.3.block_sparse_moe.experts.w1", 5)
    assert hf_to_ours_key("model.layers.0.block_sparse_moe.gate.weight") == \
        ("layers.0.block_sparse_moe.gate.weight", None)
    assert hf_to_ours_key("model.layers.0.mlp.gate.weight") == ("layers.0.block_sparse_moe.gate.weight", None)
    assert hf_to_ours_key("model.layers.2.self_attn.k_proj.weight") == ("layers.2.self_attn.k_proj.weight", None)
    assert hf_to_ours_key("model.embed_tokens.weight") == ("embed_tokens.weight", None)
    assert hf_to_ours_key("lm_head.weight") == ("lm_head.weight", None)
    assert hf_to_ours_key("model.layers.1.mlp.up_proj.weight") == ("layers.1.block_sparse_moe.experts.w3", 0)
    assert ours_to_hf_key("layers.3.block_sparse_moe.experts.w2", 4) == \
        "model.layers.3.block_sparse_moe.experts.4.w2.weight"
    with pytest.raises(KeyError, match="model.layers.0.foo.weight"):
        hf_to_ours_key("model.layers.0.foo.weight")
    with pytest.raises(KeyError, match="split_fused_experts"):
        hf_to_ours_key("model.layers.0.mlp.experts.gate_up_proj")


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True},
                                       {"num_local_experts": 1, "num_experts_per_tok": 1}])
def test_round_trip_through_hf_keys(overrides):
    torch.manual_seed(0)
    a, b = Mixtral(cfg(**overrides)), Mixtral(cfg(**overrides))
    state = to_hf_state_dict(a, clone=True)
    assert ("lm_head.weight" in state) == (not a.config.tie_word_embeddings)
    if not a.config.is_moe:
        assert "model.layers.0.mlp.gate_proj.weight" in state
    assert load_hf_state_dict(b, state) == ([], [])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_fused_form_splits_gate_first():
    gate_up = torch.arange(3 * 48 * 16, dtype=torch.float32).view(3, 48, 16)
    down = torch.randn(3, 16, 24)
    out = split_fused_experts({"model.layers.0.mlp.experts.gate_up_proj": gate_up,
                               "model.layers.0.mlp.experts.down_proj": down,
                               "model.layers.0.mlp.gate.weight": torch.zeros(3, 16)})
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.2.w1.weight"], gate_up[2, :24])
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.2.w3.weight"], gate_up[2, 24:])
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.1.w2.weight"], down[1])
    assert "model.layers.0.block_sparse_moe.gate.weight" in out


def test_errors_name_the_tensor():
    model = Mixtral(cfg())
    state = to_hf_state_dict(model, clone=True)
    bad = dict(state)
    bad["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(5, 16)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight: shape \(5, 16\)"):
        load_hf_state_dict(model, bad)
    bad = dict(state)
    del bad["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    bad["model.layers.7.input_layernorm.weight"] = torch.ones(16)       # a layer the model lacks
    with pytest.raises(KeyError, match=r"missing keys: model\.layers\.0\.block_sparse_moe\.experts\.2\.w3\.weight"):
        load_hf_state_dict(model, bad)
    result = load_hf_state_dict(model, bad, strict=False)
    assert result.missing == ["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert result.unexpected == ["model.layers.7.input_layernorm.weight"]
    tied = Mixtral(cfg(tie_word_embeddings=True))
    tied_state = to_hf_state_dict(tied, clone=True)
    tied_state["lm_head.weight"] = torch.zeros(40, 16)
    with pytest.raises(ValueError, match="lm_head.weight: the model ties"):
        load_hf_state_dict(tied, tied_state)
