"""Fast batch-1 decoding: one token per step with no host syncs, replayed as a CUDA graph.

At batch 1 a decode step does little arithmetic; its time is (a) reading the active weights once,
which the GPU's memory bandwidth bounds, and (b) overhead: Python, ~1,500 kernel launches, and
every point where the CPU waits for the GPU. `Mixtral.forward` is written to be read and checks
its input (`int(input_ids.min())`), and its single-token expert dispatch asks the GPU which
experts were chosen (`.tolist()`): each is a host sync, 34 per token for 8x7B. `decode_step` below is the
same computation rearranged so that nothing leaves the GPU:

* the position is a tensor on the GPU: RoPE's cos/sin are picked with `index_select`, the new key
  and value go into the static `KVCache` with `index_copy_`, and attention runs over the whole
  cache with a mask `key position <= position` (so every step has the same shapes);
* the chosen experts stay on the GPU: `gpu_kernels.gathered_matvec` reads the expert id inside
  the kernel (on the CPU, or without Triton, `Experts.forward_gathered` gathers the weights);
* greedy sampling (`argmax`) writes the next token into the input buffer, also on the GPU.

With no syncs the step can be captured once as a CUDA graph (`torch.cuda.CUDAGraph`) and
replayed: one launch per token instead of ~1,500. `torch.compile` can additionally fuse the small
elementwise kernels (norms, RoPE, residuals) before capture.

(`benchmarks/random_weights.py` builds full-size models with random weights on the GPU, so the speed of
this can be measured without downloading 93 GB.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts
from .kernels import gathered_glu, gathered_matvec, triton_available
from ..model.mixtral import Mixtral
from .quant import Int8Experts, Int8Linear
from ..model.rope import apply_rope
from ..model.router import route


@torch.no_grad()
def fuse_qkv_(model: Mixtral) -> list:
    """Store each layer's q, k and v projections as one tensor `[(heads + 2 kv_heads) * head_dim, hidden]`
    and make q_proj/k_proj/v_proj's weights views of it: one matrix-vector product instead of three
    while decoding, no extra memory, and `model.forward` sees the same weights as before.

    Returns, per layer, (weight, scale or None) of the fused projection. Works on nn.Linear and
    Int8Linear projections; a model already fused is returned as it is.
    """
    fused = []
    for layer in model.layers:
        attn = layer.self_attn
        mods = (attn.q_proj, attn.k_proj, attn.v_proj)
        if isinstance(attn.q_proj, Int8Linear):
            w = torch.cat([m.weight for m in mods])
            s = torch.cat([m.scale for m in mods])
            start = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight, m.scale = w[start:start + n], s[start:start + n]
                start += n
            fused.append((w, s))
        else:
            w = torch.cat([m.weight for m in mods])
            start = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
                start += n
            fused.append((w, None))
    return fused


# ----------------------------------------------------------------------------- one step
def _linear(module: nn.Module, x: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """x `[1, in]` -> `[1, out]` through an nn.Linear or an Int8Linear (the kernel for int8 on a GPU)."""
    if use_kernel and isinstance(module, Int8Linear):
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        return gathered_matvec(x, module.weight[None], zero, module.scale[None])
    return module(x)


def _experts_one_token(experts: nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       use_kernel: bool) -> torch.Tensor:
    """x `[1, hidden]`, weights `[k]` (x's dtype), ids `[k]` on the device -> `[1, hidden]`. No host sync."""
    if use_kernel and isinstance(experts, (Experts, Int8Experts)):
        s1, s2, s3 = ((experts.w1_scale, experts.w2_scale, experts.w3_scale) if isinstance(experts, Int8Experts)
                      else (None, None, None))
        h = gathered_glu(x, experts.w1, experts.w3, ids, s1, s3)                                     # [k, I]
        out = gathered_matvec(h, experts.w2, ids, s2)                                                   # [k, H]
    else:
        out = experts.forward_gathered(x, ids[None])[0]                                                 # [k, H]
    return (weights[:, None] * out).sum(dim=0, keepdim=True)


def decode_step(model: Mixtral, cache, token: torch.Tensor, pos: torch.Tensor,
                use_kernel: bool = False, qkv: Optional[list] = None) -> torch.Tensor:
    """One greedy-decoding step without host syncs.

    token `[1, 1]` int64 (the last token), pos `[1]` int64 (its position) -> logits `[1, vocab]`.
    Writes the token's keys and values into `cache` (a `KVCache` with batch 1) at `pos`; attends to
    the cached positions <= pos. Does not move `cache.pos` or `pos`; the caller does.
    qkv: the fused projections from `fuse_qkv_` (one product for q, k and v), or None.
    """
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    max_len = cache.k.shape[3]
    key_pos = torch.arange(max_len, device=token.device)
    allowed = key_pos <= pos                                                # [S]
    if cfg.sliding_window is not None:
        allowed = allowed & (pos - key_pos < cfg.sliding_window)
    cos = model.rotary_emb.cos.index_select(0, pos)                         # [1, head_dim]
    sin = model.rotary_emb.sin.index_select(0, pos)

    h = model.embed_tokens(token)[0]                                        # [1, hidden]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        if qkv is not None:
            w, scale = qkv[i]
            if scale is None:
                y = F.linear(x, w)
            elif use_kernel:
                y = gathered_matvec(x, w[None], torch.zeros(1, dtype=torch.long, device=x.device), scale[None])
            else:
                y = F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
            q, k, v = y.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = (_linear(m, x, use_kernel) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k, v = q.reshape(1, nh, 1, hd), k.reshape(1, nkv, 1, hd), v.reshape(1, nkv, 1, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i].index_copy_(2, pos, k)                                   # cache.k[i]: [1, kv_heads, S, head_dim]
        cache.v[i].index_copy_(2, pos, v)
        # grouped-query attention without repeating K/V: the g query heads of a KV head share it
        scores = q.view(1, nkv, nh // nkv, hd) @ cache.k[i].transpose(-1, -2) / math.sqrt(hd)  # [1, kv, g, S]
        probs = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
        out = (probs @ cache.v[i]).reshape(1, nh * hd)                      # [1, heads * head_dim]
        h = h + _linear(attn.o_proj, out, use_kernel)

        moe = layer.block_sparse_moe
        x = layer.post_attention_layernorm(h)
        if moe.gate is None:                                                # dense model: one expert
            h = h + moe.experts(x, 0)
            continue
        weights, ids = route(moe.gate(x), moe.top_k)                        # [1, k] each, on the device
        h = h + _experts_one_token(moe.experts, x, weights[0].to(x.dtype), ids[0], use_kernel)
    return model.lm_head(model.norm(h))                                     # [1, vocab]


# ----------------------------------------------------------------------------- the decoder
class FastDecoder:
    """Greedy batch-1 generation with `decode_step`, optionally compiled and captured as a CUDA graph.

    decoder = FastDecoder(model, max_seq_len=512)
    new_ids = decoder.generate(prompt_ids, max_new_tokens=128)        # list of ints

    use_kernel: the Triton expert kernel (default: when available for the model's device).
    cuda_graph: capture the step once and replay it (default: on CUDA). compile: torch.compile the
    step first (fuses the small kernels; the first call takes a while). fuse_qkv: see `fuse_qkv_`
    (changes how the model stores q/k/v, not their values).
    """

    def __init__(self, model: Mixtral, max_seq_len: int, use_kernel: Optional[bool] = None,
                 cuda_graph: Optional[bool] = None, compile: bool = False, fuse_qkv: bool = False) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.use_kernel = triton_available(self.device) if use_kernel is None else use_kernel
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.cache = model.new_kv_cache(1, max_seq_len)
        self.qkv = fuse_qkv_(model) if fuse_qkv else None
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)   # static input buffers
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits = None
        self.graph = None
        step = self._step
        self._run = torch.compile(step, fullgraph=True, dynamic=False) if compile else step

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = decode_step(self.model, self.cache, token, pos, self.use_kernel, self.qkv)
        return logits, logits.argmax(dim=-1, keepdim=True)

    def _eager_step(self) -> torch.Tensor:
        logits, next_token = self._run(self.token, self.pos)
        self.token.copy_(next_token)
        self.pos.add_(1)
        return logits

    @torch.no_grad()
    def capture(self, warmup: int = 3) -> None:
        """Run the step a few times (compiles, autotunes), then record it as a CUDA graph.

        The warm-up steps write into the cache at and after the current position; those entries
        are rewritten before any later step can attend to them, and token/pos are restored.
        """
        saved_token, saved_pos = self.token.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._eager_step()
                self.pos.copy_(saved_pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._eager_step()
        self.token.copy_(saved_token)
        self.pos.copy_(saved_pos)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids `[1, seq]`: run the prompt through `model.forward` (grouped experts, one pass),
        fill the cache, and set the next input to the greedy token. Returns logits `[1, vocab]`."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"FastDecoder decodes one sequence: input_ids must be [1, seq], got {tuple(input_ids.shape)}")
        self.cache.reset()
        logits = self.model(input_ids.to(self.device), cache=self.cache, last_only=True)[:, -1]
        self.pos.fill_(self.cache.pos)
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        return logits

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Decode the token in the input buffer: logits `[1, vocab]` (a static buffer when graphed);
        the greedy next token goes into the input buffer. No host sync."""
        if self.cache.pos + 1 > self.cache.max_seq_len:
            raise ValueError(f"KV cache is full: {self.cache.pos} tokens of max_seq_len {self.cache.max_seq_len}")
        if self.cuda_graph:
            if self.graph is None:
                self.capture()
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._eager_step()
        self.cache.advance(1)
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> list:
        """Greedy: the prompt's next token, then `max_new_tokens - 1` more decode steps. Returns ids."""
        self.prefill(input_ids)
        tokens = [self.token.clone()]
        for _ in range(max_new_tokens - 1):
            self.step()
            tokens.append(self.token.clone())
        return torch.cat(tokens, dim=1)[0].tolist()                 # the one host sync, at the end
