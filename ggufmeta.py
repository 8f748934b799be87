"""What a GGUF file stores, read from its header: the number formats of its tensors, so that an
estimate for a GGUF artifact costs the bytes the runtime really reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shrink.archspec import Formats
from shrink.errors import ShrinkError

# GGML tensor types -> shrink format names (numformats.FORMATS)
_GGML_TO_FORMAT = {
    "F32": "fp32", "F16": "fp16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1",
    "Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "TQ1_0": "tq1_0",
    "TQ2_0": "tq2_0", "MXFP4": "mxfp4", "NVFP4": "nvfp4", "Q1_0": "binary",
}


@dataclass(frozen=True)
class GGUFFormats:
    formats: Formats
    linear_bytes_by_type: dict[str, int]  # GGML type -> bytes of 2-D block weights stored in it

    @property
    def mixed(self) -> bool:
        return len(self.linear_bytes_by_type) > 1


def gguf_formats(path: str | Path) -> GGUFFormats:
    """Formats of a GGUF's tensors: block weights take the type holding most of their bytes (a
    Q4_K_M file mixes several), embeddings the token table's type. llama.cpp keeps the KV cache in
    f16 and quantizes activations to 8 bits for its quantized dot products, hence int8 activations
    whenever the weights are quantized."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as err:
        raise ShrinkError(f"'{path}' is corrupt or truncated: not a readable GGUF file ({err}).") from None
    linear: Counter[str] = Counter()
    embedding = None
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if tensor.name == "token_embd.weight":
            embedding = kind
        elif tensor.name.startswith("blk.") and len(tensor.shape) >= 2:
            linear[kind] += int(tensor.n_bytes)
    unknown = {k for k in [*linear, embedding] if k is not None and k not in _GGML_TO_FORMAT}
    if unknown or not linear or embedding is None:
        raise ShrinkError(f"'{path}' holds tensor types shrink cannot cost yet: {sorted(unknown) or 'no block weights'}.")
    weights = _GGML_TO_FORMAT[linear.most_common(1)[0][0]]
    quantized = weights not in ("fp32", "fp16", "bf16")
    formats = Formats(
        weights=weights,
        embeddings=_GGML_TO_FORMAT[embedding],
        activations="int8" if quantized else "fp32",
        kv_cache="fp16",
        other="fp32",
    )
    return GGUFFormats(formats, dict(linear))
