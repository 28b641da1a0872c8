"""Every claim notebooks 05 (router, sparse MoE, router losses) and 06 (full model vs reference) make, asserted.

The tests recompute the facts the notebooks print, so a package change that makes a notebook
sentence false fails here, not only under nbval.
"""

import math
import os
import tempfile

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.experts import swiglu_expert
from mixtral_edu.weights.keys import hf_to_ours_key
from mixtral_edu.weights import load_hf_state_dict
from mixtral_edu.training.losses import expert_load, load_balancing_loss, router_z_loss
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.model.moe import SparseMoeBlock, dispatch_auto, dispatch_gathered, dispatch_grouped
from mixtral_edu.params import count_parameters
from mixtral_edu.model.router import route, route_via_full_softmax, router_probs

WORKED_LOGITS = torch.tensor([[1.2, -0.3, 2.0, 0.1, -1.0, 0.7, 1.9, -0.5]])


# ============================================================================ 05 · router
def test_nb05_worked_router_example():
    weights, ids = route(WORKED_LOGITS, 2)
    assert ids.tolist() == [[2, 6]]
    assert [round(w, 4) for w in weights[0].tolist()] == [0.525, 0.475]
    w_full, ids_full = route_via_full_softmax(WORKED_LOGITS, 2)
    assert ids_full.tolist() == [[2, 6]] and torch.allclose(w_full, weights, atol=1e-7)
    probs = router_probs(WORKED_LOGITS)[0]
    assert round(probs[[2, 6]].sum().item(), 2) == 0.63       # "63% on the chosen two, 37% on the six others"
    top3, _ = route(WORKED_LOGITS, 3)                          # exercise 1
    assert torch.allclose(top3[0], torch.softmax(torch.tensor([2.0, 1.9, 1.2]), 0), atol=1e-6)


def test_nb05_route_equals_full_softmax_for_every_k():
    torch.manual_seed(0)
    many = torch.randn(1000, 8) * 3
    for k in range(1, 9):
        w_a, ids_a = route(many, k)
        w_b, ids_b = route_via_full_softmax(many, k)
        assert torch.equal(ids_a, ids_b) and (w_a - w_b).abs().max().item() < 1e-6


def test_nb05_dispatch_strategies_agree_with_a_naive_loop_on_the_tiny_block():
    cfg = MixtralConfig.tiny()
    torch.manual_seed(0)
    block = SparseMoeBlock(cfg).eval()
    torch.nn.init.normal_(block.gate.weight, std=0.3)
    x = torch.randn(2, 16, cfg.hidden_size)
    with torch.no_grad():
        block.dispatch = dispatch_grouped
        grouped, logits = block(x)
        block.dispatch = dispatch_gathered
        gathered, _ = block(x)
        w, ids = route(logits, 2)
        flat = x.reshape(32, -1)
        naive = torch.stack([sum(w[t, s] * swiglu_expert(flat[t], *(getattr(block.experts, n)[ids[t, s]]
                                                                   for n in ("w1", "w2", "w3")))
                                 for s in range(2)) for t in range(32)])
    assert (grouped - gathered).abs().max().item() < 1e-6
    assert (grouped.reshape(32, -1) - naive).abs().max().item() < 1e-6
    block.dispatch = dispatch_auto
    with torch.no_grad():
        assert (block(x[:1, :1])[0] - grouped[:1, :1]).abs().max().item() < 1e-6
    assert abs(load_balancing_loss(logits, 2).item() - load_balancing_loss_func((logits,), 8, 2).item()) < 1e-6


def test_nb05_the_aux_loss_coefficients_and_where_they_come_from():
    """0.02 is in Mixtral's published config.json (its fields are copied in test_config.py); 0.001 is
    the default of transformers' own MixtralConfig."""
    from test_config import MIXTRAL_8X7B_HF

    assert MIXTRAL_8X7B_HF["router_aux_loss_coef"] == 0.02
    assert transformers.MixtralConfig().router_aux_loss_coef == 0.001


def nb05_examples(E=8, k=2, T=16):
    balanced = torch.zeros(T, E)
    for t in range(T):
        balanced[t, [(2 * t) % E, (2 * t + 1) % E]] = 3.0
    collapsed = torch.full((T, E), -30.0)
    collapsed[:, :2] = 30.0
    return balanced, collapsed


def test_nb05_load_balancing_worked_numbers():
    balanced, collapsed = nb05_examples()
    counts, mean_p = expert_load(balanced, 2)
    assert (counts / 16).tolist() == [0.25] * 8 and torch.allclose(mean_p, torch.full((8,), 0.125))
    counts, mean_p = expert_load(collapsed, 2)
    assert (counts / 16).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert torch.allclose(mean_p, torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]), atol=1e-6)
    for logits, hf, switch in [(balanced, 2.0, 1.0), (collapsed, 8.0, 4.0)]:
        assert load_balancing_loss(logits, 2).item() == pytest.approx(hf, abs=1e-5)
        assert load_balancing_loss(logits, 2, normalization="switch").item() == pytest.approx(switch, abs=1e-5)
        assert load_balancing_loss_func((logits,), 8, 2).item() == pytest.approx(hf, abs=1e-5)
    # collapsing the tokens one by one climbs monotonically from k to E (and from 1 to E/k)
    for norm, lo, hi in [("hf", 2.0, 8.0), ("switch", 1.0, 4.0)]:
        curve = [load_balancing_loss(torch.cat([collapsed[:n], balanced[n:]]), 2, normalization=norm).item()
                 for n in range(17)]
        assert curve[0] == pytest.approx(lo, abs=1e-5) and curve[-1] == pytest.approx(hi, abs=1e-5)
        assert all(y >= x - 1e-6 for x, y in zip(curve, curve[1:])) and curve[-1] > curve[8] > curve[0]
    # scaling logits keeps the chosen experts but the z-loss grows
    scales = torch.linspace(0, 5, 21)
    assert {tuple(route(s * WORKED_LOGITS, 2)[1][0].tolist()) for s in scales[1:]} == {(2, 6)}
    z_curve = [router_z_loss(s * WORKED_LOGITS).item() for s in scales]
    assert all(y > x for x, y in zip(z_curve, z_curve[1:]))
    # exercise 2: collapse costs E whatever k is
    for E, k in [(4, 1), (8, 2), (16, 4)]:
        lg = torch.full((10, E), -30.0)
        lg[:, :k] = 30.0
        assert load_balancing_loss(lg, k).item() == pytest.approx(E, abs=1e-4)


