"""Issue 15, checkpoints: nothing lost when saving, nothing wrong or outside the folder when loading."""

import errno
import json
import os
import re
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_edu.weights import load as checkpoint
from mixtral_edu.weights import CheckpointError, detect_layout, load_model, memory_plan, save_mistral, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral

CFG = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=64)

pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed):
    torch.manual_seed(seed)
    return Mixtral(CFG)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- saving loses nothing
@pytest.mark.parametrize("shard", [None, 20_000])
def test_a_save_that_fails_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch, shard):
    """A full disk while writing the second shard: the old checkpoint still loads, unchanged."""
    old = model(0)
    save_model(old, tmp_path, max_shard_size=20_000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import safetensors.torch as st
    real, calls = st.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2 or shard is None:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_model(model(1), tmp_path, max_shard_size=shard or "5GB")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before      # no temp folder left either
    assert same_weights(load_model(tmp_path, progress=False), old)


def test_an_error_while_publishing_leaves_the_new_checkpoint_and_the_next_save_finishes(tmp_path, monkeypatch):
    """Lasting I/O errors after the journal is written (the save retries once): the folder loads as the new
    checkpoint (through the journal), never a mixture, and the next save completes the publish and removes
    every leftover."""
    save_model(model(0), tmp_path, max_shard_size=20_000)
    new = model(1)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) >= 3:         # the journal is in, one new file is in place, then the disk fails
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="Input/output"):
        save_model(new, tmp_path, max_shard_size=30_000)
    monkeypatch.setattr(os, "replace", real)
    assert same_weights(load_model(tmp_path, progress=False), new)
    newer = model(2)
    save_model(newer, tmp_path)
    assert listing(tmp_path) == ["config.json", "model.safetensors"]
    assert same_weights(load_model(tmp_path, progress=False), newer)


