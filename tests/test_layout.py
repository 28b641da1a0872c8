"""to_column_major_ changes how the weights sit in memory, and nothing else."""

import torch

from mixtral_edu.checkpoint import load_model, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.generate import generate
from mixtral_edu.layout import column_major, is_column_major, to_column_major_
from mixtral_edu.model import Mixtral
from mixtral_edu.quant import Int8Experts, quantize_model


def tiny(**overrides):
    cfg = MixtralConfig.tiny(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    model = Mixtral(cfg).eval()
    model.init_weights(std=0.1)
    return model


def test_column_major_is_the_same_matrix_stored_transposed():
    w = torch.randn(3, 5, 7)
    c = column_major(w)
    assert torch.equal(c, w) and c.shape == w.shape
    assert is_column_major(c) and not is_column_major(w)
    assert c.stride() == (35, 1, 5)                                    # rows are strided, columns contiguous
    assert c[1].data_ptr() == c.data_ptr() + 35 * 4                    # one expert is still a view


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
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_before.items())
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_are_unchanged():
    model = tiny()
    prompt = [5, 17, 3, 99]
    expected = generate(model, prompt, 12, eos_id=None)
    assert generate(to_column_major_(model), prompt, 12, eos_id=None) == expected


def test_tied_embeddings_stay_tied():
    model = to_column_major_(tiny(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight and is_column_major(model.lm_head.weight)


def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    ids = torch.randint(0, 128, (1, 7))
    save_model(to_column_major_(model), tmp_path)
    loaded = load_model(tmp_path, progress=False)
    assert not is_column_major(loaded.lm_head.weight)                  # the loader's own layout
    torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_int8_experts_are_left_alone():
    model = quantize_model(tiny())
    experts = model.layers[0].block_sparse_moe.experts
    assert isinstance(experts, Int8Experts)
    before = [t.clone() for t in experts.state_dict().values()]
    to_column_major_(model)
    assert all(torch.equal(a, b) for a, b in zip(before, experts.state_dict().values()))
