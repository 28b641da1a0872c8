"""The placement planner's decisions for the GPUs learners have, and the arithmetic behind them."""

import copy
import pytest

from mixtral_edu.config import MixtralConfig
from mixtral_edu.params import count_parameters
from mixtral_edu.inference.placement import (
    active_weight_bytes, bandwidth_bound_tokens_per_s, int8_weights_bytes, plan_placement,
)

CFG = MixtralConfig.mixtral_8x7b()
GB = 1e9


def test_one_141gb_gpu_holds_bf16():
    plan = plan_placement(CFG, [141 * GB])
    assert plan.strategy == "single"
    assert plan.devices == ["cuda:0"] and plan.weight_dtype == "bf16"
    assert 93 * GB < plan.bytes_per_device[0] < 141 * GB
    assert "bf16 on one device" in plan.explanation


def test_one_80gb_gpu_gets_int8():
    plan = plan_placement(CFG, [80 * GB])
    assert plan.strategy == "int8" and plan.weight_dtype == "int8"
    assert plan.rejected["single"].startswith("needs 96.1 GB")
    assert 46 * GB < plan.bytes_per_device[0] < 52 * GB
    assert "47.0 GB" in plan.explanation and "per output channel" in plan.explanation


def test_several_80gb_gpus_split_exact_bf16_over_the_fewest_by_default():
    # the rule: the fastest exact plan first. An 8xH100 node: bf16 over 2 of them (the fewest that hold it), not int8
    plan = plan_placement(CFG, [80 * GB] * 8)
    assert plan.strategy == "split" and plan.devices == ["cuda:0", "cuda:1"] and plan.weight_dtype == "bf16"
    assert plan.rejected["single"].startswith("needs 96.1 GB") and "int8" not in plan.rejected


def test_two_80gb_gpus_split_bf16_by_layers():
    plan = plan_placement(CFG, [80 * GB, 80 * GB])
    assert plan.strategy == "split"
    assert plan.devices == ["cuda:0", "cuda:1"]
    assert plan.layers_per_device == [16, 16]
    assert all(b < 80 * GB for b in plan.bytes_per_device)
    assert "layers 0-15 on cuda:0, layers 16-31 on cuda:1" in plan.explanation


def test_int8_on_one_gpu_before_a_split_when_asked():
    plan = plan_placement(CFG, [80 * GB, 80 * GB], prefer_one_gpu=True)
    assert plan.strategy == "int8" and plan.devices == ["cuda:0"] and "split" not in plan.rejected


def test_uneven_gpus_split_in_proportion():
    plan = plan_placement(CFG, [40 * GB, 80 * GB], device_names=["cuda:0", "cuda:1"])
    assert plan.strategy == "split"
    assert plan.devices == ["cuda:1", "cuda:0"]          # the larger GPU first
    assert plan.layers_per_device[0] > plan.layers_per_device[1]
    assert sum(plan.layers_per_device) == 32
    assert all(b <= f for b, f in zip(plan.bytes_per_device, [80 * GB, 40 * GB]))


def test_one_48gb_gpu_offloads_because_int8_plus_cache_and_reserve_is_49_7gb():
    plan = plan_placement(CFG, [48 * GB])
    assert plan.strategy == "offload" and plan.cache_slots == 119
    assert plan.rejected["int8"] == "needs 49.7 GB but the largest GPU has 48.0 GB free"


