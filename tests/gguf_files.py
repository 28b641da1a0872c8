"""Small Mixtral GGUF files for the tests, written with the `gguf` package's writer (never downloaded).

They mirror what llama.cpp's convert_hf_to_gguf.py writes for a Mixtral: architecture "llama" with
`llama.expert_count`, the same metadata keys, q/k rows permuted for llama.cpp's RoPE (the converter's
`LlamaModel.permute`, written here with numpy), experts merged into 3-D `ffn_*_exps` tensors (or, for
the older layout, one tensor per expert). Float types and Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 quantize
our weights with `gguf.quants.quantize`; the K-quants, which the gguf package cannot quantize, get
random blocks with finite float16 scales. `reference_state` dequantizes a file with the gguf package
alone: the independent side of every comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as T

from mixtral_edu.config import MixtralConfig
from mixtral_edu.weights.gguf_save import add_mixtral_metadata

QUANTIZABLE = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"}
# byte offsets of the float16 scales (d, dmin, m) inside one block of each type
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """`[n_blocks, type_size]` uint8: random codes, float16 scales uniform in [0, scale) (finite)."""
    _, nbytes = gguf.GGML_QUANT_SIZES[T[qtype]]
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = (rng.random(n_blocks) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter on q or k rows `[n_head * head_dim, in]` (rotate-half order -> pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """float32 `[..., in]` -> the bytes GGUF stores for `qtype` (`[..., bytes per row]` uint8 or floats)."""
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(w.astype(np.float32), T[qtype])
    size, nbytes = gguf.GGML_QUANT_SIZES[T[qtype]]
    n_blocks = w.size // size
    return random_blocks(qtype, n_blocks, rng).reshape(*w.shape[:-1], w.shape[-1] // size * nbytes)


def gguf_tensors(state: dict, cfg: MixtralConfig, merged: bool = True) -> dict:
    """Our state dict (stacked experts) -> {GGUF name: float32 numpy array}, converter order and permutation."""
    out = {"token_embd.weight": state["embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[b + "attn_q.weight"] = permute(state[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[b + "attn_k.weight"] = permute(state[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        out[b + "attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
        out[b + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[b + "ffn_gate_inp.weight"] = state[p + "block_sparse_moe.gate.weight"]
        for ours, theirs in (("w1", "ffn_gate"), ("w2", "ffn_down"), ("w3", "ffn_up")):
            w = state[p + "block_sparse_moe.experts." + ours]
            if merged:
                out[b + theirs + "_exps.weight"] = w
            else:
                for j in range(cfg.num_local_experts):
                    out[b + f"{theirs}.{j}.weight"] = w[j]
    out["output_norm.weight"] = state["norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    return out


def type_of(name: str, qtype: str, cfg: MixtralConfig) -> str:
    """The converter keeps norms and the router in F32; K-quant rows must hold whole 256-blocks."""
    if name.endswith("norm.weight") or "ffn_gate_inp" in name:
        return "F32"
    size, _ = gguf.GGML_QUANT_SIZES[T[qtype]] if qtype not in ("F32", "F16") else (1, 0)
    return qtype if cfg.hidden_size % size == 0 and cfg.intermediate_size % size == 0 else "Q8_0"


def write_gguf(model, path: Path, qtype: str = "F32", merged: bool = True, seed: int = 0,
               pieces: list | None = None, arch: str = "llama", tensors: dict | None = None) -> Path:
    """Write `model` (a Mixtral) as a GGUF file of `qtype` (norms and routers F32, as the converter does)."""
    from mixtral_edu.tokenizer import Tokenizer

    cfg = model.config
    rng = np.random.default_rng(seed)
    if pieces is None:
        tok = Tokenizer()
        pieces = tok.pieces(range(tok.vocab_size))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    add_mixtral_metadata(writer, cfg, pieces, name="tiny")
    for name, w in (tensors or gguf_tensors(state, cfg, merged)).items():
        t = type_of(name, qtype, cfg)
        data = encode(np.ascontiguousarray(w), t, rng)
        writer.add_tensor(name, data, raw_dtype=T[t] if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def reference_state(path: Path, cfg: MixtralConfig) -> dict:
    """Our state dict from a GGUF file using only the gguf package (its reader and dequantize) and numpy."""
    reader = gguf.GGUFReader(path)
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        name = t.name.removesuffix(".weight")
        state[name] = w
    out = {"embed_tokens.weight": state["token_embd"], "norm.weight": state["output_norm"]}
    out["lm_head.weight"] = state.get("output", state["token_embd"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        inv = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads}
        for x, n in inv.items():        # the converter's permutation is undone by its own transpose
            w = state[b + f"attn_{x}"]
            out[p + f"self_attn.{x}_proj.weight"] = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        out[p + "self_attn.v_proj.weight"] = state[b + "attn_v"]
        out[p + "self_attn.o_proj.weight"] = state[b + "attn_output"]
        out[p + "input_layernorm.weight"] = state[b + "attn_norm"]
        out[p + "post_attention_layernorm.weight"] = state[b + "ffn_norm"]
        out[p + "block_sparse_moe.gate.weight"] = state[b + "ffn_gate_inp"]
        for ours, theirs in (("w1", "ffn_gate"), ("w2", "ffn_down"), ("w3", "ffn_up")):
            if b + theirs + "_exps" in state:
                out[p + "block_sparse_moe.experts." + ours] = state[b + theirs + "_exps"]
            else:
                out[p + "block_sparse_moe.experts." + ours] = np.stack(
                    [state[b + f"{theirs}.{j}"] for j in range(cfg.num_local_experts)])
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
