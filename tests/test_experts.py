import torch
import torch.nn.functional as F

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.experts import Experts, swiglu_expert


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    w1, w3, w2 = torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)
    gate = x @ w1.T
    naive = ((gate * torch.sigmoid(gate)) * (x @ w3.T)) @ w2.T      # silu(a) = a * sigmoid(a)
    assert torch.allclose(swiglu_expert(x, w1, w2, w3), naive, atol=1e-5)


def test_stacked_experts_use_views_and_gathered_matches_per_token():
    torch.manual_seed(1)
    experts = Experts(4, 16, 24)
    assert experts.w1[2].data_ptr() == experts.w1.data_ptr() + 2 * 24 * 16 * 4    # expert 2 is a view
    x = torch.randn(6, 16)
    ids = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1], [0, 2]])
    gathered = experts.forward_gathered(x, ids)
    for t in range(6):
        for s in range(2):
            e = ids[t, s].item()
            expected = swiglu_expert(x[t], experts.w1[e], experts.w2[e], experts.w3[e])
            assert torch.allclose(gathered[t, s], expected, atol=1e-6)
    assert torch.allclose(experts(x, 1), F.linear(F.silu(F.linear(x, experts.w1[1])) * F.linear(x, experts.w3[1]),
                                                  experts.w2[1]))


def test_one_8x7b_expert_has_176_million_parameters():
    cfg = MixtralConfig.mixtral_8x7b()
    with torch.device("meta"):
        one = Experts(1, cfg.hidden_size, cfg.intermediate_size)
    assert sum(p.numel() for p in one.parameters()) == 176_160_768
