"""The checkers' naive references (mixtral_edu/course/naive.py) equal the package's parts and
transformers' Mixtral, so a learner is judged against the model the course teaches."""

import pytest
import torch

from mixtral_edu.course import naive


def test_rms_norm_and_rope_equal_the_package():
    from mixtral_edu.model.norm import rms_norm
    from mixtral_edu.model.rope import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 16, generator=g), torch.rand(16, generator=g)
    assert torch.allclose(naive.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=1e-6)
    q = torch.randn(1, 2, 4, 8, generator=g)
    cos, sin = rope_cos_sin(8, 64, 1e4)
    assert torch.allclose(naive.rope(q, 37, 1e4), apply_rope(q, cos[37:41], sin[37:41]), atol=1e-5)


def test_attention_router_expert_and_top_p_equal_the_package_and_torch():
    from mixtral_edu.inference.generate import next_token_probs
    from mixtral_edu.model.experts import swiglu_expert
    from mixtral_edu.model.router import route

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 6, 3, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    mask = torch.arange(7)[None, :] <= torch.arange(3)[:, None] + 4
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            attn_mask=mask)
    assert torch.allclose(naive.attention(q, k, v), sdpa, atol=1e-5)
    logits = torch.randn(5, 8, generator=g)
    weights, ids = naive.router(logits, 2)
    want_w, want_ids = route(logits, 2)
    assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, atol=1e-6)
    x, w1, w2, w3 = (torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g), torch.randn(6, 10, generator=g),
                     torch.randn(10, 6, generator=g))
    assert torch.allclose(naive.expert(x, w1, w2, w3), swiglu_expert(x, w1, w2, w3), atol=1e-4)
    probs = torch.softmax(torch.randn(30, generator=g) * 2, 0)
    assert torch.allclose(naive.top_p(probs, 0.8), next_token_probs(probs.log(), top_p=0.8), atol=1e-6)


def test_the_naive_model_equals_transformers():
    pytest.importorskip("transformers")
    from hf_pair import hf_and_ours

    from mixtral_edu.config import MixtralConfig
    from mixtral_edu.course.build import model_weights

    cfg = MixtralConfig.tiny(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=24, head_dim=8,
                             max_position_embeddings=32)
    reference, model = hf_and_ours(cfg, 0.1)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    caches = [{} for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        want = reference(ids).logits
        first = naive.forward(ids[:, :5], model_weights(model), cfg, caches)        # prefill, then two decode steps
        rest = [naive.forward(ids[:, t:t + 1], model_weights(model), cfg, caches) for t in (5, 6)]
    got = torch.cat([first] + rest, dim=1)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balancing_loss_and_its_gradient_equal_the_package_and_transformers(k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mixtral_edu.training.losses import load_balancing_loss

    logits = (torch.randn(11, 8, generator=torch.Generator().manual_seed(k)) * 2).requires_grad_()
    package = load_balancing_loss(logits, k)
    package.backward()
    ours = naive.load_balancing_loss(logits.detach(), k)
    reference = load_balancing_loss_func((logits.detach(),), num_experts=8, top_k=k)
    # float32 sums of 11 x 8 probabilities: a few ulps apart, far below the checkers' 2e-4
    assert abs(ours.item() - package.item()) < 1e-6 and abs(ours.item() - reference.item()) < 1e-6
    assert torch.allclose(naive.load_balancing_loss_grad(logits.detach(), k), logits.grad, atol=1e-7)
