"""Differential fuzzing: our safetensors reader accepts exactly the files the official reader accepts.

A seeded generator writes valid files and damages them (shifted or shared offsets, repeated keys,
trailing bytes, wrong types, bad UTF-8, deep nesting, ...). For every file, either both readers refuse
it (ours with a CheckpointError, never another exception), or both read it and every tensor is the
same, bit for bit.
"""

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open

from mixtral_edu.weights import CheckpointError, SafetensorsFile

N_CASES = 1300
SEED = 20261202
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
ODD_DTYPES = ["U16", "U32", "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "f32", "Q4", "",
              "F8_E4M3FNUZ", "F8_E5M2FNUZ"]


def _valid(rng):
    """(entries, metadata, data): entries are [key, info-dict] in header order, data the tensors' bytes."""
    entries, data = [], bytearray()
    for i in range(rng.randint(0, 4)):
        dtype = rng.choice(sorted(DTYPES))
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype]
        if dtype == "BOOL":
            chunk = bytes(rng.randint(0, 1) for _ in range(nbytes))
        else:
            chunk = bytes(rng.randrange(256) for _ in range(nbytes))
        entries.append([f"t{i}.weight", {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}])
        data += chunk
    rng.shuffle(entries)
    metadata = {"format": "pt"} if rng.random() < 0.5 else None
    return entries, metadata, bytes(data)


