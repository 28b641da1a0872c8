"""MixtralConfig: presets, Hugging Face and Mistral round trips, and each validation error."""

import json
import warnings

import pytest
import transformers

from mixtral_edu.config import MixtralConfig

MIXTRAL_8X7B_HF = {  # the fields of mistralai/Mixtral-8x7B-v0.1's config.json
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}

MIXTRAL_8X7B_PARAMS = {  # Mistral's params.json for Mixtral-8x7B (rope_theta absent)
    "dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
    "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000,
    "moe": {"num_experts_per_tok": 2, "num_experts": 8},
}


def test_mixtral_8x7b_preset():
    cfg = MixtralConfig.mixtral_8x7b()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (4096, 32, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_groups) == (32, 8, 4)
    assert (cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok) == (14336, 8, 2)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (32000, 1e6, 1e-5)
    assert cfg.max_position_embeddings == 32768 and cfg.sliding_window is None
    assert not cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_tiny_is_small_and_moe():
    cfg = MixtralConfig.tiny()
    assert cfg.vocab_size == 32000 and cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.hidden_size <= 128 and cfg.is_moe
    assert MixtralConfig.tiny(num_hidden_layers=2).num_hidden_layers == 2


def test_mistral_7b_is_dense():
    cfg = MixtralConfig.mistral_7b()
    assert not cfg.is_moe and cfg.sliding_window == 4096


def test_from_hf_config_real_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MIXTRAL_8X7B_HF))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real file's extra keys are known: no warning
        cfg = MixtralConfig.from_hf_config(tmp_path)  # a folder works as well as the file
    assert cfg == MixtralConfig.mixtral_8x7b()
    assert MixtralConfig.from_hf_config(path) == cfg


def test_from_hf_config_transformers5_rope_parameters_and_null_head_dim():
    d = dict(MIXTRAL_8X7B_HF)
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    d["head_dim"] = None
    assert MixtralConfig.from_hf_config(d) == MixtralConfig.mixtral_8x7b()


@pytest.mark.parametrize("cfg", [
    MixtralConfig.mixtral_8x7b(),
    MixtralConfig.tiny(),
    MixtralConfig.tiny(head_dim=24, num_key_value_heads=1, num_experts_per_tok=3, num_local_experts=4),
    MixtralConfig.tiny(sliding_window=128, rope_theta=1e4),
])
def test_hf_round_trip_through_transformers(cfg):
    theirs = transformers.MixtralConfig(**cfg.to_hf_config())
    assert theirs.hidden_size == cfg.hidden_size
    assert theirs.head_dim == cfg.head_dim
    assert theirs.num_key_value_heads == cfg.num_key_value_heads
    assert theirs.num_local_experts == cfg.num_local_experts
    assert theirs.num_experts_per_tok == cfg.num_experts_per_tok
    assert theirs.sliding_window == cfg.sliding_window
    assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta
    # ... and transformers' own serialisation reads back to the same config.
    assert MixtralConfig.from_hf_config(theirs.to_dict()) == cfg


def test_from_params_json(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(MIXTRAL_8X7B_PARAMS))
    assert MixtralConfig.from_params_json(tmp_path) == MixtralConfig.mixtral_8x7b()
    cfg = MixtralConfig.tiny(rope_theta=1e4)
    (tmp_path / "params.json").write_text(json.dumps(cfg.to_params_json()))
    back = MixtralConfig.from_params_json(tmp_path / "params.json")
    assert back.hidden_size == cfg.hidden_size and back.rope_theta == 1e4
    assert back.num_local_experts == 8 and back.num_experts_per_tok == 2


def test_params_json_missing_field_is_named(tmp_path):
    d = dict(MIXTRAL_8X7B_PARAMS)
    del d["n_kv_heads"]
    (tmp_path / "params.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="n_kv_heads"):
        MixtralConfig.from_params_json(tmp_path)


@pytest.mark.parametrize("overrides, field", [
    ({"num_attention_heads": 32, "num_key_value_heads": 6}, "num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"intermediate_size": -5}, "intermediate_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"head_dim": 15}, "head_dim"),
    ({"sliding_window": 0}, "sliding_window"),
])
def test_bad_config_names_the_field(overrides, field):
    d = dict(MIXTRAL_8X7B_HF, **overrides)
    with pytest.raises(ValueError, match=field):
        MixtralConfig.from_hf_config(d)


