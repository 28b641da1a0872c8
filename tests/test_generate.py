"""Generation: the sampling step, the KV-cached loop against plain full-forward decoding, EOS, errors, text streaming."""

import pytest
import torch
from torch import nn

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.generate import (TextStream, chat_reply, check_sampling_args, generate, next_token_probs,
                                  sample_next)
from mixtral_edu.model.mixtral import Mixtral

VOCAB = 101
PROMPT = [1, 17, 42, 5, 99, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


@pytest.fixture(scope="module")
def model():
    """A small random Mixtral with large weights, so its next-token distributions are peaked
    (argmax decisions are then far from ties and robust to float rounding)."""
    torch.manual_seed(0)
    cfg = MixtralConfig.tiny(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64)
    m = Mixtral(cfg)
    m.init_weights(std=0.3)
    return m.eval()


def full_forward_greedy(model, prompt, n):
    """Reference decoding without a cache: re-run the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


class CountingModel(nn.Module):
    """Wraps a model and counts the token positions it is asked to process."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.embed_tokens = inner.embed_tokens
        self.tokens_processed = 0
        self.calls = 0

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)

    def forward(self, ids, **kwargs):
        self.tokens_processed += ids.shape[1]
        self.calls += 1
        return self.inner(ids, **kwargs)


class FixedLogitsModel(nn.Module):
    """A stand-in model whose next-token logits are `logits_fn(position)`, position = tokens seen so far."""

    def __init__(self, logits_fn, vocab=5, context=64):
        super().__init__()
        self.config = MixtralConfig.tiny(vocab_size=vocab, num_hidden_layers=1, max_position_embeddings=context)
        self.embed_tokens = nn.Embedding(vocab, 1)
        self.logits_fn = logits_fn

    def new_kv_cache(self, batch_size, max_seq_len=None):
        class Cache:
            pos = 0
        return Cache()

    def forward(self, ids, cache=None, last_only=False):
        cache.pos += ids.shape[1]
        return self.logits_fn(cache.pos).reshape(1, 1, -1)


# ---------------------------------------------------------------- the KV-cached loop

def test_greedy_with_cache_equals_full_forward_argmax(model):
    expected = full_forward_greedy(model, PROMPT, 32)
    got = generate(model, PROMPT, 32, eos_id=None)
    assert got == expected
    assert len(set(got)) > 3  # a real sequence, not one repeated token


def test_prompt_as_list_1d_or_2d_tensor_gives_the_same(model):
    a = generate(model, PROMPT, 8, eos_id=None)
    assert generate(model, torch.tensor(PROMPT), 8, eos_id=None) == a
    assert generate(model, torch.tensor([PROMPT]), 8, eos_id=None) == a


def test_cache_processes_each_token_once(model):
    """With the cache the model sees prompt + (n - 1) tokens in n calls; without, the whole sequence each step."""
    n = 20
    counter = CountingModel(model)
    out = generate(counter, PROMPT, n, eos_id=None)
    assert len(out) == n
    assert counter.calls == n
    assert counter.tokens_processed == len(PROMPT) + n - 1
    no_cache_tokens = sum(len(PROMPT) + i for i in range(n))
    assert no_cache_tokens > 5 * counter.tokens_processed


def test_no_cache_loop_processes_the_quadratic_count(model):
    """Notebook 08's formula: re-running the whole sequence costs N*P + N(N-1)/2 positions for N tokens."""
    n = 15
    counter = CountingModel(model)
    full_forward_greedy(counter, PROMPT, n)
    assert counter.tokens_processed == n * len(PROMPT) + n * (n - 1) // 2


def test_generate_leaves_training_mode_as_it_was(model):
    model.train()
    generate(model, PROMPT, 2)
    assert model.training
    model.eval()


# ---------------------------------------------------------------- sampling

def test_seed_reproducible_and_seeds_differ(model):
    a = generate(model, PROMPT, 24, temperature=1.5, seed=123, eos_id=None)
    b = generate(model, PROMPT, 24, temperature=1.5, seed=123, eos_id=None)
    assert a == b
    others = [generate(model, PROMPT, 24, temperature=1.5, seed=s, eos_id=None) for s in range(3)]
    assert any(o != a for o in others)
    assert a != full_forward_greedy(model, PROMPT, 24)  # sampling at T=1.5 is not greedy


def test_seed_leaves_global_rng_alone(model):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    generate(model, PROMPT, 5, temperature=1.0, seed=1, eos_id=None)
    assert torch.equal(torch.rand(3), expected)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPT, 24, eos_id=None)
    for seed in range(3):
        assert generate(model, PROMPT, 24, temperature=1.0, top_k=1, seed=seed, eos_id=None) == greedy
        assert generate(model, PROMPT, 24, temperature=1.0, top_p=1e-6, seed=seed, eos_id=None) == greedy


