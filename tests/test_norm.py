import torch

from mixtral_edu.model.norm import RMSNorm, rms_norm


def test_rmsnorm_matches_its_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 3
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    naive = norm.weight * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), naive, atol=1e-6)
    # unit weights: every output vector has root-mean-square 1 (up to eps)
    y = rms_norm(x, torch.ones(16), 1e-12)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), torch.ones(2, 5), atol=1e-5)


def test_rmsnorm_equals_layernorm_on_zero_mean_input():
    torch.manual_seed(1)
    x = torch.randn(4, 32)
    x = x - x.mean(-1, keepdim=True)
    layer_norm = torch.nn.LayerNorm(32, eps=1e-5, elementwise_affine=False)
    assert torch.allclose(RMSNorm(32, eps=1e-5)(x), layer_norm(x), atol=1e-5)
    # ... and differs once the mean is not zero
    assert not torch.allclose(RMSNorm(32)(x + 1), layer_norm(x + 1), atol=1e-2)


def test_rmsnorm_keeps_low_precision_dtype_and_matches_reference():
    transformers_mixtral = __import__("transformers.models.mixtral.modeling_mixtral", fromlist=["x"])
    torch.manual_seed(2)
    x = torch.randn(3, 24).to(torch.bfloat16)
    ours, ref = RMSNorm(24, eps=1e-5), transformers_mixtral.MixtralRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        w = torch.randn(24)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    assert ours(x).dtype == torch.bfloat16
    assert torch.equal(ours(x), ref(x))
