"""Every published layout loads with the reference's logits; save_model's output loads in transformers."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # noqa: E402  (a hard requirement of the test suite)

from mixtral_edu.weights import (SafetensorsFile, detect_layout, load_model, read_config, save_mistral, save_model)
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral

CFG = dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
           max_position_embeddings=128)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def reference(seed=0, **overrides):
    """A random transformers MixtralForCausalLM (norm gains random too) and input ids."""
    cfg = MixtralConfig(**{**CFG, **overrides})
    hf_cfg = transformers.MixtralConfig(**cfg.to_hf_config())
    hf_cfg.initializer_range = 0.08
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    return cfg, hf, ids


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """transformers' save_pretrained in several shards, with the files people also download beside it."""
    cfg, hf, ids = reference()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer.model").write_bytes(b"not weights")
    (path / "README.md").write_text("a model card")
    with torch.no_grad():
        logits = hf(ids).logits
    return path, cfg, ids, logits


def test_transformers_shards_load_with_equal_logits(hf_sharded):
    path, cfg, ids, ref = hf_sharded
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    assert detect_layout(path) == "hf-sharded"
    model = load_model(path, progress=False)
    assert isinstance(model, Mixtral) and not model.training
    assert model.embed_tokens.weight.dtype == torch.float32 and model.embed_tokens.weight.device.type == "cpu"
    with torch.no_grad():
        assert max_diff(model(ids), ref) < 1e-5


def test_transformers_single_file_loads(tmp_path):
    cfg, hf, ids = reference(seed=3)
    hf.save_pretrained(tmp_path)
    assert detect_layout(tmp_path) == "hf"
    with torch.no_grad():
        assert max_diff(load_model(tmp_path, progress=False)(ids), hf(ids).logits) < 1e-5


def test_save_model_loads_in_transformers(hf_sharded, tmp_path):
    path, cfg, ids, ref = hf_sharded
    ours = load_model(path, progress=False)
    written = save_model(ours, tmp_path, max_shard_size=150_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert written == ["config.json", *shards, "model.safetensors.index.json"]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and len(shards) > 2
    # per-expert keys, each shard holding what the index says, in float32 like the model
    assert "model.layers.2.block_sparse_moe.experts.7.w2.weight" in index["weight_map"]
    total = 0
    for shard in shards:
        with SafetensorsFile(tmp_path / shard) as st:
            assert sorted(st.keys()) == sorted(k for k, s in index["weight_map"].items() if s == shard)
            assert {info["dtype"] for info in st.header.values()} == {"F32"}
            total += sum(info["data_offsets"][1] - info["data_offsets"][0] for info in st.header.values())
    assert index["metadata"]["total_size"] == total
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ref) < 1e-5


def test_save_model_single_file_bf16_round_trip(tmp_path):
    cfg, hf, ids = reference(seed=1)
    model = load_model_from(hf, tmp_path / "src").to(torch.bfloat16)
    written = save_model(model, tmp_path / "bf16")
    assert written == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_model(tmp_path / "bf16", progress=False)             # dtype=None keeps the checkpoint's
    assert back.embed_tokens.weight.dtype == torch.bfloat16 and back.rotary_emb.cos.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    as_f32 = load_model(tmp_path / "bf16", dtype=torch.float32, progress=False)
    assert as_f32.layers[0].block_sparse_moe.experts.w2.dtype == torch.float32
    assert torch.equal(as_f32.layers[0].block_sparse_moe.experts.w2,
                       model.layers[0].block_sparse_moe.experts.w2.float())
    hf16 = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert hf16.model.embed_tokens.weight.dtype == torch.bfloat16


def load_model_from(hf, path):
    hf.save_pretrained(path)
    return load_model(path, progress=False)


def test_resaving_into_the_same_folder_leaves_no_stale_shards(tmp_path):
    model = Mixtral(MixtralConfig(**CFG))
    save_model(model, tmp_path, max_shard_size=100_000)
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert detect_layout(tmp_path) == "hf"


@pytest.mark.parametrize("layout", ["mistral", "mistral-pt"])
def test_mistral_layouts_load_with_equal_logits(hf_sharded, tmp_path, layout):
    path, cfg, ids, ref = hf_sharded
    written = save_mistral(load_model(path, progress=False), tmp_path, layout=layout)
    assert written[0] == "params.json"
    if layout == "mistral":
        assert written[1:] == ["consolidated.safetensors"]
        with SafetensorsFile(tmp_path / "consolidated.safetensors") as st:
            assert st.header["layers.0.feed_forward.experts.7.w2.weight"]["shape"] == [48, 80]
            assert st.header["layers.0.attention.wk.weight"]["shape"] == [32, 48]
    else:
        assert written[1:] == [f"consolidated.{i:02d}.pt" for i in range(8)]
        merged = {}
        for name in written[1:]:
            part = torch.load(tmp_path / name, weights_only=True)
            assert not set(part) & set(merged)                 # whole tensors, each in one file only
            merged.update(part)
        assert merged["layers.2.block_sparse_moe.w2"].shape == (8 * 80, 48)
    assert detect_layout(tmp_path) == layout
    assert read_config(tmp_path) == cfg
    model = load_model(tmp_path, progress=False)
    with torch.no_grad():
        assert max_diff(model(ids), ref) < 1e-5


