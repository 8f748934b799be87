"""llama.cpp's own quantizer (`llama_model_quantize` in llama-cpp-python), driven by shrink.

What a llama.cpp user would run (`llama-quantize model-f16.gguf out.gguf Q4_K_M --imatrix m.dat`),
with three things it takes from shrink: the importance matrix (computed from calibration activations
by compress/quant/imatrix.py, passed in memory), per-tensor type overrides (a mixture chosen by
measured sensitivity), and a check of every override against the tensor's row length first:
llama.cpp aborts the whole process when a forced type's blocks do not divide a row (Q6_K on Gemma 3's
640-wide token embedding), so such an override is refused here in one sentence instead.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np

from shrink.archspec import ArchSpec
from shrink.errors import ShrinkError
from shrink.export.gguf_layout import MODEL_TENSORS, choose_layout, gguf_tensor_name
from shrink.export.runtimes import quiet_stderr
from shrink.ggufmeta import tensor_infos
from shrink.numformats.filetypes import file_type
from shrink.numformats.registry import get_format
from shrink.storage import atomic_path


def tensor_rows(path: Path) -> dict[str, int]:
    """Each 2-D tensor of a GGUF file -> its row length (ne[0], the dimension blocks run along)."""
    return {t.name: t.shape[0] for t in tensor_infos(path) if len(t.shape) >= 2}


def gguf_importance(matrix: dict[str, np.ndarray], spec: ArchSpec, rows: dict[str, int]) -> dict[str, np.ndarray]:
    """An importance matrix keyed by parameter names -> keyed by the GGUF tensors they are stored as.
    A tied lm_head's statistics belong to token_embd (the tensor the output matmul reads); an entry
    whose length is not the tensor's row length (a padded layout) is dropped rather than mis-applied."""
    layout = choose_layout(spec, pad_to_uniform=False)
    mapped = {}
    for name, values in matrix.items():
        if name == "lm_head.weight":
            target = "token_embd.weight" if spec.tied_embeddings else MODEL_TENSORS[name]
        else:
            try:
                target = gguf_tensor_name(name, layout)
            except ShrinkError:
                continue  # a linear layer GGUF does not store (none in the supported families)
        if rows.get(target) == values.shape[0]:
            mapped[target] = values
    return mapped


def check_overrides(overrides: dict[str, str], rows: dict[str, int]) -> dict[str, str]:
    """Registry formats by exact tensor name, checked: the tensor exists, the format is a GGUF type,
    and its blocks divide the tensor's rows. Returns tensor name -> GGML type name."""
    checked = {}
    for name, wanted in overrides.items():
        fmt = get_format(wanted)
        if name not in rows:
            raise ShrinkError(f"The GGUF file has no 2-D tensor '{name}' to give {fmt.name}.")
        if fmt.gguf_type is None:
            raise ShrinkError(f"{fmt.name} is not a GGUF tensor type, so '{name}' cannot be stored in it.")
        if rows[name] % fmt.block:
            raise ShrinkError(f"'{name}' has rows of {rows[name]}, which {fmt.name}'s blocks of {fmt.block} do not "
                              "divide; llama.cpp would abort on it.")
        checked[name] = fmt.gguf_type
    return checked


def quantize_gguf(source: str | Path, output: str | Path, kind: str, *, overrides: dict[str, str] | None = None,
                  imatrix: dict[str, np.ndarray] | None = None, threads: int = 0,
                  rows: dict[str, int] | None = None) -> Path:
    """Write `output` from the F16/BF16/F32 GGUF `source` with llama.cpp's quantizer: file type `kind`
    (Q4_K_M, IQ4_XS, ...), `overrides` (tensor name -> registry format) on top, weighted by `imatrix`
    (tensor name -> mean squared input activation per column); `rows`: tensor_rows(source), when known.
    Atomic: a failure leaves no file."""
    import llama_cpp as lib
    from gguf import GGMLQuantizationType

    source, output = Path(source), Path(output)
    if not source.is_file():
        raise ShrinkError(f"No GGUF file at '{source}'.")
    spec = file_type(kind)
    if spec.needs_imatrix and not imatrix:
        raise ShrinkError(f"llama.cpp makes {spec.name} only with an importance matrix; give one.")
    ftype = spec.ftype
    if overrides:
        rows = rows if rows is not None else tensor_rows(source)
        if not get_format(spec.weights).quantized:
            # llama.cpp applies no override under an unquantized file type (checked: the file comes out
            # all F16), so ask for Q8_0 and keep every tensor not overridden in the file type's own type
            overrides = {**{name: spec.weights for name in rows}, **overrides}
            ftype = file_type("Q8_0").ftype
    types = check_overrides(overrides, rows) if overrides else {}

    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    keep = []  # ctypes buffers must outlive the call
    if types:
        table = (lib.llama_model_tensor_override * (len(types) + 1))()  # NULL-terminated
        for slot, (name, ggml) in zip(table, types.items()):
            pattern = f"^{re.escape(name)}$".encode()
            keep.append(pattern)
            slot.pattern, slot.type = pattern, GGMLQuantizationType[ggml].value
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(lib.llama_model_tensor_override))
        keep.append(table)
    if imatrix:
        entries = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
        for slot, (name, values) in zip(entries, imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode()
            keep += [array, encoded]
            slot.name = encoded
            slot.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = array.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lib.llama_model_imatrix_data))
        keep.append(entries)
    with atomic_path(output) as tmp:
        with quiet_stderr():  # llama.cpp logs every tensor on fd 2
            status = lib.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise ShrinkError(f"llama.cpp's quantizer could not make {spec.name} from '{source}' (status {status}).")
    return output
