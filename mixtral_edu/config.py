"""The Mixtral architecture as one dataclass, with Hugging Face field names.

Three presets: `mixtral_8x7b()` (the published model), `mistral_7b()` (its dense sibling, for the
size table) and `tiny()` (small enough for a laptop CPU; used by the notebooks and tests).
Two readers: a Hugging Face `config.json` and Mistral's own `params.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from .files import FileTooLarge, NotRegularFile, read_regular

# Keys a real config.json carries that say nothing about the architecture we build.
_HF_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "use_cache", "transformers_version",
    "attention_dropout", "initializer_range", "output_router_logits", "router_jitter_noise",
    "pad_token_id", "return_dict", "output_hidden_states", "output_attentions", "_name_or_path",
    "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "tokenizer_class", "layer_types", "attention_bias", "mlp_bias", "pretraining_tp",
    "_attn_implementation", "_attn_implementation_autoset", "name_or_path",
}


# Upper bounds on the integer fields: generous (several times every published Mixtral/Mistral config)
# but finite, so that a config file cannot make us allocate or loop without limit.
LIMITS = {
    "vocab_size": 1 << 20, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024, "num_local_experts": 1024,
    "num_experts_per_tok": 1024, "max_position_embeddings": 1 << 24,
}
MAX_CONFIG_BYTES = 1 << 20     # config.json / params.json of real models are a few KB


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MixtralConfig:
    """Hyper-parameters of a Mixtral (or, with `num_local_experts=1` and no router, Mistral) model.

    `head_dim=None` means hidden_size // num_attention_heads, as in Hugging Face.
    `sliding_window=None` means full causal attention (Mixtral has no window).
    `num_local_experts=1, num_experts_per_tok=1` is a dense model: one feed-forward block, no router.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    router_aux_loss_coef: float = 0.02

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0 \
                and isinstance(self.hidden_size, int):
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def mixtral_8x7b(cls) -> "MixtralConfig":
        """The published Mixtral-8x7B(-Instruct-v0.1) architecture (its config.json / params.json)."""
        return cls()

    @classmethod
    def mistral_7b(cls) -> "MixtralConfig":
        """Mistral-7B-v0.1: the same backbone with one dense SwiGLU block per layer, no router.

        Mistral-7B-v0.1 used a 4096-token sliding window, rope_theta 1e4 and a 32k context.
        """
        return cls(
            num_local_experts=1, num_experts_per_tok=1, rope_theta=1e4, sliding_window=4096,
            router_aux_loss_coef=0.0,
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> "MixtralConfig":
        """A small Mixtral for laptops and tests: the real 32000-token vocabulary, 8 experts, top-2."""
        fields = dict(
            vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=512,
        )
        fields.update(overrides)
        return cls(**fields)

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        """True when each layer has a router choosing among several experts."""
        return self.num_local_experts > 1

    @property
    def num_key_value_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field when the architecture is impossible or absurdly large.

        Every field is type-checked (integers are ints, never bools or floats; tie_word_embeddings is a
        bool) and bounded by `LIMITS`, which admit every published Mixtral and Mistral config (the
        largest: Mistral-Large-2's 88 layers, Mistral-Nemo's 131072 vocabulary and 1024000 positions),
        so a config can neither allocate nor loop without bound before anything is loaded.
        """
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"MixtralConfig.{name} must be an integer in [1, {limit}], got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MixtralConfig.num_attention_heads ({self.num_attention_heads}) must be divisible "
                f"by num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"MixtralConfig.num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise ValueError(f"MixtralConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name, low, high in (("rope_theta", 0, math.inf), ("rms_norm_eps", 0, 1)):
            value = getattr(self, name)
            if not _is_real(value) or not (low < value < high and math.isfinite(value)):
                raise ValueError(f"MixtralConfig.{name} must be a finite number in ({low}, {high}), got {value!r}")
        if not _is_real(self.router_aux_loss_coef) or not (
                math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            raise ValueError(f"MixtralConfig.router_aux_loss_coef must be a finite number >= 0, "
                             f"got {self.router_aux_loss_coef!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
            or not 0 < self.sliding_window <= LIMITS["max_position_embeddings"]
        ):
            raise ValueError(
                f"MixtralConfig.sliding_window must be a positive integer or None, got {self.sliding_window!r}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"MixtralConfig.tie_word_embeddings must be true or false (a JSON boolean), "
                             f"got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"MixtralConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), "
                                 f"got {value!r}")

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, path_or_dict: "str | os.PathLike | dict") -> "MixtralConfig":
        """Read a Hugging Face config.json (a path to the file or its folder, or the parsed dict).

        Accepts transformers 4's `rope_theta` and transformers 5's `rope_parameters`, and
        `head_dim: null`. Refuses what this model does not implement (hidden_act other than silu,
        rope scaling); warns about keys it does not know.
        """
        source = "config dict"
        if isinstance(path_or_dict, dict):
            data = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            data = _read_json(path)

        def fail(message: str) -> ValueError:
            return ValueError(f"{source}: {message}")

        act = data.pop("hidden_act", "silu")
        if act != "silu":
            raise fail(f"hidden_act={act!r} is not supported (Mixtral uses 'silu')")
        rope_scaling = data.pop("rope_scaling", None)
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters is not None:
            if not isinstance(rope_parameters, dict):
                raise fail(f"rope_parameters must be an object, got {rope_parameters!r}")
            rope_type = rope_parameters.get("rope_type", "default")
            if rope_type != "default":
                raise fail(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
            if "rope_theta" in rope_parameters:
                theta = rope_parameters["rope_theta"]
                if "rope_theta" in data and not _same_number(data["rope_theta"], theta):
                    # transformers 5 reads one, transformers 4 the other: refuse rather than pick
                    raise fail(f"rope_parameters.rope_theta={theta!r} disagrees with rope_theta="
                               f"{data['rope_theta']!r}; keep one, or make them equal")
                data["rope_theta"] = theta
        if rope_scaling:
            raise fail(f"rope_scaling={rope_scaling!r} is not supported")
        dtypes = {k: data[k] for k in ("dtype", "torch_dtype") if data.get(k) is not None}
        for key, value in dtypes.items():
            if not isinstance(value, str):
                raise fail(f"{key} must be a string such as 'bfloat16', got {value!r}")
        if len(set(dtypes.values())) > 1:
            raise fail(f"dtype={dtypes['dtype']!r} disagrees with torch_dtype={dtypes['torch_dtype']!r}")
        # transformers names the dense sibling's intermediate size the same way; nothing to map.
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        unknown = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in _HF_IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}", stacklevel=2)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise fail(str(err)) from None
        except TypeError as err:
            raise fail(f"bad field types: {err}") from None

    def to_hf_config(self) -> dict:
        """A config.json dict that `transformers.MixtralConfig(**d)` accepts with this architecture."""
        data = dataclasses.asdict(self)
        data.update(
            model_type="mixtral",
            architectures=["MixtralForCausalLM"],
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
        )
        data["rope_theta"] = float(self.rope_theta)
        return data

    # ------------------------------------------------------------------ Mistral
    @classmethod
    def from_params_json(cls, path: "str | os.PathLike") -> "MixtralConfig":
        """Read Mistral's params.json (a path to the file or its folder).

        Fields: dim, n_layers, head_dim, hidden_dim, n_heads, n_kv_heads, norm_eps, vocab_size,
        optional rope_theta (absent means 1e6, as in Mixtral's release), sliding_window,
        and `moe: {num_experts, num_experts_per_tok}` (absent means a dense model).
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "params.json")
        data = _read_json(path)
        required = ["dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps", "vocab_size"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{path}: params.json is missing fields {missing}")
        moe = data.get("moe") or {"num_experts": 1, "num_experts_per_tok": 1}
        if not isinstance(moe, dict):
            raise ValueError(f"{path}: params.json field moe must be an object, got {moe!r}")
        for key in ("num_experts", "num_experts_per_tok"):
            if key not in moe:
                raise ValueError(f"{path}: params.json field moe.{key} is missing")
        try:
            return cls(
                vocab_size=data["vocab_size"],
                hidden_size=data["dim"],
                intermediate_size=data["hidden_dim"],
                num_hidden_layers=data["n_layers"],
                num_attention_heads=data["n_heads"],
                num_key_value_heads=data["n_kv_heads"],
                head_dim=data.get("head_dim"),
                num_local_experts=moe["num_experts"],
                num_experts_per_tok=moe["num_experts_per_tok"],
                rope_theta=data.get("rope_theta", 1e6),
                rms_norm_eps=data["norm_eps"],
                sliding_window=data.get("sliding_window"),
                max_position_embeddings=data.get("max_seq_len", 32768),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def to_params_json(self) -> dict:
        """The params.json dict of Mistral's layout for this architecture."""
        data = {
            "dim": self.hidden_size, "n_layers": self.num_hidden_layers, "head_dim": self.head_dim,
            "hidden_dim": self.intermediate_size, "n_heads": self.num_attention_heads,
            "n_kv_heads": self.num_key_value_heads, "norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
        }
        if self.is_moe:
            data["moe"] = {"num_experts": self.num_local_experts,
                           "num_experts_per_tok": self.num_experts_per_tok}
        if self.sliding_window is not None:
            data["sliding_window"] = self.sliding_window
        return data


def _same_number(a, b) -> bool:
    return _is_real(a) and _is_real(b) and float(a) == float(b)


class _Pairs(dict):
    """A parsed JSON object; json.loads keeps the last of repeated keys, so we note conflicting repeats."""


def _object_without_conflicts(pairs):
    obj = _Pairs()
    for key, value in pairs:
        if key in obj and obj[key] != value:
            raise ValueError(f"field {key!r} appears twice with different values ({obj[key]!r} and {value!r})")
        obj[key] = value
    return obj


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def read_json_file(path: "str | os.PathLike", max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a small regular file: FileNotFoundError when absent, else ValueError naming the file.

    Refuses what is not a regular file (a FIFO or /dev/zero would hang or fill memory), files over
    `max_bytes`, invalid UTF-8, NaN/Infinity, nesting deep enough to exhaust the stack, and a key
    repeated with two different values.
    """
    path = os.fspath(path)
    try:
        raw = read_regular(path, max_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    except NotRegularFile:
        raise ValueError(f"{path}: not a regular file") from None
    except FileTooLarge as err:
        if err.size is None:
            raise ValueError(f"{path}: more than the {max_bytes} bytes a config file may have") from None
        raise ValueError(f"{path}: {err.size} bytes, more than the {max_bytes} a config file may have") from None
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_conflicts,
                          parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return dict(data)


_read_json = read_json_file
