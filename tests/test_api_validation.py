"""Issue 33, item 6: the Python API refuses what the command line refuses, with the same words.

The checks live in one place, `inference/arguments.py`; `generate`, `FastDecoder` and `mixtral-edu` call it.
Before the fix `generate(temperature=1e-40)` and `top_p=1e-46` reached torch ("probability tensor contains
inf/nan"), `FastDecoder(m, 612)` on a 512-position model failed later with an IndexError, and
`FastDecoder.generate(ids, 0)` returned one token.
"""

import io
import sys

import pytest
import torch

from mixtral_edu import FastDecoder, generate
from mixtral_edu.cli import main
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.weights import save_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(MixtralConfig.tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=32)).eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    save_model(model, folder)
    return folder


SAMPLING = [
    (dict(temperature=1e-40), ["--temperature", "1e-40"]),
    (dict(temperature=1.0, top_p=1e-46), ["--temperature", "1", "--top-p", "1e-46"]),
    (dict(temperature=float("inf")), ["--temperature", "inf"]),
    (dict(temperature=float("nan")), ["--temperature", "nan"]),
    (dict(top_k=2 ** 40), ["--top-k", str(2 ** 40)]),
]


@pytest.mark.parametrize("kwargs, flags", SAMPLING)
def test_generate_refuses_what_the_cli_refuses_with_the_same_message(model, weights, kwargs, flags, capsys,
                                                                    monkeypatch):
    with pytest.raises(ValueError) as refused:
        generate(model, [1, 2, 3], 4, **kwargs)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", "x", "--weights", str(weights), *flags]) == 1
    assert capsys.readouterr().err == f"mixtral-edu: error: {refused.value}\n"


def test_fast_decoder_refuses_a_cache_longer_than_the_model_positions(model):
    with pytest.raises(ValueError, match="max_seq_len 612 exceeds the model's context of 512 tokens"):
        FastDecoder(model, 612, use_kernel=False, cuda_graph=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_seq_len must be an integer >= 1"):
            FastDecoder(model, bad, use_kernel=False, cuda_graph=False)


def test_fast_decoder_with_no_new_tokens_returns_none_like_generate(model):
    decoder = FastDecoder(model, 16, use_kernel=False, cuda_graph=False)
    prompt = torch.tensor([[1, 5, 9]])
    assert decoder.generate(prompt, 0) == [] == generate(model, prompt, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        decoder.generate(prompt, -1)
    assert decoder.generate(prompt, 3) == generate(model, prompt, 3, eos_id=None)


def test_fast_decoder_refuses_more_tokens_than_its_cache_before_any_work(model):
    decoder = FastDecoder(model, 8, use_kernel=False, cuda_graph=False)
    with pytest.raises(ValueError, match=r"KV cache is full: prompt \(3 tokens\) \+ max_new_tokens \(7\) - 1 = 9"):
        decoder.generate(torch.tensor([[1, 5, 9]]), 7)
    assert decoder.cache.pos == 0                   # refused before the prompt was run
    assert len(decoder.generate(torch.tensor([[1, 5, 9]]), 6)) == 6
