"""The shipped checkpoint data/tiny-mixtral: its size, architecture, tokenizer, held-out losses and style."""

import hashlib
import math
import re

import pytest
import torch

from mixtral_edu.assets import DATA_DIR, TINY_MODEL_DIR
from mixtral_edu.weights import load_model
from mixtral_edu.training.corpus import DOMAINS, load_split, token_streams
from mixtral_edu.tokenizer import MIXTRAL_SHA256, Tokenizer
from mixtral_edu.training.train import evaluate

# How data/README.md's numbers were measured (the CLI's final evaluation): windows of 128 tokens,
# the first 32 per domain.
EVAL_SEQ_LEN, EVAL_WINDOWS = 128, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


@pytest.fixture(scope="module")
def model():
    return load_model(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TINY_MODEL_DIR / "tokenizer.model")


def documented_losses() -> dict[str, float]:
    """The held-out table of data/README.md: rows `| domain | loss |`."""
    text = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (python|prose|arithmetic) \| ([0-9.]+) \|", text, flags=re.M))
    assert set(rows) == set(DOMAINS), "data/README.md must list a held-out loss for every domain"
    return {d: float(v) for d, v in rows.items()}


def test_checkpoint_is_small():
    total = sum(p.stat().st_size for p in TINY_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024


def test_architecture_is_a_real_mixtral_in_miniature(model):
    cfg = model.config
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.num_hidden_layers >= 4 and cfg.vocab_size == 32000
    assert (TINY_MODEL_DIR / "model.safetensors").is_file() and (TINY_MODEL_DIR / "config.json").is_file()


def test_it_ships_the_mixtral_tokenizer(tok):
    blob = (TINY_MODEL_DIR / "tokenizer.model").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == MIXTRAL_SHA256
    assert tok.vocab_size == 32000


def test_heldout_losses_match_data_readme(model, tok):
    documented = documented_losses()
    measured = evaluate(model, token_streams(tok, load_split("heldout")), EVAL_SEQ_LEN, EVAL_WINDOWS)
    for domain in DOMAINS:
        assert measured[domain] == pytest.approx(documented[domain], abs=0.01), domain
        assert measured[domain] < math.log(32000) / 2      # far below uniform guessing (10.37)


def _greedy(model, tok, prompt: str, n: int) -> str:
    """Plain greedy decoding without a cache (independent of mixtral_edu.inference.generate)."""
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[0, -1].argmax()
            if int(nxt) == tok.eos_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, 1:].tolist())[len(prompt):]


def test_greedy_continuation_of_code_looks_like_code(model, tok):
    text = _greedy(model, tok, "def fibonacci(n):", 30)
    assert text.startswith("\n    ")                      # a new, indented line after the colon
    assert sum(text.count(c) for c in "()=:.") >= 3          # punctuation of code, not prose


def test_greedy_continuation_of_arithmetic_is_a_number(model, tok):
    text = _greedy(model, tok, "Question: What is 12 + 30?\nAnswer:", 6)
    assert re.match(r" -?\d+\n", text), text


def test_transformers_reads_the_tokenizer_with_its_bos():
    """data/tiny-mixtral carries tokenizer_config.json (as save_model writes it), so AutoTokenizer adds <s>."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    text = "def add(a, b):\n    return a + b"
    assert hf(text).input_ids == [1] + Tokenizer(TINY_MODEL_DIR / "tokenizer.model").encode(text)
