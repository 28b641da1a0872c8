"""int8 and offload loads build the model one decoder layer at a time: the host never holds all layers,
and a model placed on another device keeps the standard layout (the CPU layout stays on the CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.offload import OffloadedExperts
from mixtral_edu.inference.placement import Plan, load_placed
from mixtral_edu.inference.quant import Int8Experts
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.params import count_parameters
from mixtral_edu.weights import load_model, save_model
from mixtral_edu.weights.partial import load_by_layer

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(folder, **overrides):
    cfg = MixtralConfig.tiny(vocab_size=128, num_hidden_layers=3, max_position_embeddings=32, **overrides)
    torch.manual_seed(3)
    model = Mixtral(cfg).eval()
    save_model(model, folder, max_shard_size=60_000)          # layers span several files
    return model


def _where(layer) -> set:
    return {p.device.type for p in layer.parameters()}


def test_each_layer_gets_host_storage_only_when_its_turn_comes(tmp_path, monkeypatch):
    """At layer i's callback: every other layer is shapes on the meta device (later ones not read yet,
    earlier ones placed, here on the meta device as a GPU stand-in), and layer i, on the host, holds
    exactly the checkpoint's weights."""
    from mixtral_edu.weights import load as load_module

    ref = _checkpoint(tmp_path)
    built, seen = [], []
    real_skeleton = load_module.meta_skeleton
    monkeypatch.setattr(load_module, "meta_skeleton", lambda cfg: built.append(real_skeleton(cfg)) or built[-1])

    def place(i, layer):
        others = [j for j in range(3) if j != i]
        assert all(_where(built[0].layers[j]) == {"meta"} for j in others), i
        assert _where(layer) == {"cpu"}
        for name, p in layer.named_parameters():
            assert torch.equal(p, ref.layers[i].get_parameter(name)), (i, name)
        seen.append(i)
        layer.to("meta")

    model = load_by_layer(tmp_path, torch.float32, "meta", place)
    assert seen == [0, 1, 2] and model is built[0]
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_layer_by_layer_int8_and_offload_equal_the_model_loaded_whole(tmp_path):
    """The same logits as load_model + quantising (int8) or offloading afterwards, on the CPU."""
    from mixtral_edu.inference.offload import offload_experts
    from mixtral_edu.inference.quant import quantize_model

    _checkpoint(tmp_path)
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    int8, _ = load_placed(tmp_path, Plan("int8", ["cpu"], "int8", [3], [0], 0), dtype=torch.float32, progress=False)
    offload, cache = load_placed(tmp_path, Plan("offload", ["cpu"], "float32", [3], [0], 0, cache_slots=4),
                                 dtype=torch.float32, pin=False, progress=False)
    assert isinstance(int8.layers[2].block_sparse_moe.experts, Int8Experts)
    assert isinstance(offload.layers[2].block_sparse_moe.experts, OffloadedExperts)
    whole_int8 = quantize_model(load_model(tmp_path, dtype=torch.float32, progress=False), device="cpu")
    whole = load_model(tmp_path, dtype=torch.float32, progress=False)
    whole_cache = offload_experts(whole, "cpu", 4, pin=False, per_layer=True)
    with torch.no_grad():
        # lm_head's memory order differs (load_placed installs the CPU layout), so compare to float32 rounding
        torch.testing.assert_close(int8(ids), whole_int8(ids), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(offload(ids), whole(ids), rtol=1e-5, atol=1e-6)
    assert cache.stats.lookups == whole_cache.stats.lookups and cache.stats.hits == whole_cache.stats.hits


def test_a_non_finite_weight_is_refused_by_name(tmp_path):
    from mixtral_edu.weights.errors import CheckpointError

    ref = _checkpoint(tmp_path)
    with torch.no_grad():
        ref.layers[1].block_sparse_moe.experts.w2[3, 0, 0] = float("nan")
    save_model(ref, tmp_path)
    with pytest.raises(CheckpointError, match="layers.1.block_sparse_moe.experts.w2 holds NaN"):
        load_placed(tmp_path, Plan("int8", ["cpu"], "int8", [3], [0], 0), dtype=torch.float32, progress=False)


@pytest.mark.parametrize("strategy", ["single", "int8", "offload"])
def test_a_model_placed_off_the_cpu_keeps_the_standard_layout(tmp_path, strategy):
    """The column-major lm_head is the CPU's layout (inference/cpu.py); placed on another device (meta stands
    in for a GPU: same placement code, no memory) every weight keeps the row-major layout it was read in."""
    _checkpoint(tmp_path)
    plan = Plan(strategy, ["meta"], "float32", [3], [0], 0, cache_slots=3 if strategy == "offload" else None)
    model, _ = load_placed(tmp_path, plan, dtype=torch.float32, pin=False, progress=False)
    assert model.lm_head.weight.device.type == "meta" and model.lm_head.weight.is_contiguous()
    assert all(p.is_contiguous() for p in model.parameters())
    on_cpu, _ = load_placed(tmp_path, Plan(strategy, ["cpu"], "float32", [3], [0], 0,
                                           cache_slots=plan.cache_slots), dtype=torch.float32, pin=False, progress=False)
    assert on_cpu.lm_head.weight.mT.is_contiguous() and not on_cpu.lm_head.weight.is_contiguous()


_PEAK_SCRIPT = r"""
import json, sys, torch
from mixtral_edu.inference.placement import Plan, load_placed
from mixtral_edu.weights import load_model
from mixtral_edu.parallel.expert_parallel import rss_bytes
torch.set_num_threads(1)
narrow, wide, how = sys.argv[1:]

def load(folder):
    if how == "by_layer":     # int8 onto the meta device: a GPU stand-in, so the host holds only what the load needs
        return load_placed(folder, Plan("int8", ["meta"], "int8", [0], [0], 0), dtype=torch.float32, progress=False)
    return load_model(folder, dtype=torch.float32, progress=False)       # every layer on the host

load(narrow)              # the same code on a model of next to no weights: imports and first calls happen here
start = rss_bytes()[0]
model = load(wide)
print(json.dumps({"start": start, "peak": rss_bytes()[1]}))
"""


def _peak_growth(narrow, wide, how: str) -> int:
    """Peak resident bytes of a fresh process loading `wide` `how`, over what it held before (after a warm-up
    load of `narrow`)."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(narrow), str(wide), how], capture_output=True,
                         text=True, check=True, timeout=300)
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    return numbers["peak"] - numbers["start"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM (peak resident memory) is Linux's")
def test_peak_host_memory_of_an_int8_load_is_a_few_layers_not_the_model(tmp_path):
    """8 decoder layers of 24 MiB each (float32). Loading the whole model on the host grows the process by
    all eight; the layer-by-layer int8 load by about one: the layer being read (measured 25-26 MiB). Without
    giving freed pages back after each layer (partial._return_freed_memory), glibc kept one 8 MiB expert stack
    per layer in half the runs (26 MiB or 72 MiB here, 145 MiB with 16 layers): this bound catches that."""
    def config(intermediate):
        return MixtralConfig.tiny(vocab_size=128, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=8,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32)

    torch.manual_seed(0)
    save_model(Mixtral(config(16)), tmp_path / "narrow")
    save_model(Mixtral(config(2048)), tmp_path / "wide")
    layer_bytes = 4 * count_parameters(config(2048))["per_layer"]
    by_layer = _peak_growth(tmp_path / "narrow", tmp_path / "wide", "by_layer")
    whole = _peak_growth(tmp_path / "narrow", tmp_path / "wide", "whole")
    print(f"one layer {layer_bytes / 2**20:.1f} MiB; peak RSS growth: layer by layer {by_layer / 2**20:.1f} MiB, "
          f"whole model on the host {whole / 2**20:.1f} MiB")
    assert whole > 7 * layer_bytes            # the measurement sees a whole model when there is one
    assert by_layer < 2 * layer_bytes, (by_layer, layer_bytes)


@pytest.mark.parametrize("layout", ["mistral", "mistral-pt"])
def test_every_layout_loads_layer_by_layer(tmp_path, layout):
    """Mistral's consolidated.safetensors and the original release's fused .pt files (2 of them) give the
    layer-by-layer loads the same weights as load_model reads from them."""
    from mixtral_edu.weights import save_mistral

    ref = _checkpoint(tmp_path / "hf")
    kwargs = {"num_files": 2} if layout == "mistral-pt" else {}
    save_mistral(ref, tmp_path / layout, layout=layout, **kwargs)
    whole = load_model(tmp_path / layout, dtype=torch.float32, progress=False)
    seen = []

    def compare(i, layer):
        for name, p in layer.named_parameters():
            assert torch.equal(p, whole.layers[i].get_parameter(name)), (layout, i, name)
        seen.append(i)
        layer.to("meta")

    model = load_by_layer(tmp_path / layout, torch.float32, "cpu", compare)
    assert seen == [0, 1, 2]
    for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(model.get_parameter(name), whole.get_parameter(name)), name