def _header_text(entries, metadata, extra_pairs=(), first_pairs=()):
    parts = list(first_pairs)
    parts += [] if metadata is None else [f'"__metadata__": {json.dumps(metadata)}']
    parts += [f"{json.dumps(k)}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in entries]
    parts += list(extra_pairs)
    return "{" + ", ".join(parts) + "}"


def _damage(rng, entries, metadata, data):
    """One damaged file as bytes (sometimes undamaged, so acceptance is exercised too)."""
    kind = rng.randrange(37)
    header, pad, prefix, extra, first = None, b"", b"", [], []
    infos = [info for _, info in entries if isinstance(info, dict)]
    if kind == 0 and infos:                                     # shift one offset by one byte
        info = rng.choice(infos)
        info["data_offsets"][rng.randrange(2)] += rng.choice([-1, 1])
    elif kind == 1 and len(infos) >= 2:                         # two tensors share the same bytes
        a, b = rng.sample(infos, 2)
        b["data_offsets"] = list(a["data_offsets"])
        b["dtype"], b["shape"] = a["dtype"], list(a["shape"])
    elif kind == 2 and entries:                                 # a key repeated, same or other entry
        k, info = rng.choice(entries)
        other = rng.choice(entries)[1]
        extra.append(f"{json.dumps(k)}: {json.dumps(other)}")
    elif kind == 3:                                             # trailing or missing data bytes
        data = data + bytes(rng.randint(1, 9)) if rng.random() < 0.6 else data[:-rng.randint(1, 5)]
    elif kind == 4 and infos:                                   # a dtype the reader may not know
        rng.choice(infos)["dtype"] = rng.choice(ODD_DTYPES + sorted(DTYPES) + [["F32"], 5, None, {"F32": 1}])
    elif kind == 5 and infos:                                   # shapes: floats, negatives, strings, huge
        info = rng.choice(infos)
        info["shape"] = rng.choice([[2.0], [-1], ["2"], [2 ** 64], [2 ** 64 - 1], [2 ** 32, 2 ** 32], None, 3,
                                    [1e400], [True], list(info["shape"]) + [1], [0]])
    elif kind == 6 and infos:                                   # offsets: floats, strings, too many, huge
        info = rng.choice(infos)
        b, e = info["data_offsets"]
        info["data_offsets"] = rng.choice([[float(b), e], [b, str(e)], [b, e, e], [b], {"a": b}, None,
                                           [2 ** 64, e], [b, 1e400], [-1, e], [b, e + 2 ** 64]])
    elif kind == 7:                                             # whitespace / NUL padding, leading space, BOM
        pad = rng.choice([b" " * rng.randint(1, 8), b"\t\n\r ", b"\x00", b" x", b"\x00" * 4])
        prefix = rng.choice([b"", b" ", b"\n", b"\xef\xbb\xbf"])
    elif kind == 8:                                             # header length field off by some bytes
        header = _header_text(entries, metadata).encode()
        n = len(header) + rng.choice([-3, -1, 1, 2, 10 ** 9, 2 ** 63])
        return struct.pack("<Q", n % 2 ** 64) + header + data
    elif kind == 9:                                             # invalid UTF-8 or a lone surrogate in a key
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"])
        header = _header_text(entries, metadata).encode().replace(b"{", b'{"k' + bad + b'": 1, ', 1)
        if rng.random() < 0.5:
            header = _header_text(entries, metadata, [rng.choice(['"\\ud800": 1', '"\\udc00x": 1',
                                                                  '"\\ud83d\\ude00": 1'])]).encode()
    elif kind == 10:                                            # metadata of the wrong type
        metadata = rng.choice([{"a": 1}, {"a": None}, [], {"a": "b", "c": ["d"]}, "x", {"a": {"b": "c"}}])
    elif kind == 11:                                            # __metadata__ twice
        extra.append('"__metadata__": {"format": "pt"}')
        metadata = metadata or {"x": "y"}
    elif kind == 12 and infos:                                  # a field repeated inside an entry
        k, info = rng.choice([e for e in entries if isinstance(e[1], dict)])
        field = rng.choice(["dtype", "shape", "data_offsets", "unknown"])
        body = json.dumps(info)[:-1] + f', {json.dumps(field)}: {json.dumps(info.get(field, 1))}}}'
        entries = [[kk, body if kk == k else vv] for kk, vv in entries]
    elif kind == 13 and infos:                                  # unknown fields, deep nesting inside them
        info = rng.choice(infos)
        depth = rng.choice([1, 50, 124, 125, 126, 200, 3000])
        info["note"] = "x"
        k = next(kk for kk, vv in entries if vv is info)
        body = json.dumps(info)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
        entries = [[kk, body if kk == k else vv] for kk, vv in entries]
    elif kind == 14:                                            # NaN / Infinity / junk values
        extra.append(rng.choice(['"n": NaN', '"n": Infinity', '"n": -Infinity', '"n": 01']))
    elif kind == 15 and infos:                                  # an entry written as a 3-element array
        k, info = rng.choice([e for e in entries if isinstance(e[1], dict)])
        entries = [[kk, [vv["dtype"], vv["shape"], vv["data_offsets"]] if kk == k else vv] for kk, vv in entries]
    elif kind == 16:                                            # not an object at all
        header = rng.choice([b"[]", b"null", b"1", b'"x"', b"", b"{", b"{}}", b'{"a": {}}', b'{"a": []}'])
    elif kind == 17 and data:                                   # flip a data byte: still valid, must read the same
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
    elif kind == 18 and infos:                                  # swap two entries' offsets
        if len(infos) >= 2:
            a, b = rng.sample(infos, 2)
            a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    elif kind == 19:                                            # a random byte of the header flipped
        header = bytearray(_header_text(entries, metadata).encode())
        if header:
            i = rng.randrange(len(header))
            header[i] = rng.randrange(256)
        header = bytes(header)
    elif kind == 20 and infos:                                  # a gap: one tensor moved later
        info = rng.choice(infos)
        info["data_offsets"] = [o + 1 for o in info["data_offsets"]]
    elif kind == 21:                                            # a tiny file
        return rng.choice([b"", b"\x01", bytes(7), bytes(8), struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 3) + b"{} "])
    elif kind == 22 and infos:                                  # bool values / nulls where ints go
        rng.choice(infos)["data_offsets"][0] = rng.choice([False, None, True])
    elif kind == 23 and infos:                                  # a number written as 1e400, 8.0, 8e0, "8", -0
        text = _header_text(entries, metadata, extra)
        marker = rng.choice(['"data_offsets": [', '"shape": ['])
        at = text.find(marker)
        if at >= 0:
            at += len(marker)
            end = at
            while end < len(text) and text[end].isdigit():
                end += 1
            if end > at:
                text = text[:at] + rng.choice(["1e400", f"{text[at:end]}.0", f"{text[at:end]}e0", f'"{text[at:end]}"',
                                               "-0", f"0{text[at:end]}", f" {text[at:end]} "]) + text[end:]
        header = text.encode()
    elif kind == 34 and entries:                                # a key repeated, its FIRST entry invalid (or not)
        k, info = rng.choice(entries)
        other = rng.choice(entries)[1]
        first.append(f"{json.dumps(k)}: " + rng.choice([
            '{"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}', '"a string"', "5", "null", "[]",
            '{"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}', '{"dtype": "F32", "shape": [1]}',
            '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "dtype": "F32"}',
            json.dumps(other), json.dumps(other if isinstance(other, str) else {**other, "shape": [7, 7]})]))
    elif kind == 35:                                            # __metadata__ twice, the first not strings
        first.append('"__metadata__": ' + rng.choice(['{"a": 1}', '{"a": null}', '"x"', "null", "[]", '{"a": "b"}',
                                                      '{"a": ["b"]}']))
    elif kind == 36:                                            # a zero-byte tensor whose shape overflows
        end = len(data)
        shape = rng.choice([[2 ** 63, 2 ** 63, 0], [0, 2 ** 63, 2 ** 63], [2 ** 63, 0], [2 ** 62, 0],
                            [2 ** 64 - 1, 0], [2 ** 32, 2 ** 32, 0], [0, 2 ** 64 - 1], [2 ** 63 - 1, 0]])
        big = {"dtype": rng.choice(["F32", "U8", "F64"]), "shape": shape, "data_offsets": [end, end]}
        extra.append(f'"big": {json.dumps(big)}')
    # other kinds: leave the file valid
    if header is None:
        header = prefix + _header_text(entries, metadata, extra, first).encode() + pad
    return struct.pack("<Q", len(header)) + header + data


