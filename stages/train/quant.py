"""A quantized frozen base for LoRA training: the UNet's frozen Linear (and, for fp8, Conv2d) weights stored in
fewer bits, the LoRA weights beside them in float32 as before (so checkpoints and exports hold exactly the keys
and shapes of an unquantized run).

- `nf4` / `int8`: bitsandbytes' Linear4bit (NormalFloat 4-bit, QLoRA, Dettmers et al. 2023) and Linear8bitLt
  (LLM.int8()); the layers are swapped in after the LoRA is injected (each LoRA layer's `base_layer`) and quantize
  when moved to the device. Convolutions stay in weights_dtype.
- `fp8`: float8_e4m3fn storage with one float32 scale per output channel (max |w| maps to e4m3's 448), upcast
  layer by layer in the forward pass; the backward pass upcasts again instead of keeping the upcast weight, so no
  full-precision copy outlives its layer (written here: no kept library does this for convolutions on the CPU).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from shared.core.errors import ConfigError
from shared.models import lora

KINDS = ("no", "fp8", "nf4", "int8")
FP8_MAX = 448.0   # the largest finite float8_e4m3fn
NF4_BLOCK = 64    # bitsandbytes' 4-bit block size (one float32 absmax per block)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Fp8Op(torch.autograd.Function):
    """y = op(x, dequantized w) + b with a frozen fp8 weight: only the input's gradient, from w upcast again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "Fp8Layer") -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.layer, ctx.dtype, ctx.shape = layer, dtype, x.shape
        with torch.autocast(x.device.type, enabled=False):
            bias = layer.bias.to(dtype) if layer.bias is not None else None
            return layer.op(x.to(dtype), layer.dequantized(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        return layer.input_grad(ctx.shape, grad.to(ctx.dtype), layer.dequantized(ctx.dtype)), None


class Fp8Layer(torch.nn.Module):
    """A frozen Linear or Conv2d whose weight is float8_e4m3fn × a float32 scale per output channel. `weight`
    gives the upcast weight (what peft's DoRA reads of its base layer)."""

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d):
        super().__init__()
        w = layer.weight.detach().float()
        scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.register_buffer("qweight", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale)
        self.bias = layer.bias
        self.dtype = layer.weight.dtype
        self.conv = isinstance(layer, torch.nn.Conv2d)
        if self.conv:
            self.args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            self.in_features, self.out_features = layer.in_features, layer.out_features

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.scale).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.dtype)

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, *self.args) if self.conv else F.linear(x, w, b)

    def input_grad(self, shape: torch.Size, grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return torch.nn.grad.conv2d_input(shape, w, grad, *self.args)
        return grad.matmul(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Op.apply(x, self)


def frozen_layers(unet: torch.nn.Module, kind: str) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, layer) of every frozen Linear (and Conv2d for fp8) of the base: not a LoRA weight."""
    types = (torch.nn.Linear, torch.nn.Conv2d) if kind == "fp8" else (torch.nn.Linear,)
    found = []
    for name, parent in unet.named_modules():
        for attr, child in parent.named_children():
            full = f"{name}.{attr}" if name else attr
            if type(child) in types and not lora.is_adapter_parameter(full) and not child.weight.requires_grad:
                found.append((parent, attr, child))
    return found


def bnb_layer(layer: torch.nn.Linear, kind: str) -> torch.nn.Module:
    """The bitsandbytes layer holding `layer`'s weight, quantized when moved to a device."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(f"quantize_base {kind} needs bitsandbytes: pip install bitsandbytes "
                          f"(or the project's `bnb` extra), or use quantize_base fp8") from e
    w = layer.weight.detach()
    if kind == "nf4":
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=w.dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w.to("cpu", copy=True), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.to("cpu", copy=True), requires_grad=False, has_fp16_weights=False)
    if layer.bias is not None:
        q.bias = layer.bias
    return q


def quantize_base(unet: torch.nn.Module, kind: str) -> int:
    """Replace the frozen base layers by their `kind` form (bitsandbytes layers quantize on the next `.to`);
    the number replaced."""
    if kind == "no":
        return 0
    layers = frozen_layers(unet, kind)
    for parent, attr, layer in layers:
        setattr(parent, attr, Fp8Layer(layer) if kind == "fp8" else bnb_layer(layer, kind))
    return len(layers)


def layer_bytes(shape: torch.Size, kind: str) -> int:
    """The bytes a frozen weight of `shape` takes as `kind` (what the memory planner counts)."""
    n = shape.numel()
    if kind == "fp8":
        return n + 4 * shape[0]
    if kind == "int8":
        return n + 4 * shape[0]                           # int8 weight + a float32 scale per row
    if kind == "nf4":
        return math.ceil(n / 2) + 4 * math.ceil(n / NF4_BLOCK)   # 4-bit codes + a float32 absmax per block
    raise ValueError(kind)
