"""A Mixtral GGUF file (llama.cpp, Ollama, LM Studio): its config, its tokenizer check, one matrix at a time.

A GGUF file is a header, metadata key/values (`llama.block_count`, `tokenizer.ggml.tokens`, ...),
one info record per tensor (name, shape, GGML type, offset) and then the tensors' bytes, aligned.
llama.cpp writes Mixtral as architecture "llama" with `llama.expert_count` experts. The `gguf`
package (llama.cpp's own) parses the header; the bytes are read here from our own memory map, one
matrix (or one expert's matrix) at a time, dequantized (`gguf_quants.py`) and the map's pages
released again (madvise), so reading never makes the whole file resident.

    GGUF name                                  our parameter                         note
    token_embd                                 embed_tokens.weight
    blk.{i}.attn_norm / ffn_norm               layers.{i}.input_ / post_attention_layernorm
    blk.{i}.attn_q / attn_k                    layers.{i}.self_attn.q_proj / k_proj  rows permuted back
    blk.{i}.attn_v / attn_output               layers.{i}.self_attn.v_proj / o_proj
    blk.{i}.ffn_gate_inp                       layers.{i}.block_sparse_moe.gate
    blk.{i}.ffn_gate_exps / _up_exps / _down_exps  experts w1 / w3 / w2 `[E, out, in]`  files since 2024
    blk.{i}.ffn_gate.{j} / ffn_up.{j} / ffn_down.{j}  expert j's w1 / w3 / w2            older files
    output_norm / output                       norm.weight / lm_head.weight          output absent: tied

GGUF lists a shape innermost first (`ne = [in, out, experts]`); here shapes are torch's `[out, in]`.
llama.cpp's RoPE pairs neighbouring dimensions (2i, 2i+1), ours (the Hugging Face checkpoint's) pairs
i with i + head_dim/2; its converter permutes the rows of q and k within each head to match, and
`unpermute_qk` puts them back.
"""

from __future__ import annotations

import mmap
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import MixtralConfig
from .errors import CheckpointError
from .gguf_quants import BLOCKS, SUPPORTED, dequantize, row_bytes

