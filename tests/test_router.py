import torch

from mixtral_edu.model.router import route, route_via_full_softmax, router_probs


def test_topk_softmax_equals_full_softmax_topk_renormalised():
    torch.manual_seed(0)
    logits = torch.randn(200, 8) * 3
    for k in (1, 2, 3, 8):
        w, ids = route(logits, k)
        w_ref, ids_ref = route_via_full_softmax(logits, k)
        assert torch.equal(ids, ids_ref)
        assert torch.allclose(w, w_ref, atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(200), atol=1e-6)
        assert bool((w[:, :-1] >= w[:, 1:]).all())                    # ordered by weight
    assert torch.equal(route(logits, 1)[0], torch.ones(200, 1))       # top-1: the one expert gets weight 1


def test_worked_example_and_reference_router():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    w, ids = route(logits, 2)
    assert ids.tolist() == [[0, 2]]
    e = torch.exp(torch.tensor(1.0))
    assert torch.allclose(w, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))   # softmax([2, 1])
    assert torch.allclose(router_probs(logits).sum(), torch.tensor(1.0))

    from transformers import MixtralConfig as HFConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    ref = MixtralTopKRouter(HFConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2))
    torch.nn.init.normal_(ref.weight)
    x = torch.randn(30, 16)
    ref_logits, ref_w, ref_ids = ref(x)
    w, ids = route(x @ ref.weight.T, 2)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w, atol=1e-6)
