"""The one registry of number formats: what each format stores, what it costs, how it is verified.

A *stored format* is a layout as one runtime writes it (GGUF Q4_0, ONNX MatMulNBits int4 with blocks
of 32, a PyTorch fake-quant grid): its exact bits per weight (scales and zero points with their own
dtypes included), the compute class a matmul on it runs in, the exact-numerics grid it is made on
(`shrink.numformats.grids`), the GGUF tensor type or ONNX operator it is written as, and the gate
`shrink verify` holds an artifact in it to. A *family* (`int4`, `nvfp4`, ...) is what a user asks
for; per runtime it names the stored format its weights take, and its vocabulary tensors.

The estimator, the planner, quantize, export, verify and bench read only this module, so what is
costed is what is stored. Adding a format is one record here plus its grid code in grids.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shrink.errors import ShrinkError

# Compute classes a hardware profile can list a peak for, and what a class falls back to when the
# hardware lacks it (a format without native support is costed as its upcast).
COMPUTE_CLASSES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4", "fp4")
UPCAST = {"fp4": "fp8", "fp8": "fp16", "int4": "int8", "int8": "fp16", "bf16": "fp16", "fp16": "fp32", "tf32": "fp32"}
RUNTIMES = ("gguf", "onnx", "torch")  # torch: fake-quant in PyTorch, no artifact


@dataclass(frozen=True)
class Gate:
    """What `shrink verify` asks of an artifact in this format against the model it came from.

    max_kl bounds the mean KL(reference || artifact) over every verified position: a mean over a few
    hundred positions moves by a few percent of itself between prompt sets, far inside these bounds.
    min_top1 is the agreement the format is expected to keep; the check fails only when the measured
    rate is significantly below it (the upper end of its 95% Wilson interval under it), because a
    top-1 rate over ~370 positions moves by about a percent from sampling alone.
    """

    min_top1: float
    max_kl: float
    reason: str


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits_per_element: float  # as stored: block scales, zero points and their dtypes included
    compute: str  # the class a matmul runs in when both operands use this format
    description: str
    runtime: str | None = None  # gguf / onnx / torch for a weight layout; None: a plain number type
    grid: str | None = None  # exact numerics in shrink.numformats.grids; None: a cast or not made by shrink
    gguf_type: str | None = None  # GGML tensor type it is written as
    onnx_op: str | None = None  # ONNX operator and attributes it is written as
    block: int = 1  # a row's length must be a multiple of this to take the format
    gate: Gate | None = None

    @property
    def bytes_per_element(self) -> float:
        return self.bits_per_element / 8

    @property
    def quantized(self) -> bool:
        return self.name not in ("fp32", "fp16", "bf16")


# --- verify gates, one per precision tier; each says why its numbers are what they are ---

_PARITY = Gate(0.99, 0.001, "Same numbers as the reference: only kernel rounding order differs, so the "
               "KL is float noise (~1e-5 measured for f32 ONNX and GGUF exports).")
_HALF = Gate(0.99, 0.01, "16-bit weights: relative weight error 2^-11 (f16); a KL of 0.01 nats is ten "
             "times the f16 exports measured here.")
_BF16 = Gate(0.98, 0.02, "bf16 keeps 8 mantissa bits (relative error 2^-8), eight times f16's; bound doubled.")
_EIGHT = Gate(0.97, 0.03, "8-bit blocks: per-weight error at most amax/254 of its block; Q8_0 of Gemma 3 270M "
              "measured KL 0.003 on the verify prompts (top-1 96.5-97.3%), a tenth of the bound.")
_FIVE = Gate(0.90, 0.10, "5-bit blocks: error twice 6-bit's; bound between the 8- and 4-bit tiers.")
_FOUR = Gate(0.80, 0.40, "4-bit blocks without recovery: plain Q4_0 of Gemma 3 270M measured KL 0.34 on the "
             "verify prompts; a QAD student exported on its own grid is judged against itself and sits near 0.")
_LOW = Gate(0.0, math.inf, "Ternary and binary weights without QAD lose the model (KL > 5 measured): reported, "
            "not gated; gate the run with --min-top1/--max-kl.")


def _fmt(name: str, bits: float, compute: str, description: str, **record) -> NumberFormat:
    return NumberFormat(name, bits, compute, description, **record)


def _gguf(name: str, ggml: str, block: int, type_bytes: int, compute: str, description: str,
          grid: str | None, gate: Gate) -> NumberFormat:
    return _fmt(name, type_bytes * 8 / block, compute, description, runtime="gguf", grid=grid, gguf_type=ggml,
                block=block, gate=gate)


def matmul_nbits_name(bits: int, block: int) -> str:
    """The registry name of ONNX Runtime's MatMulNBits with `bits` per weight and blocks of `block`."""
    return f"onnx_int{bits}_g{block}"


