"""save_gguf: a Mixtral written as the GGUF file llama.cpp's converter would write for it.

Architecture "llama" with `llama.expert_count`, the converter's metadata keys, the tokenizer's
pieces, q and k rows permuted for llama.cpp's RoPE (`gguf_file.permute_qk`), each layer's experts
merged into 3-D `ffn_gate_exps` / `ffn_down_exps` / `ffn_up_exps`, norms and routers in F32.
The matrices are F32, F16 or Q8_0 (quantized by the `gguf` package). The file is written beside
its final name and renamed when complete, so a failed save never leaves a half file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import MixtralConfig
from .gguf_file import EXPERT_NAMES, LAYER_NAMES, TOP_NAMES, permute_qk

SAVE_TYPES = ("F32", "F16", "Q8_0")


def add_mixtral_metadata(writer, cfg: MixtralConfig, pieces: list, name: str = "mixtral-edu") -> None:
    """The key/values convert_hf_to_gguf.py writes for a Mixtral (its LlamaModel with experts)."""
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * len(pieces))
    writer.add_token_types([1] * len(pieces))
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)


def gguf_name(ours: str) -> str:
    """Our parameter name -> its GGUF tensor name (experts: the merged 3-D tensor)."""
    for theirs, mine in TOP_NAMES.items():
        if ours == mine:
            return theirs + ".weight"
    _, i, rest = ours.split(".", 2)
    for theirs, mine in LAYER_NAMES.items():
        if rest == mine:
            return f"blk.{i}.{theirs}.weight"
    theirs = {v: k for k, v in EXPERT_NAMES.items()}[rest.rsplit(".", 1)[1]]
    return f"blk.{i}.{theirs}_exps.weight"


def save_gguf(model, path, qtype: str = "F32", tokenizer=None) -> Path:
    """Write `model` (a Mixtral) to the GGUF file `path`; matrices in `qtype` (F32, F16, Q8_0). Returns the path."""
    import gguf
    from ..tokenizer import Tokenizer

    if qtype not in SAVE_TYPES:
        raise ValueError(f"save_gguf writes {', '.join(SAVE_TYPES)}, not {qtype!r} (llama-quantize makes the others)")
    cfg = model.config
    tok = tokenizer or Tokenizer()
    path = Path(path)
    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(part), "llama")
    add_mixtral_metadata(writer, cfg, tok.pieces(range(tok.vocab_size)))
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[qtype])
    for name, w in model.state_dict().items():
        if name.startswith("rotary_emb") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        w = w.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, cfg.num_key_value_heads)
        data = w.numpy()
        if w.dim() == 1 or name.endswith("gate.weight") or qtype == "F32":
            writer.add_tensor(gguf_name(name), data)
        elif qtype == "F16":
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(part, path)
    finally:
        if part.exists():
            part.unlink()
    return path

