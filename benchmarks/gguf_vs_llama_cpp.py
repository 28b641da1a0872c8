"""Ours against llama.cpp on the same GGUF files, one row per quantization type.

    .venv/bin/python benchmarks/gguf_vs_llama_cpp.py            # builds llama.cpp once (llama_cpp.py's cache)
    .venv/bin/python benchmarks/gguf_vs_llama_cpp.py --models tiny

Models: the course's tiny model (data/tiny-mixtral, hidden 64); llama_cpp.py's random 139M model
(hidden 512, so every K-quant applies; every matrix N(0, 0.1)); and the same 139M draws rescaled to a
trained model's scale (`SCALED_STD`, `scaled_checkpoint`); and the 139M config trained for a few minutes
by the course's own `train` on data/corpus (`TRAIN`, `trained_checkpoint`). Each is converted by llama.cpp's own
convert_hf_to_gguf.py to F32, F16 and Q8_0, and re-quantized from F32 by llama-quantize to Q4_0,
Q4_K_M, Q5_K_M and Q6_K. For each model, `conditioning` also reports how much each layer matters.

For every file, on one prompt (all positions' logits):
  (a) ours (load_model on the .gguf: streamed, dequantized in torch) against a plain float32 Mixtral
      holding the weights the gguf package's numpy dequantize gives: the same weights, so only float
      rounding may differ;
  (b) ours against llama.cpp through llama-cpp-python (F32 KV cache): max |diff| of the logits, the
      positions whose argmax agrees, and whether 16 greedy tokens are the same.
llama.cpp multiplies quantized weights by activations that it quantizes too (to Q8_0 or Q8_K blocks, in
its vec_dot kernels), and F16 weights by F16 activations; we multiply float32 activations by float32
dequantized weights. So (b) is exact only for F32; for the other types it measures that difference.
To show that this is the whole difference, and how large it is on our side alone:
  (c) ours computing as llama.cpp's CPU backend does (`llama_cpp_activations`): every matmul's input
      rounded to the weight's `vec_dot_type` from ggml-cpu.c (quantize_row_q8_0 / q8_1 / q8_K as its
      x86 code computes them), Q4_1 / Q5_1 blocks' offsets times Q8_1's own float16 sums, and RMSNorm
      as ggml's rms_norm_f32 rounds it; against llama.cpp: logits and 16 greedy tokens;
  (d) ours against that same model: the activation rounding's own effect on the logits, and where
      our top-2 margin exceeds twice it (so no such rounding can swap the first two), whether
      llama.cpp's argmax is ours;
  (e) the model of (c) against itself with every matmul input first moved by one float32 rounding
      step: how far this file's logits are defined at all, once activations are rounded to 8 bits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import llama_cpp as lc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))         # gguf_files.reference_state: the gguf package's side
CONVERTED = ("f32", "f16", "q8_0")
QUANTIZED = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
PROMPT = "The capital of France is Paris, and the capital of Italy is"
GREEDY = 16


def quantize(cache: lc.Cache, f32: Path, qtype: str) -> Path:
    """llama-quantize F32 file -> `qtype` file, cached beside it."""
    out = f32.with_name(f32.name.replace("-f32.gguf", f"-{qtype.lower()}.gguf"))
    if out.exists():
        return out
    part = out.with_name(out.stem + ".part.gguf")
    lc.run_logged(f"llama-quantize ({qtype})", [str(cache.bin / "llama-quantize"), str(f32), str(part), qtype, "2"],
                  cache.logs / f"quantize-{out.stem}.log")
    part.rename(out)
    return out


# The 139M benchmark model's shapes at the scale of a trained model rather than llama_cpp.py's N(0, 0.1) for every
# matrix (whose branches have gains of 2-3 and replace the residual stream layer after layer). The std of each
# matrix's normal init, from hidden H, expert hidden I and layers L: embeddings of rms 1 (the residual stream);
# unit-gain projections of the normalised input (q, k, v, w1, w3); the residual branches' outputs (o_proj, w2)
# at 1/(2L) of unit gain, so each of the 2L branches adds about 1/(2L) of the stream; router logits of std 2
# (decisive top-2); logits of std 3.
SCALED_STD = {"embed_tokens.weight": lambda H, I, L: 1.0,
              "q_proj.weight": lambda H, I, L: H ** -0.5, "k_proj.weight": lambda H, I, L: H ** -0.5,
              "v_proj.weight": lambda H, I, L: H ** -0.5, "experts.gate_up_proj": lambda H, I, L: H ** -0.5,
              "o_proj.weight": lambda H, I, L: H ** -0.5 / (2 * L),
              "experts.down_proj": lambda H, I, L: I ** -0.5 / (2 * L),
              "mlp.gate.weight": lambda H, I, L: 2 * H ** -0.5, "lm_head.weight": lambda H, I, L: 3 * H ** -0.5}


def scaled_checkpoint(cache: lc.Cache) -> Path:
    """llama_cpp.py's random 139M model (cpu_vs_transformers.py's config and seed) rescaled to SCALED_STD, once.

    The same N(0, 0.1) draws, each matrix multiplied by SCALED_STD / 0.1; the RMSNorm weights stay ones.
    """
    import shutil

    import torch

    import cpu_vs_transformers as cvt

    folder = cache.root / "scaled-139m"
    if (folder / "config.json").exists() and (folder / "tokenizer.model").exists():
        return folder
    lc.say(f"weights: building the rescaled 139M model into {folder}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = cvt.parse_args([])
    _, hf, _ = cvt.build_models(args, str(tmp))
    c = hf.config
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    with torch.no_grad():
        for key, param in hf.named_parameters():
            if param.dim() == 1:
                continue                                                    # RMSNorm weights: ones
            rule = next(f for suffix, f in SCALED_STD.items() if key.endswith(suffix))
            param.mul_(rule(H, I, L) / args.init_std)
    hf.save_pretrained(str(tmp))
    shutil.copy2(lc.TINY / "tokenizer.model", tmp / "tokenizer.model")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


TRAIN = dict(steps=360, batch_size=8, seq_len=128, seed=0)


def trained_checkpoint(cache: lc.Cache) -> Path:
    """The 139M config trained by the course's own `train` on data/corpus's train split (TRAIN), once.

    A trained model is what GGUF files hold; the random ones have no margin between their two best tokens
    beyond chance. About 20 minutes on 2 cores (AMD EPYC, 3.2 s a step), then cached.
    """
    import shutil

    import torch

    import cpu_vs_transformers as cvt
    from mixtral_edu.tokenizer import Tokenizer
    from mixtral_edu.training.corpus import load_split, token_streams
    from mixtral_edu.training.train import train
    from mixtral_edu.weights import save_model

    folder = cache.root / f"trained-139m-{TRAIN['steps']}"
    if (folder / "config.json").exists() and (folder / "tokenizer.model").exists():
        return folder
    lc.say(f"weights: training the 139M config {TRAIN} into {folder} (about 20 minutes on 2 cores)")
    torch.set_num_threads(2)
    model, history = train(cvt.model_config(cvt.parse_args([])), token_streams(Tokenizer(), load_split("train")),
                           progress=True, log_every=40, **TRAIN)
    lc.say(f"weights: training loss every 40 steps {[round(v, 2) for v in history.loss]}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    shutil.copy2(lc.TINY / "tokenizer.model", tmp / "tokenizer.model")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def conditioning(path: Path, threads: int) -> dict:
    """How much each layer matters (the logits with that layer skipped) and how varied 16 greedy tokens are."""
    import torch

    from mixtral_edu.inference.generate import generate
    from mixtral_edu.tokenizer import Tokenizer
    from mixtral_edu.weights import load_model

    torch.set_num_threads(threads)
    tok = Tokenizer()
    ids = [tok.bos_id] + tok.encode(PROMPT)
    model = load_model(path, memory_budget=2 ** 30)
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        skipped = []
        for layer in model.layers:
            layer.forward = lambda h, *args, **kw: (h, None)
            out = model(torch.tensor([ids]))[0]
            del layer.forward
            skipped.append(((out - full).abs().max().item(), (out.argmax(-1) != full.argmax(-1)).float().mean().item()))
    top2 = full.topk(2, -1).values
    greedy = generate(model, ids, GREEDY)
    return {"skip_max": [m for m, _ in skipped], "skip_argmax": [a for _, a in skipped],
            "logit_std": full.std(-1).mean().item(), "min_margin": (top2[:, 0] - top2[:, 1]).min().item(),
            "distinct": len(set(greedy)), "greedy": greedy}


def _bindings(cache: lc.Cache):
    """llama-cpp-python's module, from the cache."""
    if str(cache.pydeps) not in sys.path:
        sys.path[:0] = [str(lc.bindings(cache)), str(cache.pydeps)]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(cache.bindings / "llama_cpp" / "lib")
    if sys.modules.get("llama_cpp") is lc:        # this script imported benchmarks/llama_cpp.py under that name
        del sys.modules["llama_cpp"]
    import llama_cpp                              # the bindings

    return llama_cpp


