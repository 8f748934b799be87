"""Fake quantization for training: the forward pass sees the grid, the backward pass a straight-through
estimator that is zero where the grid clipped (only the absmean ternary/binary grids clip)."""

from __future__ import annotations


import torch

from shrink.compress.quant.formats import quantize, quantize_dequantize, saturation_limit

# per-token activation grids: a weight grid applied to each token's row
ACTIVATION_GRIDS = {"fp8_e4m3": "fp8_e4m3_channel", "fp8_e5m2": "fp8_e5m2_channel", "int8": "int8"}


def fake_quant(weight: torch.Tensor, name: str) -> torch.Tensor:
    with torch.no_grad():
        grid_values = quantize_dequantize(weight, name).to(weight.dtype)
        limit = saturation_limit(name)
        if limit is None:
            inside = torch.ones_like(weight)
        else:
            scales = quantize(weight, name).scales
            scale = scales.reshape(-1, 1).repeat_interleave(weight.numel() // scales.numel(), 0).reshape(weight.shape) \
                if scales.numel() > 1 else scales.reshape(1, 1)
            inside = ((weight / scale).abs() <= limit).to(weight.dtype)
    masked = weight * inside
    return masked + (grid_values - masked).detach()


def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return fake_quant(rows, ACTIVATION_GRIDS[name]).reshape(x.shape)


class FakeQuantLinear(torch.nn.Module):
    """An nn.Linear whose weight (and optionally input, per token) is fake-quantized on every forward;
    the scales follow the current weight, so the exported grid is the grid of the final weight."""

    def __init__(self, linear: torch.nn.Linear, grid: str, activations: str | None = None) -> None:
        super().__init__()
        if activations is not None and activations not in ACTIVATION_GRIDS:
            from shrink.errors import ShrinkError

            raise ShrinkError(f"Unknown activation format '{activations}'; choose one of: {', '.join(ACTIVATION_GRIDS)}.")
        self.linear, self.grid, self.activations = linear, grid, activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x = _activation(x, self.activations)
        return torch.nn.functional.linear(x, fake_quant(self.linear.weight, self.grid), self.linear.bias)


def quantized_grid_weight(module: FakeQuantLinear) -> torch.Tensor:
    return quantize_dequantize(module.linear.weight, module.grid).to(module.linear.weight.dtype)
