"""Routing trace and statistics: hand-built traces with known answers, a random-routing simulation,
and the trace against the model's own router outputs."""

import math

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.model.router import route, router_probs
from mixtral_edu.analysis.routing import (
    RoutingTrace, coefficient_of_variation, default_layers, domain_repetition_rates, domain_usage,
    expert_counts, expert_usage, normalized_entropy, pooled_repetition_rates, random_repetition_baselines,
    repetition_counts, repetition_rates, trace_domains, trace_routing,
)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    fields.update(overrides)
    model = Mixtral(MixtralConfig.tiny(**fields)).eval()
    with torch.no_grad():   # larger router weights, so routing varies from token to token
        for layer in model.layers:
            layer.block_sparse_moe.gate.weight.normal_(0, 1.0)
    return model


def hand_trace(ids_per_layer, num_experts=4, layers=None):
    """A trace from explicit expert ids `[L, T, k]` (probs/weights made consistent but unimportant)."""
    ids = torch.tensor(ids_per_layer)
    L, T, k = ids.shape
    probs = torch.full((L, T, num_experts), 1.0 / num_experts)
    weights = torch.full((L, T, k), 1.0 / k)
    return RoutingTrace(probs, ids, weights, torch.arange(T), tuple(range(L)) if layers is None else layers)


# ------------------------------------------------------------------------- repetition: known answers
def test_repetition_rates_hand_built():
    # pairs: (0,1)->(0,2): first equal, share 0 | (0,2)->(3,2): first differs, share 2
    #        (3,2)->(1,0): nothing shared        | (1,0)->(0,1): first differs, sets equal
    ids = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 0], [0, 1]])
    assert repetition_counts(ids) == (1, 3, 4)
    assert repetition_rates(ids) == (0.25, 0.75)
    # second choice of t equal to first choice of t+1 counts for "first or second", not "first"
    assert repetition_rates(torch.tensor([[5, 6], [6, 7]])) == (0.0, 1.0)
    # a constant first choice repeats always
    assert repetition_rates(torch.tensor([[2, 0], [2, 1], [2, 3]])) == (1.0, 1.0)
    # top-1 routing: both rates are the same thing
    assert repetition_rates(torch.tensor([[1], [1], [2], [2], [3]])) == (0.5, 0.5)


def test_repetition_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        repetition_rates(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        repetition_rates(torch.zeros(2, 3, 2, dtype=torch.long))


def test_pooled_repetition_never_pairs_across_texts():
    a = hand_trace([[[0, 1], [0, 2]]])          # 1 pair, first equal, share
    b = hand_trace([[[3, 2], [1, 0], [1, 2]]])  # 2 pairs: nothing shared; first equal + share
    # pooled over 3 pairs; the boundary pair (0,2)->(3,2) would add a shared pair if it were counted
    assert pooled_repetition_rates([a, b]).tolist() == [[2 / 3, 2 / 3]]
    rates = domain_repetition_rates({"x": [a], "y": [b]})
    assert rates["x"].tolist() == [[1.0, 1.0]] and rates["y"].tolist() == [[0.5, 0.5]]


def test_random_baselines_formula():
    first, either = random_repetition_baselines(8, 2)
    assert first == 0.125
    assert either == pytest.approx(1 - (6 / 8) * (5 / 7))
    assert round(100 * either, 1) == 46.4
    assert random_repetition_baselines(8, 1) == (0.125, 0.125)
    assert random_repetition_baselines(4, 3)[1] == 1.0           # two 3-subsets of 4 always meet
    assert random_repetition_baselines(16, 4)[1] == pytest.approx(1 - math.comb(12, 4) / math.comb(16, 4))
    with pytest.raises(ValueError):
        random_repetition_baselines(4, 5)


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (16, 4)])
def test_random_routing_simulation_recovers_baselines(num_experts, top_k):
    # iid Gaussian router logits -> route() picks a uniformly random ordered k-subset per token
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200_000, num_experts, generator=gen)
    _, ids = route(logits, top_k)
    first, either = repetition_rates(ids)
    base_first, base_either = random_repetition_baselines(num_experts, top_k)
    assert abs(first - base_first) < 0.01 and abs(either - base_either) < 0.01
    if (num_experts, top_k) == (8, 2):
        assert abs(first - 0.125) < 0.01 and abs(either - 0.464) < 0.01
        # and a perfectly repetitive router is far away from both
        assert repetition_rates(ids[:1].repeat(100, 1)) == (1.0, 1.0)


