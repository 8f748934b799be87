"""Estimated (roofline on `host`, each runtime's kernels as calibrated here) beside measured, per artifact.

Writes artifacts of the embedded Gemma 3 270M -- GGUF F16, Q8_0, Q4_0, the shipped Q4_K_M file, MXFP4,
NVFP4, TQ2_0, a pruned model (FFN width 2048 -> 1024, Q8_0), and ONNX f32 and int4 -- times each in its
runtime as `shrink bench` does (seeded ids, one warm-up, --repeats runs), and prints its decode time per
token and prefill time measured and estimated, their ratio, and the geometric-mean error of each phase
(exp(mean |log(estimate / measured)|)). The estimate uses the calibration cached for `host` by
`shrink profiles calibrate`; run that first on the same quiet machine (--calibrate does it here).

    python benchmarks/estimate_vs_measured.py [--calibrate] [--prompt-len 128] [--gen-len 32] [--repeats 3]
        [--work DIR] [--no-onnx] [--make-only] [--json out.json]

Targets (issue 15): decode geo-mean error <= 10% with every artifact within 20%; prefill geo-mean <= 20%.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.compress.data import prepare
from shrink.compress.importance import cached_score
from shrink.compress.prune import prune_ffn
from shrink.export.bench import bench
from shrink.export.manifest import write_manifest
from shrink.export.workflow import export_artifact
from shrink.flows import defaults
from shrink.flows.calibrate import _grid_gguf, cache_host_kernels, calibrate_runtimes
from shrink.hardware.profiles import get_profile
from shrink.model import embedded_gguf_path, load

MODEL = "gemma-3-270m"
GGUF = ("fp16", "q8_0", "q4_0", "mxfp4", "tq2_0")


def make_artifacts(work: Path, onnx: bool, say) -> dict[str, Path]:
    """Each artifact (kept in `work`, reused when present) by label."""
    loaded = load(MODEL)
    made: dict[str, Path] = {}
    for quant in GGUF:
        made[f"GGUF {quant}"] = _once(work / f"{quant}.gguf", lambda p, q=quant: export_artifact(loaded, "gguf", p, quant=q, verify=False), say)
    shipped = work / "q4_k_m.gguf"  # the model's own Q4_K_M file, with a manifest so bench can cost it
    if not shipped.exists():
        shutil.copyfile(embedded_gguf_path(), shipped)
        write_manifest(shipped, source=MODEL, source_hash="shipped file", spec=loaded.spec, export={"quant": "q4_k_m"},
                       verify=None)
    made["GGUF Q4_K_M (shipped)"] = shipped
    made["GGUF nvfp4"] = _once(work / "nvfp4.gguf", lambda p: _nvfp4(loaded, p), say)
    split = prepare(loaded, None, seq_len=defaults.SEQ_LEN)
    pruned = prune_ffn(loaded, cached_score(loaded, split.calibration), 1024)
    made["GGUF q8_0, FFN pruned to 1024"] = _once(work / "pruned-q8_0.gguf",
                                                 lambda p: export_artifact(pruned, "gguf", p, quant="q8_0", verify=False), say)
    if onnx:
        for quant in ("f32", "int4"):
            made[f"ONNX {quant}"] = _once(work / f"onnx-{quant}", lambda p, q=quant: export_artifact(loaded, "onnx", p, quant=q, verify=False), say)
    return made


def _nvfp4(loaded, path: Path) -> None:
    _grid_gguf(loaded, "nvfp4", path)
    write_manifest(path, source=MODEL, source_hash="nvfp4 ptq", spec=loaded.spec, export={"quant": "nvfp4_gguf"}, verify=None)


def _once(path: Path, make, say) -> Path:
    if not path.exists():
        say(f"writing {path.name}")
        make(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="calibrate llama.cpp here first (cached for host)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="artifacts (kept; reused when present)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--make-only", action="store_true", help="write the artifacts into --work and stop (time them later, quietly)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=160)
    say = lambda message: console.print(message, style="dim")  # noqa: E731
    if args.calibrate:
        host = get_profile("host", refresh_host=True)
        calibrations = calibrate_runtimes(host, status=say)
        say("calibration cached" if cache_host_kernels(calibrations) else "calibration BUSY: not cached, not used")
    host = get_profile("host")
    kernels = host.calibration("llama.cpp")
    say(f"host: {host.bandwidth_GBps:g} GB/s, peaks {host.peak_tflops}; llama.cpp kernels: "
        + (kernels.source if kernels else "NOT calibrated (run with --calibrate)"))
    work = args.work or Path(tempfile.mkdtemp(prefix="estimate_vs_measured-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = make_artifacts(work, args.onnx, say)
    if args.make_only:
        return

    rows = []
    for label, path in artifacts.items():
        say(f"timing {label}")
        result = bench(path, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats, host=host)
        est = result.estimate
        rows.append({"artifact": label, "runtime": result.runtime, "kernels": est.runtime,
                     "decode_measured_s": result.decode.median_s, "decode_estimated_s": est.tpot_s,
                     "prefill_measured_s": result.prefill.median_s, "prefill_estimated_s": est.ttft_s})

    table = Table(title=f"{MODEL} on this machine: prompt {args.prompt_len}, {args.gen_len} decoded tokens, "
                        f"median of {args.repeats} runs after a warm-up (measured) vs host roofline (estimated)")
    for column in ("artifact", "kernels", "decode measured", "decode estimated", "est/meas", "prefill measured",
                   "prefill estimated", "est/meas"):
        table.add_column(column, justify="left" if column in ("artifact", "kernels") else "right")
    for r in rows:
        table.add_row(r["artifact"], r["kernels"] or "none (profile peaks)",
                      f"{r['decode_measured_s'] * 1e3:.2f} ms", f"{r['decode_estimated_s'] * 1e3:.2f} ms",
                      f"{r['decode_estimated_s'] / r['decode_measured_s']:.2f}",
                      f"{r['prefill_measured_s'] * 1e3:.0f} ms", f"{r['prefill_estimated_s'] * 1e3:.0f} ms",
                      f"{r['prefill_estimated_s'] / r['prefill_measured_s']:.2f}")
    console.print(table)
    summary = {}
    groups = {runtime: [r for r in rows if r["runtime"] == runtime] for runtime in sorted({r["runtime"] for r in rows})}
    groups["all artifacts"] = rows  # what the targets are set on
    for runtime, chosen in groups.items():
        for phase in ("decode", "prefill"):
            errors = [abs(math.log(r[f"{phase}_estimated_s"] / r[f"{phase}_measured_s"])) for r in chosen]
            summary[f"{runtime} {phase}"] = {"geo_mean_error": math.exp(sum(errors) / len(errors)) - 1,
                                             "worst_error": math.exp(max(errors)) - 1, "artifacts": len(chosen)}
    for name, s in summary.items():
        console.print(f"{name}: geo-mean error {s['geo_mean_error']:.1%}, worst {s['worst_error']:.1%} "
                      f"over {s['artifacts']} artifacts")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "settings": vars(args) | {"work": str(work)}},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
