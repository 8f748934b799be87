"""`shrink profiles calibrate`: measure a runtime's own kernels on this machine, per stored format.

Synthetic Llama models (random weights: timing does not depend on their values) are written in each
format and timed in the runtime as `shrink bench` times an artifact:
- a narrow model (every matrix a few KB, so bytes and FLOPs cost next to nothing) at two depths gives
  the fixed costs per call and per layer of a decode step and of a prefill;
- a wide model, its weights hundreds of MB as a deployed model's are, gives per format the rate the
  runtime streams weights at in a decode step and computes at over a prompt, once the fixed costs and
  the roofline's own figures for everything but the weight matrices are taken off;
- a model of short rows under a large vocabulary (its head, as a small real model's, most of its bytes)
  separates a cost per output row from the cost per byte.
The rates are solved through the roofline itself (hardware/roofline.py), so an estimate made with
them reproduces the measurements it came from. Each timing repeats until two runs agree
within 5% (their spread is recorded); other work on the machine during a measurement is detected and
flags the result, which is then not cached.
"""

from __future__ import annotations

import numpy as np

import copy
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from shrink.archspec import ArchSpec
from shrink.compress.quant.plan import make_plan
from shrink.compress.quant.student import fake_quantize, materialize
from shrink.errors import ShrinkError
from shrink.families import spec_from_model
from shrink.hardware.calibration import KernelRate, RuntimeCalibration
from shrink.hardware.host import BUSY_SHARE, kernels_cache_path, kernels_cache_text, others_busy_share, package_version
from shrink.hardware.ops import pass_ops, prefill_ops
from shrink.hardware.profiles import Profile, get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import LoadedModel
from shrink.numformats.filetypes import FILE_TYPES
from shrink.storage import atomic_write_text

# Formats a llama.cpp artifact of shrink stores: every one the planner's GGUF search can choose (the
# weights of numformats' COMMON file types and gguf_search's vocabulary types; an artifact in a format
# not measured here is costed at the profile's generic peaks, far too fast: a plan storing its vocabulary
# in q4_1 was estimated 24% under its measurement), shrink's own grids, the 640-wide rows' fallbacks.
LLAMA_CPP_FORMATS = ("fp32", "fp16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl",
                     "iq4_xs", "q3_k", "iq3_s", "iq3_xxs", "q2_k", "mxfp4", "nvfp4_gguf", "tq2_0")
ONNX_FORMATS = ("f32", "int8", "int4")  # as `shrink export -f onnx --quant` names them
ONNX_STORED = ("fp32", "onnx_int8_g32", "onnx_int4_g32")  # the same, as the registry (and the rates) name them
UNQUANTIZED = ("fp32", "fp16", "bf16")  # cast by shrink's exporter
SHRINK_GRIDS = {"nvfp4_gguf": "nvfp4"}  # packed by shrink (a family's grid); the rest by llama.cpp's quantizer

NARROW = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}
WIDE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4,
        "head_dim": 128}
SHORT_ROWS = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 128}
NARROW_DEPTHS = (2, 26)
WIDE_DEPTH = 8  # 361M parameters: 722 MB in fp16, 203 MB in q4_0
SHORT_DEPTH = 12
# The short-row model carries a vocabulary the size of Gemma 3's, tied (180M parameters, 191 MB in q8_0): its
# 512-long head rows are most of its weights and rows, as a small real model's head is. Without it (46M
# parameters, 49 MB; the 2-core machine reports a 480 MiB L3) it streamed faster per byte than the wide
# model, every format's cost per row fitted as zero, and Gemma's q8_0 files decoded 12-15% slower than
# estimated (two thirds of the rows its decode step reads are the head's 262,144).
SHORT_VOCAB = 262144
VOCAB = 512
PROMPT, GEN = 64, 16
AGREE = 0.05  # two timing runs within this of each other end a measurement
FIT_TOLERANCE = 0.01  # the fitted kernels must give the long-row model's measured times within this
MAX_RUNS = 6


