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


# Each block function takes blocks `[n, type_size]` uint8 and returns (codes `[n, S, L]` as small
# integers, scale `[n, S, 1]`, offset `[n, S, 1]` or None): weight = scale * code + offset for the
# S sub-blocks of L weights. `dequantize` then does the float arithmetic once, in one fused pass.

def _q8_0(b):
    return b[:, None, 2:].view(torch.int8), _f16(b[:, :2])[:, :, None], None


def _q4_0(b):
    d = _f16(b[:, :2])[:, :, None]
    return _halves(b[:, 2:]), d, -8 * d                               # d * (q - 8)


def _q4_1(b):
    return _halves(b[:, 4:]), _f16(b[:, :2])[:, :, None], _f16(b[:, 2:4])[:, :, None]


def _halves(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 1, 32] codes: weights 0-15 are the low nibbles, 16-31 the high ones."""
    out = torch.empty(qs.shape[0], 2, qs.shape[1], dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=out[:, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, 1])
    return out.view(qs.shape[0], 1, -1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 (one little-endian uint32) -> [n, 1, 32] bit j of it, shifted to 16 (the code's 5th bit)."""
    bits = (qh[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1      # [n, 4 bytes, 8 bits]
    return (bits << 4).reshape(-1, 1, 32)


def _q5_0(b):
    d = _f16(b[:, :2])[:, :, None]
    return _halves(b[:, 6:]) | _fifth_bits(b[:, 2:6]), d, -16 * d     # d * (q - 16)


def _q5_1(b):
    return _halves(b[:, 8:]) | _fifth_bits(b[:, 4:8]), _f16(b[:, :2])[:, :, None], _f16(b[:, 2:4])[:, :, None]


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K / Q5_K -> 8 scales and 8 mins of 6 bits each, `[n, 8]` float.

    Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    4-7 take 4 low bits from bytes 8-11 and their 2 high bits from the top of bytes 0-7.
    """
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], 1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc.float(), mn.float()


def _k4_codes(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 256 codes `[n, 8, 32]`: each 32 bytes give 64 weights, their low nibbles then their high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, 4, 32)
    out = torch.empty(n, 4, 2, 32, dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=out[:, :, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, :, 1])
    return out.view(n, 8, 32)


def _k4_scale_offset(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    return (d * sc)[..., None], -(dmin * mn)[..., None]


def _q4_k(b):
    return (_k4_codes(b[:, 16:144]), *_k4_scale_offset(b))


def _q5_k(b):
    qh = b[:, 16:48]                                                      # bit i of byte l: sub-block i, weight l
    high = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1   # [n, 8, 32]
    return (_k4_codes(b[:, 48:176]) | (high << 4), *_k4_scale_offset(b))


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(torch.int8).float().reshape(-1, 16, 1)
    d = _f16(b[:, 208:210])
    # Each half of 128 weights: 64 ql bytes (low nibbles: weights 0-63, high: 64-127) and 32 qh bytes
    # (2 bits per weight for weights l, l+32, l+64, l+96).
    low = torch.cat([ql & 0x0F, ql >> 4], 2)                             # [n, half, 4 groups of 32, 32]
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).view(torch.int8) - 32                        # codes 0..63 stored, minus 32
    return q.reshape(-1, 16, 16), d[:, :, None] * sc, None


def _q2_k(b):
    scales, qs = b[:, 0:16], b[:, 16:80].reshape(-1, 2, 1, 32)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    # half h, shift j, byte l -> weight 128h + 32j + l; its scale byte is 8h + 2j + (l >= 16)
    q = ((qs >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 16, 16)
    sc, mn = (scales & 0x0F).float(), (scales >> 4).float()
    return q, (d * sc)[..., None], -(dmin * mn)[..., None]


def _q3_k(b):
    hmask, qs, s = b[:, 0:32], b[:, 32:96].reshape(-1, 2, 1, 32), b[:, 96:108]
    d = _f16(b[:, 108:110])
    # 16 six-bit scales: 4 low bits from bytes 0-7 (low nibbles give 0-7, high nibbles 8-15),
    # 2 high bits from bytes 8-11 (scale i: byte 8 + i % 4, shifted by 2 * (i // 4)); stored plus 32.
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], 1)
    high = (s[:, None, 8:12] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3   # [n, 4, 4]
    sc = (low | (high.reshape(-1, 16) << 4)).float() - 32
    ql = (qs >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3          # [n, 2, 4, 32]
    # weight 128h + 32j + l loses 4 unless bit (4h + j) of hmask[l] is set
    bit = (hmask[:, None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1                 # [n, 8, 32]
    q = ql.reshape(-1, 8, 32).view(torch.int8) - ((1 - bit) << 2).view(torch.int8)
    return q.reshape(-1, 16, 16), (d * sc)[..., None], None


_BLOCK_FUNCS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
                "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: torch.Tensor, qtype: str, out: torch.Tensor | None = None,
               chunk_blocks: int | None = None) -> torch.Tensor:
    """raw `[n_bytes]` uint8 of whole blocks -> float32 `[n_weights]` (written into `out` if given).

    Works `chunk_blocks` blocks at a time (default: 2**19 weights' worth), so the temporaries stay a
    few MB, in the CPU's cache, whatever the tensor's size.
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
    func = _BLOCK_FUNCS[qtype]
    chunk_blocks = chunk_blocks or max(1, 2 ** 19 // size)
    # One thread: these passes are short and memory-bound, and on a busy machine a second torch thread
    # mostly spin-waits for the first (py-spy on the full-size benchmark: 10x the CPU time per weight).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, blocks.shape[0], chunk_blocks):
            codes, scale, offset = func(blocks[start:start + chunk_blocks])
            dst = out_blocks[start:start + chunk_blocks].view(codes.shape)
            if offset is None:
                torch.mul(codes.float(), scale, out=dst)
            else:
                torch.addcmul(offset, codes.float(), scale, out=dst)   # offset + code * scale, one pass
    finally:
        torch.set_num_threads(threads)
    return out