def llama_cpp_run(cache: lc.Cache, path: Path, ids: list, threads: int):
    """llama.cpp's logits `[T, vocab]` for `ids` (F32 KV cache), its greedy continuation, its own tokens."""
    import numpy as np

    llama_cpp = _bindings(cache)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=threads, logits_all=True,
                          verbose=False, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)
    own = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    greedy = []
    for _ in range(GREEDY):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    llm.close()
    return logits, greedy, own


def llama_cpp_layers(cache: lc.Cache, path: Path, ids: list, threads: int) -> list:
    """Each layer's output `[T, hidden]` as llama.cpp computes it for `ids` (its graph's `l_out-{i}` tensors,
    copied in an eval callback; the same context settings as `llama_cpp_run`)."""
    import ctypes

    import numpy as np

    llama_cpp = _bindings(cache)

    class Tensor(ctypes.Structure):            # the head of ggml.h's struct ggml_tensor, up to its name
        _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                    ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]

    layers = {}

    def seen(t, ask, _):
        t = ctypes.cast(t, ctypes.POINTER(Tensor)).contents
        name = t.name.decode()
        if ask or not name.startswith("l_out-"):
            return name.startswith("l_out-")
        assert t.type == 0 and t.nb[1] == 4 * t.ne[0], name               # F32, rows contiguous
        rows = (ctypes.c_float * (t.ne[0] * t.ne[1])).from_address(t.data)
        layers[int(name[6:])] = np.ctypeslib.as_array(rows).reshape(t.ne[1], t.ne[0]).copy()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(seen)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 128, 128, threads, threads
    params.type_k = params.type_v = lc.GGML_TYPE_F32
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED         # as Llama(flash_attn=False)
    params.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    batch.n_tokens = len(ids)
    for i, token in enumerate(ids):            # every position an output, as logits_all: the last layer keeps all rows
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = token, i, 1, 0, True
    failed = llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    if failed:
        raise lc.StepError("llama.cpp layers", f"llama_decode failed on {path.name}")
    llama_cpp.llama_model_free(model)
    return [layers[i] for i in sorted(layers)]


