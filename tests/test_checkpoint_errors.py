"""Every way a checkpoint folder can be broken raises a CheckpointError naming the file and the tensor."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_edu.weights import load as checkpoint
from mixtral_edu.weights import (CheckpointError, InsufficientMemoryError, SafetensorsFile, load_model, memory_plan,
                                 save_mistral, save_model)
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral

CFG = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model saved in every layout; each test breaks a copy."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    model = Mixtral(CFG)
    save_model(model, root / "hf")
    save_model(model, root / "sharded", max_shard_size=20_000)
    save_mistral(model, root / "mistral")
    save_mistral(model, root / "pt", layout="mistral-pt", num_files=2)
    return root


@pytest.fixture
def copy(saved, tmp_path):
    def make(layout):
        shutil.copytree(saved / layout, tmp_path / layout)
        return tmp_path / layout
    return make


def fails(path, *patterns, **kwargs):
    with pytest.raises(CheckpointError) as info:
        load_model(path, progress=False, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def test_the_good_copies_load(saved):
    for layout in ("hf", "sharded", "mistral", "pt"):
        load_model(saved / layout, progress=False)


def test_missing_key(copy):
    path = copy("hf")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, path / "model.safetensors")
    fails(path, r"lacks 1 tensor", r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight")


def test_unexpected_key(copy):
    path = copy("mistral")
    state = load_file(path / "consolidated.safetensors")
    state["layers.0.attention.rope_freqs"] = torch.zeros(4)
    save_file(state, path / "consolidated.safetensors")
    fails(path, r"consolidated\.safetensors: tensor layers\.0\.attention\.rope_freqs", "not a Mistral checkpoint key")


def test_expert_beyond_the_config(copy):
    path = copy("hf")
    state = load_file(path / "model.safetensors")
    state["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(48, 32)
    save_file(state, path / "model.safetensors")
    fails(path, r"model\.safetensors: tensor model\.layers\.0\.block_sparse_moe\.experts\.4\.w1\.weight",
          "unexpected key")


def test_shape_disagrees_with_config(copy):
    path = copy("sharded")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    fails(path, r"model-\d{5}-of-\d{5}\.safetensors: tensor model\.layers\.\d\.block_sparse_moe\.experts\.\d\.w\d\.weight",
          r"shape \((48, 32|32, 48)\), but config\.json implies \((64, 32|32, 64)\)")


def test_params_json_shape_disagrees(copy):
    path = copy("pt")
    params = json.loads((path / "params.json").read_text())
    params["dim"] = 64
    (path / "params.json").write_text(json.dumps(params))
    fails(path, r"consolidated\.0\d\.pt: tensor ", "params.json implies")


@pytest.mark.parametrize("layout, file", [("hf", "model.safetensors"), ("mistral", "consolidated.safetensors"),
                                          ("sharded", "model-00002-of-")])
def test_truncated_file(copy, layout, file):
    path = copy(layout)
    target = next(p for p in path.iterdir() if p.name.startswith(file))
    data = target.read_bytes()
    target.write_bytes(data[:-100])
    fails(path, re.escape(target.name) + r": truncated: tensor \S+ ends at byte \d+, the file has \d+")


def test_truncated_pt_file(copy):
    path = copy("pt")
    target = path / "consolidated.01.pt"
    target.write_bytes(target.read_bytes()[:1000])
    fails(path, r"consolidated\.01\.pt: not a readable weights-only torch file")


def st_bytes(header: bytes, data: bytes = b"") -> bytes:
    """A hand-made safetensors file: 8-byte little-endian header length, JSON header, data."""
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("garbage, pattern", [
    (b"\x05\x00", r"truncated or not safetensors \(2 bytes, no header\)"),
    ((10 ** 9).to_bytes(8, "little") + b"{}",
     r"truncated or not safetensors \(header of 1000000000 bytes does not fit in a 10-byte file\)"),
    (st_bytes(b"{oops"), r"corrupt safetensors header"),
    (st_bytes(b'{"w": {"dtype": "F32", "shape": [3]}}'), r"tensor w: corrupt header entry"),
    (st_bytes(b'{"w": {"dtype": "Q4", "shape": [3], "data_offsets": [0, 12]}}', bytes(12)),
     r"tensor w: corrupt header entry"),
    (st_bytes(b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', bytes(12)),
     r"tensor w: data_offsets \[0, 8\] disagree with shape \[3\] of F32"),
], ids=["no_header", "header_too_long", "bad_json", "no_offsets", "unknown_dtype", "offsets_vs_shape"])
def test_corrupt_safetensors(copy, garbage, pattern):
    path = copy("hf")
    (path / "model.safetensors").write_bytes(garbage)
    fails(path, r"model\.safetensors: " + pattern)


def test_index_names_a_missing_shard(copy):
    path = copy("sharded")
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    fails(path, r"model\.safetensors\.index\.json: names shard\(s\) \['model-00002-of-\d{5}\.safetensors'\]",
          r"e\.g\. tensor \S+ lives in model-00002")


def test_index_promises_a_tensor_the_shard_lacks(copy):
    path = copy("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] != last
    index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = last
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(path, re.escape(last) + r": the index says this shard holds tensor model\.layers\.0\.self_attn\.q_proj\.weight")


def test_shard_holds_a_tensor_the_index_does_not_list(copy):
    path = copy("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(path, re.escape(shard) + r": holds tensor model\.norm\.weight that the index does not list")


def test_corrupt_index(copy):
    path = copy("sharded")
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    fails(path, r"model\.safetensors\.index\.json: not a valid index")


def test_duplicate_tensor_across_pt_files(copy):
    path = copy("pt")
    first = torch.load(path / "consolidated.00.pt", weights_only=True)
    second = torch.load(path / "consolidated.01.pt", weights_only=True)
    second["layers.0.attention.wq.weight"] = first["layers.0.attention.wq.weight"]
    torch.save(second, path / "consolidated.01.pt")
    fails(path, r"consolidated\.01\.pt: tensor layers\.0\.attention\.wq\.weight",
          r"already loaded from consolidated\.00\.pt")


class Payload:
    """Anything but tensors must never be unpickled."""


def test_pt_file_with_pickled_objects_is_refused(copy):
    path = copy("pt")
    state = torch.load(path / "consolidated.01.pt", weights_only=True)
    state["payload"] = Payload()
    torch.save(state, path / "consolidated.01.pt")
    fails(path, r"consolidated\.01\.pt: not a readable weights-only torch file")


def test_pt_file_with_a_non_tensor_entry(copy):
    path = copy("pt")
    state = torch.load(path / "consolidated.00.pt", weights_only=True)
    state["step"] = 3
    torch.save(state, path / "consolidated.00.pt")
    fails(path, r"consolidated\.00\.pt: entry step is a int, not a tensor")


@pytest.mark.parametrize("layout, config", [("hf", "config.json"), ("sharded", "config.json"),
                                            ("mistral", "params.json"), ("pt", "params.json")])
def test_missing_config(copy, layout, config):
    path = copy(layout)
    (path / config).unlink()
    fails(path, f"needs {re.escape(config)}, which is missing")


def test_bad_config_value(copy):
    path = copy("hf")
    config = json.loads((path / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (path / "config.json").write_text(json.dumps(config))
    fails(path, r"config\.json: MixtralConfig\.num_attention_heads \(4\) must be divisible")


def test_no_weights_and_no_folder(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    fails(tmp_path, "no weights found", "tokenizer.model")
    fails(tmp_path / "nowhere", "checkpoint folder not found")


def test_tied_lm_head_that_differs(copy):
    path = copy("hf")
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    fails(path, r"model\.safetensors: tensor lm_head\.weight: config\.json ties lm_head to the embeddings")


def test_memory_refusal_names_the_ways_out(saved, monkeypatch):
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: 1000)
    plan = memory_plan(CFG, torch.float32, "cpu")
    assert plan == {"needed_bytes": plan["needed_bytes"], "available_bytes": 1000, "fits": False}
    with pytest.raises(InsufficientMemoryError) as info:
        load_model(saved / "hf", progress=False)
    message = str(info.value)
    for way_out in ("int8", "offload experts to CPU memory", "more GPUs", "ignore_memory_check=True", "--ignore-memory-check"):
        assert way_out in message
    assert "(weights and RoPE tables, torch.float32) on cpu" in message and "bf16 instead" in message
    load_model(saved / "hf", progress=False, ignore_memory_check=True)     # the override


def test_memory_plan_uses_params_memory_footprint():
    from mixtral_edu.params import count_parameters
    plan = memory_plan(MixtralConfig.mixtral_8x7b(), torch.bfloat16, "meta")
    rope = 2 * 32768 * 128 * 2                       # cos and sin [positions, head_dim] in bf16
    assert plan == {"needed_bytes": 2 * count_parameters(MixtralConfig.mixtral_8x7b())["total"] + rope,
                    "available_bytes": None, "fits": True}
    assert plan["needed_bytes"] == 93_405_585_408 + 16_777_216
    cpu = memory_plan(CFG, torch.float32, "cpu")
    assert 0 < cpu["available_bytes"] and cpu["fits"]


def test_safetensors_reader_views_and_release(saved):
    with SafetensorsFile(saved / "hf" / "model.safetensors") as st:
        assert st.metadata == {"format": "pt", "written_by": "mixtral-edu"}
        t = st.tensor("model.norm.weight")
        assert t.shape == (32,) and t.dtype == torch.float32
        copy = t.clone()
        del t
        st.release("model.norm.weight")
        assert torch.equal(st.tensor("model.norm.weight"), copy)     # released pages read back from the file
