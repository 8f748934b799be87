"""SwiftKV's SingleInputKV in ONNX Runtime: prefill time of a long prompt, measured beside the roofline.

Exports the embedded Gemma 3 270M to ONNX three times: as it is with every position's logits (the default
graph, what verify reads), as it is with the last position's logits only (what a deployment's prefill needs,
the fair baseline), and with SingleInputKV from layer k on (compress/swiftkv.py; its graph runs the prompt
through the layers below k and only the last token through the rest, blockvariants.last_token_prefill).
The three are timed in ONNX Runtime on one prompt of --prompt-len token ids, round after round in turn so
that drift on a shared machine falls on all of them alike (measured: medians and ranges), beside the
roofline's time to first token for the `host` profile (estimated). No weights are trained: token identities
and trained values do not change the work (quality: shrink run with a single-input-kv step reports the KL).

    python benchmarks/swiftkv_onnx.py [--prompt-len 2048] [--k 9] [--rounds 5] [--threads 2] [--quant f32]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.compress.swiftkv import single_input_kv
from shrink.export.backend import backend
from shrink.export.bench import token_ids
from shrink.export.onnx import export_onnx
from shrink.export.onnx_runtime import OnnxRunner
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--k", type=int, default=None, help="first layer that reads layer k's input; default half")
    parser.add_argument("--rounds", type=int, default=5, help="timed prefills per graph, after one warm-up each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="f32", help="ONNX weights: f32, int8, int4")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    console = Console(width=140)

    loaded = load("gemma-3-270m")
    k = args.k if args.k is not None else loaded.spec.num_layers // 2
    swift = single_input_kv(loaded, k)
    graphs = {"original, all logits": (loaded, "all"), "original, last logits": (loaded, "last"),
              f"SingleInputKV k={k}": (swift, "last")}
    prompt = token_ids(args.prompt_len, loaded.spec.vocab_size)
    profile = get_profile("host")
    console.print(f"[bold]Gemma 3 270M[/], ONNX {args.quant}, ONNX Runtime on {args.threads} threads, prompt "
                  f"{args.prompt_len} tokens, {args.rounds} timed prefills per graph in turn after a warm-up; "
                  f"SingleInputKV: layers {k}-{loaded.spec.num_layers - 1} of {loaded.spec.num_layers} take K/V "
                  f"from layer {k}'s input")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="swiftkv_onnx-") as tmp:
        runners = {}
        for name, (model, logits) in graphs.items():
            directory = Path(tmp) / name.replace(" ", "_").replace(",", "").replace("=", "")
            started = time.perf_counter()
            export_onnx(model, directory, quant=args.quant, logits=logits)
            stored, formats = backend("onnx").stored_formats(directory, model.spec)
            est = estimate(replace(stored, formats=formats), profile, Workload(prompt_len=args.prompt_len, gen_len=1))
            results[name] = {"export_s": time.perf_counter() - started, "ttft_estimated_s": est.ttft_s, "prefill_s": []}
            runners[name] = OnnxRunner(directory, args.threads)
            runners[name].step(prompt, runners[name].empty_cache())  # warm-up
            gc.collect()
        for _ in range(args.rounds):
            for name, runner in runners.items():
                started = time.perf_counter()
                runner.step(prompt, runner.empty_cache())
                results[name]["prefill_s"].append(time.perf_counter() - started)
        del runners
        gc.collect()

    base = "original, last logits"
    table = Table()
    for column in ("graph", "prefill median (ms, measured)", "min-max (ms)", "vs original last (measured)",
                   "TTFT (ms, estimated host)", "vs original (estimated)"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    for name, r in results.items():
        r["prefill_median_s"] = statistics.median(r["prefill_s"])
        table.add_row(name, f"{r['prefill_median_s'] * 1e3:.0f}",
                      f"{min(r['prefill_s']) * 1e3:.0f}-{max(r['prefill_s']) * 1e3:.0f}",
                      f"{r['prefill_median_s'] / statistics.median(results[base]['prefill_s']):.3f}",
                      f"{r['ttft_estimated_s'] * 1e3:.0f}",
                      f"{r['ttft_estimated_s'] / results[base]['ttft_estimated_s']:.3f}")
    console.print(table)
    cut = 1 - results[f"SingleInputKV k={k}"]["prefill_median_s"] / results[base]["prefill_median_s"]
    console.print(f"SingleInputKV cuts the measured prefill by {cut:.1%} against the same model's last-logits graph "
                  f"(target: at least 30%)")
    if args.json:
        args.json.write_text(json.dumps({"prompt_len": args.prompt_len, "k": k, "threads": args.threads,
                                         "quant": args.quant, "graphs": results, "cut": cut}, indent=2))


if __name__ == "__main__":
    main()
