"""The checks on generation arguments, in one place: `generate`, `FastDecoder` and the command line
call these, so the Python API and `mixtral-edu` refuse the same values with the same words.

Each check raises ValueError naming the argument and the value, and returns nothing.
"""

from __future__ import annotations

import math
from typing import Optional

# Below this a temperature or top-p only ever keeps the argmax, and logits / temperature overflows
# float32 (torch then reports "probability tensor contains inf/nan").
MIN_SAMPLING = 1e-6
MAX_SEED = 2 ** 63                # torch.Generator.manual_seed takes any int64; negative seeds are refused here


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sampling(temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                   seed: Optional[int] = None) -> None:
    """temperature: 0 (greedy) or a finite number >= MIN_SAMPLING; top_k: None or an integer >= 1;
    top_p: in [MIN_SAMPLING, 1]; seed: None or an integer in [0, 2**63)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature}")
    if 0 < temperature < MIN_SAMPLING:
        raise ValueError(f"temperature {temperature:g} is too small to sample with (below {MIN_SAMPLING:g} every "
                         "draw is the likeliest token); use temperature 0 for greedy decoding")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_k is not None and top_k > 2 ** 31 - 1:
        raise ValueError(f"top_k {top_k} is larger than any vocabulary")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_p < MIN_SAMPLING:
        raise ValueError(f"top_p {top_p:g} is too small (below {MIN_SAMPLING:g} only the likeliest token is ever "
                         "kept); use top_k 1 or temperature 0 for that")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")


def check_max_new_tokens(max_new_tokens: int, minimum: int = 0) -> None:
    """An integer >= minimum (0 for the Python API, where it means "no new token"; the CLI asks for 1)."""
    if not _is_int(max_new_tokens) or max_new_tokens < minimum:
        raise ValueError(f"max_new_tokens must be an integer >= {minimum}, got {max_new_tokens!r}")


def check_cache_room(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """FastDecoder: the prompt and the new tokens but the last (never fed back) fit its KV cache."""
    if prompt_len + max_new_tokens - 1 > max_seq_len:
        raise ValueError(f"KV cache is full: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) - 1 = "
                         f"{prompt_len + max_new_tokens - 1} exceeds the decoder's max_seq_len of {max_seq_len}")


def check_max_seq_len(max_seq_len: int, context: int) -> None:
    """A KV cache length: an integer in [1, context], the model's max_position_embeddings (RoPE has no
    angles past it)."""
    if not _is_int(max_seq_len) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
    if max_seq_len > context:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of {context} tokens "
                         "(config.max_position_embeddings)")
