"""GGML's quantized blocks, dequantized with torch: raw bytes `[n_bytes]` (uint8) -> float32 values.

A quantized GGUF tensor is a run of fixed-size *blocks* along each row (a row is never split
between blocks). A block holds `block_size` weights in `type_size` bytes: one or two float16
scales and small integer codes. Two families:

    type   weights/block  bytes  bits/weight  value of code q
    Q8_0        32          34     8.5        d * q                    (q int8)
    Q4_0        32          18     4.5        d * (q - 8)              (q 4 bits)
    Q4_1        32          20     5.0        d * q + m
    Q5_0        32          22     5.5        d * (q - 16)             (q 5 bits: 4 in qs, 1 in qh)
    Q5_1        32          24     6.0        d * q + m
    Q2_K       256          84     2.625      d*sc * q - dmin*mn       16 sub-blocks of 16
    Q3_K       256         110     3.4375     d*sc * (q - 4 or q)      16 sub-blocks of 16, signed 6-bit sc
    Q4_K       256         144     4.5        d*sc * q - dmin*mn       8 sub-blocks of 32, 6-bit sc and mn
    Q5_K       256         176     5.5        d*sc * q - dmin*mn       as Q4_K plus one high bit per weight
    Q6_K       256         210     6.5625     d*sc * (q - 32)          16 sub-blocks of 16, int8 sc

The K-quants ("super-blocks" of 256) quantize the per-sub-block scales themselves against one
float16 `d` (and `dmin`), which is how Q4_K reaches 4.5 bits. Layouts follow ggml's
`ggml-common.h` (`block_q4_K` etc.); tests check every type element for element against the
`gguf` package's numpy `dequantize`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# type name -> (weights per block, bytes per block)
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
SUPPORTED = tuple(BLOCKS)


def row_bytes(qtype: str, row_len: int) -> int:
    """Bytes of one row of `row_len` weights (row_len must be a whole number of blocks)."""
    size, nbytes = BLOCKS[qtype]
    if row_len % size:
        raise ValueError(f"a {qtype} row holds whole blocks of {size} weights, not {row_len}")
    return row_len // size * nbytes


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian float16)."""
    return b.contiguous().view(torch.float16).float()


# Each type has two functions of its blocks `[n, type_size]` uint8:
#   scales(b) -> (scale `[n, S, 1]`, offset `[n, S, 1]` or None), float32;
#   codes(b)  -> codes `[n, S, L]`, small integers (uint8 or int8),
# so that weight = code * scale + offset for the S sub-blocks of L weights. `dequantize` works out the
# scales for many blocks at once (they are dozens of tiny ops) and the codes a cache-sized chunk at a
# time, multiplying the integer codes straight into the float32 output (no float copy of the codes).
# The unpacking works on 8 bytes at a time (int64 lanes): the masks and shifts act on every byte of a
# lane alike, and no bit crosses into a neighbouring byte, so it equals unpacking byte by byte.

NIBBLES = 0x0F0F0F0F0F0F0F0F      # the low 4 bits of each of 8 bytes
LOW2 = 0x0303030303030303         # the low 2 bits of each byte
BIT0 = 0x0101010101010101         # bit 0 of each byte
BIT5 = 0x2020202020202020         # bit 5 of each byte


def _lanes(b: torch.Tensor, *shape: int) -> torch.Tensor:
    """[n, k] uint8 (k a multiple of 8) -> int64 `[n, *shape]`, 8 bytes per element (a copy: b is strided)."""
    b = b.contiguous()
    if b.storage_offset() % 8 or b.stride(0) % 8:    # a single block's slice counts as contiguous
        b = torch.empty(b.shape, dtype=torch.uint8).copy_(b)
    return b.view(torch.int64).view(b.shape[0], *shape)


def _as_bytes(lanes: torch.Tensor, *shape: int, dtype=torch.uint8) -> torch.Tensor:
    """int64 lanes `[n, ...]` -> their bytes `[n, *shape]`."""
    return lanes.view(dtype).view(lanes.shape[0], *shape)


def _q8_0_scales(b):
    return _f16(b[:, :2])[:, :, None], None


def _q8_0_codes(b):
    return b[:, None, 2:].view(torch.int8)


def _q4_0_scales(b):
    d = _f16(b[:, :2])[:, :, None]
    return d, -8 * d                                                  # d * (q - 8), exact in float32


def _q4_1_scales(b):
    return _f16(b[:, :2])[:, :, None], _f16(b[:, 2:4])[:, :, None]


def _q5_1_scales(b):
    return _f16(b[:, :2])[:, :, None], _f16(b[:, 2:4])[:, :, None]


