"""What a GGUF file stores, read from its header: the number formats of its tensors, so that an
estimate for a GGUF artifact costs the bytes the runtime really reads, and the tokenizer keys that a
new GGUF copies from the one its model came from. The gguf package (numpy under it) is imported only
when a file is read, so that config-only commands stay light."""

from __future__ import annotations

import mmap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink.archspec import Formats
from shrink.errors import ShrinkError
from shrink.numformats import FORMATS, format_by_gguf_type, gguf_activations, mixture_name

# GGUF block tensor name (blk.N.<name>.weight) -> the roofline operator that reads it (hardware/ops.py)
_OP_OF_TENSOR = {
    "attn_q": "attn.qkv", "attn_k": "attn.qkv", "attn_v": "attn.qkv", "attn_qkv": "attn.qkv", "attn_output": "attn.o",
    "ffn_gate": "ffn.up", "ffn_up": "ffn.up", "ffn_down": "ffn.down", "ssm_in": "ssm.in_proj", "ssm_out": "ssm.out_proj",
    "ffn_gate_inp": "moe.router", "ffn_gate_exps": "moe.experts_up", "ffn_up_exps": "moe.experts_up",
    "ffn_down_exps": "moe.experts_down", "ffn_gate_shexp": "moe.shared_up", "ffn_up_shexp": "moe.shared_up",
    "ffn_down_shexp": "moe.shared_down",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # GGML type name: F16, Q4_K, ...
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length blocks run along
    elements: int
    bytes: int


# GGUF value types -> their fixed size in bytes (8: string, 9: array are variable)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_infos(path: str | Path) -> list[TensorInfo]:
    """The tensor table of a GGUF file, read straight from its header. The gguf package's reader
    decodes every metadata value first (a 262,144-token vocabulary: about 10 s); this skips them."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_tensor_table(data, GGML_QUANT_SIZES, GGMLQuantizationType)
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        raise ShrinkError(f"'{path}' is corrupt or truncated: not a readable GGUF file "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'no detail'}).") from None


def _read_tensor_table(data: Any, sizes: Any, types: Any) -> list[TensorInfo]:
    """Parse the header in `data` (bytes or an mmap): skip the metadata, read the tensor infos."""
    if data[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version, count, kv_count = int.from_bytes(data[4:8], "little"), *_u64s(data, 8, 2)
    pos = 24
    if version < 2 or count > len(data) or kv_count > len(data):
        raise ValueError(f"version {version}, {count} tensors, {kv_count} keys")
    for _ in range(kv_count):
        pos = _skip_string(data, pos)
        kind = _u32(data, pos)
        pos = _skip_value(data, pos + 4, kind)
    infos = []
    for _ in range(count):
        length = _u64s(data, pos, 1)[0]
        name = data[pos + 8:pos + 8 + length].decode()
        pos = _skip_string(data, pos)
        dims = _u32(data, pos)
        if dims > 8:
            raise ValueError(f"{dims} dimensions")
        shape = tuple(_u64s(data, pos + 4, dims))
        kind = types(_u32(data, pos + 4 + 8 * dims))
        pos += 4 + 8 * dims + 4 + 8
        elements = 1
        for size in shape:
            elements *= size
        block, type_size = sizes[kind]
        infos.append(TensorInfo(name, kind.name, shape, elements, elements // block * type_size))
    return infos


def _u32(data: bytes, pos: int) -> int:
    if pos + 4 > len(data):
        raise IndexError("header ends early")
    return int.from_bytes(data[pos:pos + 4], "little")


def _u64s(data: bytes, pos: int, count: int) -> list[int]:
    if pos + 8 * count > len(data):
        raise IndexError("header ends early")
    return [int.from_bytes(data[pos + 8 * i:pos + 8 * i + 8], "little") for i in range(count)]


def _skip_string(data: bytes, pos: int) -> int:
    end = pos + 8 + _u64s(data, pos, 1)[0]
    if end > len(data):
        raise IndexError("header ends early")
    return end


def _skip_value(data: bytes, pos: int, kind: int, depth: int = 0) -> int:
    if depth > 4:  # GGUF nests arrays, but no writer nests them this deep: a damaged file
        raise ValueError("arrays nested too deep")
    if kind in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[kind]
    if kind == 8:
        return _skip_string(data, pos)
    if kind != 9:
        raise ValueError(f"unknown metadata value type {kind}")
    inner, length = _u32(data, pos), _u64s(data, pos + 4, 1)[0]
    pos += 12
    if inner in _SCALAR_SIZES:
        end = pos + length * _SCALAR_SIZES[inner]
        if end > len(data):
            raise IndexError("header ends early")
        return end
    if length > len(data):
        raise IndexError("header ends early")
    for _ in range(length):
        pos = _skip_value(data, pos, inner, depth + 1)
    return pos


@dataclass(frozen=True)
class GGUFFormats:
    formats: Formats
    linear_bytes_by_type: dict[str, int]  # GGML type -> bytes of 2-D block weights stored in it

    @property
    def mixed(self) -> bool:
        return len(self.linear_bytes_by_type) > 1


def gguf_formats(path: str | Path) -> GGUFFormats:
    """Formats of a GGUF's tensors, per operator: `weights` is the type holding most block-weight bytes,
    and an operator stored otherwise gets its own entry, a mixture by element share where its layers
    use several types (as Q4_K_M files do), so that the bytes costed are the file's; the embedding
    takes the token table's type, a separate output projection its own. llama.cpp keeps the KV
    cache in f16; activations are what its dot products take (registry.gguf_activations)."""
    tensors = [(t.name, t.ggml_type, len(t.shape), t.elements, t.bytes) for t in tensor_infos(path)]
    by_op: dict[str, Counter[str]] = {}
    linear: Counter[str] = Counter()
    embedding = output = None
    for name_, kind, dims, elements, size in tensors:
        if name_ == "token_embd.weight":
            embedding = kind
        elif name_ == "output.weight":
            output = kind
        elif name_.startswith("blk.") and dims >= 2:
            op = _OP_OF_TENSOR.get(name_.split(".")[2] if name_.count(".") >= 2 else "", "other")
            by_op.setdefault(op, Counter())[kind] += elements
            linear[kind] += size
    if not linear or embedding is None:
        raise ShrinkError(f"'{path}' holds no block weights or no token embedding that shrink can cost.")
    name = {k: format_by_gguf_type(k).name for k in {*linear, embedding, output} if k is not None}
    weights = name[linear.most_common(1)[0][0]]
    mixed = {op: mixture_name({name[k]: n for k, n in types.items()}) for op, types in by_op.items() if op != "other"}
    ops = tuple(sorted((op, fmt) for op, fmt in mixed.items() if fmt != weights))
    formats = Formats(
        weights=weights,
        embeddings=name[embedding],
        activations=gguf_activations(FORMATS[weights]),
        kv_cache="fp16",
        other="fp32",
        lm_head=name[output] if output and name[output] != name[embedding] else None,  # None: as embeddings
        ops=ops,
    )
    return GGUFFormats(formats, dict(linear))


def copy_tokenizer_fields(source: str | Path, writer: Any) -> None:
    """Copy every tokenizer.* key of a GGUF file into a GGUFWriter verbatim (token strings as raw bytes):
    the tokenizer a GGUF export carries, and the sidecar `shrink.model.save` keeps beside the weights."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    for name, field_ in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field_.types[0]
        if kind == GGUFValueType.ARRAY:
            if field_.types[1] == GGUFValueType.STRING:
                writer.add_array(name, [bytes(field_.parts[i]) for i in field_.data])
            else:
                writer.add_array(name, [field_.parts[i][0].item() for i in field_.data])
        elif kind == GGUFValueType.STRING:
            writer.add_string(name, bytes(field_.parts[field_.data[0]]).decode())
        else:
            writer.add_key_value(name, field_.parts[field_.data[0]][0].item(), kind)
