"""Fuzzing whole checkpoint folders, configs and saves: a clear error or a correct load, never a traceback,
never a silent wrong load, never a lost file.

Seeded generators damage the structure of saved folders (config values of every type, index entries,
headers, shapes, key names, layouts), feed arbitrary JSON values to the config readers, and interrupt
saves at random points.
"""

import json
import os
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_edu.weights import CheckpointError, InsufficientMemoryError, load_model, save_mistral, save_model
from mixtral_edu.config import MixtralConfig
from mixtral_edu.model.mixtral import Mixtral

CFG = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                    num_experts_per_tok=2, max_position_embeddings=32)
pytestmark = pytest.mark.usefixtures("one_thread")

VALUES = [0, -1, 1, 2, 3, 7, 2 ** 31, 10 ** 8, 10 ** 11, 30000, 1.5, 2.0, -0.0, 1e-300, "raw:1e400", "raw:-1e400",
          "raw:NaN", "", "8", "false", "true", None, True, False, [], [1], {}, {"rope_theta": 5}, [[[[]]]]]
FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
          "rope_theta", "rms_norm_eps", "sliding_window", "tie_word_embeddings", "bos_token_id", "eos_token_id",
          "router_aux_loss_coef", "rope_parameters", "dtype", "torch_dtype", "hidden_act", "rope_scaling",
          "model_type", "unknown_field"]


def dump(data, raw=()):
    """json.dumps, then "raw:..." string values written as they are (NaN, 1e400: not producible by dumps)."""
    text = json.dumps(data)
    for value in raw:
        text = text.replace(json.dumps(value), value[4:])
    return text


def raws(value):
    if isinstance(value, str) and value.startswith("raw:"):
        return [value]
    if isinstance(value, dict):
        return [r for v in value.values() for r in raws(v)]
    return []


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = Mixtral(CFG)
    save_model(model, root / "hf")
    save_model(model, root / "sharded", max_shard_size=6_000)
    save_mistral(model, root / "mistral")
    save_mistral(model, root / "pt", layout="mistral-pt", num_files=2)
    return root, {k: v.clone() for k, v in model.state_dict().items()}


def _damage_folder(rng, folder, layout):
    """One structural damage to the folder (never a change of tensor values, which no loader can detect)."""
    kind = rng.randrange(9)
    config = folder / ("params.json" if layout in ("mistral", "pt") else "config.json")
    if kind <= 2:                                                     # a config field of any type
        data = json.loads(config.read_text())
        for _ in range(rng.randint(1, 2)):
            field = rng.choice(FIELDS if config.name == "config.json" else
                               ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
                                "vocab_size", "rope_theta", "moe", "max_seq_len", "sliding_window"])
            data[field] = rng.choice(VALUES)
        config.write_text(dump(data, [r for v in data.values() for r in raws(v)]))
        return
    if kind == 3:                                                     # a config that is not a JSON object
        config.write_text(rng.choice(["", "[]", "null", "{", '{"a": 1, "a": 2}', "[" * 20000, "\udcff",
                                      '{"vocab_size": 64, "vocab_size": 65}']), errors="surrogateescape")
        return
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pt"))
    target = rng.choice(files)
    if kind == 4 and target.suffix == ".safetensors":                 # rename / drop / add a tensor
        tensors = load_file(target)
        key = rng.choice(sorted(tensors))
        action = rng.randrange(4)
        if action == 0:
            tensors[key + ".x"] = tensors.pop(key)
        elif action == 1:
            del tensors[key]
        elif action == 2:
            tensors[key] = tensors[key].reshape(-1)[:-1].clone() if tensors[key].numel() > 1 else tensors[key]
        else:
            tensors[key] = tensors[key].to(rng.choice([torch.int32, torch.float64]))   # exact, or refused
        save_file(tensors, str(target))
        return
    if kind == 5 and target.suffix == ".safetensors":                 # header surgery
        raw = target.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        key = rng.choice(sorted(k for k in header if k != "__metadata__"))
        field = rng.choice(["shape", "data_offsets", "dtype"])
        header[key][field] = rng.choice([[1], [0, 4], "F32", [2.0], [-1, 3], "BF16", [10 ** 30], None])
        text = json.dumps(header).encode()
        target.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        return
    if kind == 6:                                                     # truncate or extend a weight file
        raw = target.read_bytes()
        target.write_bytes(raw[:rng.randrange(len(raw))] if rng.random() < 0.7 else raw + b"\x00" * rng.randint(1, 9))
        return
    if kind == 7 and layout == "sharded":                             # index entries of any type or place
        index_file = folder / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        key = rng.choice(sorted(index["weight_map"]))
        index["weight_map"][key] = rng.choice(["../hf/model.safetensors", "/etc/passwd", 5, None, ["a"], "",
                                               "model-00001-of-00009.safetensors", "nothing.safetensors"])
        if rng.random() < 0.2:
            index = rng.choice([[], {"weight_map": []}, {"weight_map": {"a": {}}}, {}])
        index_file.write_text(json.dumps(index))
        return
    if kind == 8:                                                     # a second layout, a FIFO, a link
        choice = rng.randrange(3)
        if choice == 0:
            second = folder / rng.choice(["model.safetensors", "consolidated.safetensors",
                                          "model.safetensors.index.json"])
            if second != target:
                shutil.copy(target, second)
        elif choice == 1:
            config.unlink()
            os.mkfifo(config)
        else:
            target.unlink()
            target.symlink_to("/dev/zero")
        return
    # other draws: leave the folder intact


