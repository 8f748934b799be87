"""Fake quantization for training: the forward pass sees the grid, the backward pass a straight-through
estimator that passes the gradient where the weight rounds onto the grid and stops it where the grid
clipped it (formats.clipped). Absmax scales clip nothing; the signed-max ones (q4_0, int4_g*) clip the
far side's largest value, MXFP4's power of two up to a quarter of the block's largest values, and the
absmean ternary/binary scales whatever lies beyond 1.5 / 2 scales.

Scales are recomputed from the current weight on every forward, so the grid exported at the end is
the grid of the final weight: quantized_grid_weight(module) is exactly what the forward used.
"""

from __future__ import annotations

import torch

from shrink.numformats.grids import block_size, clipped, dequantize, quantize, weight_format
from shrink.errors import ShrinkError

# an activation format applies per token: one scale per row of the flattened input
PER_TOKEN = {"fp8_e4m3": "fp8_e4m3_channel", "fp8_e5m2": "fp8_e5m2_channel"}


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, name: str) -> torch.Tensor:
        q = quantize(weight, name)
        ctx.save_for_backward(~clipped(weight, q))
        ctx.dtype = weight.dtype
        return dequantize(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return (grad * inside).to(ctx.dtype), None


def fake_quant(weight: torch.Tensor, name: str) -> torch.Tensor:
    """quantize_dequantize(weight, name) (float32) forward; gradient 1 inside the grid's range, 0 where clipped."""
    return _StraightThrough.apply(weight, name)


def _per_token(x: torch.Tensor, name: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return fake_quant(rows, PER_TOKEN.get(name, name)).reshape(x.shape).to(x.dtype)


class FakeQuantLinear(torch.nn.Module):
    """An nn.Linear whose weight, and optionally its input per token, is fake-quantized on every forward."""

    def __init__(self, linear: torch.nn.Linear, grid: str, activations: str | None = None) -> None:
        super().__init__()
        for name, width in ((grid, linear.in_features), (activations, linear.in_features)):
            if name is not None and width % block_size(name):  # also rejects unknown names
                raise ShrinkError(f"{name} needs rows that are a multiple of {block_size(name)}; "
                                  f"this layer's are {width} wide.")
        if activations is not None:
            weight_format(PER_TOKEN.get(activations, activations))
        self.linear, self.grid, self.activations = linear, grid, activations

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x = _per_token(x, self.activations)
        weight = fake_quant(self.linear.weight, self.grid).to(x.dtype)
        return torch.nn.functional.linear(x, weight, self.linear.bias)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, activations={self.activations}"


def quantized_grid_weight(module: FakeQuantLinear) -> torch.Tensor:
    """The float32 on-grid weight the forward uses (before its cast to the input's dtype)."""
    with torch.no_grad():
        return dequantize(quantize(module.linear.weight, module.grid))