@dataclass
class Timed:
    decode_s: float  # median seconds per decoded token
    prefill_s: float  # median seconds per prefill of PROMPT tokens
    spread: float  # relative spread of the agreeing runs' medians


def synthetic_model(shape: dict, layers: int, vocab: int = VOCAB, tied: bool = False):
    """A random Llama of `shape`, depth and vocabulary, in the shrink model wrapper the exporters take."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=512,
                         tie_word_embeddings=tied, **shape)
    model = LlamaForCausalLM(config).eval()
    name = f"synthetic-{shape['hidden_size']}x{layers}" + ("" if vocab == VOCAB else f"x{vocab}") + ("-tied" if tied else "")
    return LoadedModel(model, None, spec_from_model(model), name)


def write_gguf(loaded, fmt: str, folder: Path, f16: Path | None) -> Path:
    """`loaded` as a GGUF whose every matrix is stored in `fmt` (no fallbacks: the widths divide every block)."""
    from shrink.export.backend import backend
    from shrink.export.llamacpp_quantize import quantize_gguf, tensor_rows

    path = folder / f"{loaded.source}-{fmt}.gguf"
    if fmt in UNQUANTIZED:
        backend("gguf").export(loaded, path, fmt)
        return path
    if fmt in SHRINK_GRIDS:
        return _grid_gguf(loaded, SHRINK_GRIDS[fmt], path)
    kind = next((t.name for t in FILE_TYPES.values() if t.weights == fmt and not t.needs_imatrix), "Q8_0")
    rows = tensor_rows(f16)
    # llama.cpp makes some types (IQ3_XXS) only with an importance matrix; a flat one times the same kernels
    flat = ({name: np.ones(length, dtype=np.float32) for name, length in rows.items()}
            if any(t.weights == fmt and t.needs_imatrix for t in FILE_TYPES.values()) else None)
    return quantize_gguf(f16, path, kind, overrides={name: fmt for name in rows}, rows=rows, imatrix=flat)


def _grid_gguf(loaded, family: str, path: Path) -> Path:
    """A copy of `loaded` put on `family`'s GGUF grid (PTQ, max calibration) and exported as packed."""
    from shrink.export.backend import backend

    student = copy.deepcopy(loaded)
    plan = make_plan(student.model, family, "gguf")
    fake_quantize(student.model, plan)
    materialize(student.model, plan)
    backend("gguf").export(student, path, None)
    return path


def time_artifact(path: Path, threads: int, vocab: int) -> Timed:
    """Prefill and decode of `path`, repeated until two runs' medians agree within AGREE."""
    from shrink.export.backend import backend_for
    from shrink.export.bench import token_ids

    prompt, gen = token_ids(PROMPT, vocab), token_ids(GEN, vocab)
    runtime = backend_for(path)
    runs: list[tuple[float, float]] = []
    for _ in range(MAX_RUNS):
        prefill, decode = runtime.time(path, threads, prompt, gen, 2)
        runs.append((statistics.median(decode), statistics.median(prefill)))
        agreeing = _agreeing(runs)
        if agreeing:
            break
    else:  # no two runs agreed: every run counts, and the spread says how far apart they were
        agreeing = runs
    # The typical run, not the fastest: bench and the benchmarks report medians, so fitting to the fastest
    # made every estimate optimistic by the noise (llama.cpp's 3-12% low in session 11's comparison).
    decode_s = statistics.median(d for d, _ in agreeing)
    prefill_s = statistics.median(p for _, p in agreeing)
    spread = max(_spread([d for d, _ in agreeing]), _spread([p for _, p in agreeing]))
    return Timed(decode_s, prefill_s, spread)


def _agreeing(runs: list[tuple[float, float]]) -> list[tuple[float, float]] | None:
    """Two runs whose decode and prefill medians both agree within AGREE, if any."""
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if _spread([a[0], b[0]]) <= AGREE and _spread([a[1], b[1]]) <= AGREE:
                return [a, b]
    return None


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values)


