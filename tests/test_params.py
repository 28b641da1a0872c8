"""Parameter and memory arithmetic: the published numbers, exactly, and a check against real modules."""

import pytest
import torch
import transformers

from mixtral_edu.config import MixtralConfig
from mixtral_edu.params import count_parameters, dtype_bytes, kv_cache_bytes_per_token, memory_footprint


def test_mixtral_8x7b_exact_counts():
    p = count_parameters(MixtralConfig.mixtral_8x7b())
    assert p["total"] == 46_702_792_704
    assert p["active"] == 12_879_925_248
    assert p["one_expert"] == 176_160_768
    assert round(100 * p["experts"] / p["total"], 2) == 96.56
    parts = ["embeddings", "lm_head", "attention", "experts", "router", "norms"]
    assert sum(p[k] for k in parts) == p["total"]


def test_mistral_7b_exact_count():
    assert count_parameters(MixtralConfig.mistral_7b())["total"] == 7_241_732_096


def test_mixtral_8x7b_memory():
    cfg = MixtralConfig.mixtral_8x7b()
    m = memory_footprint(cfg, "bf16", context_len=0)
    assert m["weights_bytes"] == 93_405_585_408
    assert round(m["weights_bytes"] / 2**30, 2) == 86.99
    assert kv_cache_bytes_per_token(cfg, "bf16") == 131_072
    m = memory_footprint(cfg, torch.bfloat16, context_len=32768)
    assert m["kv_cache_bytes"] == 4 * 2**30
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"]
    # int8 weights: about 47 GB, the KV cache stays bf16.
    m8 = memory_footprint(cfg, "int8", context_len=1, batch_size=2)
    assert round(m8["weights_bytes"] / 1e9) == 47 and m8["kv_cache_bytes"] == 2 * 131_072
    # Too big for one 80 GB card, fits one 141 GB H200.
    assert 80e9 < memory_footprint(cfg, "bf16")["weights_bytes"] < 141e9


def test_bad_dtype_and_sizes():
    with pytest.raises(ValueError, match="dtype"):
        dtype_bytes("float8_madeup")
    with pytest.raises(ValueError, match="context_len"):
        memory_footprint(MixtralConfig.tiny(), "bf16", context_len=-1)


@pytest.mark.parametrize("cfg", [
    MixtralConfig.tiny(vocab_size=500, num_hidden_layers=2),
    MixtralConfig.tiny(vocab_size=300, head_dim=24, num_key_value_heads=1, num_local_experts=4,
                       num_experts_per_tok=3, num_hidden_layers=1),
    MixtralConfig.tiny(vocab_size=300, tie_word_embeddings=True, num_hidden_layers=1),
])
def test_count_matches_transformers_model(cfg):
    """The arithmetic equals the number of weights in transformers' real MixtralForCausalLM."""
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg.to_hf_config()))
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_dense_count_matches_transformers_mistral():
    cfg = MixtralConfig.mistral_7b()
    small = MixtralConfig(**{**cfg.__dict__, "hidden_size": 64, "intermediate_size": 96,
                             "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300})
    hf = transformers.MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = transformers.MistralForCausalLM(hf)
    assert count_parameters(small)["total"] == sum(p.numel() for p in model.parameters())