def _q5_0_scales(b):
    d = _f16(b[:, :2])[:, :, None]
    return d, -16 * d                                                 # d * (q - 16), exact in float32


def _halves(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 1, 32] codes: weights 0-15 are the low nibbles, 16-31 the high ones."""
    q = _lanes(qs, 1, 2)
    return _as_bytes(torch.stack([q & NIBBLES, (q >> 4) & NIBBLES], 2), 1, 32)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 (one little-endian uint32) -> [n, 1, 32] bit j of it, shifted to 16 (the code's 5th bit)."""
    bits = (qh[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1      # [n, 4 bytes, 8 bits]
    return (bits << 4).reshape(-1, 1, 32)


def _q4_0_codes(b):
    return _halves(b[:, 2:])


def _q4_1_codes(b):
    return _halves(b[:, 4:])


def _q5_0_codes(b):
    return _halves(b[:, 6:]) | _fifth_bits(b[:, 2:6])


def _q5_1_codes(b):
    return _halves(b[:, 8:]) | _fifth_bits(b[:, 4:8])


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K / Q5_K -> 8 scales and 8 mins of 6 bits each, `[n, 8]` float.

    Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    4-7 take 4 low bits from bytes 8-11 and their 2 high bits from the top of bytes 0-7.
    """
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], 1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc.float(), mn.float()


def _k4_scale_offset(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    return (d * sc)[..., None], -(dmin * mn)[..., None]


def _k4_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 256 codes as int64 lanes `[n, 8, 4]`: each 32 bytes give 64 weights, low nibbles then high."""
    q = _lanes(qs, 4, 1, 4)                                              # [n, 4 groups of 32 bytes]
    return torch.cat([q & NIBBLES, (q >> 4) & NIBBLES], 2).view(-1, 8, 4)


def _q4_k_codes(b):
    return _as_bytes(_k4_nibbles(b[:, 16:144]), 8, 32)


def _q5_k_codes(b):
    qh = _lanes(b[:, 16:48], 1, 4)                                       # bit i of byte l: sub-block i, weight l
    high = (qh >> torch.arange(8)[:, None]) & BIT0                       # [n, 8, 4]
    return _as_bytes(_k4_nibbles(b[:, 48:176]) | (high << 4), 8, 32)


def _q6_k_scales(b):
    d = _f16(b[:, 208:210])
    return (d * b[:, 192:208].view(torch.int8).float())[..., None], None


def _q6_k_codes(b):
    # Each half of 128 weights: 64 ql bytes (low nibbles: weights 0-63, high: 64-127) and 32 qh bytes
    # (2 bits per weight for weights l, l+32, l+64, l+96).
    ql, qh = _lanes(b[:, 0:128], 2, 2, 4), _lanes(b[:, 128:192], 2, 1, 4)
    low = torch.cat([ql & NIBBLES, (ql >> 4) & NIBBLES], 2)             # [n, half, 4 groups, 4 lanes]
    high = (qh >> torch.tensor([0, 2, 4, 6]).view(1, 1, 4, 1)) & LOW2
    # code q in 0..63 is stored for q - 32: flip bit 5 and copy it into bits 6 and 7 (a 6-bit
    # two's complement sign-extended to 8 bits), all 8 bytes of a lane at once
    v = (low | (high << 4)) ^ BIT5
    return _as_bytes(v | (v & BIT5) * 6, 16, 16, dtype=torch.int8)     # bit 5 * 6 = bits 6 and 7


def _q2_k_scales(b):
    scales = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    return (d * (scales & 0x0F).float())[..., None], -(dmin * (scales >> 4).float())[..., None]


def _q2_k_codes(b):
    # half h, shift j, byte l -> weight 128h + 32j + l; its scale byte is 8h + 2j + (l >= 16)
    qs = b[:, 16:80].reshape(-1, 2, 1, 32)
    return ((qs >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 16, 16)


def _q3_k_scales(b):
    s, d = b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: 4 low bits from bytes 0-7 (low nibbles give 0-7, high nibbles 8-15),
    # 2 high bits from bytes 8-11 (scale i: byte 8 + i % 4, shifted by 2 * (i // 4)); stored plus 32.
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], 1)
    high = (s[:, None, 8:12] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3   # [n, 4, 4]
    return (d * ((low | (high.reshape(-1, 16) << 4)).float() - 32))[..., None], None


def _q3_k_codes(b):
    hmask, qs = b[:, 0:32], b[:, 32:96].reshape(-1, 2, 1, 32)
    ql = (qs >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3          # [n, 2, 4, 32]
    # weight 128h + 32j + l loses 4 unless bit (4h + j) of hmask[l] is set
    bit = (hmask[:, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1                 # [n, 8, 32]
    q = ql.reshape(-1, 8, 32).view(torch.int8) - ((1 - bit) << 2).view(torch.int8)
    return q.reshape(-1, 16, 16)


# type -> (scales, codes)
_BLOCK_FUNCS = {"Q8_0": (_q8_0_scales, _q8_0_codes), "Q4_0": (_q4_0_scales, _q4_0_codes),
                "Q4_1": (_q4_1_scales, _q4_1_codes), "Q5_0": (_q5_0_scales, _q5_0_codes),
                "Q5_1": (_q5_1_scales, _q5_1_codes), "Q2_K": (_q2_k_scales, _q2_k_codes),
                "Q3_K": (_q3_k_scales, _q3_k_codes), "Q4_K": (_k4_scale_offset, _q4_k_codes),
                "Q5_K": (_k4_scale_offset, _q5_k_codes), "Q6_K": (_q6_k_scales, _q6_k_codes)}
SCALE_CHUNK = 2 ** 14             # blocks whose scales are worked out together
_workers: dict = {}                # thread count -> its ThreadPoolExecutor, made when first needed


@torch.no_grad()          # on a worker thread too (grad mode is per thread): `out` may be a parameter
def _decode_blocks(blocks: torch.Tensor, out_blocks: torch.Tensor, qtype: str, chunk_blocks: int) -> None:
    """Dequantize blocks `[n, type_size]` into out_blocks `[n, block_size]` float32, on this thread alone."""
    scales_of, codes_of = _BLOCK_FUNCS[qtype]
    for start in range(0, blocks.shape[0], SCALE_CHUNK):
        group, out_group = blocks[start:start + SCALE_CHUNK], out_blocks[start:start + SCALE_CHUNK]
        scale, offset = scales_of(group)
        for at in range(0, group.shape[0], chunk_blocks):
            codes = codes_of(group[at:at + chunk_blocks])
            dst = out_group[at:at + chunk_blocks].view(codes.shape)
            torch.mul(codes, scale[at:at + chunk_blocks], out=dst)      # int codes -> float32, one pass
            if offset is not None:
                dst.add_(offset[at:at + chunk_blocks])                  # rounded like the reference's d*q - m


def _one_thread() -> None:
    """A worker's start: torch sets up this thread (copying the process-wide count), then it gets 1."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def dequantize(raw: torch.Tensor, qtype: str, out: torch.Tensor | None = None,
               chunk_blocks: int | None = None, threads: int | None = None) -> torch.Tensor:
    """raw `[n_bytes]` uint8 of whole blocks -> float32 `[n_weights]` (written into `out` if given).

    Works `chunk_blocks` blocks at a time (default: 2**18 weights' worth), so the temporaries stay in
    the CPU's cache whatever the tensor's size. `threads` (default: torch's thread count) threads of
    our own each take a contiguous share of the blocks and run their torch ops on one thread: the
    ops are short and memory-bound, and torch's own thread team would spin-wait between them on a
    busy machine (py-spy on the full-size benchmark: 10x the CPU time per weight).
    """
    if qtype not in BLOCKS:
        raise ValueError(f"cannot dequantize GGML type {qtype}; supported: {', '.join(SUPPORTED)}")
    size, nbytes = BLOCKS[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % nbytes:
        raise ValueError(f"{qtype} data must be a 1-D uint8 tensor of whole {nbytes}-byte blocks")
    n = raw.numel() // nbytes * size
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    if qtype in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
        return out.copy_(raw.view(dtype))
    blocks, out_blocks = raw.view(-1, nbytes), out.view(-1, size)
    chunk_blocks = chunk_blocks or max(1, 2 ** 18 // size)
    threads = max(1, min(threads or torch.get_num_threads(), blocks.shape[0] // SCALE_CHUNK))
    share = -(-blocks.shape[0] // threads)
    shares = [(blocks[i:i + share], out_blocks[i:i + share]) for i in range(0, blocks.shape[0], share)]
    if len(shares) == 1:
        with _torch_threads(1):
            _decode_blocks(*shares[0], qtype, chunk_blocks)
        return out
    if len(shares) not in _workers:
        _workers[len(shares)] = ThreadPoolExecutor(len(shares), "dequantize", initializer=_one_thread)
    pool = _workers[len(shares)]
    for done in [pool.submit(_decode_blocks, b, o, qtype, chunk_blocks) for b, o in shares]:
        done.result()
    # a worker's set_num_threads(1) also set the count torch gives threads started later: put ours back
    torch.set_num_threads(torch.get_num_threads())
    return out


@contextmanager
def _torch_threads(n: int):
    """Run the block with torch's thread count at `n` on this thread, then put it back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
