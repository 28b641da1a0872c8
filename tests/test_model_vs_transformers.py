"""Our Mixtral against transformers' MixtralForCausalLM on the same random weights (CPU, float32).

The weights go from transformers to us the way a real checkpoint does: `save_pretrained` writes
per-expert safetensors keys, and `load_hf_state_dict` copies them in through the documented mapping.
"""

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")  # noqa: E402  (a hard requirement of the test suite)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.keys import to_hf_state_dict
from mixtral_edu.weights import load_hf_state_dict
from mixtral_edu.training.losses import load_balancing_loss
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.model.router import route

CONFIGS = {
    # head_dim 16 != hidden 48 / 4 heads; 8 experts, top-2; 2 KV heads shared by 4 query heads
    "explicit_head_dim": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=8, num_experts_per_tok=2),
    # one KV head for all query heads, 4 experts, top-1
    "one_kv_head_top1": dict(vocab_size=150, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=1,
                             num_local_experts=4, num_experts_per_tok=1),
    # 4 experts, top-3, rope_theta 1e4, tied embeddings
    "top3_tied": dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, num_local_experts=4,
                      num_experts_per_tok=3, rope_theta=1e4, tie_word_embeddings=True),
    # a sliding window shorter than the sequence (Mistral-7B-v0.1 style)
    "sliding_window": dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=8, num_experts_per_tok=2, sliding_window=16),
}


def make_pair(overrides, seed=0):
    """A random transformers MixtralForCausalLM and our Mixtral holding the same weights."""
    cfg = MixtralConfig(max_position_embeddings=256, **overrides)
    hf_cfg = transformers.MixtralConfig(**cfg.to_hf_config())
    hf_cfg.initializer_range = 0.08      # larger than the default 0.02: sharper, more varied routing
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():               # norms start at 1; give them random gains so they are tested too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    ours = Mixtral(cfg).eval()
    ours.init_weights(std=1.0)          # overwritten below; proves nothing survives from our init
    return cfg, hf, ours


def load_from_save_pretrained(hf, ours, tmp_path):
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    result = load_hf_state_dict(ours, state)
    assert result.missing == [] and result.unexpected == []
    return state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_routing_match_transformers(name, tmp_path):
    cfg, hf, ours = make_pair(CONFIGS[name])
    load_from_save_pretrained(hf, ours, tmp_path)
    torch.manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (3, 70))          # batch > 1, seq > 64
    with torch.no_grad():
        ref = hf(input_ids, output_router_logits=True)
        logits, router_logits = ours(input_ids, return_router_logits=True)

    assert logits.shape == (3, 70, cfg.vocab_size) and logits.dtype == torch.float32
    assert (logits - ref.logits).abs().max().item() < 1e-4
    assert len(router_logits) == len(ref.router_logits) == cfg.num_hidden_layers
    for layer, (mine, theirs) in enumerate(zip(router_logits, ref.router_logits)):
        assert mine.shape == theirs.shape == (3 * 70, cfg.num_local_experts)
        assert (mine - theirs).abs().max().item() < 1e-5, f"layer {layer}"
        # the reference's choice: full softmax -> top-k (its MixtralTopKRouter)
        ref_ids = torch.topk(torch.softmax(theirs.float(), -1), cfg.num_experts_per_tok, dim=-1).indices
        assert torch.equal(route(mine, cfg.num_experts_per_tok)[1], ref_ids), f"layer {layer}"
    # the routing is not trivial: several experts are used in every layer
    assert all(len(torch.unique(route(r, cfg.num_experts_per_tok)[1])) > 1 for r in router_logits)


def test_in_memory_fused_state_dict_loads_too(tmp_path):
    """transformers 5's own state_dict() has fused experts (mlp.experts.gate_up_proj); it loads the same."""
    cfg, hf, ours = make_pair(CONFIGS["explicit_head_dim"])
    fused = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused          # the real in-memory form
    load_hf_state_dict(ours, fused)
    file_form = load_from_save_pretrained(hf, Mixtral(cfg), tmp_path)
    ours_back = to_hf_state_dict(ours)
    assert sorted(ours_back) == sorted(file_form)
    assert all(torch.equal(ours_back[k], file_form[k]) for k in file_form)


def greedy_without_cache(model, input_ids, steps):
    ids = input_ids
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def greedy_with_cache(model, input_ids, steps):
    cache = model.new_kv_cache(input_ids.shape[0], input_ids.shape[1] + steps)
    logits = model(input_ids, cache=cache, last_only=True)
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits = model(token, cache=cache)
    assert cache.pos == input_ids.shape[1] + steps
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name,batch", [("explicit_head_dim", 1), ("sliding_window", 2), ("one_kv_head_top1", 2)])
def test_greedy_32_tokens_cache_nocache_and_transformers_generate(name, batch, tmp_path):
    cfg, hf, ours = make_pair(CONFIGS[name], seed=3)
    load_from_save_pretrained(hf, ours, tmp_path)
    torch.manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (batch, 20))      # with the window of 16, 52 tokens cross it
    with torch.no_grad():
        cached = greedy_with_cache(ours, prompt, 32)
        uncached = greedy_without_cache(ours, prompt, 32)
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=32, min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert cached.shape == (batch, 32)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref[:, prompt.shape[1]:])
    assert len(torch.unique(cached)) > 3                           # not a degenerate repeat of one token


def test_aux_loss_equals_transformers_load_balancing_loss_func(tmp_path):
    cfg, hf, ours = make_pair(CONFIGS["explicit_head_dim"])
    load_from_save_pretrained(hf, ours, tmp_path)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        ref = hf(input_ids, output_router_logits=True)
        _, router_logits = ours(input_ids, return_router_logits=True)
    theirs = load_balancing_loss_func(ref.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
    assert abs(ref.aux_loss.item() - theirs.item()) < 1e-7
    assert abs(load_balancing_loss(router_logits, cfg.num_experts_per_tok).item() - theirs.item()) < 1e-6
    for k in (1, 3):   # other k on the same logits
        theirs_k = load_balancing_loss_func(ref.router_logits, cfg.num_local_experts, k)
        assert abs(load_balancing_loss(router_logits, k).item() - theirs_k.item()) < 1e-6


def test_dense_config_equals_transformers_mistral(tmp_path):
    """num_local_experts=1: the same block with one expert and no router is Mistral's dense MLP."""
    cfg = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=1,
                        num_experts_per_tok=1, sliding_window=12, rope_theta=1e4, max_position_embeddings=128)
    hf_cfg = transformers.MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=12, max_position_embeddings=128, initializer_range=0.08,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = Mixtral(cfg).eval()
    assert load_hf_state_dict(ours, load_file(str(tmp_path / "model.safetensors"))) == ([], [])
    input_ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert (ours(input_ids) - hf(input_ids).logits).abs().max().item() < 1e-4
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