def test_next_token_probs_by_hand():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    assert torch.allclose(next_token_probs(logits), torch.tensor([0.1, 0.4, 0.2, 0.3]))
    # only differences between logits matter
    assert torch.allclose(next_token_probs(logits + 100.0, temperature=0.7, top_p=0.8),
                          next_token_probs(logits, temperature=0.7, top_p=0.8))
    # temperature 0.5 squares the probabilities before renormalising
    sq = torch.tensor([0.01, 0.16, 0.04, 0.09])
    assert torch.allclose(next_token_probs(logits, temperature=0.5), sq / sq.sum())
    assert torch.equal(next_token_probs(logits, temperature=0), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # top-2 keeps 0.4 and 0.3
    assert torch.allclose(next_token_probs(logits, top_k=2), torch.tensor([0, 4 / 7, 0, 3 / 7]))
    # top-p 0.5: 0.4 alone is below 0.5, 0.4 + 0.3 crosses it -> keep both
    assert torch.allclose(next_token_probs(logits, top_p=0.5), torch.tensor([0, 4 / 7, 0, 3 / 7]))
    # top-p 0.75: 0.4 + 0.3 = 0.7 < 0.75 -> the 0.2 token is needed too
    assert torch.allclose(next_token_probs(logits, top_p=0.75), torch.tensor([0, 4 / 9, 2 / 9, 3 / 9]))
    # top-p 0.4 is reached by the first token alone
    assert torch.equal(next_token_probs(logits, top_p=0.4), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # the filters compose: top_k=3 then top_p=0.5 of (4/9, 3/9, 2/9)
    assert torch.allclose(next_token_probs(logits, top_k=3, top_p=0.5), torch.tensor([0, 4 / 7, 0, 3 / 7]))


def test_temperature_sharpens_and_flattens():
    """Notebook 08's claims: lower T puts more mass on the top token and lowers the entropy;
    T -> 0 tends to greedy, T -> infinity to uniform."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 3

    def entropy(p):
        p = p[p > 0]
        return float(-(p * p.log()).sum())
    temps = [0.25, 0.5, 1.0, 2.0, 4.0]
    tops = [float(next_token_probs(logits, temperature=t).max()) for t in temps]
    entropies = [entropy(next_token_probs(logits, temperature=t)) for t in temps]
    assert tops == sorted(tops, reverse=True) and len(set(tops)) == len(tops)
    assert entropies == sorted(entropies) and len(set(entropies)) == len(entropies)
    assert float(next_token_probs(logits, temperature=1e-3).max()) > 0.999
    assert int(next_token_probs(logits, temperature=1e-3).argmax()) == int(logits.argmax())
    assert float(next_token_probs(logits, temperature=1e4).max()) < 2 / 1000


def nucleus_by_hand(p, top_p):
    """Nucleus filtering as a plain loop: the likeliest tokens until their mass reaches top_p."""
    ranked = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in ranked:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    out = [0.0] * len(p)
    for i in kept:
        out[i] = p[i] / mass
    return torch.tensor(out, dtype=torch.float64)


def test_top_p_equals_the_plain_loop():
    for seed in range(5):
        logits = torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 2
        p = torch.softmax(logits, -1).double().tolist()
        for top_p in (0.1, 0.5, 0.9, 0.99):
            filtered = next_token_probs(logits, top_p=top_p)
            by_hand = nucleus_by_hand(p, top_p)
            assert torch.equal(filtered > 0, by_hand > 0), (seed, top_p)
            assert torch.allclose(filtered.double(), by_hand, atol=1e-6)


def test_next_token_probs_is_batched():
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0))
    probs = next_token_probs(logits, temperature=0.8, top_k=4, top_p=0.9)
    assert probs.shape == logits.shape
    assert torch.allclose(probs.sum(-1), torch.ones(3, 7))
    assert ((probs > 0).sum(-1) <= 4).all()
    for i in range(3):
        assert torch.equal(probs[i, 2], next_token_probs(logits[i, 2], temperature=0.8, top_k=4, top_p=0.9))


def test_sample_frequencies_match_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.05, 0.35, 0.1, 0.25, 0.15, 0.1]))
    n = 40000
    for kwargs in [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.8)]:
        expected = next_token_probs(logits, **kwargs)
        draws = sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **kwargs)
        freq = torch.bincount(draws, minlength=6).float() / n
        assert torch.all(freq[expected == 0] == 0), kwargs  # filtered tokens are never drawn
        assert torch.allclose(freq, expected, atol=0.01), (kwargs, freq, expected)


def test_generate_samples_from_the_models_distribution():
    """Across seeds, the first generated token follows softmax(logits / T) of a hand-made model."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    fake = FixedLogitsModel(lambda pos: torch.log(probs + 1e-30))
    n = 3000
    firsts = [generate(fake, [0], 1, temperature=1.0, seed=s, eos_id=None)[0] for s in range(n)]
    freq = torch.bincount(torch.tensor(firsts), minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq
    # with top_p=0.6 only the two most likely survive: 0.5/0.8 and 0.3/0.8
    firsts = [generate(fake, [0], 1, temperature=1.0, top_p=0.6, seed=s, eos_id=None)[0] for s in range(n)]
    freq = torch.bincount(torch.tensor(firsts), minlength=5).float() / n
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.03), freq


# ---------------------------------------------------------------- stopping and streaming

def test_stops_at_eos_and_returns_it():
    # the hand-made model predicts 3, 4, 3, then EOS (2) from position 4 on
    def logits_fn(pos):
        wanted = {1: 3, 2: 4, 3: 3}.get(pos, 2)
        return torch.nn.functional.one_hot(torch.tensor(wanted), 5).float() * 10
    fake = FixedLogitsModel(logits_fn)
    seen = []
    out = generate(fake, [1], 50, stream=seen.append)
    assert out == [3, 4, 3, 2]
    assert seen == out
    assert generate(fake, [1], 50, eos_id=4) == [3, 4]
    assert generate(fake, [1], 6, eos_id=None) == [3, 4, 3, 2, 2, 2]
    assert generate(fake, [1], 2) == [3, 4]  # max_new_tokens comes first
    assert generate(fake, [1], 0) == []


def test_stream_gets_each_id_in_order(model):
    seen = []
    out = generate(model, PROMPT, 10, temperature=1.0, seed=5, eos_id=None, stream=seen.append)
    assert seen == out and all(isinstance(i, int) for i in seen)


# ---------------------------------------------------------------- errors

def test_context_overflow_is_a_clear_error(model):
    context = model.config.max_position_embeddings  # 64
    assert len(generate(model, PROMPT, context - len(PROMPT), eos_id=None)) == context - len(PROMPT)
    with pytest.raises(ValueError, match=r"exceeds the model's context of 64 tokens"):
        generate(model, PROMPT, context - len(PROMPT) + 1)
    with pytest.raises(ValueError, match="context"):
        generate(model, list(range(1, 66)), 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments(model, kwargs, message):
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPT, **args)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="batch 1"):
        generate(model, torch.tensor([PROMPT, PROMPT]), 4)
    with pytest.raises(ValueError, match="not text"):
        generate(model, "hello", 4)
    with pytest.raises(ValueError, match="integer"):
        generate(model, torch.tensor([1.0, 2.0]), 4)
    with pytest.raises(ValueError, match=r"input_ids\[1\]"):
        generate(model, [1, "x"], 4)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [1, VOCAB], 4)