def stored_spec(path: Path, spec: ArchSpec) -> ArchSpec:
    """`spec` in the formats the file really stores (read from its tensor types, as bench costs it)."""
    from shrink.export.backend import backend_for

    costed, stored = backend_for(path).stored_formats(path, spec)
    return costed.with_formats(**{k: v for k, v in vars(stored).items() if k != "ssm_state"})


def write_onnx(loaded, quant: str, folder: Path, f16: Path | None = None) -> Path:
    """`loaded` as an ONNX directory with `quant` weights, its graph returning the last position's logits
    (what the roofline costs; a prompt's other positions need no vocabulary projection)."""
    from shrink.export.backend import backend

    path = folder / f"{loaded.source}-onnx-{quant}"
    backend("onnx").export(loaded, path, quant, logits="last")
    return path


@dataclass(frozen=True)
class Calibratable:
    """A runtime shrink can calibrate: the package that is it, the formats to measure (as export names
    them), the unquantized one the fixed costs are measured in, and how an artifact is written."""
    name: str
    package: str
    formats: tuple[str, ...]
    plain: str
    write: Callable[..., Path]
    stored: tuple[str, ...]  # `formats` as the registry names them: the keys a complete calibration holds

    def complete(self, calibration: RuntimeCalibration | None) -> bool:
        """Whether `calibration` measured every format this shrink measures (a cache written by an
        earlier shrink with fewer formats is not)."""
        return calibration is not None and set(self.stored) <= set(calibration.formats)


RUNTIMES = {
    "llama.cpp": Calibratable("llama.cpp", "llama-cpp-python", LLAMA_CPP_FORMATS, "fp16", write_gguf, LLAMA_CPP_FORMATS),
    "onnxruntime": Calibratable("onnxruntime", "onnxruntime", ONNX_FORMATS, "f32", write_onnx, ONNX_STORED),
}


def calibrate_runtime(profile: Profile, runtime: str = "llama.cpp", formats: tuple[str, ...] | None = None,
                      threads: int | None = None, status: Callable[[str], None] = lambda message: None) -> RuntimeCalibration:
    """`runtime`'s kernels on this machine (`profile`: its generic bandwidth and compute, for what the
    kernels do not cover), keyed by the format each artifact stores its matrices in."""
    if runtime not in RUNTIMES:
        raise ShrinkError(f"shrink cannot calibrate '{runtime}'; it calibrates {', '.join(RUNTIMES)}.")
    kind = RUNTIMES[runtime]
    formats = formats or kind.formats
    unknown = [f for f in formats if f not in kind.formats]
    if unknown:
        raise ShrinkError(f"Cannot calibrate {runtime} for '{unknown[0]}'; it calibrates {', '.join(kind.formats)}.")
    formats = tuple(f for f in kind.formats if f in formats)  # a vocabulary's q8_0 measured before nvfp4 keeps it
    cached = profile.calibration(runtime)
    threads = threads or os.cpu_count() or 1
    others = [others_busy_share()]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="shrink-calibrate-") as tmp:
        folder = Path(tmp)
        narrow = {}
        for layers in NARROW_DEPTHS:
            loaded = synthetic_model(NARROW, layers)
            status(f"{runtime} fixed costs: narrow model, {layers} layers")
            path = kind.write(loaded, kind.plain, folder, None)
            narrow[layers] = (stored_spec(path, loaded.spec), time_artifact(path, threads, VOCAB))  # as the file stores it
        fixed = _fixed_costs(runtime, narrow, profile, threads)
        models = [synthetic_model(WIDE, WIDE_DEPTH), synthetic_model(SHORT_ROWS, SHORT_DEPTH, SHORT_VOCAB, tied=True)]
        plains = [kind.write(loaded, kind.plain, folder, None) for loaded in models]
        rates, spreads = {}, [t.spread for _, t in narrow.values()]
        for i, fmt in enumerate(formats, 1):
            status(f"{runtime} {fmt} kernels ({i}/{len(formats)})")
            measured = []
            for loaded, plain in zip(models, plains):
                path = plain if fmt == kind.plain else kind.write(loaded, fmt, folder, plain)
                timed = time_artifact(path, threads, VOCAB)
                measured.append((stored_spec(path, loaded.spec), timed))
                spreads.append(timed.spread)
                if path != plain:
                    _remove(path)
            stored = measured[0][0].formats.weights
            rates[stored] = _rate(measured, profile, stored, fixed, known={**(cached.formats if cached else {}), **rates})
        others.append(others_busy_share())
    busy = max(others) > BUSY_SHARE
    source = (f"measured {started} by shrink profiles calibrate: {kind.package} {package_version(kind.package) or 'not installed'}, "
              f"{threads} threads; fixed costs from a {NARROW['hidden_size']}-wide model at {NARROW_DEPTHS[0]} and "
              f"{NARROW_DEPTHS[1]} layers, rates per format from a {WIDE['hidden_size']}-wide {WIDE_DEPTH}-layer and a "
              f"{SHORT_ROWS['hidden_size']}-wide {SHORT_DEPTH}-layer model with a tied {SHORT_VOCAB}-word vocabulary; "
              f"prompt {PROMPT}, {GEN} decoded tokens, each timing repeated until two runs agree within {AGREE:.0%}, their median kept")
    if busy:
        source += f"; BUSY: other processes used up to {max(others):.0%} of the CPUs"
    return flag_unstable(replace(fixed, formats=rates, source=source, spread=max(spreads), busy=busy))


