"""ONNX export: one decoder graph with KV-cache inputs and outputs, run by ONNX Runtime for both
prefill (empty past) and decode (one token, the cache from the previous call).

Built with `torch.onnx.export(dynamo=True)` through a wrapper whose inputs are plain tensors:
input_ids, attention_mask, position_ids and past_key_<i> / past_value_<i> for every attention
layer i; outputs logits and present_key_<i> / present_value_<i>. A layer whose mixer is a no-op or
linear map (a Puzzle variant) holds no cache and has no such tensors; nor does a layer that reads another
layer's cache (cross-layer KV sharing, compress/kvshare.py): it attends to its owner's present K/V inside
the graph, so only owners' caches cross the graph's boundary. Sequence axes are `Dim.DYNAMIC`
(arithmetic between Dims, such as past + new, fails to export). Weights live once, in
model.onnx.data; tied embeddings stay one tensor.

Why not optimum: optimum-onnx, the ONNX exporter of optimum, requires transformers < 4.58 and does
not import with the transformers 5 that shrink ships, so shrink drives the PyTorch exporter itself.
Non-uniform models export the same way: the graph takes each layer's shapes from its tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.archspec import ArchSpec, AttentionSpec, Formats
from shrink.errors import ShrinkError
from shrink.export.costing import onnx_vocabulary
from shrink.export.numerics import check_weights
from shrink.export.onnx_attention import traced_with_grouped_attention
from shrink.export.onnx_weights import read_layout, stored_weight, store_weights
from shrink.numformats.plan import saved_plan
from shrink.numformats.registry import FAMILIES, FORMATS, NumberFormat, matmul_nbits_name
from shrink.storage import atomic_directory

log = logging.getLogger("shrink")
LAYOUT_FILE = "shrink_onnx.json"  # what the runner needs to feed the graph: layers, KV shapes, vocab
ONNX_QUANTS = ("f32", "int8", "int4", "fp8")
LOGITS = ("all", "last")  # --logits: which positions' logits the graph returns (logits_kept)  # --quant; int8/int4 with --block-size name a registry format (onnx_int4_g32)
# Why FP4 weights have no ONNX artifact: the ONNX Runtime shrink pins (1.32) has no CPU kernel that computes
# with FLOAT4E2M1 weights: DequantizeLinear on float4e2m1 (opset 23) is NOT_IMPLEMENTED and MatMulNBits takes
# integer blocks only; its GatherBlockQuantized reads FP4, but no MatMul could. tests/test_onnx_weights.py
# checks this against the installed onnxruntime's kernel registry.
FP4_REFUSAL = ("{family} has no ONNX artifact: ONNX Runtime {version} has no CPU kernel that computes with FLOAT4E2M1 "
               "weights (DequantizeLinear on float4e2m1 is not implemented), so nothing could run or verify it; "
               "export it with -f gguf ({gguf}) instead.")
_matmul_nbits_weight = stored_weight  # the name tests/test_quantize.py reads a MatMulNBits weight back with


@dataclass
class OnnxExport:
    path: Path
    quant: str
    tensor_type_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "arch": "onnx-decoder", "quant": self.quant,
                "tensor_type_counts": self.tensor_type_counts, "substitutions": [], "notes": self.notes}


def _cached_layers(spec: ArchSpec) -> dict[int, AttentionSpec]:
    """The layers that hold a KV cache (layer index -> attention), in order: a no-op or linear mixer
    (blockvariants.py) holds none, nor does a consumer of a shared cache (kv_source set), so the graph
    has no past/present tensors for them."""
    if any(layer.mixer_kind == "ssm" for layer in spec.layers):
        raise ShrinkError("ONNX export with a KV cache covers attention-only models so far; SSM layers need a state "
                          "input that is not written yet.")
    return {i: layer.mixer for i, layer in enumerate(spec.layers)
            if isinstance(layer.mixer, AttentionSpec) and layer.mixer.owns_kv}


def _decoder_with_cache(model: Any, cached: list[int], layers: int, last: bool = False) -> Any:
    """The model behind plain-tensor inputs and outputs (defined here so importing the module does not import torch).
    `cached`: the layers whose past K/V are inputs. Each other layer (a no-op or linear mixer, a consumer of a
    shared cache) gets a cache slot that counts positions only, as blockvariants._keep_positions fills it:
    one-wide K/V of the past's length (transformers reads the cache's length from layer 0, and an empty slot
    reports 0). Nothing of such a slot leaves the graph. `last`: logits of the last new position only, and a
    SingleInputKV model's layers from k on run that position alone (blockvariants.last_token_prefill)."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from shrink.blockvariants import last_token_prefill

    class DecoderWithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # from a past input when there is one: the graph's sequence axes are independent symbols, and the
            # mask's length minus the new tokens' would be a third, which the cached layers' keys do not match
            past_len = past[0].shape[2] if past else attention_mask.shape[1] - input_ids.shape[1]
            positions = torch.zeros(input_ids.shape[0], 1, past_len, 1)
            slots = iter(past)
            cache = DynamicCache()
            cache.layers = [DynamicLayer() for _ in range(layers)]
            for i, layer in enumerate(cache.layers):
                layer.update(*((next(slots), next(slots)) if i in cached else (positions, positions)))
            with last_token_prefill(self.model) if last else contextlib.nullcontext():
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1 if last else 0)
            present = [t for i in cached for t in (out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values)]
            return (out.logits, *present)

    return DecoderWithCache().eval()