def test_resave_replaces_our_shards_and_keeps_the_users_files(tmp_path):
    save_model(model(0), tmp_path, max_shard_size=20_000)
    ours = [n for n in listing(tmp_path) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    assert len(ours) > 2
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model-final-of-run3.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model-00009-of-00009.safetensors"))   # not ours, not indexed
    (tmp_path / "notes.txt").write_text("mine")
    new = model(1)
    save_model(new, tmp_path)
    assert listing(tmp_path) == ["config.json", "model-00009-of-00009.safetensors", "model-final-of-run3.safetensors",
                                 "model.safetensors", "notes.txt"]
    assert same_weights(load_model(tmp_path, progress=False), new)


def test_shards_of_an_index_written_by_someone_else_are_replaced(tmp_path):
    """A folder written by transformers (no mark of ours): the shards its index lists go, as the index does."""
    save_model(model(0), tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["metadata"].pop("written_by")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in set(index["weight_map"].values()):             # strip our mark from the shards too
        tensors = load_file(tmp_path / shard)
        save_file(tensors, str(tmp_path / shard), metadata={"format": "pt"})
    save_model(model(1), tmp_path)
    assert listing(tmp_path) == ["config.json", "model.safetensors"]


def test_a_symlinked_config_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"precious": true}')
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").symlink_to(outside)
    (folder / "model.safetensors").symlink_to(outside)
    save_model(model(0), folder)
    assert outside.read_text() == '{"precious": true}'
    assert not (folder / "config.json").is_symlink() and not (folder / "model.safetensors").is_symlink()
    load_model(folder, progress=False)


def test_save_into_a_file_or_a_dangling_link_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        save_model(model(0), tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="symlink to a folder that does not exist"):
        save_model(model(0), tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("size", [0, -5, "0MB", "1e9", "lots", 1.5, True])
def test_bad_shard_sizes_are_refused_before_writing(tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_model(model(0), tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- loading stays inside
@pytest.fixture
def sharded(tmp_path):
    save_model(model(0), tmp_path / "ck", max_shard_size=20_000)
    return tmp_path / "ck"


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "..", "",
                                  "a\\b.safetensors"])
def test_index_paths_stay_inside_the_folder(sharded, name):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = sharded.parent / "x.safetensors"
    shutil.copy(sharded / first, outside)                   # a loadable file, outside the folder
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor \S+: shard .* is not a file name inside"):
        load_model(sharded, progress=False)


@pytest.mark.parametrize("weight_map", [5, [], {"model.norm.weight": 3}, {"model.norm.weight": None},
                                        {"model.norm.weight": ["a"]}])
def test_index_values_of_the_wrong_type(sharded, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"index\.json: "):
        load_model(sharded, progress=False)


def test_two_hf_layouts_in_one_folder_are_refused(sharded):
    save_model(model(1), sharded.parent / "single")
    shutil.copy(sharded.parent / "single" / "model.safetensors", sharded)
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        detect_layout(sharded)


def test_hf_beside_mistral_loads_hf_and_says_so(tmp_path):
    m = model(0)
    save_mistral(m, tmp_path)
    st = load_file(tmp_path / "consolidated.safetensors")
    save_file(st, str(tmp_path / "consolidated.safetensors"))    # not marked as ours: a save leaves it
    save_model(m, tmp_path)
    with pytest.warns(UserWarning, match="loading the hf layout, ignoring consolidated.safetensors"):
        load_model(tmp_path, progress=False)


# ----------------------------------------------------------------------------- wrong weights refused
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, bad):
    save_model(model(0), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    tensors[key][3, 4] = bad
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(key) + r".*1 of \d+ values .* NaN or infinite.*allow_non_finite"):
        load_model(tmp_path, progress=False)
    loaded = load_model(tmp_path, progress=False, allow_non_finite=True)       # the explicit way in
    w3 = loaded.layers[1].block_sparse_moe.experts.w3[2]
    assert not torch.isfinite(w3).all()


def test_overflow_when_converting_is_refused(tmp_path):
    m = model(0)
    with torch.no_grad():
        m.norm.weight[0] = 1e30                     # finite in float32, infinite in float16
    save_model(m, tmp_path)
    load_model(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*infinite in torch\.float16"):
        load_model(tmp_path, progress=False, dtype=torch.float16)


def test_shared_bytes_do_not_load_as_a_silent_copy(tmp_path):
    """Expert 1 pointing at expert 0's bytes (the issue's example) is refused, not loaded as expert 0."""
    save_model(model(0), tmp_path)
    file = tmp_path / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    e0 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    e1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    header[e1]["data_offsets"] = header[e0]["data_offsets"]
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor \S+: data_offsets .* overlap"):
        load_model(tmp_path, progress=False)


def test_pt_file_with_int_keys_is_refused(tmp_path):
    m = model(0)
    save_mistral(m, tmp_path, layout="mistral-pt", num_files=2)
    torch.save({0: torch.zeros(2)}, tmp_path / "consolidated.01.pt")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pt: key 0 is a int, not a tensor name"):
        load_model(tmp_path, progress=False)


# ----------------------------------------------------------------------------- configs bounded
def write_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    text = json.dumps(cfg)
    for key, value in changes.items():       # "raw:..." values go in as written (json.dumps cannot write 1e400)
        if isinstance(value, str) and value.startswith("raw:"):
            text = text.replace(json.dumps(value), value[4:])
    (folder / "config.json").write_text(text)


@pytest.fixture
def single(tmp_path):
    save_model(model(0), tmp_path / "ck")
    return tmp_path / "ck"


def test_rope_tables_count_in_the_memory_check(single, monkeypatch):
    big = MixtralConfig(**{**CFG.__dict__, "max_position_embeddings": 1 << 24})
    plan = memory_plan(big, torch.float32, "meta")
    assert plan["needed_bytes"] >= 2 * (1 << 24) * big.head_dim * 4
    write_config(single, max_position_embeddings=1 << 24)             # 77 KB of weights, 1 GiB of tables
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: 512 << 20)
    with pytest.raises(checkpoint.InsufficientMemoryError, match="RoPE tables"):
        load_model(single, progress=False)


@pytest.mark.parametrize("field, value", [("max_position_embeddings", 10 ** 8), ("max_position_embeddings", 10 ** 11),
                                          ("num_hidden_layers", 30000), ("vocab_size", 10 ** 12),
                                          ("hidden_size", "raw:1e400"), ("num_local_experts", 2.0)])
def test_absurd_configs_are_refused_at_once(single, field, value):
    write_config(single, **{field: value})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(field)):
        load_model(single, progress=False)
    assert time.perf_counter() - start < 5


def test_config_that_is_a_fifo_or_device_is_refused(single):
    (single / "config.json").unlink()
    os.mkfifo(single / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: not a regular file"):
        load_model(single, progress=False)
    (single / "config.json").unlink()
    (single / "config.json").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"config\.json: not a regular file"):
        load_model(single, progress=False)


def test_oversized_and_deeply_nested_configs_are_refused(single):
    (single / "config.json").write_text('{"a": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(CheckpointError, match="more than the 1048576 a config file may have"):
        load_model(single, progress=False)
    (single / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_model(single, progress=False)
