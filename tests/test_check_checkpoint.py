"""check_checkpoint on the full-size 8x7B layout (sparse files) and on each kind of damage a download can have."""

import json
import os

import pytest

from mixtral_edu.weights import CheckpointError, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.check import check_checkpoint, expected_tensors
from sparse_checkpoint import linked_copy, shard_name, shard_plan, write_index, write_shard, write_sparse_hf

FULL = MixtralConfig.mixtral_8x7b()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return write_sparse_hf(tmp_path_factory.mktemp("sparse") / "Mixtral-8x7B-Instruct-v0.1")


def test_the_full_size_layout_passes(full):
    result = check_checkpoint(full)
    assert result.layout == "hf-sharded" and len(result.files) == 19
    assert result.tensors == len(expected_tensors(FULL, "hf")) == 995
    assert result.dtype == "bfloat16" and result.weight_bytes == 93_405_585_408
    assert "19 weight files, 995 tensors in bfloat16, 93.41 GB; 32 layers" in str(result)
    # sparse: 93 GB long, (almost) nothing on disk
    assert sum(os.stat(p).st_blocks * 512 for p in result.files) < 50e6


def test_a_saved_tiny_model_passes_in_both_layouts(tmp_path):
    import torch

    from mixtral_edu.weights import save_mistral
    from mixtral_edu.model.mixtral import Mixtral

    torch.manual_seed(0)
    model = Mixtral(MixtralConfig.tiny(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32))
    save_model(model, tmp_path / "hf", max_shard_size="40KB")
    assert check_checkpoint(tmp_path / "hf").layout == "hf-sharded"
    save_mistral(model, tmp_path / "mistral", layout="mistral")
    assert check_checkpoint(tmp_path / "mistral").layout == "mistral"


def _variant(full, tmp_path, shard=None, tensors=None, dtype="BF16", index_total=None, drop_from_index=None):
    """A linked copy of `full` with shard number `shard` rewritten to hold `tensors` (and the index to match)."""
    folder = linked_copy(full, tmp_path / "variant")
    plan = shard_plan(FULL)
    if shard is not None:
        plan[shard] = tensors
        (folder / shard_name(shard)).unlink()
        write_shard(folder / shard_name(shard), tensors, dtype)
    (folder / "model.safetensors.index.json").unlink()
    total = sum(2 * _n(s) for t in plan for _, s in t) if index_total is None else index_total
    index_plan = [[(k, s) for k, s in t if k != drop_from_index] for t in plan]
    write_index(folder, index_plan, total)
    return folder


def _n(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_each_damage_is_named(full, tmp_path):
    plan = shard_plan(FULL)
    last = plan[-1]

    # a shard missing from the download
    gone = linked_copy(full, tmp_path / "missing")
    (gone / shard_name(7)).unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) \['model-00008-of-00019.safetensors'\]"):
        check_checkpoint(gone)

    # a truncated shard (an interrupted download)
    cut = linked_copy(full, tmp_path / "truncated")
    (cut / shard_name(3)).unlink()
    write_shard(cut / shard_name(3), plan[3])
    os.truncate(cut / shard_name(3), os.path.getsize(full / shard_name(3)) - 1_000_000)
    with pytest.raises(CheckpointError, match=r"model-00004-of-00019\.safetensors.*truncated|model-00004.*bytes"):
        check_checkpoint(cut)

    for name, kwargs, pattern in [
        ("shape", dict(shard=18, tensors=[(k, (32001, 4096) if k == "lm_head.weight" else s) for k, s in last]),
         r"tensor lm_head\.weight: shape \(32001, 4096\), but config\.json implies \(32000, 4096\)"),
        ("dropped", dict(shard=18, tensors=[(k, s) for k, s in last if k != "model.norm.weight"],
                         drop_from_index="model.norm.weight"),
         r"lacks 1 tensor\(s\) the model in config\.json needs \(HF names\): \['model\.norm\.weight'\]"),
        ("extra", dict(shard=18, tensors=last + [("model.layers.32.input_layernorm.weight", (4096,))]),
         r"tensor model\.layers\.32\.input_layernorm\.weight: unexpected key"),
        ("dtype", dict(shard=18, tensors=last, dtype="I16"), r"model-00019-of-00019\.safetensors: tensor .*: dtype torch\.int16 "
                                                            r"is not a float weight"),
    ]:
        folder = _variant(full, tmp_path / name, **kwargs)
        with pytest.raises(CheckpointError, match=pattern):
            check_checkpoint(folder)


def test_a_config_that_disagrees_with_the_weights_is_named(full, tmp_path):
    folder = linked_copy(full, tmp_path / "config")
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(dict(FULL.to_hf_config(), intermediate_size=14335)))
    with pytest.raises(CheckpointError,
                       match=r"experts\.\d+\.w[123]\.weight: shape \((14336, 4096|4096, 14336)\), but config\.json implies"):
        check_checkpoint(folder)


def test_float16_beside_bfloat16_loads_and_passes(full, tmp_path):
    """load_model converts every float tensor to one dtype (config.json's), so check accepts a mixture too."""
    folder = _variant(full, tmp_path / "mixed", shard=18, tensors=shard_plan(FULL)[-1], dtype="F16")
    result = check_checkpoint(folder)
    assert result.dtype == "bfloat16" and result.stored == ["bfloat16", "float16"]
    assert "(stored as bfloat16 and float16; loaded as bfloat16)" in str(result)


def test_a_wrong_total_size_is_a_note_not_a_refusal(full, tmp_path):
    """load_model (and transformers) ignore the index's metadata.total_size, so check only notes it."""
    result = check_checkpoint(_variant(full, tmp_path / "total", index_total=93_405_585_407))
    assert "(note: the index's metadata.total_size says 93405585407, the shards hold 93405585408 bytes" in str(result)
