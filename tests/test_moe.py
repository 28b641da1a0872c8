import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.experts import swiglu_expert
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.inference.dispatch import decode_dispatch, dispatch_sync_free
from mixtral_edu.model.moe import SparseMoeBlock, dispatch_auto, dispatch_gathered, dispatch_grouped


def moe_cfg(**overrides):
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=64)
    fields.update(overrides)
    return MixtralConfig(**fields)


def naive_moe(block, x):
    """Every token, every chosen expert, one at a time: full softmax -> top-k -> renormalise."""
    out = torch.zeros_like(x)
    probs = torch.softmax(x @ block.gate.weight.T, dim=-1)
    for t in range(x.shape[0]):
        top_p, top_e = probs[t].topk(block.top_k)
        for p, e in zip(top_p / top_p.sum(), top_e.tolist()):
            out[t] += p * swiglu_expert(x[t], block.experts.w1[e], block.experts.w2[e], block.experts.w3[e])
    return out


def run(block, x, dispatch):
    block.dispatch = dispatch
    return block(x)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_strategies_agree_and_match_naive(k):
    torch.manual_seed(k)
    block = SparseMoeBlock(moe_cfg(num_experts_per_tok=k))
    torch.nn.init.normal_(block.gate.weight)
    x = torch.randn(2, 25, 32)
    grouped, logits = run(block, x, dispatch_grouped)
    gathered, logits2 = run(block, x, dispatch_gathered)
    assert grouped.shape == x.shape and logits.shape == (50, 8) and torch.equal(logits, logits2)
    assert (grouped - gathered).abs().max().item() < 1e-6
    assert (run(block, x, dispatch_sync_free)[0] - grouped).abs().max().item() < 1e-6
    assert torch.allclose(grouped.view(50, 32), naive_moe(block, x.view(50, 32)), atol=1e-6)
    one = x[:1, :1]                                        # a single token: the decode paths
    for dispatch in (dispatch_gathered, dispatch_sync_free, dispatch_auto, decode_dispatch(use_kernel=False)):
        assert (run(block, one, dispatch)[0] - grouped[:1, :1]).abs().max().item() < 1e-6, dispatch


def test_auto_dispatch_choice_and_set_dispatch():
    block = SparseMoeBlock(moe_cfg())
    assert block.dispatch is dispatch_auto
    calls = []

    def spy(experts, x, weights, expert_ids):
        calls.append(x.shape[0])
        return dispatch_grouped(experts, x, weights, expert_ids)
    model = Mixtral(moe_cfg())
    model.set_dispatch(spy)
    model(torch.zeros(1, 3, dtype=torch.long))
    assert calls == [3, 3]                                 # one call per layer, all 3 tokens at once
    model.set_dispatch("gathered")
    assert all(layer.block_sparse_moe.dispatch is dispatch_gathered for layer in model.layers)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        model.set_dispatch("scatter")


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any non-view aten op produces (an expert-weight copy would show up here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:                               # select/t/view share the weights' memory
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def test_single_token_decode_copies_no_expert_weights():
    torch.manual_seed(0)
    block = SparseMoeBlock(moe_cfg(hidden_size=64, intermediate_size=256))
    one_expert_matrix = 256 * 64
    with torch.no_grad(), LargestOutput() as rec:
        block(torch.randn(1, 1, 64))
    assert rec.largest < one_expert_matrix // 8            # only activations: [1, 256] at most
    with torch.no_grad(), LargestOutput() as rec:
        run(block, torch.randn(1, 3, 64), dispatch_gathered)   # several tokens: the gather copies weights
    assert rec.largest >= 3 * 2 * one_expert_matrix


def test_dense_block_has_no_router_and_weight_one():
    cfg = moe_cfg(num_local_experts=1, num_experts_per_tok=1)
    block = SparseMoeBlock(cfg)
    assert block.gate is None
    x = torch.randn(3, 4, 32)
    out, logits = block(x)
    assert logits is None
    e = block.experts
    assert torch.allclose(out, swiglu_expert(x, e.w1[0], e.w2[0], e.w3[0]))


def test_whole_model_dispatch_agrees_in_forward_and_decode():
    torch.manual_seed(5)
    model = Mixtral(moe_cfg()).eval()
    model.init_weights(std=0.1)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        model.set_dispatch("grouped")
        grouped = model(ids)
        model.set_dispatch("gathered")
        gathered = model(ids)
        model.set_dispatch("auto")
        cache = model.new_kv_cache(1, 9)
        steps = [model(ids[:1, t:t + 1], cache=cache) for t in range(9)]   # T=1: auto picks "gathered"
    assert (grouped - gathered).abs().max().item() < 1e-6
    assert (torch.cat(steps, dim=1) - grouped[:1]).abs().max().item() < 1e-5