# ggml-cpu.c's type_traits_cpu[type].vec_dot_type: what a matmul rounds its activations to for these weights
# (Q8_1 rounds the values as Q8_0 does; it also stores their sum, which the Q4_1 / Q5_1 dot products use)
VEC_DOT = {"F32": None, "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q5_0": "Q8_0",
           "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K",
           "Q6_K": "Q8_K"}


def _div(a: float, t):
    """a / t rounded once, as C's float division is (torch's `a / t` multiplies by 1/t: two roundings)."""
    import torch

    return torch.full_like(t, a) / t


def _round(x, kind):
    """x `[..., n]` float32 -> the values llama.cpp's CPU backend multiplies instead (n whole blocks).

    Q8_0 (quantize_row_q8_0, x86): per 32, d = amax/127 stored as float16, q = round-half-even(x * 127/amax).
    Q8_K (quantize_row_q8_K_ref): per 256, m = the value of largest magnitude, q = min(127, round(x * -127/m)),
    d = 1 / (-127/m) in float32. F16 / BF16: the activations converted to that type.
    """
    import torch

    if kind is None:
        return x
    if kind in ("F16", "BF16"):
        return x.to(torch.float16 if kind == "F16" else torch.bfloat16).float()
    if kind in ("Q8_0", "Q8_1"):
        return _q8_0(x)[0]
    b = x.reshape(*x.shape[:-1], -1, 256)
    m = b.gather(-1, b.abs().argmax(-1, keepdim=True))             # first of the largest |x|, with its sign
    iscale = torch.where(m != 0, _div(-127, m), 0)
    q = torch.round(iscale * b).clamp(max=127)
    return (q * torch.where(m != 0, _div(1, iscale), 0)).reshape(x.shape)


