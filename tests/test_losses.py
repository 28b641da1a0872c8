import math

import pytest
import torch

from mixtral_edu.training.losses import expert_load, load_balancing_loss, router_z_loss


def balanced_logits(num_experts=4, top_k=2, tokens=8):
    """Token t strongly prefers experts t*k .. t*k+k-1 (mod E): every expert is picked equally often
    and, by symmetry, gets the same mean probability."""
    logits = torch.zeros(tokens, num_experts)
    for t in range(tokens):
        for j in range(top_k):
            logits[t, (t * top_k + j) % num_experts] = 3.0
    return logits


def test_perfect_balance_gives_top_k_in_hf_convention_and_one_in_switch():
    logits = balanced_logits()
    counts, mean_probs = expert_load(logits, 2)
    assert counts.tolist() == [4, 4, 4, 4] and torch.allclose(mean_probs, torch.full((4,), 0.25))
    assert load_balancing_loss(logits, 2).item() == pytest.approx(2.0, abs=1e-6)
    assert load_balancing_loss(logits, 2, normalization="switch").item() == pytest.approx(1.0, abs=1e-6)
    uniform = torch.zeros(10, 8)                 # all logits equal: P uniform, any top-k gives k
    assert load_balancing_loss(uniform, 2).item() == pytest.approx(2.0, abs=1e-6)


def test_collapsed_routing_gives_num_experts():
    logits = torch.full((6, 4), -30.0)
    logits[:, :2] = 30.0                         # every token: experts 0 and 1, probability ~1/2 each
    # f = [1, 1, 0, 0] (picks per token), P = [1/2, 1/2, 0, 0]: E * (1/2 + 1/2) = E
    assert load_balancing_loss(logits, 2).item() == pytest.approx(4.0, abs=1e-5)
    assert load_balancing_loss(logits, 2, normalization="switch").item() == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        load_balancing_loss(logits, 2, normalization="gshard")


def test_layers_are_pooled_as_tokens_and_match_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    layers = tuple(torch.randn(20, 8) * 2 for _ in range(3))
    pooled = torch.cat(layers)
    assert load_balancing_loss(layers, 2).item() == pytest.approx(load_balancing_loss(pooled, 2).item(), abs=1e-6)
    for k in (1, 2, 3):
        ref = load_balancing_loss_func(layers, 8, k).item()
        assert load_balancing_loss(layers, k).item() == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="dense"):
        load_balancing_loss((None, None), 2)


def test_z_loss_worked_example():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2  ->  mean(ln2^2, 4 ln2^2) = 2.5 ln2^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, abs=1e-6)
    assert router_z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2, abs=1e-5)
    assert router_z_loss(torch.zeros(5, 8) + 10).item() == pytest.approx((10 + math.log(8)) ** 2, abs=1e-3)
    with pytest.raises(ValueError, match=r"\[tokens, num_experts\]"):
        router_z_loss(torch.zeros(2, 3, 4))
