"""The claims notebook 10 makes about the trained tiny Mixtral's routing on held-out text.

The analysis is the notebook's: 24 evenly spaced windows of 128 tokens per held-out domain, each
traced on its own; first, middle and last layer. If the checkpoint is retrained, these are the
statements to re-check before re-running the notebook.
"""

import itertools

import pytest
import torch

from mixtral_edu.assets import TINY_MODEL_DIR
from mixtral_edu.weights import load_model
from mixtral_edu.training.corpus import load_split, token_stream
from mixtral_edu.model.router import route
from mixtral_edu.analysis.routing import (
    default_layers, domain_repetition_rates, domain_usage, evenly_spaced_windows, expert_usage,
    normalized_entropy, pooled_usage, random_repetition_baselines, trace_domains, trace_routing,
)
from mixtral_edu.tokenizer import Tokenizer

WINDOW, N_WINDOWS = 128, 24


@pytest.fixture(scope="module")
def setup():
    model = load_model(TINY_MODEL_DIR, progress=False)
    tok = Tokenizer()
    windows = {d: evenly_spaced_windows(token_stream(tok, docs), WINDOW, N_WINDOWS)
               for d, docs in load_split("heldout").items()}
    traces = trace_domains(model, windows, progress=False)
    return model, tok, traces


def test_trace_is_the_trained_models_own_routing(setup):
    model, tok, _ = setup
    ids = [tok.bos_id] + tok.encode("def square(x):\n    return x * x\n")
    trace = trace_routing(model, ids)
    _, router_logits = model(torch.tensor([ids]), return_router_logits=True)
    for layer, logits in enumerate(router_logits):
        weights, expert_ids = route(logits, model.config.num_experts_per_tok)
        assert torch.equal(trace.expert_ids[layer], expert_ids)
        assert torch.allclose(trace.weights[layer], weights, atol=1e-6)


def test_claim_1_repetition_above_random_and_lowest_at_first_layer(setup):
    model, _, traces = setup
    cfg = model.config
    L = cfg.num_hidden_layers
    first_random, either_random = random_repetition_baselines(cfg.num_local_experts, cfg.num_experts_per_tok)
    for domain, rates in domain_repetition_rates(traces).items():
        assert bool((rates[:, 0] > first_random).all()) and bool((rates[:, 1] > either_random).all()), domain
        assert all(rates[0, 0] < rates[layer, 0] for layer in range(1, L)), domain
        for layer in default_layers(L)[1:]:
            assert rates[layer, 0] >= 2 * first_random, (domain, layer)


def test_claim_2_domains_use_different_experts(setup):
    model, _, traces = setup
    usage = domain_usage(traces)
    for a, b in itertools.combinations(usage, 2):
        for layer in default_layers(model.config.num_hidden_layers):
            assert 0.5 * (usage[a][layer] - usage[b][layer]).abs().sum() >= 0.3, (a, b, layer)


def test_claim_3_balanced_over_the_mixture_not_per_domain(setup):
    _, _, traces = setup
    pooled = pooled_usage([t for ts in traces.values() for t in ts])
    assert bool((normalized_entropy(pooled) >= 0.99).all())
    for domain, usage in domain_usage(traces).items():
        assert bool((normalized_entropy(usage) < 0.96).all()), domain


def _concentration(tok, traces, num_experts, keep):
    token_ids = torch.cat([t.token_ids for t in traces])
    expert_ids = torch.cat([t.expert_ids for t in traces], dim=1)
    mask = torch.tensor([keep(p) for p in tok.pieces(token_ids.tolist())])
    return expert_usage(expert_ids[:, mask], num_experts, "first").max(-1).values     # [L]


def test_claim_4_syntax_gets_its_own_experts(setup):
    model, tok, traces = setup
    E = model.config.num_local_experts
    kinds = {
        "self": ("python", lambda p: p in ("▁self", "self")),
        "indentation": ("python", lambda p: len(p) >= 2 and set(p) == {"▁"}),
        "newline": ("python", lambda p: p == "<0x0A>"),
        "digits": ("arithmetic", lambda p: p.strip("▁").isdigit()),
    }
    for name, (domain, keep) in kinds.items():
        kind = _concentration(tok, traces[domain], E, keep)
        whole = _concentration(tok, traces[domain], E, lambda p: True)
        best = int(kind.argmax())
        assert kind[best] >= 0.8 and kind[best] - whole[best] >= 0.2, (name, kind.tolist(), whole.tolist())
    digits = _concentration(tok, traces["arithmetic"], E, kinds["digits"][1])
    assert digits[0] >= 0.9                                           # layer 0: digits -> one expert

    repeats = digit_pairs = 0
    for t in traces["arithmetic"]:
        digit = torch.tensor([p.strip("▁").isdigit() for p in tok.pieces(t.token_ids.tolist())])
        same = t.expert_ids[0, 1:, 0] == t.expert_ids[0, :-1, 0]
        repeats += int(same.sum())
        digit_pairs += int((same & digit[1:] & digit[:-1]).sum())
    assert 0.4 <= digit_pairs / repeats <= 0.6                         # "about half"
    # ... and arithmetic repeats far more than the paper's DM Mathematics (14.1%) at layer 0
    assert domain_repetition_rates(traces)["arithmetic"][0, 0] > 0.25


def test_training_tokens_and_window_length():
    import json

    config = json.loads((TINY_MODEL_DIR / "training_log.json").read_text())["train_config"]
    assert config["steps"] * config["batch_size"] * config["seq_len"] < 2_000_000     # "under two million"
    assert config["seq_len"] == WINDOW                                                 # windows = training length


def test_setup_facts_the_discussion_states(setup):
    model, tok, traces = setup
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok) == (4, 64, 8, 2)
    assert default_layers(cfg.num_hidden_layers) == (0, 1, 3)                        # "middle" = layer 1
    for domain, ts in traces.items():
        assert len(ts) == N_WINDOWS and sum(t.num_tokens - 1 for t in ts) == 3048
        assert sum(int(t.token_ids[0]) != tok.bos_id for t in ts) > N_WINDOWS / 2, domain   # most mid-document
    # exercise 2's premise: random routing puts the next first choice among this token's k experts k/E of the time
    gen = torch.Generator().manual_seed(0)
    _, ids = route(torch.randn(100_000, 8, generator=gen), 2)
    assert abs((ids[1:, :1] == ids[:-1]).any(-1).float().mean().item() - 2 / 8) < 0.01