def test_check_sampling_args_accepts_the_defaults():
    check_sampling_args()
    check_sampling_args(0.7, 50, 0.9)


# ---------------------------------------------------------------- text

@pytest.fixture(scope="module")
def tokenizer():
    from mixtral_edu.tokenizer import Tokenizer
    return Tokenizer()


def test_text_stream_gets_spaces_and_multibyte_characters_right(tokenizer):
    prompt = tokenizer.encode("def fibonacci(n):")
    continuation = "\n    return n if n < 2 else 🦜 fibonacci(n - 1) — ünïcode ꙮ"
    new = tokenizer.encode("def fibonacci(n):" + continuation)[len(prompt):]
    assert prompt + new == tokenizer.encode("def fibonacci(n):" + continuation)  # a clean split
    stream = TextStream(tokenizer, prompt)
    pieces = [stream.push(i) for i in new]
    assert "".join(pieces) == continuation
    assert stream.text == continuation
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the parrot emoji is byte pieces: its first bytes were held back
    assert stream.flush() == ""  # nothing left over at the end
    # naive per-token decoding loses the spaces: that is what TextStream is for
    assert "".join(tokenizer.decode([i]) for i in new) != continuation


def test_text_stream_flush_lets_out_an_unfinished_character(tokenizer):
    prompt = tokenizer.encode("a")
    parrot = tokenizer.encode("a 🦜")[len(prompt):]  # '▁', then four byte pieces
    stream = TextStream(tokenizer, prompt)
    assert "".join(stream.push(i) for i in parrot[:-1]) == " "
    held = stream.flush()
    assert held and set(held) == {"\ufffd"}  # the three bytes of an unfinished emoji
    assert stream.flush() == ""


def test_chat_reply_is_the_decoded_generation(tokenizer):
    from mixtral_edu.chat import encode_chat
    torch.manual_seed(1)
    m = Mixtral(MixtralConfig.tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                   max_position_embeddings=128)).eval()
    m.init_weights(std=0.2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    pieces = []
    reply = chat_reply(m, tokenizer, messages, max_new_tokens=12, temperature=1.0, seed=3, on_text=pieces.append)
    ids = generate(m, encode_chat(tokenizer, messages), 12, temperature=1.0, seed=3, eos_id=tokenizer.eos_id)
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    assert reply == tokenizer.decode(ids).lstrip(" ")
    assert reply and "".join(pieces) == reply
    with pytest.raises(ValueError, match="last message must be the user's"):
        chat_reply(m, tokenizer, messages + [{"role": "assistant", "content": "5"}])
    with pytest.raises(ValueError, match="message 1"):
        chat_reply(m, tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                  {"role": "user", "content": "c"}])