def test_one_24gb_gpu_offloads_experts():
    plan = plan_placement(CFG, [24 * GB])
    assert plan.strategy == "offload"
    one_expert = count_parameters(CFG)["one_expert"] * 2
    resident = (count_parameters(CFG)["total"] - count_parameters(CFG)["experts"]) * 2
    # the slots fill what is left after resident weights, KV cache and reserve, and no more
    left = 24 * GB - resident - plan.kv_cache_bytes - 2 * 2 ** 30
    assert plan.cache_slots == int(left // one_expert) == 51
    assert plan.bytes_per_device[0] <= 24 * GB
    assert "one LRU cache per layer of 1-2 experts" in plan.explanation and "pinned CPU memory" in plan.explanation


def test_host_memory_is_part_of_the_plan():
    from mixtral_edu.inference.placement import host_bytes_needed

    counts = count_parameters(CFG)
    # offloading reads the model layer by layer and keeps the experts pinned on the host; the pinned
    # allocator rounds each layer's w1, w2, w3 stack (939,524,096 bytes) up to 1 GiB, so at the end the
    # host holds 32 x 3 GiB pinned (103.1 GB, not the 90.2 GB of the bytes), plus the layer being read
    # (2.82 GB) and the largest tensor (0.26 GB): 106.2 GB
    one_layer = counts["per_layer"] * 2 + counts["embeddings"] * 2
    assert host_bytes_needed(CFG, "offload") == 32 * 3 * 2 ** 30 + one_layer
    # int8 holds one layer at a time: 3.1 GB, not the 93.4 GB of the whole model
    assert host_bytes_needed(CFG, "int8") == one_layer < 3.2 * GB and host_bytes_needed(CFG, "single") < 1 * GB
    # a 24 GB GPU on a 64 GB desktop is refused before anything is loaded, with the reason
    with pytest.raises(ValueError, match="offload: fits the GPU, but loading it needs about 106.*64.0 GB is available"):
        plan_placement(CFG, [24 * GB], host_free_bytes=64 * GB)
    plan = plan_placement(CFG, [24 * GB], host_free_bytes=128 * GB)
    assert plan.strategy == "offload" and plan.host_bytes == host_bytes_needed(CFG, "offload")
    assert "host memory" in plan.explanation
    # an 80 GB GPU with 64 GB of host memory: int8 streams layer by layer, so it still fits
    assert plan_placement(CFG, [80 * GB], host_free_bytes=64 * GB).strategy == "int8"


def test_long_context_changes_the_decision():
    # 141 GB holds bf16 at 4k tokens, but not with a 32k context at batch 16 (64 GB of KV cache)
    plan = plan_placement(CFG, [141 * GB], context_len=32768, batch_size=16)
    assert plan.kv_cache_bytes == 131072 * 32768 * 16
    assert plan.strategy == "int8"


def test_nothing_fits_raises_with_reasons():
    with pytest.raises(ValueError, match="no placement fits.*offload"):
        plan_placement(CFG, [4 * GB])
    with pytest.raises(ValueError, match="at least one GPU"):
        plan_placement(CFG, [])


def test_int8_and_bandwidth_arithmetic():
    assert int8_weights_bytes(CFG) == pytest.approx(47.0e9, rel=0.01)
    assert active_weight_bytes(CFG) == (12_879_925_248 - 32000 * 4096) * 2
    # the bounds: H200 bf16 ~188 tokens/s, H100 int8 ~260 tokens/s
    assert bandwidth_bound_tokens_per_s(CFG, 4.8e12) == pytest.approx(188.25, abs=0.01)
    assert bandwidth_bound_tokens_per_s(CFG, 3.35e12, quant="int8") == pytest.approx(260, abs=1)


def test_load_placed_follows_the_plan(tmp_path):
    """Each strategy on the CPU with a tiny checkpoint: the loaded model computes the same logits."""
    import torch

    from mixtral_edu.weights import save_model
    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.inference.offload import OffloadedExperts
    from mixtral_edu.inference.optimize import optimize_for
    from mixtral_edu.inference.placement import Plan, load_placed
    from mixtral_edu.inference.quant import is_quantized

    cfg = MixtralConfig.tiny(vocab_size=128, num_hidden_layers=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ref = Mixtral(cfg).eval()
    save_model(ref, tmp_path)
    ids = torch.randint(0, 128, (1, 5))
    expected = optimize_for(copy.deepcopy(ref), "cpu", threads=False)(ids)   # load_placed installs the CPU layout
    cpu = ["cpu"]
    for plan in (Plan("single", cpu, "float32", [2], [0], 0), Plan("split", cpu * 2, "float32", [1, 1], [0, 0], 0),
                 Plan("offload", cpu, "float32", [2], [0], 0, cache_slots=3), Plan("int8", cpu, "int8", [2], [0], 0)):
        model, cache = load_placed(tmp_path, plan, dtype=torch.float32, pin=False, progress=False)
        with torch.no_grad():
            got = model(ids)
        if plan.strategy == "int8":
            assert is_quantized(model) and ((got - expected).norm() / expected.norm()) < 0.05
        else:
            assert torch.equal(got, expected), plan.strategy
        assert (cache is not None) == (plan.strategy == "offload")
        if cache is not None:
            assert isinstance(model.layers[0].block_sparse_moe.experts, OffloadedExperts) and cache.stats.lookups > 0


def test_pinned_blocks_round_up_to_a_power_of_two():
    from mixtral_edu.inference.placement import pinned_block_bytes

    assert pinned_block_bytes(939_524_096) == 2 ** 30 and pinned_block_bytes(2 ** 30) == 2 ** 30
    assert pinned_block_bytes(2 ** 30 + 1) == 2 ** 31 and pinned_block_bytes(1) == 1




def test_an_offload_plan_states_the_hit_rate_of_a_routing_trace_and_the_load_has_it(tmp_path):
    """The tiny trained model planned onto a "GPU" (the CPU) with room for 6 of its 32 experts: the plan states
    the hit rate its per-layer caches have on the routing trace of a text, and the model load_placed builds,
    decoding that text one token at a time, counts exactly that hit rate."""
    import torch

    from mixtral_edu.analysis.routing import trace_routing
    from mixtral_edu.assets import TINY_MODEL_DIR
    from mixtral_edu.inference.placement import load_placed
    from mixtral_edu.params import kv_cache_bytes_per_token
    from mixtral_edu.tokenizer import Tokenizer
    from mixtral_edu.weights import load_model

    model = load_model(TINY_MODEL_DIR, progress=False)
    cfg = model.config
    ids = [1] + Tokenizer(TINY_MODEL_DIR / "tokenizer.model").encode("def add(a, b):\n    return a + b\n" * 3)
    trace = trace_routing(model, ids).expert_ids
    counts = count_parameters(cfg)
    kv = kv_cache_bytes_per_token(cfg, "float32") * 64
    free = (counts["total"] - counts["experts"]) * 4 + kv + 6.5 * counts["one_expert"] * 4
    plan = plan_placement(cfg, [free], dtype="float32", context_len=64, reserve_bytes=0, device_names=["cpu"],
                          allow_int8=False, routing_trace=trace)
    assert plan.strategy == "offload" and plan.cache_slots == 6
    assert 0 < plan.expected_hit_rate < 1 and f"these caches hit {plan.expected_hit_rate:.1%}" in plan.explanation
    with pytest.raises(ValueError, match="routing_trace has 2 layers"):
        plan_placement(cfg, [free], dtype="float32", context_len=64, reserve_bytes=0, device_names=["cpu"],
                       allow_int8=False, routing_trace=trace[:2])
    offloaded, cache = load_placed(TINY_MODEL_DIR, plan, pin=False, progress=False)
    kv_cache = offloaded.new_kv_cache(1, len(ids))
    with torch.no_grad():
        for t in ids:
            offloaded(torch.tensor([[t]]), cache=kv_cache)
    assert cache.stats.hit_rate == plan.expected_hit_rate