def _official(path):
    """{key: tensor} as the official reader reads the file, or None when it refuses."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:       # SafetensorError, or RuntimeError for dtypes torch cannot read
        return None


def _ours(path):
    try:
        with SafetensorsFile(path) as st:
            return {k: st.tensor(k).clone() for k in st.keys()}
    except CheckpointError:
        return None


def _same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if a.dtype == torch.bool:       # a byte other than 0/1 is still True; compare truth, not bytes
        return torch.equal(a.reshape(-1).view(torch.uint8) != 0, b.reshape(-1).view(torch.uint8) != 0)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_reader_agrees_with_the_official_reader_on_damaged_files(tmp_path):
    rng = random.Random(SEED)
    accepted = refused = 0
    disagreements = []
    for case in range(N_CASES):
        entries, metadata, data = _valid(rng)
        blob = _damage(rng, entries, metadata, data)
        path = tmp_path / f"case{case}.safetensors"
        path.write_bytes(blob)
        theirs, ours = _official(path), _ours(path)       # ours raises anything but CheckpointError -> test error
        if (theirs is None) != (ours is None):
            disagreements.append(f"case {case}: official {'refuses' if theirs is None else 'accepts'}, "
                                 f"ours {'refuses' if ours is None else 'accepts'}: {blob[:300]!r}")
        elif theirs is not None:
            accepted += 1
            if set(theirs) != set(ours) or not all(_same(theirs[k], ours[k]) for k in theirs):
                disagreements.append(f"case {case}: both accept but the tensors differ: {blob[:300]!r}")
        else:
            refused += 1
        path.unlink()
    assert not disagreements, f"{len(disagreements)} disagreement(s):\n" + "\n".join(disagreements[:10])
    assert accepted + refused == N_CASES >= 1000
    assert accepted >= 150 and refused >= 500, (accepted, refused)     # both sides of the line are exercised


@pytest.mark.parametrize("blob_kind", ["shared_bytes", "shifted_offset", "trailing_bytes", "repeated_key"])
def test_the_damage_the_issue_names_is_refused(tmp_path, blob_kind):
    """Issue 15's four examples, each refused with a message naming the file."""
    a = torch.arange(4, dtype=torch.float32)
    info = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    data = a.numpy().tobytes() * 2
    text = json.dumps(info)
    if blob_kind == "shared_bytes":
        text = json.dumps({"a": info["a"], "b": dict(info["b"], data_offsets=[0, 16])})
        data = data[:16]
    elif blob_kind == "shifted_offset":
        text = json.dumps({"a": dict(info["a"], data_offsets=[1, 17]), "b": dict(info["b"], data_offsets=[17, 33])})
        data = data + b"\x00"
    elif blob_kind == "trailing_bytes":
        data = data + b"junk"
    else:
        text = text[:-1] + ', "a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}'
    header = text.encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    assert _official(path) is None
    with pytest.raises(CheckpointError, match=r"x\.safetensors: "):
        SafetensorsFile(path)


_ONE = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


@pytest.mark.parametrize("header", [
    '{"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}, "a": ' + _ONE + '}',     # first: unknown dtype
    '{"a": "a string", "a": ' + _ONE + '}',                                                # first: a string
    '{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}, "a": ' + _ONE + '}',  # first: 1e400
    '{"__metadata__": {"x": 1}, "__metadata__": {"x": "y"}, "a": ' + _ONE + '}',           # metadata: non-string first
    '{"a": ' + _ONE + ', "big": {"dtype": "F32", "shape": [%d, %d, 0], "data_offsets": [4, 4]}}' % (2 ** 63, 2 ** 63),
    '{"a": ' + _ONE + ', "big": {"dtype": "F32", "shape": [0, %d, %d], "data_offsets": [4, 4]}}' % (2 ** 63, 2 ** 63),
])
def test_issue33_headers_the_official_reader_refuses_are_refused_in_one_line(tmp_path, header):
    """Issue 33: a repeated key whose first entry is invalid, a repeated __metadata__ whose first value is not
    strings, and a zero-element shape whose product overflows (or does not fit torch's int64 sizes)."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4))
    assert _official(path) is None
    with pytest.raises(CheckpointError) as err:
        with SafetensorsFile(path) as st:
            [st.tensor(k) for k in st.keys()]
    assert "\n" not in str(err.value) and len(str(err.value)) <= 300


def test_a_repeated_key_with_two_valid_entries_keeps_the_last_as_the_official_reader_does(tmp_path):
    header = '{"a": {"dtype": "F32", "shape": [7, 7], "data_offsets": [0, 196]}, "a": ' + _ONE + '}'
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4))
    theirs = _official(path)
    with SafetensorsFile(path) as st:
        assert st.keys() == list(theirs) == ["a"] and tuple(st.tensor("a").shape) == tuple(theirs["a"].shape) == (1,)
