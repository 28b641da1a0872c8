"""Every execution path runs the model's own layers: forward hooks on `self_attn`,
`block_sparse_moe` and `block_sparse_moe.gate` fire once per layer per step, and routing recorded
during fast decoding is the routing of one plain forward pass over the same tokens."""

import copy

import pytest
import torch

from mixtral_edu.analysis.routing import record_routing, trace_routing
from mixtral_edu.inference.decode import FastDecoder
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.offload import offload_experts
from mixtral_edu.inference.quant import quantize_model
from mixtral_edu.inference.split import split_by_layers
from mixtral_edu.model.mixtral import Mixtral
from tiny_models import random_tiny

PROMPT = [5, 17, 3, 99, 42, 8]
NEW = 6
LAYERS = 3


def tiny_model() -> Mixtral:
    return random_tiny(num_hidden_layers=LAYERS, std=0.08)


def variant(name: str) -> Mixtral:
    model = tiny_model()
    if name == "int8":
        model = quantize_model(model)
    elif name == "offloaded":
        offload_experts(model, "cpu", capacity=3)
    elif name == "split":
        split_by_layers(model, ["cpu", "cpu"])
    return model


def fast_decode(model):
    return FastDecoder(model, 32, use_kernel=False, cuda_graph=False).generate(torch.tensor([PROMPT]), NEW)


def eager_generate(model):
    return generate(model, PROMPT, NEW, eos_id=None)


class HookCounter:
    """Counts calls of each hooked module: counts[name][layer]."""

    def __init__(self, model):
        self.counts = {name: [0] * len(model.layers) for name in ("self_attn", "block_sparse_moe", "gate")}
        self.handles = []
        for i, layer in enumerate(model.layers):
            modules = {"self_attn": layer.self_attn, "block_sparse_moe": layer.block_sparse_moe,
                       "gate": layer.block_sparse_moe.gate}
            for name, module in modules.items():
                self.handles.append(module.register_forward_hook(self._hook(name, i)))

    def _hook(self, name, i):
        def hook(module, args, output):
            self.counts[name][i] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


PATHS = [("eager", "dense", eager_generate), ("fast", "dense", fast_decode), ("fast", "int8", fast_decode),
         ("fast", "offloaded", fast_decode), ("fast", "split", fast_decode), ("eager", "split", eager_generate),
         ("eager", "int8", eager_generate), ("eager", "offloaded", eager_generate)]


@pytest.mark.parametrize("path,kind,run", PATHS, ids=[f"{p}-{k}" for p, k, _ in PATHS])
def test_hooks_fire_once_per_layer_per_step(path, kind, run):
    model = variant(kind)
    counter = HookCounter(model)
    new_ids = run(model)
    counter.remove()
    assert len(new_ids) == NEW
    steps = 1 + (NEW - 1)                      # the prefill, then one call per decoded token but the last
    for name, per_layer in counter.counts.items():
        assert per_layer == [steps] * LAYERS, (name, per_layer)


@pytest.mark.parametrize("kind", ["dense", "int8", "offloaded", "split"])
def test_routing_recorded_while_decoding_fast_is_the_forward_pass_routing(kind):
    model = variant(kind)
    with record_routing(model) as recorder:
        new_ids = fast_decode(model)
    seen = PROMPT + new_ids[:-1]
    during = recorder.trace(seen)
    after = trace_routing(model, seen)
    assert torch.equal(during.expert_ids, after.expert_ids)
    torch.testing.assert_close(during.probs, after.probs, rtol=1e-4, atol=1e-5)
    assert during.expert_ids.shape == (LAYERS, len(seen), 2)


def test_every_path_decodes_the_same_tokens():
    reference = eager_generate(tiny_model())
    assert fast_decode(tiny_model()) == reference
    for kind in ("offloaded", "split"):
        assert fast_decode(variant(kind)) == reference, kind
    # int8 changes the weights, so its fast and eager paths are compared with each other
    assert fast_decode(variant("int8")) == eager_generate(variant("int8"))


def test_torch_compile_on_the_cpu_runs_the_same_forward():
    """FastDecoder(compile=True) on the CPU (inductor): the same greedy tokens and logits as eager."""
    model = tiny_model()
    reference = FastDecoder(copy.deepcopy(model), 32, use_kernel=False, cuda_graph=False)
    compiled = FastDecoder(model, 32, use_kernel=False, cuda_graph=False, compile=True)
    ids = torch.tensor([PROMPT])
    assert compiled.generate(ids, NEW) == reference.generate(ids, NEW)
    reference.prefill(ids)
    compiled.prefill(ids)
    for _ in range(3):
        torch.testing.assert_close(compiled.step(), reference.step(), rtol=1e-4, atol=1e-5)


def test_hooks_fire_once_per_layer_per_step_when_compiled():
    """FastDecoder(compile=True) on the CPU: the compiled step still calls every hook once per layer per token."""
    model = tiny_model()
    counter = HookCounter(model)
    new_ids = FastDecoder(model, 32, use_kernel=False, cuda_graph=False, compile=True).generate(torch.tensor([PROMPT]), NEW)
    counter.remove()
    assert len(new_ids) == NEW
    for name, per_layer in counter.counts.items():
        assert per_layer == [NEW] * LAYERS, (name, per_layer)