def test_damaged_folders_give_a_clear_error_or_the_right_weights(saved, tmp_path, recwarn):
    root, reference = saved
    rng = random.Random(15)
    outcomes = {"error": 0, "loaded": 0}
    for case in range(150):
        layout = rng.choice(["hf", "sharded", "mistral", "pt"])
        folder = tmp_path / f"case{case}"
        shutil.copytree(root / layout, folder)
        _damage_folder(rng, folder, layout)
        try:
            model = load_model(folder, progress=False, ignore_memory_check=rng.random() < 0.5)
        except (CheckpointError, InsufficientMemoryError) as err:
            message = str(err)
            assert message and "\n" not in message and "Traceback" not in message, message
            outcomes["error"] += 1
        else:   # a load that succeeds must hold exactly the saved weights
            state = model.state_dict()
            assert set(state) == set(reference), f"case {case}: different parameters"
            for key, value in reference.items():
                assert torch.equal(state[key].to(value.dtype), value), f"case {case}: {key} differs"
            outcomes["loaded"] += 1
        shutil.rmtree(folder)
    assert outcomes["error"] > 60 and outcomes["loaded"] > 10, outcomes


def test_config_readers_take_any_json_value(tmp_path):
    """Every field set to every kind of value: a valid config or a ValueError naming the file, nothing else."""
    rng = random.Random(16)
    base_hf = CFG.to_hf_config()
    base_params = CFG.to_params_json()
    for case in range(400):
        hf = rng.random() < 0.6
        data = dict(base_hf if hf else base_params)
        for _ in range(rng.randint(1, 3)):
            data[rng.choice(list(data) + FIELDS[-6:])] = rng.choice(VALUES)
        path = tmp_path / ("config.json" if hf else "params.json")
        path.write_text(dump(data, [r for v in data.values() for r in raws(v)]))
        try:
            cfg = MixtralConfig.from_hf_config(path) if hf else MixtralConfig.from_params_json(path)
        except ValueError as err:
            assert str(path) in str(err), str(err)
        else:
            cfg.validate()                                  # whatever was accepted is a usable architecture
            assert isinstance(cfg.tie_word_embeddings, bool)


def test_interrupted_saves_never_lose_a_checkpoint(tmp_path, monkeypatch):
    """Saves of different models and shard sizes, each failing at a random rename or write: afterwards the
    folder always loads as the old model or the new one, and the user's own files are untouched."""
    rng = random.Random(17)
    folder = tmp_path / "ck"
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(Mixtral(CFG))
    save_model(models[0], folder)
    (folder / "tokenizer.model").write_bytes(b"mine")
    (folder / "model-best-of-run1.safetensors").write_bytes(b"mine too")
    current = 0
    real_replace = os.replace
    import safetensors.torch as st
    real_save = st.save_file
    for attempt in range(40):
        new = rng.randrange(3)
        fail_at = rng.randint(1, 12)
        calls = [0]

        def counting(real):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == fail_at:
                    raise OSError(28, "No space left on device")
                return real(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(os, "replace", counting(real_replace))
        monkeypatch.setattr(st, "save_file", counting(real_save))
        try:
            save_model(models[new], folder, max_shard_size=rng.choice([5_000, 12_000, "5GB"]))
            current = new
        except OSError:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(st, "save_file", real_save)
        loaded = load_model(folder, progress=False)
        want = models[current].state_dict()
        assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items()), f"attempt {attempt}"
        assert (folder / "tokenizer.model").read_bytes() == b"mine"
        assert (folder / "model-best-of-run1.safetensors").read_bytes() == b"mine too"
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a staging folder was left"