def test_tied_embeddings_round_trip(tmp_path):
    cfg, hf, ids = reference(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", progress=False)
    assert model.lm_head.weight is model.embed_tokens.weight
    save_model(model, tmp_path / "ours")
    for layout in ("mistral", "mistral-pt"):
        save_mistral(model, tmp_path / layout, layout=layout)
    with torch.no_grad():
        ref = hf(ids).logits
        for folder in ("hf", "ours", "mistral", "mistral-pt"):
            assert max_diff(load_model(tmp_path / folder, progress=False)(ids), ref) < 1e-5


def test_dense_model_round_trips_in_every_layout(tmp_path):
    cfg = MixtralConfig(**{**CFG, "num_local_experts": 1, "num_experts_per_tok": 1})
    torch.manual_seed(0)
    model = Mixtral(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    save_model(model, tmp_path / "hf")
    save_mistral(model, tmp_path / "mistral")
    with SafetensorsFile(tmp_path / "mistral" / "consolidated.safetensors") as st:
        assert "layers.0.feed_forward.w2.weight" in st.keys()
    with torch.no_grad():
        for folder in ("hf", "mistral"):
            assert torch.equal(load_model(tmp_path / folder, progress=False)(ids), model(ids))


def test_progress_bar_goes_to_stderr_and_can_be_disabled(hf_sharded, capsys):
    path = hf_sharded[0]
    load_model(path)
    assert "reading Hugging Face (sharded) weights" in capsys.readouterr().err
    load_model(path, progress=False)
    assert capsys.readouterr().err == ""


def test_meta_device_loads_nothing_but_checks_everything(hf_sharded):
    model = load_model(hf_sharded[0], device="meta", progress=False)
    assert model.layers[0].block_sparse_moe.experts.w1.is_meta


def test_skipping_the_qk_permutation_gives_wrong_logits_except_at_position_0(hf_sharded, tmp_path):
    """Notebook 07's trap: Mistral's wq/wk renamed but not permuted still run, with wrong logits."""
    from mixtral_edu.weights.convert import mistral_to_hf_key
    from mixtral_edu.weights import load_hf_state_dict
    path, cfg, ids, ref = hf_sharded
    save_mistral(load_model(path, progress=False), tmp_path)
    with SafetensorsFile(tmp_path / "consolidated.safetensors") as st:
        state = {mistral_to_hf_key(k): st.tensor(k).clone() for k in st.keys()}
    wrong = Mixtral(cfg).eval()
    load_hf_state_dict(wrong, state)
    with torch.no_grad():
        err = (wrong(ids) - ref).abs().amax(-1)                          # [batch, seq]
    assert err[:, 0].max().item() < 1e-5          # angle 0 at position 0: channel order does not matter
    assert err[:, 1:].min().item() > 1e-3         # every later position is wrong
    assert (wrong(ids).argmax(-1) != ref.argmax(-1)).any()


def test_bf16_checkpoint_is_half_the_bytes(tmp_path):
    model = Mixtral(MixtralConfig(**CFG))
    save_model(model, tmp_path / "f32")
    save_model(model.to(torch.bfloat16), tmp_path / "bf16")
    f32, bf16 = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "bf16"))
    assert 0.49 < bf16 / f32 < 0.51


def test_refusal_for_mixtral_8x7b_on_64_gib(tmp_path, monkeypatch):
    """Notebook 07: the real config, an empty weights file, 64 GiB free -> a refusal before any reading."""
    from mixtral_edu.weights import load as checkpoint
    from mixtral_edu.weights import InsufficientMemoryError, memory_plan
    big = MixtralConfig.mixtral_8x7b()
    (tmp_path / "config.json").write_text(json.dumps({**big.to_hf_config(), "dtype": "bfloat16"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: 64 * 2 ** 30)
    assert memory_plan(big, torch.bfloat16, "cpu") == {"needed_bytes": 93_405_585_408 + 16_777_216,
                                                       "available_bytes": 68_719_476_736, "fits": False}
    with pytest.raises(InsufficientMemoryError,
                       match=r"needs 87\.01 GiB \(weights and RoPE tables, torch\.bfloat16\) on cpu, "
                             r"but only 64\.00 GiB is free; ways out: int8"):
        load_model(tmp_path)
    from mixtral_edu.weights import CheckpointError
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not safetensors \(0 bytes"):
        load_model(tmp_path, ignore_memory_check=True, device="meta", progress=False)   # the override goes on


@pytest.mark.parametrize("layout", ["hf", "mistral", "mistral-pt"])
def test_saved_files_are_readable_by_others_as_the_umask_allows(tmp_path, layout):
    """A checkpoint is for sharing: every file gets the mode open() would give it (safetensors writes 0600)."""
    import os
    import stat
    model = Mixtral(MixtralConfig.tiny(vocab_size=128, num_hidden_layers=1))
    names = save_model(model, tmp_path) if layout == "hf" else save_mistral(model, tmp_path, layout=layout, num_files=1)
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_loading_a_model_stays_off_the_compilers_import_path():
    """load_model builds its skeleton without running ops on meta tensors, which import torch._dynamo (~1 s)."""
    import subprocess
    import sys
    code = ("import sys; from mixtral_edu.weights import load_model; from mixtral_edu.assets import TINY_MODEL_DIR; "
            "load_model(TINY_MODEL_DIR, progress=False); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
