"""load_model's per-layer callback: layers can leave host memory while the rest still streams in."""

import gc
import weakref

import torch

from mixtral_edu.weights import load_model, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.inference.placement import Plan, load_placed
from mixtral_edu.inference.quant import quantize_layer_, quantize_model

pytestmark = __import__("pytest").mark.usefixtures("one_thread")


def _reference(tmp_path, **shards):
    cfg = MixtralConfig.tiny(vocab_size=128, num_hidden_layers=3, max_position_embeddings=32)
    torch.manual_seed(5)
    model = Mixtral(cfg).eval()
    save_model(model, tmp_path, **shards)
    return model


def test_each_layer_is_reported_once_and_complete(tmp_path):
    ref = _reference(tmp_path, max_shard_size=60_000)     # several shards: layers span files
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    seen = []

    def check(i, layer):
        seen.append(i)
        for name, p in layer.named_parameters():
            assert torch.equal(p, ref.layers[i].get_parameter(name)), (i, name)

    loaded = load_model(tmp_path, progress=False, on_layer_loaded=check)
    assert sorted(seen) == [0, 1, 2]
    for name, p in ref.state_dict().items():                # every weight, not only the layers', bit for bit
        assert torch.equal(loaded.state_dict()[name], p), name
    # The same weights may be stored in another order (load_model keeps lm_head column-major on the CPU), and
    # a product over another memory order sums in another order: bit-equal on some CPUs, not on others (seen
    # on an AMD EPYC). So the forward pass is compared to float32 rounding of a 64-wide dot product.
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ref(ids), rtol=1e-5, atol=1e-6)


def test_the_loader_keeps_no_reference_to_a_finished_layer(tmp_path):
    """What the callback replaces is freed at once, while loading goes on: the loader holds none of it."""
    _reference(tmp_path)
    old, alive_at_callback = [], []

    def quantise(i, layer):
        gc.collect()
        alive_at_callback.append(sum(ref() is not None for ref in old))   # earlier layers' old weights
        old.append(weakref.ref(layer.block_sparse_moe.experts.w1))
        quantize_layer_(layer)

    load_model(tmp_path, progress=False, on_layer_loaded=quantise)
    assert len(old) == 3 and alive_at_callback == [0, 0, 0]


def test_streamed_int8_equals_quantising_after_loading(tmp_path):
    _reference(tmp_path)
    plan = Plan("int8", ["cpu"], "int8", [3], [0], 0)
    streamed, _ = load_placed(tmp_path, plan, dtype=torch.float32, pin=False, progress=False)
    after = quantize_model(load_model(tmp_path, dtype=torch.float32, progress=False), device="cpu")
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        assert torch.equal(streamed(ids), after(ids))
