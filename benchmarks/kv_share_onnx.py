"""Cross-layer KV sharing in ONNX Runtime: the KV bytes the artifact really holds, estimated beside measured.

Exports the embedded Gemma 3 270M twice to ONNX (f32 by default): as it is, and with pairs of same-kind
attention layers sharing one cache (compress/kvshare.py; by default as many pairs as fit, chosen without
text; --similar chooses them by measured key/value similarity on the teacher-written corpus instead).
Each graph is run in ONNX Runtime on a prompt of --prompt-len token ids: the KV bytes held are the total
size of the present_* outputs after the prefill (measured), beside the roofline's KV cache for the same
prompt (hardware/roofline.estimate, `host` profile, estimated); then prefill and per-token decode times
(measured, medians) beside the roofline's TTFT and time per token. No weights are trained: this measures
memory and time, not quality (shrink kv-share reports the KL).

Gemma 3's sliding layers keep only their last 512 positions in transformers and in the roofline; the
exported graph's cache keeps every position in every layer (the wrapper's DynamicCache), so ONNX Runtime
holds more than the estimate for both models. Sharing removes whole caches, so the ratio is what to compare.

    python benchmarks/kv_share_onnx.py [--prompt-len 2048] [--gen-len 16] [--repeats 1] [--threads 2] [--similar]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.compress.kvshare import choose_pairs, every_pair, key_value_similarity, share_kv
from shrink.export.backend import backend
from shrink.export.bench import token_ids
from shrink.export.onnx import export_onnx
from shrink.export.onnx_runtime import OnnxRunner
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load


def groups_for(loaded, similar: bool) -> list[list[int]]:
    """Every disjoint pair of consecutive same-kind layers (all alike when no text is read), or the pairs
    the measured key/value similarity on calibration text prefers."""
    if not similar:
        return every_pair(loaded.spec)
    from shrink.compress.data import prepare

    sequences = prepare(loaded, seq_len=128).calibration
    return choose_pairs(loaded.spec, key_value_similarity(loaded, sequences[:16]))


def measure(directory: Path, spec, profile, prompt: list[int], gen: list[int], threads: int, repeats: int) -> dict:
    kind = backend("onnx")
    stored, formats = kind.stored_formats(directory, spec)
    est = estimate(replace(stored, formats=formats), profile, Workload(prompt_len=len(prompt), gen_len=len(gen)))
    runner = OnnxRunner(directory, threads)
    _, cache = runner.step(prompt, runner.empty_cache())
    held = sum(t.nbytes for t in cache.values())
    positions = sorted({t.shape[2] for t in cache.values()})
    del runner, cache
    gc.collect()
    prefill, decode = kind.time(directory, threads, prompt, gen, repeats)
    return {"kv_measured": held, "kv_estimated": est.memory.kv_cache_bytes, "positions": positions,
            "caches": sum(1 for layer in spec.layers if getattr(layer.mixer, "owns_kv", False)),
            "prefill": statistics.median(prefill), "ttft": est.ttft_s,
            "decode": statistics.median(decode), "tpot": est.tpot_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="f32", help="ONNX weights: f32, int8, int4")
    parser.add_argument("--similar", action="store_true", help="choose pairs by key/value similarity (needs the corpus)")
    args = parser.parse_args()
    console = Console(width=140)

    loaded = load("gemma-3-270m")
    groups = groups_for(loaded, args.similar)
    models = {"original": loaded, "shared": share_kv(loaded, groups)}
    profile = get_profile("host")
    prompt, gen = token_ids(args.prompt_len, loaded.spec.vocab_size), token_ids(args.gen_len, loaded.spec.vocab_size)
    console.print(f"[bold]Gemma 3 270M[/], ONNX {args.quant}, ONNX Runtime on {args.threads} threads, prompt "
                  f"{args.prompt_len}, {args.gen_len} decoded tokens, {args.repeats} timed run(s) after a warm-up; "
                  f"shared groups (first owns): {groups}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="kv_share_onnx-") as tmp:
        for name, model in models.items():
            export_onnx(model, Path(tmp) / name, quant=args.quant)
            results[name] = measure(Path(tmp) / name, model.spec, profile, prompt, gen, args.threads, args.repeats)
            gc.collect()

    table = Table()
    for column in ("figure", *(f"{name} {k}" for name in results for k in ("measured", "estimated")),
                   "shared / original measured", "shared / original estimated"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    original, shared = results["original"], results["shared"]

    def row(label: str, measured: str, estimated: str, scale: float, fmt) -> None:
        table.add_row(label, fmt(original[measured] / scale), fmt(original[estimated] / scale),
                      fmt(shared[measured] / scale), fmt(shared[estimated] / scale),
                      f"{shared[measured] / original[measured]:.3f}", f"{shared[estimated] / original[estimated]:.3f}")

    row("KV cache after prefill (MB)", "kv_measured", "kv_estimated", 1e6, lambda v: f"{v:.1f}")
    row("prefill time (ms)", "prefill", "ttft", 1e-3, lambda v: f"{v:.0f}")
    row("decode time per token (ms)", "decode", "tpot", 1e-3, lambda v: f"{v:.1f}")
    console.print(table)
    for name, r in results.items():
        console.print(f"{name}: {r['caches']} layers hold a cache; positions per present tensor in ONNX Runtime: "
                      f"{r['positions']}; measured / estimated KV {r['kv_measured'] / r['kv_estimated']:.2f}x")
    console.print(f"sharing factor (layers with a cache, original / shared): {original['caches'] / shared['caches']:.3f}")


if __name__ == "__main__":
    main()
