"""Splitting the model by layers over devices (here: two CPU "devices") changes nothing."""

import copy

import pytest
import torch

from mixtral_edu.config import MixtralConfig
from mixtral_edu.inference.split import split_by_layers
from mixtral_edu.model.attention import KVCache
from mixtral_edu.model.mixtral import Mixtral


def test_split_model_equals_whole_model():
    cfg = MixtralConfig.tiny(vocab_size=256, num_hidden_layers=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Mixtral(cfg).eval()
    split = split_by_layers(copy.deepcopy(model), ["cpu", "cpu"], [1, 3])
    assert [str(d) for d in split.layer_devices] == ["cpu"] * 4
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), split(ids))
        c1, c2 = model.new_kv_cache(2, 16), split.new_kv_cache(2, 16)
        assert torch.equal(model(ids, cache=c1), split(ids, cache=c2))
        step = ids[:, :1]
        assert torch.equal(model(step, cache=c1), split(step, cache=c2))
    assert c2.pos == 8 and len(c2.k) == 4
    # generate() asks the model for its cache and gets the one cache class, each layer's part on its device
    from mixtral_edu.inference.generate import generate
    assert type(c2) is KVCache and [t.device for t in c2.k] == split.layer_devices
    assert generate(split, ids[0].tolist(), 5, eos_id=None) == generate(model, ids[0].tolist(), 5, eos_id=None)


def test_split_moves_inputs_between_devices():
    # meta tensors stand in for a second GPU: the pre-hook must hand layer 1 its inputs on meta
    cfg = MixtralConfig.tiny(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32)
    model = split_by_layers(Mixtral(cfg), ["cpu", "meta"], [1, 1])
    model.set_dispatch("gathered")          # the grouped dispatch needs expert counts, unknown on meta
    seen = []
    model.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].device.type))
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].device.type))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, dtype=torch.long))
    assert seen == ["meta", "meta"] and out.device.type == "meta"
    assert model.embed_tokens.weight.device.type == "cpu" and model.lm_head.weight.device.type == "meta"


def test_bad_layer_counts_are_refused():
    cfg = MixtralConfig.tiny(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32)
    with pytest.raises(ValueError, match="layers_per_device"):
        split_by_layers(Mixtral(cfg), ["cpu", "cpu"], [2, 1])


def _saved_tiny(tmp_path):
    from mixtral_edu.weights import save_model
    cfg = MixtralConfig.tiny(vocab_size=256, num_hidden_layers=4, max_position_embeddings=64)
    torch.manual_seed(3)
    model = Mixtral(cfg).eval()
    save_model(model, tmp_path)
    return model


def test_load_split_streams_each_layer_to_its_own_device(tmp_path):
    """A list of devices: every tensor goes straight to its layer's device, logits unchanged."""
    from mixtral_edu.inference.split import load_split
    model = _saved_tiny(tmp_path)
    split = load_split(tmp_path, ["cpu", "cpu"], [3, 1], progress=False)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), split(ids))
    assert [str(d) for d in split.layer_devices] == ["cpu"] * 4
    # "meta" stands in for a second GPU: layer 3, the final norm and lm_head are never materialised
    # on the CPU, while the embeddings and layers 0-2 are filled from the file.
    placed = load_split(tmp_path, ["cpu", "meta"], [3, 1], progress=False)
    devices = {name: p.device.type for name, p in placed.named_parameters()}
    assert {d for n, d in devices.items() if n.startswith("layers.3.") or n.startswith(("norm.", "lm_head."))} == {"meta"}
    assert {d for n, d in devices.items() if n.startswith(("embed_tokens.", "layers.0.", "layers.2."))} == {"cpu"}
    assert torch.equal(placed.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight)


def test_split_load_refuses_a_device_too_small_for_its_share(tmp_path, monkeypatch):
    from mixtral_edu.weights import load as checkpoint
    _saved_tiny(tmp_path)
    sizes = {"cpu": 10**12, "meta": 1000}
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: sizes[torch.device(device).type])
    from mixtral_edu.inference.split import load_split
    with pytest.raises(checkpoint.InsufficientMemoryError, match="on meta"):
        load_split(tmp_path, ["cpu", "meta"], progress=False)
    with pytest.raises(ValueError, match="layers_per_device"):
        load_split(tmp_path, ["cpu", "cpu"], [4, 1], progress=False)
    with pytest.raises(ValueError, match="one per decoder layer"):
        checkpoint.load_model(tmp_path, device=["cpu", "cpu"], progress=False)


def test_fast_decoder_of_a_split_model_keeps_the_models_own_dispatch():
    """A split model is not captured as one CUDA graph, so FastDecoder gives its MoE blocks the model's own
    dispatch (the k experts as weight views) instead of the sync-free one that copies them; same tokens."""
    from mixtral_edu.inference.decode import FastDecoder
    from mixtral_edu.inference.generate import generate
    from mixtral_edu.inference.split import decode_dispatch_for, is_split
    from mixtral_edu.model.moe import DISPATCH

    cfg = MixtralConfig.tiny(vocab_size=256, num_hidden_layers=4, max_position_embeddings=64)
    torch.manual_seed(0)
    whole = Mixtral(cfg).eval()
    split = split_by_layers(copy.deepcopy(whole), ["cpu", "cpu"])
    assert is_split(split) and not is_split(whole) and decode_dispatch_for(split) == "auto"
    with pytest.raises(ValueError, match="split_by_layers"):
        decode_dispatch_for(whole)
    prompt = torch.randint(0, 256, (1, 6))
    expected = generate(whole, prompt[0].tolist(), 8, eos_id=None)
    decoder = FastDecoder(split, 16, use_kernel=False, cuda_graph=False)
    assert all(layer.block_sparse_moe.dispatch is DISPATCH["auto"] for layer in split.layers)
    assert decoder.generate(prompt, 8) == expected
    assert FastDecoder(split, 16, use_kernel=False).cuda_graph is False          # not graphed by default
    FastDecoder(split, 16, use_kernel=False, cuda_graph=True)             # a graph asked for needs no host sync
    assert split.layers[0].block_sparse_moe.dispatch is not DISPATCH["auto"]
    FastDecoder(whole, 16, use_kernel=False, cuda_graph=False)            # one device: its sync-free step
    assert whole.layers[0].block_sparse_moe.dispatch is not DISPATCH["auto"]
