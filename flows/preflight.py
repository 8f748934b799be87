"""What a run refuses from the model's config alone, before it reads a weight: bad input that would
otherwise surface only at the export step, after minutes of pruning, distilling and quantizing.

`shrink run` calls `refuse_early` with its steps (a planned run on a llama.cpp target calls
`check_gguf_export` before planning); `shrink export -f gguf` calls `check_gguf_export` before loading.
"""

from __future__ import annotations

from typing import Any

from shrink.compress.search import check_axis
from shrink.errors import ShrinkError
from shrink.export.gguf_layout import SHARED_KV_REFUSAL, SINGLE_INPUT_KV_REFUSAL, choose_layout
from shrink.export.gguf_rope import check_rope
from shrink.export.gguf_tokenizer import gguf_vocabulary
from shrink.model import config_fields, load_spec, load_tokenizer


def writes_gguf(steps: list[tuple[str, Any]]) -> bool:
    """Whether a recipe's steps write a GGUF file (an export to gguf, or llama.cpp's quantizer)."""
    return any(name == "gguf-quantize" or (name == "export" and getattr(config, "format", None) == "gguf")
               for name, config in steps)


def refuse_early(model: str, steps: list[tuple[str, Any]]) -> None:
    """Raise ShrinkError now for what a later step of `steps` would refuse (one sentence, exit code 2)."""
    for name, config in steps:
        if name == "prune" and config.params is not None:
            check_axis(config.axis)
    if writes_gguf(steps):
        if any(name == "kv-share" for name, _ in steps):  # its groups are chosen later, but any group refuses
            raise ShrinkError(SHARED_KV_REFUSAL.format(family=load_spec(model).family))
        single = next((config for name, config in steps if name == "single-input-kv"), None)
        if single is not None:
            spec = load_spec(model)
            raise ShrinkError(SINGLE_INPUT_KV_REFUSAL.format(family=spec.family, k=single.k or spec.num_layers // 2))
        check_gguf_export(model, tokenizer=True)


def check_gguf_export(model: str, tokenizer: bool = False) -> None:
    """The GGUF refusals a config shows: a family or layer kind llama.cpp cannot run, RoPE it cannot
    reproduce; with `tokenizer`, also a Hugging Face tokenizer llama.cpp cannot reproduce (seconds to
    load and convert: worth it before a run, not before an export that converts it next anyway).
    A GGUF source is not checked (its RoPE and tokenizer are llama.cpp's already)."""
    config = config_fields(model)
    if config is None:
        return
    spec = load_spec(model)
    layout = choose_layout(spec, pad_to_uniform=True)  # any pruned shape can still be padded
    check_rope(getattr(config, "text_config", None) or config, layout.arch)
    if tokenizer:
        hf_tokenizer, gguf_source = load_tokenizer(model)
        if gguf_source is None and hf_tokenizer is not None:
            gguf_vocabulary(hf_tokenizer, spec.vocab_size)
