"""Int8 weight-only quantisation with one scale per output channel.

A weight row (one output channel) w `[in]` is stored as int8 codes q and one scale s:

    s = max_j |w_j| / 127,     q_j = round(w_j / s)  in [-127, 127],     w_j ≈ s * q_j

and a layer computes  y = (x @ q^T) * s  — the scale of output channel n multiplies y_n after the
dot product, so the codes can be used as they are. Activations stay in bf16 (weight-only). Each
row's worst error is s/2, so rows with an outlier lose more; a per-row scale (not one per tensor)
keeps that local.

Mixtral's experts (96.6% of the weights) and attention projections are quantised; the embedding,
lm_head, router (`gate`, only 8 rows and decisive for routing) and norms stay in bf16. That is
about 47 GB for 8x7B instead of 93.4 GB, and each decoded token reads half the bytes.

`Int8Linear` replaces an nn.Linear and `Int8Experts` replaces `Experts`: both multiply with
`int8_linear`, the one int8 product, and `Int8Experts` is an `ExpertsBase` (model/experts.py), so
the SwiGLU formula, the model code and the MoE dispatch run unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts, ExpertsBase, gathered_linear

QMAX = 127


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w `[..., out, in]` -> (q int8 `[..., out, in]`, scale `[..., out]` in w's dtype).

    Symmetric: scale = row max |w| / 127 (computed in float32); an all-zero row gets scale 1.
    """
    w32 = w.float()
    amax = w32.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w32 / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.to(w.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, product=F.linear) -> torch.Tensor:
    """y = product(x, codes) * scale: x `[..., in]`, q int8 `[..., out, in]`, scale `[..., out]` -> `[..., out]`.

    The codes are converted to x's dtype and the per-row scale applied after the product.
    product: F.linear for one matrix, `gathered_linear` for per-token stacks.
    """
    return product(x, q.to(x.dtype)) * scale.to(x.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q `[..., out, in]` int8, scale `[..., out]` -> weights `[..., out, in]` in scale's dtype."""
    return q.to(scale.dtype) * scale[..., None]


class Int8Linear(nn.Module):
    """y = (x @ weight^T) * scale with weight int8 `[out, in]` and scale `[out]` (no bias).

    x `[..., in]` -> `[..., out]` in x's dtype. Buffers, not parameters: nothing here is trained.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.shape != weight.shape[:1]:
            raise ValueError(f"Int8Linear needs int8 weight [out, in] and scale [out], got "
                             f"{weight.dtype} {tuple(weight.shape)} and {tuple(scale.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; Mixtral's projections have none")
        return cls(*quantize_per_channel(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Experts(ExpertsBase):
    """All experts of one layer as int8 codes plus per-output-channel scales.

    w1, w3 int8 `[E, I, H]` with w1_scale, w3_scale `[E, I]`; w2 int8 `[E, H, I]` with w2_scale `[E, H]`.
    An `ExpertsBase`: an expert's weights are (codes, scale) pairs and `linear` is `int8_linear`.
    """

    def __init__(self, w1, w1_scale, w2, w2_scale, w3, w3_scale) -> None:
        super().__init__()
        for name, w, s in (("w1", w1, w1_scale), ("w2", w2, w2_scale), ("w3", w3, w3_scale)):
            if w.dtype != torch.int8 or w.dim() != 3 or s.shape != w.shape[:2]:
                raise ValueError(f"Int8Experts.{name}: need int8 [E, out, in] and scale [E, out], got "
                                 f"{w.dtype} {tuple(w.shape)} and {tuple(s.shape)}")
            self.register_buffer(name, w)
            self.register_buffer(name + "_scale", s)
        self.num_experts = w1.shape[0]

    @classmethod
    def from_experts(cls, experts: Experts) -> "Int8Experts":
        """Quantise one expert at a time, so the float32 temporary is one expert, not eight."""
        parts = {}
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name).detach()
            codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
            scales = torch.empty(w.shape[:2], dtype=w.dtype, device=w.device)
            for e in range(w.shape[0]):
                codes[e], scales[e] = quantize_per_channel(w[e])
            parts[name], parts[name + "_scale"] = codes, scales
        return cls(**parts)

    def expert_weights(self, expert: int) -> tuple:
        return tuple((getattr(self, n)[expert], getattr(self, n + "_scale")[expert]) for n in ("w1", "w2", "w3"))

    def gathered_weights(self, expert_ids: torch.Tensor) -> tuple:
        """(codes, scales) `[T, k, out, in]`, `[T, k, out]` per matrix: the codes are gathered at 1 byte each."""
        return tuple((getattr(self, n)[expert_ids], getattr(self, n + "_scale")[expert_ids]) for n in ("w1", "w2", "w3"))

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        return int8_linear(x, *w)

    def batched_linear(self, x: torch.Tensor, w) -> torch.Tensor:
        return int8_linear(x, *w, product=gathered_linear)

    def extra_repr(self) -> str:
        e, i, h = self.w1.shape
        return f"num_experts={e}, hidden={h}, intermediate={i}, int8 per-channel"


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@torch.no_grad()
def quantize_layer_(layer: nn.Module, device: Optional[torch.device | str] = None) -> None:
    """Quantise one DecoderLayer in place: its experts and attention projections become int8.

    With `device`, each float module is moved there first and quantised there (the int8 result
    stays), so a model held in bf16 on the CPU can be brought to a GPU that only fits it in int8.
    """
    attn = layer.self_attn
    for name in ATTENTION_PROJECTIONS:
        linear = getattr(attn, name)
        if isinstance(linear, nn.Linear):
            setattr(attn, name, Int8Linear.from_linear(linear.to(device) if device is not None else linear))
    moe = layer.block_sparse_moe
    if isinstance(moe.experts, Experts):
        experts = moe.experts.to(device) if device is not None else moe.experts
        moe.experts = Int8Experts.from_experts(experts)
    if device is not None:
        layer.to(device)                                  # norms and router (bf16) follow


@torch.no_grad()
def quantize_model(model: nn.Module, device: Optional[torch.device | str] = None, progress: bool = False) -> nn.Module:
    """Quantise every decoder layer of a `Mixtral` in place (see `quantize_layer_`); returns the model.

    With `device`, the whole model ends up there, one layer at a time, so peak device memory is
    the int8 model plus one bf16 layer.
    """
    layers = model.layers
    if progress:
        from tqdm.auto import tqdm
        layers = tqdm(layers, desc="int8 layers")
    for layer in layers:
        quantize_layer_(layer, device)
    if device is not None:
        model.to(device)
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when any module of `model` is int8 (Int8Linear or Int8Experts)."""
    return any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules())
