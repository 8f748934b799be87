"""The quantized student: a model whose planned Linear weights are fake-quantized on their grid.

`fake_quantize` swaps each planned nn.Linear for a FakeQuantLinear (grid recomputed from the
current weight on every forward, straight-through gradients), so distillation trains the weights the
export will store. `materialize` swaps them back to plain nn.Linear holding the on-grid values and
writes the plan into the config (`shrink_quant`), so a saved student reloads with plain
transformers and the exporter knows each tensor's grid.
"""

from __future__ import annotations

from typing import Any

from shrink.numformats.plan import SAVED_KEY, QuantPlan, saved_plan  # noqa: F401  (saved_plan: the student API)


def _config(model: Any) -> Any:
    return getattr(model.config, "text_config", None) or model.config


def _swap(model: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fake_quantize(model: Any, plan: QuantPlan) -> Any:
    """Replace the planned Linear layers of `model` in place; returns the model."""
    import torch

    from shrink.compress.quant.fakequant import FakeQuantLinear
    from shrink.numformats.grids import quantize_dequantize

    for vocabulary in _vocabulary(model):
        vocabulary.weight.requires_grad_(False)  # frozen: its grid is fixed once, here
        if plan.vocabulary:
            with torch.no_grad():
                vocabulary.weight.copy_(quantize_dequantize(vocabulary.weight.detach().float(), plan.vocabulary))
    for tensor in plan.tensors:
        module = model.get_submodule(tensor.module)
        if isinstance(module, FakeQuantLinear):
            continue
        _swap(model, tensor.module, FakeQuantLinear(module, tensor.grid, activations=plan.activations))
    return model


def _vocabulary(model: Any) -> list[Any]:
    tensors = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tensors[0].weight:
        tensors.append(output)
    return tensors


def materialize(model: Any, plan: QuantPlan) -> Any:
    """Plain Linear layers with the on-grid weights, and the plan recorded in the config."""
    import torch

    from shrink.compress.quant.fakequant import FakeQuantLinear, quantized_grid_weight

    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            linear = module.linear
            with torch.no_grad():
                linear.weight.copy_(quantized_grid_weight(module))
            _swap(model, name, linear)
    for vocabulary in _vocabulary(model):
        vocabulary.weight.requires_grad_(True)
    setattr(_config(model), SAVED_KEY, plan.to_dict())
    return model
