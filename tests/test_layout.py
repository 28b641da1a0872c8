"""to_column_major_ (opt-in) changes how the weights sit in memory, and nothing else."""

import pytest
import torch

from mixtral_edu.inference.optimize import optimize_for

from mixtral_edu.weights import load_model, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.cpu import (ColumnMajorExperts, ColumnMajorLinear, column_major, is_column_major, matvec,
                                to_column_major_)
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.inference.offload import OffloadedExperts, offload_experts
from mixtral_edu.inference.quant import Int8Experts, quantize_model
from mixtral_edu.analysis.routing import trace_routing
from tiny_models import random_tiny as tiny


def test_column_major_is_the_same_matrix_stored_transposed():
    w = torch.randn(3, 5, 7)
    c = column_major(w)
    assert torch.equal(c, w) and c.shape == w.shape
    assert is_column_major(c) and not is_column_major(w)
    assert c.stride() == (35, 1, 5)                                    # rows are strided, columns contiguous
    assert c[1].data_ptr() == c.data_ptr() + 35 * 4                    # one expert is still a view


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(96, 40), (7, 33), (40, 1)])
def test_matvec_is_the_matrix_vector_product(shape, threads):
    torch.manual_seed(0)
    w, x = torch.randn(shape), torch.randn(shape[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)                                      # one bag of rows per thread
    try:
        for layout in (w, column_major(w)):
            torch.testing.assert_close(matvec(x, layout), w @ x, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_one_vector_takes_matvec_and_several_take_the_matrix_product(monkeypatch):
    cfg = MixtralConfig.tiny(vocab_size=100, num_hidden_layers=2, max_position_embeddings=64)
    model = to_column_major_(Mixtral(cfg).eval())
    calls = []
    real = matvec
    monkeypatch.setattr("mixtral_edu.inference.cpu.matvec", lambda x, w: calls.append(tuple(w.shape)) or real(x, w))
    model(torch.tensor([[3, 4, 5, 6, 7, 8]]))
    # prefill: attention, router and lm_head see 6 rows; an expert chosen by a single token sees one vector
    assert set(calls) <= {(128, 64), (64, 128)}
    calls.clear()
    model(torch.tensor([[3]]))
    # one token: per layer q, k, v, o, gate and 2 experts x (w1, w3, w2); then lm_head
    assert len(calls) == 2 * (5 + 2 * 3) + 1 and calls[-1] == (100, 64) and calls.count((32, 64)) == 4


def test_every_matrix_is_converted_and_the_model_computes_the_same():
    model = tiny()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    before = model(ids)
    params_before = {name: id(p) for name, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    to_column_major_(model)
    for name, p in model.named_parameters():
        if p.dim() == 1 or name == "embed_tokens.weight":             # norm gains; a table read by rows
            assert p.is_contiguous(), name
        else:
            assert is_column_major(p), name
    assert {name: id(p) for name, p in model.named_parameters()} == params_before   # same Parameter objects
    assert isinstance(model.lm_head, ColumnMajorLinear) and isinstance(model.layers[1].self_attn.q_proj, ColumnMajorLinear)
    assert all(isinstance(layer.block_sparse_moe.experts, ColumnMajorExperts) for layer in model.layers)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_before.items())
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_and_decode_logits_are_unchanged():
    model = tiny()
    prompt = [5, 17, 3, 99]
    expected = generate(model, prompt, 12, eos_id=None)
    cache = model.new_kv_cache(1, 8)
    steps = [model(torch.tensor([prompt]), cache=cache), model(torch.tensor([[7]]), cache=cache)]
    to_column_major_(model)
    assert generate(model, prompt, 12, eos_id=None) == expected
    cache = model.new_kv_cache(1, 8)
    torch.testing.assert_close(model(torch.tensor([prompt]), cache=cache), steps[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(torch.tensor([[7]]), cache=cache), steps[1], rtol=1e-5, atol=1e-5)


def test_routing_hooks_and_training_still_work():
    model = tiny()
    ids = torch.randint(0, 128, (1, 6))
    trace = trace_routing(model, ids)
    to_column_major_(model)
    again = trace_routing(model, ids)
    assert torch.equal(again.expert_ids, trace.expert_ids)
    model.train()
    model(torch.tensor([[3]])).sum().backward()                           # the single-vector path has gradients
    assert model.layers[0].block_sparse_moe.experts.w1.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_tied_embeddings_stay_tied():
    model = to_column_major_(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight and is_column_major(model.lm_head.weight)


def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    ids = torch.randint(0, 128, (1, 7))
    save_model(to_column_major_(model), tmp_path)
    loaded = load_model(tmp_path, progress=False)
    # the loader stores row-major; optimize_for on a CPU makes lm_head column-major (inference.cpu.use_cpu_layout_)
    assert not any(is_column_major(p) for p in loaded.parameters() if p.dim() == 2)
    optimize_for(loaded, threads=False)
    assert not is_column_major(loaded.layers[0].self_attn.q_proj.weight) and is_column_major(loaded.lm_head.weight)
    assert type(loaded.lm_head) is torch.nn.Linear                     # F.linear, not the row-sum kernel
    torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_offloading_a_column_major_model_gives_the_same_logits():
    model = tiny()
    ids = torch.randint(0, 128, (1, 5))
    expected = model(ids)
    to_column_major_(model)
    offload_experts(model, "cpu", capacity=3)
    assert isinstance(model.layers[0].block_sparse_moe.experts, OffloadedExperts)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_int8_experts_are_left_alone():
    model = quantize_model(tiny())
    experts = model.layers[0].block_sparse_moe.experts
    assert isinstance(experts, Int8Experts)
    before = [t.clone() for t in experts.state_dict().values()]
    to_column_major_(model)
    assert all(torch.equal(a, b) for a, b in zip(before, experts.state_dict().values()))


def test_quantising_a_column_major_model_gives_the_same_int8_model():
    plain, ids = tiny(), torch.randint(0, 128, (1, 5))
    laid_out = to_column_major_(tiny())
    quantize_model(plain), quantize_model(laid_out)
    assert isinstance(laid_out.layers[0].block_sparse_moe.experts, Int8Experts)
    for n in (5, 1):                                                    # prefill and a single token
        torch.testing.assert_close(laid_out(ids[:, :n]), plain(ids[:, :n]), rtol=1e-5, atol=1e-5)