UNSTABLE_SPREAD = 0.15  # repeated runs further apart than this: the machine's speed moved during the calibration


def flag_unstable(calibration: RuntimeCalibration) -> RuntimeCalibration:
    """A calibration whose repeated runs never agreed is kept (a machine that is never quiet has no better
    one) but says so where its figures are shown: its source, cached with it, and the command's output."""
    if calibration.spread <= UNSTABLE_SPREAD:
        return calibration
    return replace(calibration, source=f"{calibration.source}; UNSTABLE: repeated runs were up to {calibration.spread:.0%} "
                   "apart (the machine's speed moved while it was measured: a neighbour on the same host, or a "
                   "busy moment), so estimates made with it can be off by as much; calibrate again when it is quiet")


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _fixed_costs(runtime: str, narrow: dict[int, tuple[ArchSpec, Timed]], profile: Profile,
                 threads: int) -> RuntimeCalibration:
    """Per-call and per-layer costs from the narrow model's two depths, the roofline's own time for its
    (tiny) work taken off."""
    none = RuntimeCalibration(runtime, {}, 0.0, 0.0, 0.0, 0.0, threads, "fixed costs")
    (short, (spec_s, t_s)), (deep, (spec_d, t_d)) = sorted(narrow.items())
    left = {}
    for layers, spec, timed in ((short, spec_s, t_s), (deep, spec_d, t_d)):
        est = estimate(spec, replace(profile, calibrations={}), Workload(1, PROMPT, GEN))
        left[layers] = (timed.decode_s - est.tpot_s, timed.prefill_s - est.ttft_s)
    per_layer = [max(0.0, (left[deep][i] - left[short][i]) / (deep - short)) for i in (0, 1)]
    per_call = [max(0.0, left[short][i] - short * per_layer[i]) for i in (0, 1)]
    return replace(none, decode_token_s=per_call[0], decode_layer_s=per_layer[0], prefill_call_s=per_call[1],
                   prefill_layer_s=per_layer[1])


