"""Split a Mixtral by layers over several devices with plain PyTorch ("pipeline" placement, batch 1).

Layers 0..a-1 live on the first GPU, a..b-1 on the second, and so on; the embedding sits with
the first layers and the final norm and lm_head with the last. At a boundary the hidden state
`[batch, seq, hidden]` (32 kB per token for 8x7B in bf16) is copied to the next device: a forward
pre-hook on each layer moves its inputs to where its weights are. The KV cache is split the same
way (`SplitKVCache`), so each layer reads and writes its keys and values on its own device.

Nothing is approximated: each layer runs the same arithmetic on the same weights, so the logits
equal the one-device model's. The devices work one after another, so at batch 1 this is about
as fast as one GPU with enough memory, not faster. Any devices work, "cpu" and "cpu" included,
which is how the tests check it on a laptop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def layer_devices(num_layers: int, devices: Sequence, layers_per_device: Optional[Sequence[int]] = None
                  ) -> list[torch.device]:
    """The device of each of `num_layers` decoder layers: consecutive runs, `layers_per_device[i]` on
    `devices[i]` (default: as even as possible)."""
    devices = [torch.device(d) for d in devices]
    if layers_per_device is None:
        base, extra = divmod(num_layers, len(devices))
        layers_per_device = [base + (i < extra) for i in range(len(devices))]
    if len(layers_per_device) != len(devices) or sum(layers_per_device) != num_layers or min(layers_per_device) < 1:
        raise ValueError(f"layers_per_device {list(layers_per_device)} must give each of the {len(devices)} devices "
                         f"at least one layer and sum to {num_layers}")
    return [device for device, count in zip(devices, layers_per_device) for _ in range(count)]


def split_by_layers(model: nn.Module, devices: Sequence, layers_per_device: Optional[Sequence[int]] = None) -> nn.Module:
    """Place `model` (a Mixtral) over `devices` in place and return it.

    layers_per_device: how many consecutive decoder layers each device gets (e.g. `Plan.layers_per_device`);
    default: as even as possible. Call with a `SplitKVCache` (`new_split_kv_cache`) when caching.
    Layers already on their device are not copied (`checkpoint.load_model` with a list of devices
    streams each tensor straight there and then calls this).
    """
    devices = [torch.device(d) for d in devices]
    per_layer = layer_devices(len(model.layers), devices, layers_per_device)
    for handle in getattr(model, "_split_hooks", []):
        handle.remove()
    hooks = []
    model.layer_devices = per_layer
    for block, device in zip(model.layers, per_layer):
        block.to(device)
        # inputs (hidden, cos, sin, cache) -> this layer's device; the cache is left alone
        hooks.append(block.register_forward_pre_hook(
            lambda mod, args, d=device: tuple(_to(a, d) for a in args)))
    model.embed_tokens.to(devices[0])
    model.rotary_emb.to(devices[0])
    model.norm.to(devices[-1])
    model.lm_head.to(devices[-1])
    hooks.append(model.norm.register_forward_pre_hook(lambda mod, args, d=devices[-1]: tuple(_to(a, d) for a in args)))
    model._split_hooks = hooks
    # generate() and friends ask the model for a cache: give them one split the same way
    model.new_kv_cache = lambda batch_size, max_seq_len=None, device=None, dtype=None: new_split_kv_cache(
        model, batch_size, model.config.max_position_embeddings if max_seq_len is None else max_seq_len)
    return model


class SplitKVCache:
    """A KV cache whose layer i lives on `devices[i]`; the same interface as attention.KVCache.

    k[i], v[i]: `[batch, kv_heads, max_seq_len, head_dim]` on layer i's device.
    """

    def __init__(self, layer_devices: Sequence, batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, device=d, dtype=dtype) for d in layer_devices]
        self.v = [torch.zeros(shape, device=d, dtype=dtype) for d in layer_devices]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def check_room(self, batch_size: int, num_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was allocated for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.pos + num_new > self.max_seq_len:
            raise ValueError(f"KV cache is full: {self.pos} tokens cached + {num_new} new > max_seq_len {self.max_seq_len}")

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[batch, kv_heads, new, head_dim]` at `pos`; return the layer's cached K, V so far."""
        end = self.pos + k.shape[2]
        self.k[layer_idx][:, :, self.pos:end] = k
        self.v[layer_idx][:, :, self.pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, num_new: int) -> None:
        self.pos += num_new

    def reset(self) -> None:
        self.pos = 0


def new_split_kv_cache(model: nn.Module, batch_size: int, max_seq_len: int) -> SplitKVCache:
    """An empty SplitKVCache matching a model placed by `split_by_layers`."""
    cfg = model.config
    return SplitKVCache(model.layer_devices, batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim,
                        dtype=model.embed_tokens.weight.dtype)
