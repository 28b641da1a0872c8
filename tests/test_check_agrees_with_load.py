"""Issue 33: `check` and `load_model` agree on what loads. The same damaged and undamaged folders go to both;
each either passes both or is refused by both (one line, at most 300 characters). check runs load_model's own
steps on meta tensors (weights/check.py), so the only difference is what needs every weight read: NaN and
infinity, which load_model refuses and check cannot see from the headers.
"""

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.weights import CheckpointError, load_model, save_mistral, save_model
from mixtral_edu.weights.check import check_checkpoint

CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**changes):
    torch.manual_seed(0)
    return Mixtral(MixtralConfig(**{**CFG, **changes}))


def _rewrite(path, change):
    """Rewrite safetensors file `path` with `change(tensors)` applied (a dict edited in place)."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _single(folder, **changes):
    save_model(_model(**changes), folder)
    return folder / "model.safetensors"


def tied_with_equal_head(f):
    st = _single(f, tie_word_embeddings=True)
    _rewrite(st, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))


def tied_with_other_head(f):
    st = _single(f, tie_word_embeddings=True)
    _rewrite(st, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1))


def f32_norms_beside_bf16(f):
    save_model(_model().to(torch.bfloat16), f)
    _rewrite(f / "model.safetensors", lambda t: t.update({k: v.float() for k, v in t.items() if "norm" in k}))


def index_metadata_null(f):
    save_model(_model(), f, max_shard_size=25_000)
    _edit_json(f / "model.safetensors.index.json", lambda d: d.__setitem__("metadata", None))


def index_total_size_wrong(f):
    save_model(_model(), f, max_shard_size=25_000)
    _edit_json(f / "model.safetensors.index.json", lambda d: d["metadata"].__setitem__("total_size", "lots"))


def config_dtype_other_than_tensors(f):
    _single(f)
    _edit_json(f / "config.json", lambda d: d.__setitem__("dtype", "float16"))


def fused_transformers5_experts(f):
    def fuse(t):
        for layer in range(2):
            p = f"model.layers.{layer}.block_sparse_moe"
            w1 = torch.stack([t.pop(f"{p}.experts.{j}.w1.weight") for j in range(4)])
            w3 = torch.stack([t.pop(f"{p}.experts.{j}.w3.weight") for j in range(4)])
            t[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
            t[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
                [t.pop(f"{p}.experts.{j}.w2.weight") for j in range(4)])
    _rewrite(_single(f), fuse)


def missing_tensor(f):
    _rewrite(_single(f), lambda t: t.pop("model.norm.weight"))


def unknown_tensor(f):
    _rewrite(_single(f), lambda t: t.__setitem__("model.layers.9.input_layernorm.weight", torch.ones(16)))


def wrong_shape(f):
    _rewrite(_single(f), lambda t: t.__setitem__("model.norm.weight", torch.ones(17)))


def integer_tensor(f):
    _rewrite(_single(f), lambda t: t.__setitem__("model.norm.weight", torch.ones(16, dtype=torch.int32)))


def float64_tensor(f):
    _rewrite(_single(f), lambda t: t.__setitem__("model.norm.weight", torch.ones(16, dtype=torch.float64)))


def expert_beyond_config(f):
    _rewrite(_single(f), lambda t: t.__setitem__("model.layers.0.block_sparse_moe.experts.4.w1.weight",
                                                 torch.ones(24, 16)))


def mistral_layout(f):
    save_mistral(_model(), f, layout="mistral")


def mistral_pt_layout(f):
    save_mistral(_model(), f, layout="mistral-pt", num_files=2)


def mistral_pt_duplicate(f):
    save_mistral(_model(), f, layout="mistral-pt", num_files=2)
    part = torch.load(f / "consolidated.00.pt", weights_only=True)
    extra = torch.load(f / "consolidated.01.pt", weights_only=True)
    extra["tok_embeddings.weight"] = part["tok_embeddings.weight"]
    torch.save(extra, f / "consolidated.01.pt")


def config_more_layers(f):
    _single(f)
    _edit_json(f / "config.json", lambda d: d.__setitem__("num_hidden_layers", 3))


def fifo_in_place_of_the_weights(f):
    _single(f).unlink()
    os.mkfifo(f / "model.safetensors")


def device_in_place_of_a_pt_file(f):
    save_mistral(_model(), f, layout="mistral-pt", num_files=2)
    (f / "consolidated.01.pt").unlink()
    (f / "consolidated.01.pt").symlink_to("/dev/zero")


def fifo_in_place_of_a_shard(f):
    save_model(_model(), f, max_shard_size=25_000)
    (f / "model-00002-of-00003.safetensors").unlink()
    os.mkfifo(f / "model-00002-of-00003.safetensors")


CASES = [fifo_in_place_of_the_weights, device_in_place_of_a_pt_file, fifo_in_place_of_a_shard,
         tied_with_equal_head, tied_with_other_head, f32_norms_beside_bf16, index_metadata_null,
         index_total_size_wrong, config_dtype_other_than_tensors, fused_transformers5_experts, missing_tensor,
         unknown_tensor, wrong_shape, integer_tensor, float64_tensor, expert_beyond_config, mistral_layout,
         mistral_pt_layout, mistral_pt_duplicate, config_more_layers]
LOADS = {"tied_with_equal_head", "f32_norms_beside_bf16", "index_metadata_null", "index_total_size_wrong",
         "config_dtype_other_than_tensors", "fused_transformers5_experts", "float64_tensor", "mistral_layout",
         "mistral_pt_layout"}


def _outcome(fn):
    try:
        fn()
        return "ok"
    except CheckpointError as err:
        assert "\n" not in str(err) and len(str(err)) <= 300, str(err)
        return "refused"


@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__)
def test_check_and_load_model_agree(tmp_path, make):
    folder = tmp_path / make.__name__
    make(folder)
    loaded = _outcome(lambda: load_model(folder, progress=False))
    checked = _outcome(lambda: check_checkpoint(folder))
    assert loaded == checked == ("ok" if make.__name__ in LOADS else "refused"), (loaded, checked)


def test_a_small_config_claiming_a_huge_model_is_refused_from_the_files_size(tmp_path, monkeypatch):
    """Issue 33: a 650-byte config.json declaring 1024 layers x 1024 experts beside a 77 KB checkpoint took
    29 s and 3 GB. The config's parameter count is compared with the values the headers hold first, so
    nothing of the config's size is built (meta_skeleton must not be called)."""
    import mixtral_edu.weights.check as check

    _single(tmp_path)
    _edit_json(tmp_path / "config.json", lambda d: d.update(num_hidden_layers=1024, num_local_experts=1024))
    assert (tmp_path / "config.json").stat().st_size < 1000
    monkeypatch.setattr(check, "meta_skeleton", lambda cfg: pytest.fail("built the config's model"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"the config describes [\d,]+ parameters, but the weight files hold only"):
        check_checkpoint(tmp_path)
    print(f"refused in {time.perf_counter() - start:.3f} s")


def test_200k_missing_shards_give_one_short_line(tmp_path):
    _single(tmp_path, tie_word_embeddings=False)
    (tmp_path / "model.safetensors").unlink()
    weight_map = {f"model.layers.{i}.input_layernorm.weight": f"shard-{i:06d}.safetensors" for i in range(200_000)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for run in (lambda: load_model(tmp_path, progress=False), lambda: check_checkpoint(tmp_path)):
        with pytest.raises(CheckpointError, match="names shard") as err:
            run()
        assert len(str(err.value)) <= 300 and "\n" not in str(err.value)


def test_a_folder_with_two_layouts_warns_once(tmp_path):
    """Issue 33: the mixed-layout warning was given twice per load (detect_layout, then read_config)."""
    import warnings

    _single(tmp_path)
    save_mistral(_model(), tmp_path / "m")
    (tmp_path / "m" / "consolidated.safetensors").rename(tmp_path / "consolidated.safetensors")
    for run in (lambda: load_model(tmp_path, progress=False), lambda: check_checkpoint(tmp_path)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        assert [str(w.message).count("more than one layout") for w in caught] == [1]


def test_the_read_speed_probe_never_opens_a_fifo(tmp_path):
    from mixtral_edu.weights.check import measure_read_speed

    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        measure_read_speed(tmp_path, files=[tmp_path / "model.safetensors"])


def test_a_pt_file_with_a_huge_zip_directory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import mixtral_edu.weights.pt_header as pt_header

    save_mistral(_model(), tmp_path, layout="mistral-pt", num_files=1)
    monkeypatch.setattr(pt_header, "MAX_DIRECTORY_BYTES", 100)      # the real limit is 64 MB
    for run in (lambda: load_model(tmp_path, progress=False), lambda: check_checkpoint(tmp_path)):
        with pytest.raises(CheckpointError, match=r"consolidated\.00\.pt: a zip directory of \d+ bytes"):
            run()
