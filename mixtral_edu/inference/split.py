"""Split a Mixtral by layers over several devices with plain PyTorch ("pipeline" placement, batch 1).

Layers 0..a-1 live on the first GPU, a..b-1 on the second, and so on; the embedding sits with
the first layers and the final norm and lm_head with the last. At a boundary the hidden state
`[batch, seq, hidden]` (32 kB per token for 8x7B in bf16) is copied to the next device: a forward
pre-hook on each layer moves its inputs to where its weights are. The KV cache is split the same
way (`KVCache` keeps each layer's part on the device of that layer's weights), so each layer reads
and writes its keys and values on its own device.

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
    default: as even as possible. `model.new_kv_cache` then puts each layer's cache on its device.
    Layers already on their device are not copied (`load_split` streams each tensor straight there
    and then calls this).
    """
    devices = [torch.device(d) for d in devices]
    per_layer = layer_devices(len(model.layers), devices, layers_per_device)
    for handle in getattr(model, "_split_hooks", []):
        handle.remove()
    hooks = []
    model.layer_devices = per_layer
    for block, device in zip(model.layers, per_layer):
        block.to(device)
        # inputs (hidden, cos, sin, cache, positions) -> this layer's device; the cache is left alone
        hooks.append(block.register_forward_pre_hook(
            lambda mod, args, d=device: tuple(_to(a, d) for a in args)))
    model.embed_tokens.to(devices[0])
    model.rotary_emb.to(devices[0])
    model.norm.to(devices[-1])
    model.lm_head.to(devices[-1])
    hooks.append(model.norm.register_forward_pre_hook(lambda mod, args, d=devices[-1]: tuple(_to(a, d) for a in args)))
    model._split_hooks = hooks
    return model


def load_split(path, devices: Sequence, layers_per_device: Optional[Sequence[int]] = None, **load_kwargs) -> nn.Module:
    """Load the checkpoint in folder `path` split by layers over `devices` (see `split_by_layers`).

    Each layer's tensors are read straight onto its own device (`weights.load_model` with one device per
    layer), so no device ever holds the whole model. load_kwargs: `load_model`'s (dtype, progress, ...).
    """
    from ..weights.layouts import read_config
    from ..weights.load import load_model

    per_layer = layer_devices(read_config(path).num_hidden_layers, devices, layers_per_device)
    model = load_model(path, device=per_layer, **load_kwargs)
    return split_by_layers(model, devices, layers_per_device)


def is_split(model: nn.Module) -> bool:
    """True for a model placed by `split_by_layers` (its layers carry the device hooks)."""
    return bool(getattr(model, "_split_hooks", None))


def decode_dispatch_for(model: nn.Module) -> str:
    """The MoE dispatch a decode step of a split `model` uses: "auto" (moe.py), the model's own.

    The sync-free dispatch a one-device decoder installs gathers, i.e. copies, each token's k experts' w1,
    w2, w3 so that no host sync breaks a CUDA graph; a split model is not captured as one graph (each
    step hops devices; FastDecoder does not graph it unless asked), so the copies buy nothing, and "auto"
    reads the same weights as views (measured: benchmarks/split_decode.py)."""
    if not is_split(model):
        raise ValueError("decode_dispatch_for is for a model placed by split_by_layers")
    return "auto"