def _matmul_nbits(bits: int, block: int) -> NumberFormat:
    # MatMulNBits stores B as uint8 [N, blocks, block * bits / 8] and one float32 scale per block (the
    # graph's float type); a symmetric quantization writes no zero points.
    return _fmt(matmul_nbits_name(bits, block), bits + 32 / block, f"int{bits}",
                f"ONNX Runtime MatMulNBits: {bits}-bit symmetric, fp32 scale per {block}", runtime="onnx",
                grid=f"int{bits}_g{block}", onnx_op=f"MatMulNBits(bits={bits}, block_size={block})", block=block,
                gate=_EIGHT if bits == 8 else _FOUR)


_RECORDS: tuple[NumberFormat, ...] = (
    # plain number types (weights, activations, KV cache)
    _fmt("fp32", 32, "fp32", "IEEE float32", gguf_type="F32", gate=_PARITY),
    _fmt("fp16", 16, "fp16", "IEEE float16", grid="f16", gguf_type="F16", gate=_HALF),
    _fmt("bf16", 16, "bf16", "bfloat16", gguf_type="BF16", gate=_BF16),
    _fmt("fp8", 8, "fp8", "FP8 E4M3 (activations and KV cache; as weights one fp32 scale per tensor)",
         runtime="torch", grid="fp8_e4m3", gate=_EIGHT),
    _fmt("fp8_e5m2", 8, "fp8", "FP8 E5M2 with one fp32 scale per tensor", runtime="torch", grid="fp8_e5m2",
         gate=_EIGHT),
    _fmt("int8", 8, "int8", "INT8 (activations; as weights one fp32 scale per output row, ~0 bits per weight)",
         runtime="torch", grid="int8", gate=_EIGHT),
    # PyTorch fake-quant weight layouts (`shrink quantize --runtime torch`)
    _fmt("fp8_channel", 8, "fp8", "FP8 E4M3 with one fp32 scale per output row (~0 bits per weight)",
         runtime="torch", grid="fp8_e4m3_channel", gate=_EIGHT),
    _fmt("int4_g128", 4 + 16 / 128, "int4", "INT4 symmetric, one fp16 scale per 128", runtime="torch",
         grid="int4_g128", block=128, gate=_FOUR),
    _fmt("nvfp4", 4 + 8 / 16, "fp4", "NVFP4 (Model-Optimizer): E2M1 per 16 with an E4M3 scale, fp32 tensor scale",
         runtime="torch", grid="nvfp4", block=16, gate=_FOUR),
    _fmt("ternary", 2, "int8", "BitNet b1.58 ternary, 2-bit codes, one fp32 scale per tensor", runtime="torch",
         grid="ternary", gate=_LOW),
    _fmt("binary", 1, "int8", "FBI-LLM binary sign, one fp32 scale per output row", runtime="torch",
         grid="binary", gate=_LOW),
    # GGUF tensor types (llama.cpp), bytes per block as ggml's type traits give them
    _gguf("q8_0", "Q8_0", 32, 34, "int8", "GGUF Q8_0: 32 int8 + fp16 scale", "q8_0", _EIGHT),
    _gguf("q5_0", "Q5_0", 32, 22, "int8", "GGUF Q5_0: 32 5-bit + fp16 scale", "q5_0", _FIVE),
    _gguf("q5_1", "Q5_1", 32, 24, "int8", "GGUF Q5_1: 32 5-bit + fp16 scale and min", "q5_1", _FIVE),
    _gguf("q4_0", "Q4_0", 32, 18, "int4", "GGUF Q4_0: 32 4-bit + fp16 scale", "q4_0", _FOUR),
    _gguf("q4_1", "Q4_1", 32, 20, "int4", "GGUF Q4_1: 32 4-bit + fp16 scale and min", "q4_1", _FOUR),
    _gguf("q6_k", "Q6_K", 256, 210, "int8", "GGUF Q6_K: super-blocks of 256", "q6_k", _FIVE),
    _gguf("q5_k", "Q5_K", 256, 176, "int8", "GGUF Q5_K: super-blocks of 256", "q5_k", _FIVE),
    _gguf("q4_k", "Q4_K", 256, 144, "int4", "GGUF Q4_K: super-blocks of 256", "q4_k", _FOUR),
    _gguf("q3_k", "Q3_K", 256, 110, "int4", "GGUF Q3_K: super-blocks of 256", None, _LOW),
    _gguf("q2_k", "Q2_K", 256, 84, "int4", "GGUF Q2_K: super-blocks of 256", None, _LOW),
    # llama.cpp's importance-aware types (made only by its own quantizer, `llama_model_quantize`)
    _gguf("iq4_nl", "IQ4_NL", 32, 18, "int4", "GGUF IQ4_NL: 32 4-bit indices into a non-linear table + fp16 scale",
          None, _FOUR),
    _gguf("iq4_xs", "IQ4_XS", 256, 136, "int4", "GGUF IQ4_XS: IQ4_NL codes, 6-bit scales per 32, super-blocks of 256",
          None, _FOUR),
    _gguf("iq3_s", "IQ3_S", 256, 110, "int4", "GGUF IQ3_S: 3.4-bit lattice codes, super-blocks of 256", None, _LOW),
    _gguf("iq3_xxs", "IQ3_XXS", 256, 98, "int4", "GGUF IQ3_XXS: 3.1-bit lattice codes, super-blocks of 256", None,
          _LOW),
    _gguf("iq2_s", "IQ2_S", 256, 82, "int4", "GGUF IQ2_S: 2.6-bit lattice codes, super-blocks of 256", None, _LOW),
    _gguf("iq2_xs", "IQ2_XS", 256, 74, "int4", "GGUF IQ2_XS: 2.3-bit lattice codes, super-blocks of 256", None, _LOW),
    _gguf("iq2_xxs", "IQ2_XXS", 256, 66, "int4", "GGUF IQ2_XXS: 2.1-bit lattice codes, super-blocks of 256", None,
          _LOW),
    _gguf("iq1_m", "IQ1_M", 256, 56, "int4", "GGUF IQ1_M: 1.75-bit lattice codes, super-blocks of 256", None, _LOW),
    _gguf("iq1_s", "IQ1_S", 256, 50, "int4", "GGUF IQ1_S: 1.56-bit lattice codes, super-blocks of 256", None, _LOW),
    _gguf("mxfp4", "MXFP4", 32, 17, "fp4", "MXFP4: E2M1 per 32 with an E8M0 scale (GGUF, and PyTorch alike)",
          "mxfp4", _FOUR),
    _gguf("nvfp4_gguf", "NVFP4", 64, 36, "fp4", "GGUF NVFP4: E2M1 per 16 with a UE4M3 scale, no tensor scale",
          "nvfp4_gguf", _FOUR),
    _gguf("tq2_0", "TQ2_0", 256, 66, "int8", "GGUF TQ2_0 ternary: 2-bit codes + fp16 scale per 256",
          "ternary_b256", _LOW),
    _gguf("tq1_0", "TQ1_0", 256, 54, "int8", "GGUF TQ1_0 ternary: base-3 packed, fp16 scale per 256",
          "ternary_b256", _LOW),
    _gguf("q1_0", "Q1_0", 128, 18, "int8", "GGUF Q1_0 binary: sign bits + fp16 scale per 128", "binary_b128",
          _LOW),
    # ONNX Runtime MatMulNBits, per block size `shrink export --block-size` accepts
    *(_matmul_nbits(bits, block) for bits in (8, 4) for block in (16, 32, 64, 128, 256)),
    # FP8 E4M3 weights in ONNX, as TensorRT takes them (per-channel FP8 weights): a FLOAT8E4M3FN initializer
    # [K, N] and one fp32 scale per output row, DequantizeLinear(axis=1) then MatMul (opset 19 or later;
    # ONNX Runtime 1.32 runs per-axis float8 DequantizeLinear on the CPU, checked). The grid is the fp8
    # family's PyTorch grid, so a QAD student's weights are stored as trained. bits_per_element counts the
    # codes: the row scales add 32/K bits per weight (0.05 for 640-wide rows), a figure no single
    # per-element number can give for every row length.
    _fmt("onnx_fp8", 8, "fp8", "ONNX FP8 E4M3 initializer + fp32 scale per output row (DequantizeLinear, MatMul)",
         runtime="onnx", grid="fp8_e4m3_channel", onnx_op="DequantizeLinear(float8e4m3fn, axis=1) + MatMul",
         gate=_EIGHT),
)
FORMATS: dict[str, NumberFormat] = {f.name: f for f in _RECORDS}
ALIASES = {"float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "bfloat16": "bf16",
           "fp8_e4m3": "fp8"}