PAGE = mmap.PAGESIZE
EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
    "ffn_gate_inp": "block_sparse_moe.gate.weight",
}
TOP_NAMES = {"token_embd": "embed_tokens.weight", "output_norm": "norm.weight", "output": "lm_head.weight"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be run as a Mixtral (the message names the file and the problem)."""


@dataclass(frozen=True)
class Matrix:
    """Where one matrix (or one expert's matrix) lies in the file: `shape` `[out, in]` of `qtype` at `offset`."""

    gguf_name: str
    qtype: str
    offset: int          # absolute byte offset in the file
    shape: tuple         # torch order: (out, in) or (in,) for a vector

    @property
    def nbytes(self) -> int:
        return row_bytes(self.qtype, self.shape[-1]) * (self.shape[0] if len(self.shape) == 2 else 1)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def is_gguf(path) -> bool:
    """True for a file named *.gguf or starting with GGUF's magic (Ollama's blobs have no suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def our_name(gguf_name: str) -> tuple[str, Optional[int]]:
    """A GGUF tensor name -> (our parameter name, expert j or None); merged experts -> name "...w1" with None.

    Raises KeyError for a name Mixtral does not have.
    """
    base = gguf_name.removesuffix(".weight")
    if base in TOP_NAMES:
        return TOP_NAMES[base], None
    parts = base.split(".")
    if len(parts) in (3, 4) and parts[0] == "blk" and parts[1].isdigit():
        prefix = f"layers.{int(parts[1])}."
        if len(parts) == 3 and parts[2] in LAYER_NAMES:
            return prefix + LAYER_NAMES[parts[2]], None
        if len(parts) == 3 and parts[2].endswith("_exps") and parts[2][:-5] in EXPERT_NAMES:
            return prefix + "block_sparse_moe.experts." + EXPERT_NAMES[parts[2][:-5]], None
        if len(parts) == 4 and parts[2] in EXPERT_NAMES and parts[3].isdigit():
            return prefix + "block_sparse_moe.experts." + EXPERT_NAMES[parts[2]], int(parts[3])
    raise KeyError(gguf_name)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter: rows `[n_heads * head_dim, in]` from (pairs-adjacent) back to (halves)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q and k rows (the inverse of `unpermute_qk`)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class GGUFFile:
    """An open Mixtral GGUF file: `.config` (MixtralConfig), `.matrices` {(our name, expert): Matrix}, `read`.

    Opening checks everything that can be checked without dequantizing: the header parses, every
    tensor is a known Mixtral tensor of a type we dequantize with the shape `.config` implies, lies
    inside the file, and every tensor the model needs is there; the vocabulary is Mixtral's (when
    `check_tokenizer`). Any problem raises GGUFError with one line.
    """

    def __init__(self, path, check_tokenizer: bool = True) -> None:
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as err:
            raise GGUFError(f"{path}: cannot read the file ({err.strerror or err})") from None
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        fields, tensors = self._parse()
        self.metadata = fields
        self.config = config_from_metadata(fields, self.path, has_output="output.weight" in tensors)
        self.matrices = self._index(tensors)
        if check_tokenizer:
            check_vocabulary(fields, self.config, self.path)
        with open(self.path, "rb") as f:
            # read-only and shared: a private (copy-on-write) map of a 28 GB file would be charged
            # against the machine's commit limit, and refused where RAM is smaller than the file
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    # ------------------------------------------------------------------ opening
    def _parse(self) -> tuple[dict, dict]:
        """The metadata {key: value} (numbers, strings, lists) and the tensor infos {name: (qtype, ne, offset)}."""
        from gguf import GGUFReader
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OverflowError, EOFError, MemoryError) as err:
            unknown = _unknown_type(err)
            if unknown is not None:
                raise GGUFError(f"{self.path}: a tensor has GGML type number {unknown}, which this gguf package "
                                f"does not know (a newer quantization?); mixtral-edu reads {', '.join(SUPPORTED)}") \
                    from None
            raise GGUFError(f"{self.path}: not a readable GGUF file, truncated or corrupt "
                            f"({type(err).__name__}: {str(err)[:120]})") from None
        fields = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                fields[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError):
                fields[key] = None
        tensors = {}
        for t in reader.tensors:
            tensors[t.name] = (t.tensor_type.name, [int(n) for n in t.shape], int(t.data_offset))
        del reader
        return fields, tensors

    def _index(self, tensors: dict) -> dict:
        """{(our name, expert or None): Matrix}; every check on the tensor infos."""
        cfg = self.config
        expected = expected_shapes(cfg)
        matrices = {}
        for name, (qtype, ne, offset) in tensors.items():
            where = f"{self.path}: tensor {name}"
            try:
                ours, expert = our_name(name)
            except KeyError:
                raise GGUFError(f"{where}: not a tensor of a Mixtral model") from None
            if qtype not in BLOCKS:
                raise GGUFError(f"{where} is of GGML type {qtype}, which mixtral-edu cannot dequantize "
                                f"(it reads {', '.join(SUPPORTED)})")
            shape = tuple(reversed(ne))                                   # torch order
            want = expected.get(ours)
            if want is not None and expert is None and ours.split(".")[-1] in ("w1", "w2", "w3"):
                want = (cfg.num_local_experts,) + want
            if want is None or shape != want:
                raise GGUFError(f"{where}: shape {list(shape)} (torch order), but the file's own metadata "
                                f"implies {list(want) if want else 'no such tensor'}")
            size, _ = BLOCKS[qtype]
            if shape[-1] % size:
                raise GGUFError(f"{where}: rows of {shape[-1]} weights are not whole {qtype} blocks of {size}")
            per = Matrix(name, qtype, offset, shape[-2:])
            count = shape[0] if len(shape) == 3 else 1
            if offset + per.nbytes * count > self.size:
                raise GGUFError(f"{where} ends at byte {offset + per.nbytes * count:,}, but the file has only "
                                f"{self.size:,} bytes (truncated?)")
            if len(shape) == 3:                     # merged experts: expert j is the j-th [out, in] slab
                for j in range(count):
                    matrices[(ours, j)] = Matrix(name, qtype, offset + j * per.nbytes, shape[1:])
            else:
                if (ours, expert) in matrices:
                    raise GGUFError(f"{where}: {ours} (expert {expert}) appears twice")
                matrices[(ours, expert)] = per
        missing = [key for key in needed_keys(cfg) if key not in matrices]
        if missing:
            name, j = missing[0]
            raise GGUFError(f"{self.path}: the file lacks {len(missing)} tensor(s) a Mixtral with these sizes "
                            f"needs, e.g. {name}" + ("" if j is None else f" of expert {j}"))
        return matrices

    # ------------------------------------------------------------------ reading
    def raw(self, m: Matrix) -> torch.Tensor:
        """The bytes of `m` as a uint8 tensor viewing the memory map (no copy)."""
        with warnings.catch_warnings():           # torch warns that the map is read-only: it is only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=torch.uint8, count=m.nbytes, offset=m.offset)

    def prefetch(self, m: Matrix) -> None:
        """Ask the OS to read `m`'s pages now, in large requests, rather than at each 4 KB page fault."""
        if hasattr(mmap, "MADV_WILLNEED"):
            start = m.offset // PAGE * PAGE
            self._map.madvise(mmap.MADV_WILLNEED, start, m.offset + m.nbytes - start)

    def release(self, m: Matrix) -> None:
        """Drop `m`'s pages from this process (they stay in the OS's file cache, not in our RSS)."""
        start = m.offset // PAGE * PAGE
        self._map.madvise(mmap.MADV_DONTNEED, start, m.offset + m.nbytes - start)

    def read(self, name: str, expert: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Our parameter `name` (expert `expert` of a stacked one) dequantized to float32, in our layout.

        `[out, in]` for a matrix, `[n]` for a vector; q and k rows permuted back to ours (in a new tensor).
        `out`, of that shape, is filled and returned.
        """
        m = self.matrices[(name, expert)]
        self.prefetch(m)
        w = torch.empty(m.shape) if out is None else out        # `out` itself, not a view of it, comes back
        dequantize(self.raw(m), m.qtype, out=w.view(-1))
        self.release(m)
        return self.our_rows(name, w)

    def our_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Per-row values `[out, ...]` of matrix `name` in the file's row order -> in ours (q, k: permuted back)."""
        if name.endswith("q_proj.weight"):
            return unpermute_qk(rows, self.config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return unpermute_qk(rows, self.config.num_key_value_heads)
        return rows

    def nbytes_dequantized(self, name: str, expert: Optional[int] = None) -> int:
        """Bytes of `read(name, expert)`'s result (float32)."""
        return 4 * self.matrices[(name, expert)].numel

    def type_counts(self) -> dict:
        """{GGML type: number of matrices} (experts counted one by one), to describe a file."""
        counts: dict = {}
        for m in self.matrices.values():
            counts[m.qtype] = counts.get(m.qtype, 0) + 1
        return counts

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:        # a tensor still views the map; it closes when that is gone
            pass


def _unknown_type(err: Exception) -> Optional[int]:
    """The type number when the gguf reader failed on a GGML type enum it does not know."""
    found = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(err))
    return int(found.group(1)) if found else None


# ============================================================================= metadata
def _meta(fields: dict, key: str, path: Path, default=None, kind=int):
    value = fields.get(key, default)
    if value is None:
        raise GGUFError(f"{path}: the metadata lacks {key}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise GGUFError(f"{path}: metadata {key} should be an integer, got {value!r}")
    if kind is float:
        if not isinstance(value, (int, float, np.number)):
            raise GGUFError(f"{path}: metadata {key} should be a number, got {value!r}")
        return float(str(np.float32(value)))       # stored as float32: 1e-5, not 9.9999997e-06
    return kind(value)


def config_from_metadata(fields: dict, path: Path, has_output: bool = True) -> MixtralConfig:
    """The MixtralConfig a llama.cpp Mixtral file describes (architecture "llama" with experts)."""
    arch = fields.get("general.architecture")
    experts = fields.get(f"{arch}.expert_count") if isinstance(arch, str) else None
    if arch != "llama" or not experts or experts < 2:
        what = f"architecture {arch!r}" + (" without experts" if arch == "llama" else "")
        raise GGUFError(f"{path}: a GGUF file of {what}, not Mixtral (llama.cpp writes Mixtral as 'llama' "
                        f"with llama.expert_count experts); mixtral-edu runs Mixtral only")
    tokens = fields.get("tokenizer.ggml.tokens")
    hidden = _meta(fields, "llama.embedding_length", path)
    heads = _meta(fields, "llama.attention.head_count", path)
    head_dim = fields.get("llama.attention.key_length") or fields.get("llama.rope.dimension_count") or hidden // heads
    try:
        return MixtralConfig(
            vocab_size=len(tokens) if isinstance(tokens, list) else _meta(fields, "llama.vocab_size", path),
            hidden_size=hidden,
            intermediate_size=_meta(fields, "llama.feed_forward_length", path),
            num_hidden_layers=_meta(fields, "llama.block_count", path),
            num_attention_heads=heads,
            num_key_value_heads=_meta(fields, "llama.attention.head_count_kv", path, default=heads),
            head_dim=int(head_dim),
            num_local_experts=int(experts),
            num_experts_per_tok=_meta(fields, "llama.expert_used_count", path),
            rope_theta=_meta(fields, "llama.rope.freq_base", path, default=10000.0, kind=float),
            rms_norm_eps=_meta(fields, "llama.attention.layer_norm_rms_epsilon", path, kind=float),
            max_position_embeddings=_meta(fields, "llama.context_length", path),
            tie_word_embeddings=not has_output,
            bos_token_id=_meta(fields, "tokenizer.ggml.bos_token_id", path, default=1),
            eos_token_id=_meta(fields, "tokenizer.ggml.eos_token_id", path, default=2),
        )
    except ValueError as err:
        raise GGUFError(f"{path}: its metadata is not a valid Mixtral config: {err}") from None


def expected_shapes(cfg: MixtralConfig) -> dict:
    """Our parameter name -> its torch shape (experts: one expert's `[out, in]`)."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
            p + "block_sparse_moe.gate.weight": (cfg.num_local_experts, h),
            p + "block_sparse_moe.experts.w1": (i, h), p + "block_sparse_moe.experts.w3": (i, h),
            p + "block_sparse_moe.experts.w2": (h, i),
        })
    return shapes


def needed_keys(cfg: MixtralConfig) -> list:
    """Every (our name, expert) a model with `cfg` needs from the file."""
    keys = []
    for name in expected_shapes(cfg):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.split(".")[-1] in ("w1", "w2", "w3"):
            keys += [(name, j) for j in range(cfg.num_local_experts)]
        else:
            keys.append((name, None))
    return keys


def check_vocabulary(fields: dict, cfg: MixtralConfig, path: Path, tokenizer=None) -> None:
    """The file's tokenizer must be Mixtral's SentencePiece vocabulary, piece for piece, with BOS 1 and EOS 2."""
    from ..tokenizer import Tokenizer

    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model != "llama" or not isinstance(tokens, list):
        raise GGUFError(f"{path}: its tokenizer is {model!r}, not Mixtral's SentencePiece ('llama') vocabulary")
    tok = tokenizer or Tokenizer()
    if len(tokens) != tok.vocab_size:
        raise GGUFError(f"{path}: its vocabulary has {len(tokens)} pieces, Mixtral's has {tok.vocab_size}")
    ours = tok.pieces(range(tok.vocab_size))
    for i, (theirs, mine) in enumerate(zip(tokens, ours)):
        if theirs != mine:
            raise GGUFError(f"{path}: its vocabulary is not Mixtral's (piece {i} is {theirs!r}, Mixtral's is {mine!r})")
    if (cfg.bos_token_id, cfg.eos_token_id) != (tok.bos_id, tok.eos_id):
        raise GGUFError(f"{path}: BOS/EOS ids {cfg.bos_token_id}/{cfg.eos_token_id}, Mixtral's are "
                        f"{tok.bos_id}/{tok.eos_id}")