def _q8_0(x):
    """x `[..., n]` -> (the Q8_0 values `[..., n]`, each block's Q8_1 sum error `[..., n / 32]`).

    quantize_row_q8_0 / q8_1 (x86): per 32, d = amax/127 in float32, stored as float16; q = round-half-even
    (x * 127/amax). Q8_1 also stores s = float16(d * sum(q)), with d still float32, where the values sum to
    float16(d) * sum(q): the second result is s minus that.
    """
    import torch

    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    q = torch.round(b * torch.where(amax > 0, _div(127, amax), 0))
    qsum = q.sum(-1, keepdim=True)
    s_error = (d * qsum).half().float() - d.half().float() * qsum
    return (q * d.half().float()).reshape(x.shape), s_error[..., 0]


def block_offsets(file, name, expert=None):
    """The offsets m `[out, in / 32]` of a Q4_1 / Q5_1 matrix's blocks (weight = d * q + m), in our row order."""
    import torch

    from mixtral_edu.weights.gguf_quants import BLOCKS

    mat = file.matrices[(name, expert)]
    m = file.raw(mat).view(-1, BLOCKS[mat.qtype][1])[:, 2:4].contiguous().view(torch.float16).float()
    return file.our_rows(name, m.reshape(mat.shape[0], -1))


def ggml_input(x, kind, offsets=None):
    """x `[..., in]` -> (what llama.cpp multiplies weights of vec_dot_type `kind` by, a term to add to the output).

    The term is None except for Q8_1 (Q4_1 / Q5_1 weights, whose `offsets` m `[out, in / 32]` come from
    `block_offsets`): ggml_vec_dot_q5_1_q8_1 sums d_w * d_x * sum(q_w q_x) + m_w * s_x per block, where s_x
    is its own float16 rounding of d_x * sum(q_x), so the output gains m @ (s_x - float16(d_x) * sum(q_x)).
    """
    import torch.nn.functional as F

    if kind != "Q8_1":
        return _round(x, kind), None
    x, s_error = _q8_0(x)
    return x, F.linear(s_error, offsets)


def ggml_linear(x, w, kind, offsets=None):
    """x `[..., in]` @ w.T `[in, out]` as llama.cpp's CPU backend computes it for weights of vec_dot_type `kind`
    (to float rounding: the sums run in another order)."""
    import torch.nn.functional as F

    x, term = ggml_input(x, kind, offsets)
    y = F.linear(x, w)
    return y if term is None else y + term