def mixture_name(shares: dict[str, float]) -> str:
    """The name of a mixture of stored formats by share of elements (a GGUF operator whose layers use
    several types, as Q4_K_M files do): 'q4_k*0.6667+q6_k*0.3333'; one format alone is its own name."""
    total = sum(shares.values())
    parts = {name: share / total for name, share in sorted(shares.items()) if share > 0}
    if len(parts) == 1:
        return next(iter(parts))
    return "+".join(f"{name}*{share:.6f}" for name, share in parts.items())


def mixture_parts(key: str) -> list[tuple[NumberFormat, float]]:
    """(format, share of elements) of each part of a mixture name; a plain format name is one part."""
    if "+" not in key:
        return [(get_format(key), 1.0)]
    parts = []
    for item in key.split("+"):
        name, _, share = item.partition("*")
        try:
            parts.append((get_format(name), float(share)))
        except ValueError:
            raise ShrinkError(f"'{key}' is not a format mixture (name*share+name*share).") from None
    return parts


def _mixture(key: str) -> NumberFormat:
    """A mixture's record: bits weighted by element share, the widest part's compute class."""
    parts = mixture_parts(key)
    order = ["fp4", "int4", "fp8", "int8", "bf16", "fp16", "tf32", "fp32"]
    compute = max((f.compute for f, _ in parts), key=order.index)
    bits = sum(f.bits_per_element * share for f, share in parts)
    return NumberFormat(key, bits, compute, "mixture of " + ", ".join(f"{f.name} {share:.1%}" for f, share in parts))