# ------------------------------------------------------------------------- usage and balance
def test_expert_usage_hand_built():
    ids = torch.tensor([[[0, 1], [0, 2], [3, 0], [0, 1]]])               # [L=1, T=4, k=2]
    assert expert_usage(ids, 4, "first").tolist() == [[0.75, 0.0, 0.0, 0.25]]
    assert expert_usage(ids, 4, "any").tolist() == [[4 / 8, 2 / 8, 1 / 8, 1 / 8]]
    assert expert_usage(ids[0], 4, "any").tolist() == [4 / 8, 2 / 8, 1 / 8, 1 / 8]   # [T, k] works too
    trace = hand_trace(ids.tolist())
    assert torch.equal(trace.usage("first"), expert_usage(ids, 4, "first"))
    with pytest.raises(ValueError, match="choice"):
        expert_usage(ids, 4, "second")
    with pytest.raises(ValueError, match="outside"):
        expert_usage(ids, 3)
    assert expert_counts(ids, 4).tolist() == [[4, 2, 1, 1]]             # the tally expert_usage divides
    assert expert_counts(ids, 4, "first").tolist() == [[3, 0, 0, 1]]


def test_domain_usage_pools_tokens():
    a = hand_trace([[[0, 1], [0, 1]]])
    b = hand_trace([[[2, 3]]])
    usage = domain_usage({"code": [a, b], "prose": [b]}, "first")
    assert usage["code"].tolist() == [[2 / 3, 0.0, 1 / 3, 0.0]]
    assert usage["prose"].tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_balance_measures_hand_built():
    even = torch.tensor([0.25, 0.25, 0.25, 0.25])
    one = torch.tensor([1.0, 0.0, 0.0, 0.0])
    half = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert coefficient_of_variation(even).item() == 0.0
    assert coefficient_of_variation(one).item() == pytest.approx(math.sqrt(3))   # std sqrt(3)/4, mean 1/4
    assert coefficient_of_variation(half).item() == pytest.approx(1.0)
    assert normalized_entropy(even).item() == pytest.approx(1.0)
    assert normalized_entropy(one).item() == 0.0
    assert normalized_entropy(half).item() == pytest.approx(0.5)                # log 2 / log 4
    counts = torch.tensor([[10.0, 10, 10, 10], [40, 0, 0, 0]])                   # counts work as well, per row
    assert torch.allclose(normalized_entropy(counts), torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        normalized_entropy(torch.tensor([-1.0, 2.0]))


# ------------------------------------------------------------------------- the trace against the model
def test_trace_equals_model_router_outputs():
    model = small_model()
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    trace = trace_routing(model, ids)
    _, all_logits = model(ids, return_router_logits=True)
    k = model.config.num_experts_per_tok
    assert trace.layers == (0, 1, 2, 3)
    assert trace.probs.shape == (4, 40, 8) and trace.expert_ids.shape == (4, 40, 2)
    assert trace.probs.dtype == torch.float32 and trace.probs.device.type == "cpu"
    assert torch.equal(trace.token_ids, ids[0])
    for i, logits in enumerate(all_logits):
        weights, expert_ids = route(logits, k)
        assert torch.equal(trace.expert_ids[i], expert_ids)
        assert torch.allclose(trace.weights[i], weights, atol=1e-6)
        assert torch.allclose(trace.probs[i], router_probs(logits), atol=1e-6)
    # weights ordered, summing to 1; the first choice is the argmax of the full softmax
    assert bool((trace.weights[..., 0] >= trace.weights[..., 1]).all())
    assert torch.allclose(trace.weights.sum(-1), torch.ones(4, 40))
    assert torch.equal(trace.expert_ids[..., 0], trace.probs.argmax(-1))
    # the routing is not trivial on this model (so the comparison above means something)
    assert len(set(trace.expert_ids[0, :, 0].tolist())) > 2
    # the hooks are gone afterwards
    assert all(not layer.block_sparse_moe.gate._forward_hooks for layer in model.layers)


def test_trace_builds_no_autograd_graph():
    # a trace is inference: the forward runs with grad off, even on a model whose weights require grad
    model = small_model()
    assert all(p.requires_grad for p in model.parameters())
    grad_modes = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    try:
        trace_routing(model, [1, 2, 3, 4])
        trace_routing(model, [1, 2, 3, 4], chunk_size=2)
    finally:
        handle.remove()
    assert grad_modes == [False, False, False] and torch.is_grad_enabled()


def test_trace_layer_subset_list_input_and_chunks():
    model = small_model(seed=2)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3))
    full = trace_routing(model, ids)
    sub = trace_routing(model, ids.tolist(), layers=[3, 1])
    assert sub.layers == (3, 1) and sub.probs.shape == (2, 30, 8)
    for name in ("probs", "expert_ids", "weights"):
        assert torch.equal(getattr(sub, name), getattr(full, name)[[3, 1]])
    assert torch.equal(sub.expert_ids, full.select([3, 1]).expert_ids)
    chunked = trace_routing(model, ids, chunk_size=7)
    assert torch.equal(chunked.expert_ids, full.expert_ids)
    assert torch.allclose(chunked.probs, full.probs, atol=1e-5)
    assert sub.row(1) == 1
    with pytest.raises(KeyError, match="not recorded"):
        sub.row(0)