def check_logits(fmt: str, logits: str | None) -> None:
    """`shrink export --logits`, before any weight loads: a value of LOGITS, and for ONNX graphs only."""
    if logits is None:
        return
    if logits not in LOGITS:
        raise ShrinkError(f"Unknown --logits '{logits}'; choose one of: {', '.join(LOGITS)}.")
    if fmt != "onnx":
        raise ShrinkError("--logits shapes an ONNX graph; llama.cpp computes the logits its caller asks for, so it "
                          "does not apply to GGUF.")


def logits_kept(spec: ArchSpec, logits: str | None) -> str:
    """Which positions' logits the graph returns: "all" (verify compares every position from one call) or
    "last" (a deployment's prefill needs no more; the vocabulary projection over a long prompt is then one
    row). A SingleInputKV model returns the last only: its layers from k on run the last token alone."""
    check_logits("onnx", logits)
    logits = logits or ("last" if spec.single_input_kv is not None else "all")
    if logits == "all" and spec.single_input_kv is not None:
        raise ShrinkError(f"A SingleInputKV model's graph returns the last position's logits only: from layer "
                          f"{spec.single_input_kv} on the prompt's other tokens are not computed (use --logits last).")
    return logits


def export_onnx(loaded: Any, directory: str | Path, quant: str = "f32", block_size: int = 32,
                logits: str | None = None) -> OnnxExport:
    import torch

    stored = onnx_format(quant, block_size)
    planned = _planned_weights(loaded, stored)
    if planned is not None:
        stored = planned[0]
    spec: ArchSpec = loaded.spec
    logits = logits_kept(spec, logits)
    attention = _cached_layers(spec)
    check_weights({k: v.detach().float().cpu().numpy() for k, v in loaded.model.state_dict().items()})
    model = loaded.model.float().eval()
    wrapper = _decoder_with_cache(model, list(attention), spec.num_layers, last=logits == "last")
    batch, past_len, new_len = 1, 3, 4
    past = []
    for a in attention.values():
        shape = (batch, a.num_kv_heads, past_len, a.head_dim)
        past += [torch.zeros(shape), torch.zeros(shape)]
    ids = torch.randint(0, spec.vocab_size, (batch, new_len))
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new_len).unsqueeze(0)
    names = [f"past_{kind}_{i}" for i in attention for kind in ("key", "value")]
    outputs = ["logits"] + [n.replace("past_", "present_") for n in names]
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
              **({"past": tuple({0: dyn, 2: dyn} for _ in names)} if names else {})}  # torch.export: no key for no inputs
    directory = Path(directory)
    result = OnnxExport(directory, stored.name)
    with atomic_directory(directory) as tmp:
        try:
            with traced_with_grouped_attention(model):
                program = torch.onnx.export(wrapper, (ids, mask, positions, *past), dynamo=True,
                                            input_names=["input_ids", "attention_mask", "position_ids", *names],
                                            output_names=outputs, dynamic_shapes=shapes, report=False, verbose=False)
        except Exception as err:  # the exporter raises many types; the user needs the sentence, not the trace
            raise ShrinkError(f"torch.onnx.export could not trace this model ({type(err).__name__}: {str(err).splitlines()[0]}).") from None
        program.save(str(tmp / "model.onnx"), external_data=True)
        if stored.quantized:
            vocabulary = onnx_vocabulary(stored, spec.hidden_size, kept=planned is not None)
            _quantize_weights(tmp, stored, vocabulary, spec.vocab_size, result, planned[1] if planned else None)
        layout = {"layers": [{"layer": i, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim} for i, a in attention.items()],
                  "shared_kv": {str(i): layer.mixer.kv_source for i, layer in enumerate(spec.layers)  # consumer -> owner
                                if isinstance(layer.mixer, AttentionSpec) and not layer.mixer.owns_kv},
                  "vocab_size": spec.vocab_size, "logits": logits,
                  "inputs": ["input_ids", "attention_mask", "position_ids", *names],
                  "outputs": outputs}
        (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2))
        if loaded.tokenizer is not None:  # so that the directory is a usable model on its own
            loaded.tokenizer.save_pretrained(tmp)
        result.tensor_type_counts = _initializer_types(tmp / "model.onnx")
    return result