def get_format(name: str) -> NumberFormat:
    key = ALIASES.get(name.lower(), name.lower())
    if "+" in key:
        return _mixture(key)
    if key not in FORMATS:
        hint = f" ('{key}' is a family: {family_hint(key)})" if key in FAMILIES else ""
        raise ShrinkError(f"Unknown number format '{name}'{hint}; known formats: {', '.join(FORMATS)}.")
    return FORMATS[key]


def format_by_gguf_type(ggml: str) -> NumberFormat:
    for f in FORMATS.values():
        if f.gguf_type == ggml:
            return f
    raise ShrinkError(f"GGUF tensor type {ggml} is not in shrink's format registry, so it cannot be costed.")


def matmul_compute_class(weights: NumberFormat, activations: NumberFormat) -> str:
    """The class a weight x activation matmul runs in: the wider of the two operands.

    Weight-only quantization (int4 weights, bf16 activations) dequantizes into the activation
    format, so it computes at bf16 speed and saves only memory traffic.
    """
    order = ["fp4", "int4", "fp8", "int8", "bf16", "fp16", "tf32", "fp32"]
    return max(weights.compute, activations.compute, key=order.index)


# --- families: what a user asks for, stored per runtime ---

@dataclass(frozen=True)
class Family:
    name: str
    stored: dict[str, str]  # runtime -> stored format of the block weights
    description: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("int8", {"gguf": "q8_0", "onnx": "onnx_int8_g32", "torch": "int8"}, "8-bit integer weights"),
    Family("int4", {"gguf": "q4_0", "onnx": "onnx_int4_g32", "torch": "int4_g128"}, "4-bit integer weights"),
    Family("nvfp4", {"gguf": "nvfp4_gguf", "torch": "nvfp4"}, "NVIDIA FP4: E2M1 with an FP8 scale per 16"),
    Family("mxfp4", {"gguf": "mxfp4", "torch": "mxfp4"}, "OCP MXFP4: E2M1 with a power-of-two scale per 32"),
    Family("fp8", {"onnx": "onnx_fp8", "torch": "fp8_channel"}, "FP8 E4M3 weights"),
    Family("ternary", {"gguf": "tq2_0", "torch": "ternary"}, "BitNet b1.58 ternary weights"),
    Family("binary", {"gguf": "q1_0", "torch": "binary"}, "binary (sign) weights"),
)}
UNQUANTIZED = {"gguf": "fp16", "onnx": "fp32", "torch": "bf16"}  # what each runtime stores by default
# A GGUF keeps its token embedding and output on at least 8 bits (llama.cpp's own low-bit mixes keep
# them at 6-8 bits): at 4 bits the vocabulary projection dominates the loss for a small share of time.
GGUF_VOCABULARY = "q8_0"
# Tried in turn when a weight's rows do not divide into a stored format's blocks (Gemma 3's 640-wide
# rows against TQ2_0's 256-element blocks); every fallback is listed, none is silent. The K-quants
# fall back as llama.cpp's own quantizer does for incompatible rows (llama-quant.cpp): Q4_K -> Q5_0,
# Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> IQ4_NL (which shrink cannot make: Q4_0 instead).
FALLBACK = {"tq2_0": "q4_0", "tq1_0": "q4_0", "q1_0": "q4_0", "nvfp4_gguf": "q8_0", "mxfp4": "q8_0",
            "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q3_k": "q4_0", "q2_k": "q4_0",
            "q4_0": "q8_0", "q4_1": "q8_0", "q5_0": "q8_0", "q5_1": "q8_0", "q8_0": "fp16",
            "int4_g128": "int8", "onnx_int4_g32": "onnx_int8_g32"}