def test_trace_rejects_bad_input():
    model = small_model()
    with pytest.raises(ValueError, match="one sequence"):
        trace_routing(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not exist"):
        trace_routing(model, [1, 2, 3], layers=[4])
    with pytest.raises(ValueError, match="twice"):
        trace_routing(model, [1, 2, 3], layers=[1, 1])
    with pytest.raises(ValueError, match="no tokens"):
        trace_routing(model, [])
    dense = Mixtral(MixtralConfig.tiny(vocab_size=50, num_hidden_layers=1, num_local_experts=1,
                                       num_experts_per_tok=1))
    with pytest.raises(ValueError, match="dense"):
        trace_routing(dense, [1, 2, 3])


def test_trace_domains_and_default_layers():
    model = small_model()

    class FakeTokenizer:
        bos_id = 1

        def encode(self, text):
            return [ord(c) % 97 for c in text]

    traces = trace_domains(model, {"a": ["hello world", [5, 6, 7]], "b": ["xyz"]}, FakeTokenizer(),
                           layers=[0, 3], progress=False)
    assert [t.num_tokens for t in traces["a"]] == [12, 3] and traces["b"][0].num_tokens == 4
    assert traces["a"][0].token_ids[0].item() == 1                           # BOS first
    assert torch.equal(traces["a"][1].expert_ids, trace_routing(model, [5, 6, 7], layers=[0, 3]).expert_ids)
    with pytest.raises(ValueError, match="tokenizer"):
        trace_domains(model, {"a": ["text"]}, progress=False)
    assert default_layers(32) == (0, 15, 31)
    assert default_layers(4) == (0, 1, 3)
    assert default_layers(1) == (0,)


def test_paper_table5_transcription_matches_the_papers_own_reading():
    # The paper: first-layer repetitions are "close to random", layers 15 and 31 "significantly higher"
    # for the first choice (its first-or-second column at layer 31 dips below random for DM Mathematics).
    from mixtral_edu.analysis.routing import PAPER_TABLE5, PAPER_TABLE5_LAYERS

    assert len(PAPER_TABLE5) == 8 and PAPER_TABLE5_LAYERS == (0, 15, 31)
    first_random, either_random = (100 * r for r in random_repetition_baselines(8, 2))
    for subset, rows in PAPER_TABLE5.items():
        assert set(rows) == {0, 15, 31}
        assert abs(rows[0][0] - first_random) < 3 and abs(rows[0][1] - either_random) < 4
        assert rows[15][0] > first_random + 10 and rows[31][0] > first_random + 5
        assert rows[15][1] > either_random + 10
        for first, either in rows.values():
            assert first < either                                   # "first or second" includes "first"
    assert PAPER_TABLE5["DM Mathematics"][31] == (19.7, 44.5)


def test_evenly_spaced_windows():
    from mixtral_edu.analysis.routing import evenly_spaced_windows

    stream = torch.arange(100)
    ws = evenly_spaced_windows(stream, 10, 4)
    assert [w[0].item() for w in ws] == [0, 30, 60, 90] and all(len(w) == 10 for w in ws)
    assert ws[-1][-1].item() == 99
    assert [w[0].item() for w in evenly_spaced_windows(stream, 100, 1)] == [0]
    with pytest.raises(ValueError, match="shorter"):
        evenly_spaced_windows(stream, 101, 1)