def ggml_rms_norm(x, weight, eps):
    """RMSNorm as ggml-cpu's rms_norm_f32 computes it: x * (1 / sqrtf(float(sum of x*x in double / n) + eps)) * w.

    Ours (torch.rsqrt of a float32 mean) can differ from it in the last bit, and a matmul input one bit
    away from an 8-bit rounding boundary rounds to the other side of it.
    """
    import torch

    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    root = torch.sqrt((mean + eps).double()).float()    # sqrtf, correctly rounded (torch's float32 sqrt is not)
    return x * _div(1, root) * weight


def llama_cpp_activations(model, nudge: bool = False) -> None:
    """Make a streamed GGUF `model` multiply as llama.cpp's CPU backend does for each weight's type.

    Every matmul's input is rounded to the weight's vec_dot_type; for Q4_1 / Q5_1 weights (Q8_1 input) the
    dot product is d_w * d_x * sum(q_w q_x) + m_w * s_x (ggml_vec_dot_q5_1_q8_1), so each block's offset m_w
    also meets s_x's own float16 rounding (`ggml_input`). Hooks on the attention projections, the router and
    lm_head; each layer's experts get a forward doing the same for w1, w3 and w2 (whose input is the SwiGLU
    product); the RMSNorms compute as ggml's (`ggml_rms_norm`): at a rounding boundary their last bit
    decides the code. nudge: first move every such input by one float32 rounding
    step (x * (1 +- 2**-23), random signs, seeded), as a different summation order in another
    implementation would: how much that alone changes the logits is the floor below which no two
    implementations of this model can agree.
    """
    import torch
    import torch.nn.functional as F

    file = model.gguf_file
    gen = torch.Generator().manual_seed(0)
    offsets = {}

    def rounded(x, name, expert=None):
        if nudge:
            x = x * (1 + (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1) * 2.0 ** -23)
        kind = VEC_DOT[file.matrices[(name, expert)].qtype]
        if kind == "Q8_1" and (name, expert) not in offsets:
            offsets[(name, expert)] = block_offsets(file, name, expert)
        return ggml_input(x, kind, offsets.get((name, expert)))

    def linear(x, w, name, expert=None):
        x, term = rounded(x, name, expert)
        y = F.linear(x, w)
        return y if term is None else y + term

    def hook(module, name):
        pending = []
        def pre(m, args):
            x, term = rounded(args[0], name)
            pending.append(term)
            return (x,) + args[1:]
        def post(m, args, y):
            term = pending.pop()
            return y if term is None else y + term
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for norm in [model.norm] + [n for layer in model.layers
                                for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.forward = lambda x, norm=norm: ggml_rms_norm(x, norm.weight, norm.eps)
    for i, layer in enumerate(model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hook(getattr(layer.self_attn, proj), f"layers.{i}.self_attn.{proj}.weight")
        hook(layer.block_sparse_moe.gate, f"layers.{i}.block_sparse_moe.gate.weight")
        experts = layer.block_sparse_moe.experts

        def forward(x, e, experts=experts):
            (w1, w2, w3), e, p = experts.expert_weights(e), int(e), experts.prefix
            h = F.silu(linear(x, w1, p + "w1", e)) * linear(x, w3, p + "w3", e)
            return linear(h, w2, p + "w2", e)
        experts.forward = forward
    hook(model.lm_head, "embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight")


def margin_check(ours, rounded, theirs) -> dict:
    """Per position: our top-2 margin against twice |ours - rounded| (the rounding's effect there)."""
    import numpy as np

    top2 = np.sort(ours, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    effect = np.abs(ours - rounded).max(-1)
    safe = margin > 2 * effect
    agree = ours.argmax(-1) == theirs.argmax(-1)
    return {"safe": int(safe.sum()), "safe_agree": bool(agree[safe].all()), "min_margin": float(margin.min())}


def where_greedy_parts(ours, rounded, ids: list, ours_greedy: list, their_greedy: list):
    """The first greedy step where our tokens and llama.cpp's differ, and there the margin between the two
    tokens in our logits and in the rounded model's (on our path so far, which is theirs): None if equal."""
    import torch

    step = next((i for i, (a, b) in enumerate(zip(ours_greedy, their_greedy)) if a != b), None)
    if step is None:
        return None
    path = torch.tensor([ids + ours_greedy[:step]])
    with torch.no_grad():
        a, c = ours(path)[0, -1], rounded(path)[0, -1]
    mine, theirs = ours_greedy[step], their_greedy[step]
    return {"step": step, "ours": float(a[mine] - a[theirs]), "rounded": float(c[mine] - c[theirs]),
            "d_there": float((a - c).abs().max())}


def compare(cache: lc.Cache, path: Path, threads: int) -> dict:
    import torch

    from gguf_files import reference_state
    from mixtral_edu.inference.generate import generate
    from mixtral_edu.model.mixtral import Mixtral
    from mixtral_edu.tokenizer import Tokenizer
    from mixtral_edu.weights import load_model

    torch.set_num_threads(threads)
    tok = Tokenizer()
    ids = [tok.bos_id] + tok.encode(PROMPT)
    ours = load_model(path, memory_budget=2 ** 30)
    ref = Mixtral(ours.config).eval()
    ref.load_state_dict(reference_state(path, ours.config), strict=False)
    with torch.no_grad():
        a = ours(torch.tensor([ids]))[0].numpy()
        b = ref(torch.tensor([ids]))[0].numpy()
    ours_greedy = generate(ours, ids, GREEDY)
    rounded = load_model(path, memory_budget=2 ** 30)
    llama_cpp_activations(rounded)
    c_layers = []
    hooks = [layer.register_forward_hook(lambda m, args, out: c_layers.append(out[0][0].numpy()))
             for layer in rounded.layers]
    with torch.no_grad():
        c = rounded(torch.tensor([ids]))[0].numpy()
    for h in hooks:
        h.remove()
    rounded_greedy = generate(rounded, ids, GREEDY)
    nudged = load_model(path, memory_budget=2 ** 30)
    llama_cpp_activations(nudged, nudge=True)
    with torch.no_grad():
        e = nudged(torch.tensor([ids]))[0].numpy()
    theirs, their_greedy, their_ids = llama_cpp_run(cache, path, ids, threads)
    import numpy as np
    parting = where_greedy_parts(ours, rounded, ids, ours_greedy, their_greedy)
    layer_diff = [np.abs(ours - theirs).max(-1) for ours, theirs in zip(c_layers, llama_cpp_layers(cache, path, ids, threads))]
    return {"file": path.name, "MB": path.stat().st_size / 1e6, "types": ours.gguf_file.type_counts(),
            "a": float(np.abs(a - b).max()), "b": float(np.abs(a - theirs).max()), "scale": float(np.abs(a).max()),
            "argmax": float((a.argmax(-1) == theirs.argmax(-1)).mean()), "tokens": len(ids),
            "greedy_equal": ours_greedy == their_greedy, "same_ids": their_ids == ids,
            "c": float(np.abs(c - theirs).max()), "c_greedy_equal": rounded_greedy == their_greedy,
            "c_leading": int(np.cumprod(np.abs(c - theirs).max(-1) < 1e-4).sum()),
            "d": float(np.abs(a - c).max()), "e": float(np.abs(c - e).max()), **margin_check(a, c, theirs),
            "layers_first": [float(d[0]) for d in layer_diff], "layers_all": [float(d.max()) for d in layer_diff],
            "layer_scale": float(max(np.abs(x).max() for x in c_layers)), "parting": parting}


MODELS = {"tiny": lambda cache: lc.TINY, "139m": lc.random_checkpoint, "139m-scaled": scaled_checkpoint,
          "139m-trained": trained_checkpoint}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    cache = lc.Cache()
    try:
        lc.build(cache)
        lc.python_deps(cache)
        rows, layers = [], {}
        for name in args.models:
            folder = MODELS[name](cache)
            files = {t.upper(): lc.convert(cache, folder, t) for t in CONVERTED}
            files.update({q: quantize(cache, files["F32"], q) for q in QUANTIZED})
            layers[name] = conditioning(files["F32"], args.threads)
            for qtype, path in files.items():
                lc.say(f"compare: {name} {qtype}")
                rows.append(dict(model=name, qtype=qtype, **compare(cache, path, args.threads)))
    except lc.StepError as e:
        print(f"gguf_vs_llama_cpp.py: {e}", file=sys.stderr)
        return 1
    print(f"\nCPU: {lc.cpu_model()}; {args.threads} threads; llama-cpp-python {cache.pin}; "
          f"load average {lc.load_average()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"prompt: {PROMPT!r} ({rows[0]['tokens']} tokens, BOS first), every position's logits; "
          f"llama.cpp with an F32 KV cache; greedy: {GREEDY} tokens\n")
    print("| model | type (llama.cpp name) | tensor types in the file | MB | (a) max abs diff vs float32 model "
          "| (b) max abs diff vs llama.cpp | logit scale | argmax agrees | greedy tokens equal "
          "| (c) llama.cpp's rounding: max abs diff vs llama.cpp | (c) first positions within 1e-4 "
          "| (c) greedy tokens equal | (d) the rounding's effect on our logits "
          "| positions with margin > 2 (d): argmax agrees | (e) one-ulp nudge: max abs change |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        print(f"| {r['model']} | {r['qtype']} | {types} | {r['MB']:.1f} | {r['a']:.1e} | {r['b']:.1e} | "
              f"{r['scale']:.1f} | {r['argmax']:.0%} | {'yes' if r['greedy_equal'] else 'NO'} | "
              f"{r['c']:.1e} | {r['c_leading']} of {r['tokens']} | {'yes' if r['c_greedy_equal'] else 'NO'} | "
              f"{r['d']:.1e} | {r['safe']} of {r['tokens']}: {'yes' if r['safe_agree'] else 'NO'} | {r['e']:.1e} |")
    print("\nWhere the greedy tokens part (step 0 = the first new token): our logit of our token minus our logit "
          "of llama.cpp's token, the same in the model of (c), and (d) at that step\n")
    print("| model | type | step | ours: margin | (c): margin | (d) there |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["parting"]:
            q = r["parting"]
            print(f"| {r['model']} | {r['qtype']} | {q['step']} | {q['ours']:.3f} | {q['rounded']:.3f} | {q['d_there']:.3f} |")
    print("\n(c) against llama.cpp layer by layer: max abs difference of each layer's output (llama.cpp's l_out-i, "
          "copied in an eval callback), at the first position and over all positions\n")
    print("| model | type | largest layer output | first position: layer 0 1 ... | all positions: layer 0 1 ... |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['qtype']} | {r['layer_scale']:.1f} | {' '.join(f'{v:.0e}' for v in r['layers_first'])} "
              f"| {' '.join(f'{v:.0e}' for v in r['layers_all'])} |")
    print("\nThe models (F32 file, ours): how much each layer matters (max abs logit change, and the share of "
          "positions whose argmax changes, with that layer skipped), the logits' std over the vocabulary, the "
          "smallest top-2 margin over the prompt, distinct tokens among the 16 greedy ones\n")
    print("| model | layer skipped: max abs logit change | layer skipped: argmax changes | logit std "
          "| smallest margin | distinct greedy tokens |")
    print("|---|---|---|---|---|---|")
    for name, c in layers.items():
        print(f"| {name} | {' '.join(f'{v:.2g}' for v in c['skip_max'])} | "
              f"{' '.join(f'{v:.0%}' for v in c['skip_argmax'])} | {c['logit_std']:.2f} | {c['min_margin']:.2g} | "
              f"{c['distinct']} of {GREEDY} |")
    if not all(r["same_ids"] for r in rows):
        print("note: llama.cpp's own tokenizer gave other ids for the prompt than ours on some file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
