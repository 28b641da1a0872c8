"""Fast batch-1 decoding: the model's own forward at static shapes, replayed as a CUDA graph.

At batch 1 a decode step does little arithmetic; its time is (a) reading the active weights once,
which the GPU's memory bandwidth bounds, and (b) overhead: Python, ~1,500 kernel launches, and
every point where the CPU waits for the GPU. The model's default MoE dispatch reads a single
token's expert ids on the host (`.tolist()`): a sync per layer, 32 per token for 8x7B.

`FastDecoder` calls the same `Mixtral.forward` with the position as a tensor (`positions=`), so
nothing in a step needs the host (gpt-fast's recipe):

* RoPE's cos/sin are picked on the device, the new key and value go into the static `KVCache`
  at that position, and attention runs over the whole cache under the causal mask — the one path
  of `Attention.forward`, so every step has the same shapes;
* it installs a sync-free dispatch on every MoE block (`dispatch.decode_dispatch`): the chosen
  experts' weights are gathered on the device, or, with `use_kernel`, the Triton kernel
  (`kernels.py`) reads the expert ids inside the kernel; int8 projections get the kernel too;
* greedy sampling (`argmax`) writes the next token into the input buffer, also on the device.

With no syncs the step can be captured once as a CUDA graph (`torch.cuda.CUDAGraph`) and
replayed: one launch per token instead of ~1,500. `torch.compile` can additionally fuse the small
elementwise kernels (norms, RoPE, residuals) before capture. Because it is the model's own forward,
forward hooks on `self_attn`, `block_sparse_moe` or `gate` fire on every eager step (so
`trace_routing`-style hooks see fast decoding too), and int8, offloaded and split models decode
through it unchanged.

(`benchmarks/random_weights.py` builds full-size models with random weights on the GPU, so the speed of
this can be measured without downloading 93 GB.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model.mixtral import Mixtral
from .arguments import check_cache_room, check_max_new_tokens, check_max_seq_len
from .dispatch import decode_dispatch, kernel_weights
from .kernels import KernelInt8Linear, triton_available
from .quant import Int8Linear
from .split import decode_dispatch_for, is_split


def use_kernel_(model: nn.Module) -> nn.Module:
    """Install the Triton kernel on `model` for single tokens: the dispatch of every MoE block whose
    experts it reads (`dispatch.kernel_weights`) and every int8 projection (the module's class is
    swapped; its buffers and hooks stay). Returns the model."""
    for layer in model.layers:
        if kernel_weights(layer.block_sparse_moe.experts) is not None:
            layer.block_sparse_moe.dispatch = decode_dispatch(use_kernel=True)
    for module in model.modules():
        if type(module) is Int8Linear:
            module.__class__ = KernelInt8Linear
    return model


# ----------------------------------------------------------------------------- the decoder
class FastDecoder:
    """Greedy batch-1 generation through `model(token, cache, positions=pos)`, optionally compiled and
    captured as a CUDA graph.

    decoder = FastDecoder(model, max_seq_len=512)
    new_ids = decoder.generate(prompt_ids, max_new_tokens=128)        # list of ints

    use_kernel: the Triton expert kernel (default: when available for the model's device).
    cuda_graph: capture the step once and replay it (default: on CUDA). compile: torch.compile the
    step first (fuses the small kernels; the first call takes a while). The sync-free dispatch (and
    the kernel) stay installed on the model for its later calls too (same results).
    """

    def __init__(self, model: Mixtral, max_seq_len: int, use_kernel: Optional[bool] = None,
                 cuda_graph: Optional[bool] = None, compile: bool = False) -> None:
        check_max_seq_len(max_seq_len, model.config.max_position_embeddings)
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.use_kernel = triton_available(self.device) if use_kernel is None else use_kernel
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        # a split model hops devices and is not one graph: its own dispatch, no gathered copies (split.py)
        model.set_dispatch(decode_dispatch_for(model) if is_split(model) else decode_dispatch(use_kernel=False))
        if self.use_kernel:
            use_kernel_(model)
        self.cache = model.new_kv_cache(1, max_seq_len)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)   # static input buffers
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits = None
        self.graph = None
        self._run = self._step
        if compile:
            # Dynamo reuses a compiled step across models and does not guard on hooks, so a step compiled
            # for another model would skip this one's hooks: start from an empty cache. Hooks registered
            # before the first step are compiled in; one added later needs a new FastDecoder.
            torch._dynamo.reset()
            self._run = torch.compile(self._step, fullgraph=True, dynamic=False)

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(token, cache=self.cache, positions=pos)[:, -1]          # [1, vocab]
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
        """Greedy: the prompt's next token, then `max_new_tokens - 1` more decode steps. Returns ids
        (none for max_new_tokens=0, as `generate`)."""
        check_max_new_tokens(max_new_tokens)
        check_cache_room(input_ids.shape[-1], max_new_tokens, self.cache.max_seq_len)
        if max_new_tokens == 0:
            return []
        self.prefill(input_ids)
        tokens = [self.token.clone()]
        for _ in range(max_new_tokens - 1):
            self.step()
            tokens.append(self.token.clone())
        return torch.cat(tokens, dim=1)[0].tolist()                 # the one host sync, at the end
