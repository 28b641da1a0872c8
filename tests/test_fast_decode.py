"""The sync-free decode step computes what Mixtral.forward computes (CPU, float32, no Triton)."""

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.decode import FastDecoder
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.inference.quant import Int8Experts, quantize_model

import benchmark_scripts

random_model = benchmark_scripts.load("random_weights", "random_weights").random_model   # scaffolding in benchmarks/


def reference_greedy(model, ids, n, max_len):
    """Greedy decoding through Mixtral.forward with its KV cache: (tokens, logits of each step)."""
    cache = model.new_kv_cache(1, max_len)
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        tokens, steps = [], []
        for _ in range(n):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
            logits = model(token, cache=cache)[:, -1]
            steps.append(logits)
    return tokens, steps


@pytest.mark.parametrize("variant", ["float-path", "int8", "sliding_window"])
def test_fast_decoder_equals_forward(variant):
    extra = {"sliding_window": 5} if variant == "sliding_window" else {}
    cfg = MixtralConfig.tiny(vocab_size=256, num_hidden_layers=3, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    model = Mixtral(cfg).eval()
    model.init_weights(std=0.08)
    if variant == "int8":
        model = quantize_model(model)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    tokens, steps = reference_greedy(model, ids, 10, 40)
    decoder = FastDecoder(model, 40, use_kernel=False, cuda_graph=False)
    assert decoder.generate(ids, 10) == tokens
    decoder.prefill(ids)
    for expected in steps[:-1]:
        torch.testing.assert_close(decoder.step(), expected, rtol=1e-4, atol=1e-5)
    assert decoder.cache.pos == 7 + 9 and int(decoder.pos) == 7 + 9


def test_cache_full_is_refused():
    cfg = MixtralConfig.tiny(vocab_size=64, num_hidden_layers=1, max_position_embeddings=16)
    decoder = FastDecoder(Mixtral(cfg).eval(), 4, use_kernel=False, cuda_graph=False)
    with pytest.raises(ValueError, match="KV cache is full"):
        decoder.generate(torch.zeros(1, 3, dtype=torch.long), 3)


def test_random_model_is_built_in_place():
    cfg = MixtralConfig.tiny(vocab_size=128, num_hidden_layers=2, max_position_embeddings=32)
    model = random_model(cfg, "cpu", torch.bfloat16, seed=1)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert torch.all(model.layers[0].input_layernorm.weight == 1) and torch.all(model.norm.weight == 1)
    assert abs(model.layers[1].block_sparse_moe.experts.w2.float().std().item() - 0.02) < 0.002
    # the cos/sin table is the real one, not left over from the meta device
    torch.testing.assert_close(model.rotary_emb.cos, Mixtral(cfg).rotary_emb.cos.bfloat16())
    again = random_model(cfg, "cpu", torch.bfloat16, seed=1)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)       # seeded
    q = random_model(cfg, "cpu", torch.bfloat16, quant="int8", seed=1)
    assert isinstance(q.layers[0].block_sparse_moe.experts, Int8Experts)
    assert q.layers[0].self_attn.q_proj.weight.dtype == torch.int8


def test_summed_attention_is_sdpa_for_one_query():
    """The compiled CPU step's attention (cpu.summed_attention: one query per head, grouped kv heads, a
    boolean mask) equals F.scaled_dot_product_attention up to float32 summation order; outside a compile
    trace the SummedAttention mode leaves the call to ATen (bit for bit the same)."""
    import torch.nn.functional as F
    from mixtral_edu.inference.cpu import SummedAttention, summed_attention
    from mixtral_edu.model.attention import attention_mask

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen) for h, n in ((8, 1), (2, 12), (2, 12)))
    for window in (None, 5):
        mask = attention_mask(torch.tensor([9]), torch.arange(12), window)     # slots 10, 11: the future
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(summed_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
        with SummedAttention():
            assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), expected)