def _rate(measured: list[tuple[ArchSpec, Timed]], profile: Profile, fmt: str, fixed: RuntimeCalibration,
          known: dict[str, KernelRate] | None = None) -> KernelRate:
    """The rates (and costs per output element) at which the roofline, costing each spec with `fmt`'s
    kernels and the fixed costs, gives its measured decode and prefill times. The long-row and the
    short-row model give two equations per phase (time = bytes / rate + outputs x cost per output;
    FLOPs in place of bytes for a prefill); the costs are then corrected until the roofline gives both
    models' measured times (where outputs would cost negative time, they cost nothing and the long-row
    model's times are met). Matrices an artifact keeps in another format (a
    vocabulary in q8_0) are costed with `known`, that format's kernels measured before."""
    def times(spec: ArchSpec, rate: KernelRate) -> tuple[float, float]:
        kernels = replace(fixed, formats={**(known or {}), fmt: rate})
        est = estimate(spec, replace(profile, calibrations={fixed.runtime: kernels}), Workload(1, PROMPT, GEN),
                       fixed.runtime)
        return est.tpot_s, est.ttft_s

    instant = KernelRate(_FASTEST, _FASTEST)
    rows = []
    for spec, timed in measured:
        matmuls = [op for op in pass_ops(spec, 1, 1, PROMPT) if op.kind == "matmul"]
        others = {op.weight_format for op in matmuls} - {fmt, *(known or {})}
        if others:
            raise ShrinkError(f"The {fmt} artifacts keep matrices in {', '.join(sorted(others))}, whose kernels are not "
                              f"measured: calibrate {', '.join(sorted(others))} with it (--formats).")
        rest = times(spec, instant)
        if timed.decode_s <= rest[0] or timed.prefill_s <= rest[1]:
            raise ShrinkError(f"The {fmt} timings ({timed.decode_s * 1e3:.2f} ms/token, prefill {timed.prefill_s * 1e3:.1f} ms) "
                              "are shorter than the fixed costs measured before them: the machine's speed changed "
                              "during calibration; run it again on a quiet machine.")
        decode = [op for op in matmuls if op.weight_format == fmt]
        prefill = [op for op in prefill_ops(spec, 1, PROMPT) if op.kind == "matmul" and op.weight_format == fmt]
        rows.append((decode, prefill, timed, rest))
    decode_rows = [(sum(op.weights for op in decode), sum(op.rows for op in decode), timed.decode_s - rest[0])
                   for decode, _, timed, rest in rows]
    per_byte, per_output_d = _two_by_two(decode_rows)
    # A matmul a prefill runs for one token (batch 1: the vocabulary projection, last position only)
    # streams its weights as a decode step does (the roofline costs it so): not FLOPs and outputs of the
    # prompt's matmuls.
    prefill_rows = []
    for _, prefill, timed, rest in rows:
        streamed = [op for op in prefill if op.outputs <= op.rows]
        computed = [op for op in prefill if op.outputs > op.rows]
        streaming = sum(op.weights * per_byte + op.rows * per_output_d for op in streamed)
        prefill_rows.append((sum(op.flops for op in computed), sum(op.outputs for op in computed),
                             timed.prefill_s - rest[1] - streaming))
    per_flop, per_output_p = _two_by_two(prefill_rows)
    costs = [[per_byte, per_output_d], [per_flop, per_output_p]]
    # The sums above leave out what the roofline does with them (each op the slower of its compute and its
    # memory time): correct both phases until the roofline itself gives both models' measured times.
    def missing(phase: int) -> list[float]:
        return [(timed.decode_s, timed.prefill_s)[phase] - times(spec, _kernel_rate(costs))[phase] for spec, timed in measured]

    for _ in range(8):
        for phase, system in ((0, decode_rows), (1, prefill_rows)):
            costs[phase] = _corrected(costs[phase], [row[:2] for row in system], missing(phase))
    # the long-row model's times are always met; the short-row one's too unless its outputs would cost
    # negative time (they then cost nothing)
    worst = max(abs(missing(phase)[0]) / (timed.decode_s, timed.prefill_s)[phase] for phase in (0, 1))
    if min(costs[0][0], costs[1][0]) <= 0 or worst > FIT_TOLERANCE:
        raise ShrinkError(f"The {fmt} timings fit no rate (the roofline misses the long-row model by {worst:.1%}): the "
                          "machine's speed changed during calibration; run it again on a quiet machine.")
    return _kernel_rate(costs)