def test_nb05_z_loss_worked_numbers():
    two = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert round(router_z_loss(two).item(), 4) == round(2.5 * math.log(2) ** 2, 4) == 1.2011
    assert round(router_z_loss(torch.zeros(1, 8)).item(), 4) == 4.3241
    assert router_z_loss(torch.zeros(1, 8) + 5).item() == pytest.approx((5 + math.log(8)) ** 2, rel=1e-6)
    # a constant shift changes no routing decision
    assert torch.equal(route(WORKED_LOGITS + 5, 2)[1], route(WORKED_LOGITS, 2)[1])


# ============================================================================ 06 · full model
def test_nb06_parameter_count_by_group_and_on_meta():
    cfg = MixtralConfig.tiny()
    model = Mixtral(cfg)
    counts = count_parameters(cfg)
    groups = {"embeddings": "embed_tokens.", "lm_head": "lm_head.", "attention": ".self_attn.",
              "experts": ".experts.", "router": ".gate.", "norms": "norm."}
    for group, pattern in groups.items():
        assert sum(p.numel() for n, p in model.named_parameters() if pattern in n) == counts[group], group
    total = sum(p.numel() for p in model.parameters())
    assert total == counts["total"] == 4_934_208
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert total - expert_params + expert_params * 2 // 8 == counts["active"]          # exercise 1
    big_cfg = MixtralConfig.mixtral_8x7b()
    with torch.device("meta"):
        big = Mixtral(big_cfg)
    big_total = sum(p.numel() for p in big.parameters())
    assert big_total == count_parameters(big_cfg)["total"] == 46_702_792_704
    big_experts = sum(p.numel() for n, p in big.named_parameters() if ".experts." in n)
    assert f"{big_experts / big_total:.2%}" == "96.56%"
    # "the tiny model is mostly embeddings and lm_head, the real one almost all experts"
    assert (counts["embeddings"] + counts["lm_head"]) / total > 0.8
    assert count_parameters(big_cfg)["experts"] / big_total > 0.95


def test_nb06_tiny_model_equals_transformers_and_greedy_agrees():
    cfg = MixtralConfig.tiny()
    model = Mixtral(cfg).eval()
    hf_cfg = transformers.MixtralConfig(**cfg.to_hf_config())
    hf_cfg.initializer_range = 0.08
    torch.manual_seed(0)
    reference = transformers.MixtralForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        hf_state = load_file(os.path.join(folder, "model.safetensors"))
    assert len(hf_state) == 127
    assert hf_to_ours_key("model.layers.0.block_sparse_moe.experts.5.w1.weight") == \
        ("layers.0.block_sparse_moe.experts.w1", 5)
    assert load_hf_state_dict(model, hf_state) == ([], [])
    torch.manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 80))
    with torch.no_grad():
        ref = reference(input_ids, output_router_logits=True)
        logits, router_logits = model(input_ids, return_router_logits=True)
    assert (logits - ref.logits).abs().max().item() < 1e-4
    for mine, theirs in zip(router_logits, ref.router_logits):
        assert (mine - theirs).abs().max().item() < 1e-5
        assert torch.equal(route(mine, 2)[1], torch.topk(torch.softmax(theirs, -1), 2, dim=-1).indices)

    prompt, steps = input_ids[:1, :12], 16
    with torch.no_grad():
        cache = model.new_kv_cache(1, 12 + steps)
        nxt = model(prompt, cache=cache, last_only=True)
        with_cache = []
        for _ in range(steps):
            token = nxt[:, -1].argmax(-1, keepdim=True)
            with_cache.append(token.item())
            nxt = model(token, cache=cache)
        ids = prompt
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        generated = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=steps, min_new_tokens=steps, eos_token_id=None,
                                       pad_token_id=0)
    assert with_cache == ids[0, 12:].tolist() == generated[0, 12:].tolist()

    # exercise 2: top-1 routing in both models still agrees, and changes the logits
    for ours_layer, ref_layer in zip(model.layers, reference.model.layers):
        ours_layer.block_sparse_moe.top_k = 1
        ref_layer.mlp.gate.top_k = 1
    with torch.no_grad():
        top1 = model(input_ids)
        assert (top1 - reference(input_ids).logits).abs().max().item() < 1e-4
    assert (top1 - logits).abs().max().item() > 1e-3