def _initializer_types(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(init.data_type)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def onnx_format(quant: str, block_size: int = 32) -> NumberFormat:
    """The registry format `--quant` and `--block-size` name: fp32, MatMulNBits int8/int4 per block, or FP8 E4M3."""
    import onnxruntime

    quant = quant.lower()
    family = FAMILIES.get(quant)
    if family is not None and FORMATS[family.stored["torch"]].compute == "fp4":
        raise ShrinkError(FP4_REFUSAL.format(family=quant, version=onnxruntime.__version__, gguf=family.stored["gguf"]))
    if quant not in ONNX_QUANTS:
        raise ShrinkError(f"Unknown ONNX weight type '{quant}'; choose one of: {', '.join(ONNX_QUANTS)}.")
    if quant == "f32":
        return FORMATS["fp32"]
    if quant == "fp8":
        return FORMATS[family.stored["onnx"]]
    name = matmul_nbits_name(int(quant[3:]), block_size)
    if name not in FORMATS:
        blocks = sorted({f.block for f in FORMATS.values() if (f.onnx_op or "").startswith("MatMulNBits")})
        raise ShrinkError(f"--block-size {block_size} is not one MatMulNBits takes here; choose one of: "
                          f"{', '.join(map(str, blocks))}.")
    return FORMATS[name]


def _planned_weights(loaded: Any, stored: NumberFormat) -> tuple[NumberFormat, dict[bytes, str]] | None:
    """For a quantized student (`shrink quantize`): the ONNX format made on its grid (MatMulNBits for
    --runtime onnx, onnx_fp8 for the fp8 family on either runtime) and its planned weights by content
    (ONNX renames initializers, the values are what identify them)."""
    import numpy as np

    plan = saved_plan(loaded.model)
    if plan is None:
        return None
    onnx = [f for f in FORMATS.values() if f.runtime == "onnx" and f.grid == plan.grid]
    if not onnx:
        raise ShrinkError(f"This model was quantized on the {plan.runtime} grid ({plan.grid}), which no ONNX layout "
                          f"stores; export it with -f {plan.runtime if plan.runtime != 'torch' else 'gguf'} or quantize it "
                          "again with --runtime onnx.")
    if stored.quantized:
        raise ShrinkError(f"This model carries its own quantization plan ({plan.grid}); --quant does not apply to it.")
    if plan.fallbacks or any(t.grid != plan.grid for t in plan.tensors):
        raise ShrinkError("An ONNX export takes one weight layout per model; this plan mixes grids "
                          f"({', '.join(sorted({t.grid for t in plan.tensors}))}), which ONNX export does not write yet.")
    weights = {np.ascontiguousarray(loaded.model.get_submodule(t.module).weight.detach().float().numpy().T).tobytes(): t.module
               for t in plan.tensors}
    return onnx[0], weights


def _quantize_weights(directory: Path, stored: NumberFormat, vocabulary: NumberFormat, vocab_size: int,
                      result: OnnxExport, planned: dict[bytes, str] | None = None) -> None:
    """Store the traced graph's weights in `stored` and its vocabulary in `vocabulary` (export/onnx_weights.py)."""
    import onnx

    source = directory / "model.onnx"
    model = onnx.load(str(source))
    count = store_weights(model, stored, vocabulary, vocab_size, planned)
    for path in directory.iterdir():
        if path.name.startswith("model.onnx"):
            path.unlink()
    onnx.save_model(model, str(source), save_as_external_data=True, location="model.onnx.data")
    kept = "; the student's kept layers stay f32" if planned is not None else ""
    table = "the token embedding and lm_head f32" if not vocabulary.quantized else (
        f"the lm_head and token embedding as {vocabulary.name} (the embedding through GatherBlockQuantized)")
    result.notes.append(f"{count} MatMul weights as {stored.onnx_op}; {table}, a tied table stored once{kept}")


@dataclass(frozen=True)
class OnnxFormats:
    formats: Any  # archspec.Formats of what the graph stores
    tied: bool  # the lm_head reads the embedding table itself (no untied copy stored)
    prompt_logits: str = "all"  # the prompt positions a prefill projects onto the vocabulary ("all" or "last")


def onnx_formats(directory: str | Path) -> OnnxFormats:
    """What an exported decoder stores, read from its graph: the block MatMuls' format (the most common),
    the token embedding's and the lm_head's, and whether they share one table, so that an estimate costs
    the bytes ONNX Runtime reads."""
    import onnx

    directory = Path(directory)
    layout = json.loads((directory / LAYOUT_FILE).read_text())
    read = read_layout(onnx.load(str(directory / "model.onnx"), load_external_data=False), layout["vocab_size"])
    weights = max(read.blocks, key=read.blocks.get) if read.blocks else "fp32"
    formats = Formats(weights=weights, embeddings=read.embedding, activations="fp32", kv_cache="fp32", other="fp32",
                      lm_head=None if read.tied else read.lm_head)
    return OnnxFormats(formats, read.tied, layout.get("logits", "all"))