@pytest.mark.parametrize("overrides, match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
])
def test_unimplemented_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        MixtralConfig.from_hf_config(dict(MIXTRAL_8X7B_HF, **overrides))


def test_unknown_keys_are_named_in_a_warning():
    with pytest.warns(UserWarning, match="my_custom_key"):
        cfg = MixtralConfig.from_hf_config(dict(MIXTRAL_8X7B_HF, my_custom_key=3))
    assert cfg == MixtralConfig.mixtral_8x7b()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MixtralConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MixtralConfig.from_hf_config(tmp_path)


# ----------------------------------------------------------------------------- issue 15: validated before use
PUBLISHED = {  # the architecture fields of published Mistral AI config.json files
    "Mixtral-8x22B-v0.1": dict(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                               num_attention_heads=48, num_key_value_heads=8, max_position_embeddings=65536,
                               num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6),
    "Mistral-7B-v0.1": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            sliding_window=4096, rope_theta=10000.0, num_local_experts=1, num_experts_per_tok=1),
    "Mistral-Nemo-Base-2407": dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336, head_dim=128,
                                   num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=1024000, rope_theta=1e6, num_local_experts=1,
                                   num_experts_per_tok=1),
    "Mistral-Large-Instruct-2407": dict(vocab_size=32768, hidden_size=12288, intermediate_size=28672,
                                        num_hidden_layers=88, num_attention_heads=96, num_key_value_heads=8,
                                        max_position_embeddings=131072, rope_theta=1e6, num_local_experts=1,
                                        num_experts_per_tok=1),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_bounds_admit_every_published_config(name):
    cfg = MixtralConfig.from_hf_config(dict(MIXTRAL_8X7B_HF, **PUBLISHED[name]))
    assert cfg.num_hidden_layers == PUBLISHED[name]["num_hidden_layers"]


@pytest.mark.parametrize("overrides, match", [
    ({"max_position_embeddings": 10 ** 8}, r"max_position_embeddings must be an integer in \[1, 16777216\]"),
    ({"num_hidden_layers": 30000}, "num_hidden_layers must be an integer"),
    ({"hidden_size": 4096.0}, "hidden_size must be an integer"),
    ({"num_local_experts": "8"}, "num_local_experts must be an integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
    ({"router_aux_loss_coef": -1}, "router_aux_loss_coef"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": [2, 3]}, "eos_token_id must be a token id"),
    ({"bos_token_id": 40000}, "bos_token_id must be a token id"),
    ({"rope_parameters": 5}, "rope_parameters must be an object"),
    ({"dtype": ["bfloat16"]}, "dtype must be a string"),
    ({"dtype": "float16"}, "dtype='float16' disagrees with torch_dtype='bfloat16'"),
])
def test_types_and_bounds_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        MixtralConfig.from_hf_config(dict(MIXTRAL_8X7B_HF, **overrides))


def test_disagreeing_rope_theta_fields_are_refused_naming_both():
    d = dict(MIXTRAL_8X7B_HF, rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_theta=1000000\.0 disagrees with rope_theta=10000\.0"):
        MixtralConfig.from_hf_config(d)
    same = dict(d, rope_theta=1000000)                      # the same number written twice is fine
    assert MixtralConfig.from_hf_config(same).rope_theta == 1e6


def test_a_key_repeated_with_two_values_is_refused(tmp_path):
    text = json.dumps(MIXTRAL_8X7B_HF)[:-1] + ', "rope_theta": 10000.0}'
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"'rope_theta' appears twice with different values \(1000000\.0 and 10000\.0\)"):
        MixtralConfig.from_hf_config(tmp_path)


@pytest.mark.parametrize("moe, match", [(5, "moe must be an object"), ({"num_experts": 8, "num_experts_per_tok": "2"},
                                                                         "num_experts_per_tok must be an integer")])
def test_params_json_types(tmp_path, moe, match):
    (tmp_path / "params.json").write_text(json.dumps(dict(MIXTRAL_8X7B_PARAMS, moe=moe)))
    with pytest.raises(ValueError, match=match):
        MixtralConfig.from_params_json(tmp_path)


def test_config_files_must_be_small_regular_files(tmp_path):
    import os
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ValueError, match="not a regular file"):          # would block forever if opened
        MixtralConfig.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        MixtralConfig.from_hf_config("/dev/zero")
    (tmp_path / "params.json").write_bytes(b'{"dim": 4096, "x": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        MixtralConfig.from_params_json(tmp_path)
