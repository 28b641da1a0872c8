"""GGUF: dequantization against the gguf package, the reader, the streamed model, and bad files.

The files are written here with the gguf package's writer, laid out as llama.cpp's converter lays
out a Mixtral (tests/gguf_files.py). The independent side is always the gguf package: its reader and
its numpy `dequantize`; llama.cpp's own logits are compared in benchmarks/gguf_vs_llama_cpp.py.
"""

from __future__ import annotations

import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as T

import benchmark_scripts
from gguf_files import random_blocks, reference_state, write_gguf
from tiny_models import random_tiny
from mixtral_edu.analysis.routing import trace_routing
from mixtral_edu.cli import main
from mixtral_edu.inference.generate import generate
from mixtral_edu.inference.gguf_stream import BudgetError, DequantCache, StreamedExperts, load_gguf, minimum_budget
from mixtral_edu.model.mixtral import Mixtral
from mixtral_edu.weights import load_model
from mixtral_edu.weights.gguf_file import GGUFError, GGUFFile, our_name, permute_qk, unpermute_qk
from mixtral_edu.weights import gguf_quants
from mixtral_edu.weights.gguf_quants import BLOCKS, dequantize

REPO = Path(__file__).resolve().parent.parent
PROMPT = [1, 415, 5565, 302, 4843, 349, 5465, 28723, 415, 5565, 302, 11508]
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_dequantize_equals_gguf_package(qtype, monkeypatch):
    """Every type, element for element (bit for bit), on random blocks with finite float16 scales."""
    rng = np.random.default_rng(list(BLOCKS).index(qtype))
    if qtype in ("F32", "F16", "BF16"):
        values = rng.standard_normal(999).astype(np.float32)
        raw = {"F32": values, "F16": values.astype(np.float16),
               "BF16": (values.view(np.uint32) >> 16).astype(np.uint16)}[qtype].view(np.uint8)
    else:
        raw = random_blocks(qtype, 333, rng).reshape(-1)
    ref = gguf.quants.dequantize(raw[None], T[qtype]).reshape(-1).astype(np.float32)
    ours = dequantize(torch.from_numpy(raw.copy()), qtype, chunk_blocks=100)     # several chunks
    assert ours.dtype == torch.float32 and ours.shape == (ref.size,)
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))
    # three worker threads, each over several scale groups and chunks that do not line up with them
    monkeypatch.setattr(gguf_quants, "SCALE_CHUNK", 64)
    threaded = torch.nn.Parameter(torch.empty(ref.size))     # load_gguf dequantizes into parameters
    with torch.no_grad():
        dequantize(torch.from_numpy(raw.copy()), qtype, out=threaded, chunk_blocks=50, threads=3)
    assert np.array_equal(threaded.detach().numpy().view(np.uint32), ref.view(np.uint32))
    one_block = dequantize(torch.from_numpy(raw[-(raw.size // 333):].copy()), qtype)        # notebook 07's case
    assert np.array_equal(one_block.numpy().view(np.uint32), ref[-one_block.numel():].view(np.uint32))


def test_dequantize_threads_leave_torch_thread_counts_alone(monkeypatch):
    """The worker threads run their ops on one torch thread each; the caller's count, and the count a
    thread started afterwards gets, stay as they were."""
    raw = torch.from_numpy(random_blocks("Q4_K", 64, np.random.default_rng(0)).reshape(-1))
    monkeypatch.setattr(gguf_quants, "SCALE_CHUNK", 8)                 # so that three workers share the blocks
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with ThreadPoolExecutor(1) as later:          # a thread of the caller's, set up before
            later.submit(torch.get_num_threads).result()
            one = dequantize(raw, "Q4_K")
            many = dequantize(raw, "Q4_K", threads=3, chunk_blocks=5)
            assert torch.equal(one, many) and torch.get_num_threads() == 3
        with ThreadPoolExecutor(1) as fresh:
            assert fresh.submit(torch.get_num_threads).result() == 3
    finally:
        torch.set_num_threads(before)


def test_dequantize_refuses_partial_blocks_and_unknown_types():
    with pytest.raises(ValueError, match="whole 144-byte blocks"):
        dequantize(torch.zeros(145, dtype=torch.uint8), "Q4_K")
    with pytest.raises(ValueError, match="cannot dequantize GGML type IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS")


# ----------------------------------------------------------------------------- names and permutation
def test_names_of_both_layouts():
    assert our_name("token_embd.weight") == ("embed_tokens.weight", None)
    assert our_name("blk.3.attn_q.weight") == ("layers.3.self_attn.q_proj.weight", None)
    assert our_name("blk.3.ffn_gate_inp.weight") == ("layers.3.block_sparse_moe.gate.weight", None)
    assert our_name("blk.0.ffn_down_exps.weight") == ("layers.0.block_sparse_moe.experts.w2", None)
    assert our_name("blk.0.ffn_up.7.weight") == ("layers.0.block_sparse_moe.experts.w3", 7)
    assert our_name("output.weight") == ("lm_head.weight", None)
    for bad in ("blk.0.ffn_gate.weight", "blk.x.attn_q.weight", "rope_freqs.weight", "blk.0.attn_qkv.weight"):
        with pytest.raises(KeyError):
            our_name(bad)


def test_unpermute_inverts_the_converters_permutation():
    from gguf_files import permute
    w = torch.randn(8 * 16, 12)
    converted = torch.from_numpy(permute(w.numpy(), 8))
    assert not torch.equal(converted, w)
    assert torch.equal(unpermute_qk(converted, 8), w)
    assert torch.equal(permute_qk(w, 8), converted)


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def tiny():
    return load_model(REPO / "data" / "tiny-mixtral", progress=False)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny model as GGUF: F32, F16 and Q8_0 merged, Q8_0 with one tensor per expert, Q4_0."""
    d = tmp_path_factory.mktemp("gguf")
    return {name: write_gguf(tiny, d / f"tiny-{name}.gguf", qtype, merged=merged)
            for name, qtype, merged in (("F32", "F32", True), ("F16", "F16", True), ("Q8_0", "Q8_0", True),
                                        ("Q8_0-per-expert", "Q8_0", False), ("Q4_0", "Q4_0", True))}


@pytest.fixture(scope="module")
def kquant_files(tmp_path_factory):
    """A random model whose rows hold whole 256-weight super-blocks, in every K-quant (random blocks)."""
    model = random_tiny(vocab_size=32000, hidden_size=256, intermediate_size=256, head_dim=64)
    d = tmp_path_factory.mktemp("gguf-k")
    return {q: write_gguf(model, d / f"k-{q}.gguf", q, seed=i)
            for i, q in enumerate(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))}


def reference_model(path: Path) -> Mixtral:
    """A plain in-memory float32 Mixtral holding the weights the gguf package dequantizes from `path`."""
    f = GGUFFile(path, check_tokenizer=False)
    model = Mixtral(f.config).eval()
    model.load_state_dict(reference_state(path, f.config), strict=False)     # rotary tables are not weights
    f.close()
    return model


def test_config_and_weights_from_the_file(tiny, files):
    f = GGUFFile(files["F32"])
    assert f.config == tiny.config                      # metadata -> the same MixtralConfig
    for name, value in tiny.state_dict().items():
        if name.startswith("rotary_emb"):
            continue
        if name.endswith(("w1", "w2", "w3")):
            got = torch.stack([f.read(name, j) for j in range(f.config.num_local_experts)])
        else:
            got = f.read(name)
        assert torch.equal(got, value), name            # F32: the very weights, q/k permuted back


@pytest.mark.parametrize("name", ["F32", "F16", "Q8_0", "Q8_0-per-expert", "Q4_0"])
def test_streamed_model_equals_float32_model_with_the_same_weights(files, name):
    """(a) of the issue: ours streamed vs a plain float32 model of the gguf package's dequantized weights.
    The same operations on the same float32 values, so the logits agree to float rounding (1e-5)."""
    streamed = load_gguf(files[name], memory_budget=2 ** 30)
    ref = reference_model(files[name])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids), ref(ids), rtol=0, atol=1e-5)
    assert generate(streamed, PROMPT, 8) == generate(ref, PROMPT, 8)
    a, b = trace_routing(streamed, PROMPT), trace_routing(ref, PROMPT)
    assert torch.equal(a.expert_ids, b.expert_ids)


def test_save_gguf_writes_what_the_converter_writes(tiny, files, tmp_path):
    """save_gguf (the package's) against the test writer, which permutes with its own numpy copy of the
    converter's code: the same weights; the F32 file loads back to the checkpoint's very logits."""
    from mixtral_edu.weights.gguf_save import save_gguf
    for qtype in ("F32", "Q8_0"):
        ours = save_gguf(tiny, tmp_path / f"saved-{qtype}.gguf", qtype)
        a, b = reference_state(ours, tiny.config), reference_state(files[qtype], tiny.config)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        assert torch.equal(load_gguf(tmp_path / "saved-F32.gguf", 2 ** 30)(ids), reference_model(files["F32"])(ids))
    with pytest.raises(ValueError, match="not 'Q4_K'"):
        save_gguf(tiny, tmp_path / "x.gguf", "Q4_K")
    assert not list(tmp_path.glob("*.part"))


def test_both_layouts_give_the_same_model(files):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        merged = load_gguf(files["Q8_0"], memory_budget=2 ** 30)(ids)
        per_expert = load_gguf(files["Q8_0-per-expert"], memory_budget=2 ** 30)(ids)
    assert torch.equal(merged, per_expert)


def test_f32_file_runs_the_checkpoints_model(tiny, files):
    """The F32 file holds the checkpoint's weights, so greedy tokens and routing are the checkpoint's."""
    streamed = load_gguf(files["F32"], memory_budget=2 ** 30)
    assert generate(streamed, PROMPT, 12) == generate(tiny, PROMPT, 12)
    assert torch.equal(trace_routing(streamed, PROMPT).expert_ids, trace_routing(tiny, PROMPT).expert_ids)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_models_equal_float32_model(kquant_files, qtype):
    streamed = load_gguf(kquant_files[qtype], memory_budget=2 ** 30)
    assert set(GGUFFile(kquant_files[qtype]).type_counts()) == {qtype, "F32"}
    ref = reference_model(kquant_files[qtype])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = streamed(ids)
        torch.testing.assert_close(out, ref(ids), rtol=1e-5, atol=1e-5 * float(out.abs().max()))


# ----------------------------------------------------------------------------- streaming
def test_only_chosen_experts_are_dequantized(files):
    """Loading dequantizes no expert and no attention matrix; a forward dequantizes only chosen experts."""
    model = load_gguf(files["Q8_0"], memory_budget=2 ** 30)
    cache = model.gguf_cache
    assert cache.stats.misses == 0 and not cache.entries
    # inference only: no autograd graph may keep dequantized matrices alive after they were used
    assert not any(p.requires_grad for p in model.parameters())
    trace = trace_routing(model, PROMPT[:3])
    chosen = {(layer, e) for layer in range(model.config.num_hidden_layers)
              for e in trace.expert_ids[layer].reshape(-1).tolist()}
    read = {key for key in cache.entries if isinstance(key, tuple)}
    assert read == chosen and len(chosen) < 8 * model.config.num_hidden_layers


def test_the_moe_block_asks_the_file_for_all_its_chosen_experts_before_reading_one(files, monkeypatch):
    model = load_gguf(files["Q8_0"], memory_budget=2 ** 30)
    f, events = model.gguf_file, []
    read = f.read
    monkeypatch.setattr(f, "prefetch", lambda m: events.append(("ask", m.offset)))
    monkeypatch.setattr(f, "read", lambda name, expert=None, out=None:
                        events.append(("read", f.matrices[(name, expert)].offset)) or read(name, expert, out))
    trace = trace_routing(model, PROMPT[:3])
    prefix = "layers.0.block_sparse_moe.experts."
    chosen = set(trace.expert_ids[0].reshape(-1).tolist())
    wanted = {f.matrices[(prefix + w, e)].offset for e in chosen for w in ("w1", "w2", "w3")}
    first = next(i for i, (kind, at) in enumerate(events) if kind == "read" and at in wanted)
    assert wanted <= {at for kind, at in events[:first] if kind == "ask"}


def test_budget_bounds_the_cache_and_lru_evicts(files):
    f = GGUFFile(files["Q8_0"])
    per_expert = StreamedExperts(f, 0, DequantCache(0)).nbytes
    budget = minimum_budget(f) + per_expert          # room for attention + two experts at most
    model = load_gguf(files["Q8_0"], memory_budget=budget)
    ref = reference_model(files["Q8_0"])
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([PROMPT])), ref(torch.tensor([PROMPT])), rtol=0, atol=1e-5)
    cache = model.gguf_cache
    assert cache.used <= cache.budget and cache.stats.evictions > 0
    assert cache.reused > 0                          # evicted experts' memory was filled again, and the logits held
    with pytest.raises(BudgetError, match="too small"):
        load_gguf(files["Q8_0"], memory_budget=minimum_budget(f) - 1)


def test_dequant_cache_lru_order():
    cache = DequantCache(budget=30)
    for key in "abc":
        cache.get(key, lambda k=key: k, 10)
    cache.get("a", lambda: "never", 10)                # hit: a is now most recent
    cache.get("d", lambda: "d", 10)                    # evicts b, the least recent
    assert list(cache.entries) == ["c", "a", "d"] and cache.stats.hits == 1 and cache.stats.evictions == 1
    assert cache.get("huge", lambda: "x", 31) == "x" and "huge" not in cache.entries


def test_evicted_memory_is_reused_only_when_nothing_else_holds_it():
    cache = DequantCache(budget=400)                   # one tensor of 100 float32 at a time
    load = lambda value: lambda: cache.take((100,)).fill_(value)                                  # noqa: E731
    kept = cache.get(1, load(1), 400)                  # a learner keeps the tensor
    cache.get(2, load(2), 400)                         # evicts 1: still held, so not overwritten
    assert torch.all(kept == 1) and cache.reused == 0
    view = cache.get(2, load(-1), 400)[:50]            # a view of entry 2
    cache.get(3, load(3), 400)                         # evicts 2: viewed, so not overwritten
    assert torch.all(view == 2) and cache.reused == 0
    del view
    where = cache.get(3, load(-1), 400).data_ptr()
    cache.get(4, load(4), 400)                         # evicts 3: nothing holds it, so 4 lands in its memory
    assert cache.reused == 1 and cache.get(4, load(-1), 400).data_ptr() == where
    cache.get("pair", lambda: (cache.take((50,)).fill_(5), cache.take((50,)).fill_(6)), 400)    # a tuple of two
    cache.get("next", lambda: (cache.take((5, 10)), cache.take((10, 5))), 400)   # both from the evicted pair
    assert cache.reused == 3


# ----------------------------------------------------------------------------- bad files
def _one_line_error(path, capsys, budget="1GB"):
    """`mixtral-edu generate` on `path`: one error line, exit status 1."""
    capsys.readouterr()
    status = main(["generate", "--weights", str(path), "--memory-budget", budget, "--max-new-tokens", "1", "hi"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith("mixtral-edu: error: "), lines
    return lines[0]


def test_truncated_file(files, tmp_path, capsys):
    data = files["Q8_0"].read_bytes()
    for cut in (len(data) - 1000, 100):                # inside the tensors, inside the metadata
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated"):
            GGUFFile(bad)
    assert "truncated" in _one_line_error(bad, capsys)


def _patch_type(path: Path, tensor: str, type_number: int, out: Path) -> Path:
    """Rewrite the GGML type of `tensor` in the tensor-info record (name, n_dims, dims, type, offset)."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_number)
    out.write_bytes(bytes(data))
    return out


def test_unknown_and_unsupported_quant_types(files, tmp_path, capsys):
    unknown = _patch_type(files["Q8_0"], "blk.0.attn_v.weight", 250, tmp_path / "unknown.gguf")
    with pytest.raises(GGUFError, match="type number 250"):
        GGUFFile(unknown)
    assert "type number 250" in _one_line_error(unknown, capsys)
    # a type the gguf package knows but we do not dequantize (same block size 32 as Q8_0 would not
    # keep the byte count; IQ4_NL has 32 weights in 18 bytes, like Q4_0)
    iq = _patch_type(files["Q4_0"], "blk.0.attn_v.weight", int(T.IQ4_NL), tmp_path / "iq.gguf")
    with pytest.raises(GGUFError, match="IQ4_NL, which mixtral-edu cannot dequantize"):
        GGUFFile(iq)


def test_not_mixtral(tiny, tmp_path, capsys):
    qwen = write_gguf(tiny, tmp_path / "qwen.gguf", "F32", arch="qwen2")
    with pytest.raises(GGUFError, match="architecture 'qwen2', not Mixtral"):
        GGUFFile(qwen)
    assert "not Mixtral" in _one_line_error(qwen, capsys)
    dense = tmp_path / "dense.gguf"
    writer = gguf.GGUFWriter(str(dense), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(GGUFError, match="'llama' without experts, not Mixtral"):
        GGUFFile(dense)
    pieces = [f"p{i}" for i in range(32000)]
    other_vocab = write_gguf(tiny, tmp_path / "vocab.gguf", "F32", pieces=pieces)
    with pytest.raises(GGUFError, match="vocabulary is not Mixtral's"):
        GGUFFile(other_vocab)


def test_mismatched_shapes(tiny, tmp_path, capsys):
    from gguf_files import gguf_tensors
    state = {k: v.numpy() for k, v in tiny.state_dict().items()}
    tensors = gguf_tensors(state, tiny.config)
    tensors["blk.1.attn_v.weight"] = tensors["blk.1.attn_v.weight"][:16]
    bad = write_gguf(tiny, tmp_path / "shape.gguf", "F32", tensors=tensors)
    with pytest.raises(GGUFError, match=r"blk.1.attn_v.weight: shape \[16, 64\] .* implies \[32, 64\]"):
        GGUFFile(bad)
    assert "shape" in _one_line_error(bad, capsys)
    del tensors["blk.1.attn_v.weight"]
    missing = write_gguf(tiny, tmp_path / "missing.gguf", "F32", tensors=tensors)
    with pytest.raises(GGUFError, match="lacks 1 tensor"):
        GGUFFile(missing)


def test_budget_too_small_on_the_command_line(files, capsys):
    assert "too small" in _one_line_error(files["Q8_0"], capsys, budget="1MB")


def test_an_ollama_blob_without_suffix_is_recognised(files, tmp_path, capsys):
    """Ollama stores the GGUF as models/blobs/sha256-<digest>, no suffix: the magic bytes say what it is."""
    blob = tmp_path / "sha256-0123abcd"
    blob.write_bytes(files["Q8_0"].read_bytes())
    assert main(["route", "--weights", str(blob), "--out", str(tmp_path / "route"), "The capital of France"]) == 0
    assert (tmp_path / "route" / "explorer.html").is_file()


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(bad)


# ----------------------------------------------------------------------------- llama.cpp's arithmetic
def q5_1_q8_1_reference(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q5_1_q8_1 written out block by block, in float64: raw `[out, in/32, 24]` Q5_1 blocks, x `[n, in]`.

    The activations as x86's quantize_row_q8_1 makes them: per 32, d = amax/127 (float32), q = round-half-even
    (x * (127/amax)), stored d16 = float16(d) and s = float16(d * sum(q)). The weights: d_w, m_w float16, 5-bit
    codes (low nibbles of qs for weights 0-15, high ones for 16-31; fifth bits in qh). Result `[n, out]`.
    """
    d_w = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m_w = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    qh = raw[..., 4:8].copy().view(np.uint32)[..., 0].astype(np.int64)
    qs = raw[..., 8:24].astype(np.int64)
    fifth = (qh[..., None] >> np.arange(32)) & 1
    q_w = np.concatenate([qs & 15, qs >> 4], -1) | (fifth << 4)                         # [out, blocks, 32]
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    q_x = np.round(xb * (np.float32(127) / amax)).astype(np.int64)                      # [n, blocks, 32]
    d = amax / np.float32(127)
    d16 = d.astype(np.float16).astype(np.float64)[..., 0]
    s = (d * q_x.sum(-1, keepdims=True).astype(np.float32)).astype(np.float16).astype(np.float64)[..., 0]
    dots = np.einsum("obk,nbk->nob", q_w, q_x).astype(np.float64)                      # exact integer sums
    return (d_w[None] * d16[:, None] * dots + m_w[None] * s[:, None]).sum(-1)


def test_benchmark_multiplies_q5_1_weights_as_llama_cpp_does(tiny, tmp_path, monkeypatch):
    """benchmarks/gguf_vs_llama_cpp.py's emulation of llama.cpp's CPU matmul for Q5_1 weights (their activations
    are Q8_1: the block offsets m_w multiply llama.cpp's float16 sum s_x, not the rounded activations' sum)
    equals the kernel's formula written out above, to float32 summation order (1e-5 of the output's scale),
    on a q projection (rows permuted in the file) and an expert's w2 (4 blocks per row) of a Q5_1 file.
    Multiplying the rounded activations alone (Q8_0's way) misses by more than that."""
    monkeypatch.setitem(sys.modules, "llama_cpp", benchmark_scripts.load("llama_cpp", "llama_cpp_bench"))
    bench = benchmark_scripts.load("gguf_vs_llama_cpp", "gguf_vs_llama_cpp")
    f = GGUFFile(write_gguf(tiny, tmp_path / "tiny-q5_1.gguf", "Q5_1"))
    gen = torch.Generator().manual_seed(0)
    for name, expert in (("layers.0.self_attn.q_proj.weight", None), ("layers.1.block_sparse_moe.experts.w2", 3)):
        m = f.matrices[(name, expert)]
        x = torch.randn(64, m.shape[1], generator=gen)
        raw = f.raw(m).numpy().reshape(m.shape[0], -1, 24)
        want = torch.from_numpy(q5_1_q8_1_reference(raw, x.numpy())).float()
        if name.endswith("q_proj.weight"):
            want = unpermute_qk(want.T, f.config.num_attention_heads).T
        w = f.read(name, expert)
        got = bench.ggml_linear(x, w, "Q8_1", bench.block_offsets(f, name, expert))
        tol = 1e-5 * want.abs().max()
        assert (got - want).abs().max() < tol, name
        assert (bench.ggml_linear(x, w, "Q8_0") - want).abs().max() > 10 * tol, name
    f.close()


def test_benchmark_normalises_as_ggml_does(monkeypatch):
    """benchmarks/gguf_vs_llama_cpp.py's `ggml_rms_norm` equals ggml's rms_norm_f32 bit for bit, written out here:
    sum of float32 x*x in double, mean = float(sum / n), scale = 1.0f / sqrtf(mean + eps), y = (x * scale) * w.
    numpy's float32 division and sqrt round once, as C's do; the emulation must too (a code of an 8-bit
    rounded activation can hang on the last bit). Equal on any CPU: every step is one IEEE rounding, but for the
    order of the double sum, which could move the float32 mean only if the sum lay within a few of its last
    bits of a float32 rounding step."""
    monkeypatch.setitem(sys.modules, "llama_cpp", benchmark_scripts.load("llama_cpp", "llama_cpp_bench"))
    bench = benchmark_scripts.load("gguf_vs_llama_cpp", "gguf_vs_llama_cpp")
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2000, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    xs, ws, eps = x.numpy(), w.numpy(), np.float32(1e-5)
    want = np.empty_like(xs)
    for i, row in enumerate(xs):
        total = 0.0
        for v in row:
            total += float(v * v)                       # float32 product, double sum, in order
        scale = np.float32(1) / np.sqrt(np.float32(total / len(row)) + eps)
        want[i] = row * scale * ws
    assert np.array_equal(bench.ggml_rms_norm(x, w, 1e-5).numpy(), want)