def _kernel_rate(costs: list[list[float]]) -> KernelRate:
    """[[seconds per byte, per decode row], [seconds per FLOP, per prefill output]] as a KernelRate."""
    (per_byte, per_row), (per_flop, per_output) = costs
    return KernelRate(1e-9 / per_byte if per_byte > 0 else _FASTEST, 1e-12 / per_flop if per_flop > 0 else _FASTEST,
                      per_row * 1e9, per_output * 1e9)


def _corrected(costs: list[float], system: list[tuple[float, float]], missing: list[float]) -> list[float]:
    """(cost per unit of work, per output) moved by what each model's estimate still misses, solved through
    the same two equations; where that would make outputs cost negative time, they cost nothing and the
    long-row model alone sets the cost per unit."""
    (w1, o1), (w2, o2) = system
    if w1 <= 0:
        raise ShrinkError("The long-row calibration model stores no matrix in the format measured.")
    determinant = w1 * o2 - w2 * o1
    if determinant:
        step = ((missing[0] * o2 - missing[1] * o1) / determinant, (w1 * missing[1] - w2 * missing[0]) / determinant)
        if costs[0] + step[0] > 0 and costs[1] + step[1] >= 0:
            return [costs[0] + step[0], costs[1] + step[1]]
    # the outputs set to cost nothing: what they were charged in the long-row model goes to its work
    return [costs[0] + (missing[0] + costs[1] * o1) / w1, 0.0]


def _two_by_two(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(seconds per unit of work, seconds per output) solving work x a + outputs x b = seconds for two
    models; where the solution is not physical (either negative), the outputs cost nothing and the
    long-row model alone sets a (a correction from nothing)."""
    per_unit, per_output = _corrected([0.0, 0.0], [row[:2] for row in rows], [row[2] for row in rows])
    return per_unit, per_output


_FASTEST = 1e9  # a rate (GB/s, TFLOPS) at which the matrices take no time worth counting


def calibrate_runtimes(profile: Profile, runtimes: tuple[str, ...] = tuple(RUNTIMES), threads: int | None = None,
                       formats: tuple[str, ...] | None = None,
                       status: Callable[[str], None] = lambda message: None) -> dict[str, RuntimeCalibration]:
    """Each of `runtimes` calibrated on this machine (`formats`: a subset, for one runtime)."""
    return {runtime: calibrate_runtime(profile, runtime, formats, threads, status) for runtime in runtimes}


def cache_host_kernels(calibrations: dict[str, RuntimeCalibration]) -> bool:
    """Cache this machine's calibration for `host` (what `--target host` then uses); a busy one is not
    cached. Returns whether it was."""
    if any(c.busy for c in calibrations.values()):
        return False
    atomic_write_text(kernels_cache_path(), kernels_cache_text({name: c.to_table() for name, c in calibrations.items()}))
    return True


def calibrated_host(status: Callable[[str], None] = lambda message: None) -> Profile:
    """The `host` profile with its runtimes' kernels measured here: from the cache, else calibrated now
    (minutes, once per machine and software versions; a busy measurement is used for this run only)."""
    profile = get_profile("host")
    missing = tuple(runtime for runtime, kind in RUNTIMES.items() if not kind.complete(profile.calibration(runtime)))
    if missing:
        status(f"Calibrating {' and '.join(missing)} on this machine (once; `shrink profiles calibrate` redoes it)")
        calibrations = {**profile.calibrations, **calibrate_runtimes(profile, missing, status=status)}
        if not cache_host_kernels(calibrations):
            status("Other work ran during the calibration: its figures are used for this run and not cached")
        profile = replace(profile, calibrations=calibrations)
    return profile
