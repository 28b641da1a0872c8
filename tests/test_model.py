import pytest
import torch
from torch import nn

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import DecoderLayer, Mixtral
from mixtral_edu.model.norm import RMSNorm


def small(**overrides):
    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=40)
    fields.update(overrides)
    return MixtralConfig(**fields)


def test_structure_and_names():
    model = Mixtral(small())
    assert isinstance(model.embed_tokens, nn.Embedding) and isinstance(model.norm, RMSNorm)
    assert isinstance(model.layers, nn.ModuleList) and all(isinstance(l, DecoderLayer) for l in model.layers)
    assert model.lm_head.bias is None and model.lm_head.weight is not model.embed_tokens.weight
    layer = model.layers[1]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(layer.self_attn, proj).bias is None
    moe = layer.block_sparse_moe
    assert isinstance(moe.gate, nn.Linear) and moe.gate.weight.shape == (4, 32) and moe.gate.bias is None
    assert moe.experts.w1.shape == (4, 48, 32) and moe.experts.w2.shape == (4, 32, 48)
    assert moe.experts.w3.shape == (4, 48, 32)
    assert not any("rotary" in k for k in model.state_dict())   # cos/sin are not checkpoint tensors
    tied = Mixtral(small(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_gate_hooks_see_router_logits_and_return_router_logits_agrees():
    torch.manual_seed(0)
    model = Mixtral(small()).eval()
    seen = []
    hooks = [l.block_sparse_moe.gate.register_forward_hook(lambda m, i, o: seen.append(o)) for l in model.layers]
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        logits, router_logits = model(ids, return_router_logits=True)
    for h in hooks:
        h.remove()
    assert logits.shape == (3, 7, 50)
    assert [r.shape for r in router_logits] == [(21, 4), (21, 4)]
    assert all(torch.equal(a, b) for a, b in zip(seen, router_logits))


def test_last_only_and_dtype():
    torch.manual_seed(1)
    model = Mixtral(small()).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids, last_only=True), model(ids)[:, -1:], atol=1e-6)
        half = model.to(torch.bfloat16)
        assert half(ids).dtype == torch.bfloat16
        assert half.new_kv_cache(2, 8).k[0].dtype == torch.bfloat16


def test_dense_config_has_no_router_and_counts_like_the_dense_model():
    cfg = small(num_local_experts=1, num_experts_per_tok=1)
    model = Mixtral(cfg)
    assert model.layers[0].block_sparse_moe.gate is None
    logits, router_logits = model(torch.zeros(1, 3, dtype=torch.long), return_router_logits=True)
    assert router_logits == (None, None)
    per_layer = 2 * 32 + 32 * 32 * 2 + 2 * 32 * 8 * 2 + 3 * 32 * 48   # norms, q/o, k/v, one SwiGLU
    assert sum(p.numel() for p in model.parameters()) == 2 * 50 * 32 + 32 + 2 * per_layer


def test_the_cache_refuses_what_does_not_fit():
    """Token ids are checked where they arrive (generate, the CLI, the tokenizer; see test_generate),
    not in every forward; the cache still refuses tokens beyond its room, before any work."""
    model = Mixtral(small())
    cache = model.new_kv_cache(1, 4)
    assert cache.max_seq_len == 4 and model.new_kv_cache(1).max_seq_len == 40
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert cache.pos == 3                                  # a refused call leaves the cache as it was