def family_hint(name: str) -> str:
    stored = FAMILIES[name].stored
    return ", ".join(f"{stored[r]} in {r}" for r in stored)


def stored_format(family: str | None, runtime: str) -> NumberFormat:
    """The stored format a family's block weights take in `runtime` (None: the runtime's default float)."""
    if runtime not in RUNTIMES:
        raise ShrinkError(f"Unknown runtime '{runtime}'; choose one of: {', '.join(RUNTIMES)}.")
    if family is None:
        return FORMATS[UNQUANTIZED[runtime]]
    if family not in FAMILIES:
        raise ShrinkError(f"Unknown format '{family}'; choose one of: {', '.join(FAMILIES)}.")
    stored = FAMILIES[family].stored
    if runtime not in stored:
        exports = ", ".join(r for r in stored if r != "torch") or "none (PyTorch only)"
        raise ShrinkError(f"{family} has no {runtime} export that a runtime here executes; {family} exports to: {exports}.")
    return FORMATS[stored[runtime]]


def vocabulary_format(weights: NumberFormat, runtime: str) -> NumberFormat:
    """The format a runtime stores the token embedding and output projection in, beside `weights`."""
    if runtime == "gguf":
        return weights if weights.bits_per_element >= 8 and weights.gguf_type else FORMATS[GGUF_VOCABULARY]
    if runtime == "onnx":  # quantized: the blocks' own layout, read by GatherBlockQuantized (export/onnx_weights.py)
        return weights if weights.runtime == "onnx" else FORMATS["fp32"]
    return weights


def gguf_activations(weights: NumberFormat) -> str:
    """What llama.cpp multiplies `weights` with: quantized weights take activations quantized to 8 bits
    (its vec_dot types Q8_0/Q8_K), F16 and BF16 weights activations converted to their own type, F32 F32."""
    return "int8" if weights.quantized else weights.name


def runtime_families(runtime: str) -> list[str | None]:
    """Every family `runtime` exports (None: unquantized), in registry order."""
    return [None, *(name for name, f in FAMILIES.items() if runtime in f.stored)]


# the names hardware profiles give runtimes -> the runtime key of the formats they load
PROFILE_RUNTIMES = {"llama.cpp": "gguf", "onnxruntime": "onnx"}


def runtime_for(profile_runtimes: list[str] | tuple[str, ...]) -> str:
    """The format runtime of a target: its first runtime shrink exports to, else PyTorch's grids."""
    return next((PROFILE_RUNTIMES[r] for r in profile_runtimes if r in PROFILE_RUNTIMES), "torch")


def resolve_weights(name: str, runtime: str) -> NumberFormat:
    """A name given for weights: a stored format as it is, a family as `runtime` stores it."""
    key = name.lower()
    return stored_format(key, runtime) if key in FAMILIES else get_format(key)


def fallback_chain(name: str) -> list[str]:
    chain = [name]
    while chain[-1] in FALLBACK:
        chain.append(FALLBACK[chain[-1]])
    return chain


def fitting_format(wanted: NumberFormat, rows: set[int] | list[int]) -> NumberFormat | None:
    """The first format of `wanted`'s fallback chain whose blocks divide every row length (None: none does)."""
    return next((FORMATS[n] for n in fallback_chain(wanted.name) if all(r % FORMATS[n].block == 0 for r in rows)),
                None)


def gate_for(name: str) -> Gate:
    """The verify gate of a stored format; a format without one is an error, never a silent default."""
    fmt = get_format(name)
    if fmt.gate is None:
        raise ShrinkError(f"Format {fmt.name} has no verify gate in the registry; give --min-top1 and --max-kl.")
    return fmt.gate


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate (successes of trials)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
