"""PTQ against QAD for every weight format on the embedded Gemma 3 270M, measured in the runtime after export.

    python benchmarks/quantize.py [--formats int8,int4,mxfp4,nvfp4,ternary,binary,fp8] [--tokens 12288]
                                  [--calibration awq] [--lr LR] [--json results.json] [--keep DIR]

For each format: the plan's effective bits per quantized weight (scales included); the PTQ student
(calibrated, fake-quantized) and the QAD student (the PTQ student distilled towards the original for
--tokens tokens) each exported to GGUF (fp8 has no GGUF grid: measured in PyTorch) and compared in
llama.cpp with the original PyTorch model on held-out teacher-written text: KL(original || export),
top-1 agreement, perplexity, size on disk, and decode time per token in llama.cpp (2 threads). Beside
them, llama.cpp's own PTQ of the same weights at equal bits: the gguf package's Q8_0 and Q4_0 of the
original, and the original Q4_K_M file the embedded model ships as; and the f16 export, whose KL is
llama.cpp's own distance from PyTorch on the same weights (the floor under every row). Every figure is
measured here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.compress.data import prepare
from shrink.compress.distill.evaluate import evaluate
from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.quant.run import QuantizeSettings, quantize_model
from shrink.compress.quant.student import materialize, saved_plan
from shrink.export.bench import bench
from shrink.export.gguf import export_gguf
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from shrink.model import embedded_gguf_path, load

EVAL_SEQUENCES = 16  # held-out sequences compared in llama.cpp (x 128 tokens)


def in_llama_cpp(teacher, path: Path, sequences) -> dict:
    metrics = compare(TorchRunner(teacher.model), LlamaCppRunner(path, sequences.shape[1] + 8), sequences.tolist())
    timing = bench(path, threads=2, prompt_len=64, gen_len=32, repeats=2)
    return {"kl": metrics.mean_kl, "top1": metrics.top1_agreement, "ppl": metrics.ppl_artifact,
            "ppl_teacher": metrics.ppl_reference, "bytes": path.stat().st_size, "decode_s": timing.decode.median_s}


def in_pytorch(student, split, eval_topk) -> dict:
    result = evaluate(student, split.evaluation, *eval_topk).to_dict()
    return {"kl": result["kl"], "top1": None, "ppl": result["perplexity"], "ppl_teacher": None, "bytes": None,
            "decode_s": None}


def measure(student_model, plan, teacher, split, eval_topk, sequences, workdir: Path, label: str) -> dict:
    """Export the student (fake-quantized on `plan`, or materialized already) and compare it in
    llama.cpp; a PyTorch-only grid is measured in PyTorch."""
    if plan.runtime != "gguf":
        return in_pytorch(student_model, split, eval_topk)
    exported = copy.deepcopy(student_model)
    if saved_plan(exported) is None:
        materialize(exported, plan)
    path = workdir / f"{label}.gguf"
    export_gguf(dataclasses.replace(teacher, model=exported, source=label), path)
    return in_llama_cpp(teacher, path, sequences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int8,int4,mxfp4,nvfp4,ternary,binary,fp8")
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--calibration", default="awq")  # the start that met the INT4 goal
    parser.add_argument("--lr", type=float, default=None)  # default: the grid's (compress/quant/run.py: qad_lr)
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json")
    parser.add_argument("--keep", help="Folder to keep the exported GGUF files in (default: a temporary one).")
    args = parser.parse_args()
    console = Console(stderr=True)
    teacher = load("gemma-3-270m")
    split = prepare(teacher, None, seq_len=128)
    eval_topk = teacher_topk(teacher.model, split.evaluation)
    sequences = split.evaluation[:EVAL_SEQUENCES]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shrink-quant-bench-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.baselines:
            for name, make in (("gguf f16 (the runtime's own floor)", "f16"), ("gguf q8_0 (llama.cpp PTQ)", "q8_0"),
                               ("gguf q4_0 (llama.cpp PTQ)", "q4_0")):
                path = workdir / f"{make}.gguf"
                export_gguf(teacher, path, quant=make)
                rows.append({"format": name, "bits": {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}[make], "stage": "PTQ",
                             **in_llama_cpp(teacher, path, sequences)})
                console.print(rows[-1])
            rows.append({"format": "original Q4_K_M file", "bits": None, "stage": "shipped",
                         **in_llama_cpp(teacher, embedded_gguf_path(), sequences)})
            console.print(rows[-1])
        for family in args.formats.split(","):
            runtime = "torch" if family == "fp8" else "gguf"
            student = dataclasses.replace(teacher, model=copy.deepcopy(teacher.model))
            settings = QuantizeSettings(format=family, runtime=runtime, calibration=args.calibration, qad=True,
                                        tokens=args.tokens, lr=args.lr)
            ptq: dict = {}

            def measure_ptq(model, plan, family=family, ptq=ptq):
                ptq.update(measure(model, plan, teacher, split, eval_topk, sequences, workdir, f"{family}-ptq"))

            started = time.perf_counter()
            report = quantize_model(student, teacher, split, settings, workdir / f"{family}.ckpt",
                                    status=lambda message, family=family: console.print(f"{family}: {message}"),
                                    after_ptq=measure_ptq)
            bits = report["effective_bits_per_quantized_weight"]
            common = {"format": f"{family} ({report['grid']})", "bits": bits, "fallbacks": len(report["fallbacks"])}
            rows.append({**common, "stage": f"PTQ ({report['calibration']['method']})", **ptq})
            console.print(rows[-1])
            qad = report["qad"]
            stage = f"QAD ({qad['tokens']:,} tokens, lr {qad['lr']:g})"
            if report["kept"] == "ptq":  # the export is the PTQ student again: say so, with QAD's own KL
                rows.append({**common, "stage": f"{stage}: raised the KL to {qad['after']['kl']:.4f} "
                                                f"(PyTorch), PTQ kept", **ptq})
            else:
                qad_row = measure(student.model, saved_plan(student.model), teacher, split, eval_topk, sequences,
                                  workdir, f"{family}-qad")
                rows.append({**common, "stage": stage, "tokens_per_s": qad["tokens_per_second"], **qad_row})
            rows[-1]["seconds"] = time.perf_counter() - started
            console.print(rows[-1])
            del student
    table = Table(title=f"gemma-3-270m quantized: KL to the original measured in the runtime on "
                        f"{EVAL_SEQUENCES}x128 held-out tokens (PyTorch for fp8)", title_justify="left")
    for column in ("format", "bits/weight", "stage", "KL", "top-1", "ppl", "size", "decode ms/token"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["format"], f"{r['bits']:.3f}" if r["bits"] else "-", r["stage"], f"{r['kl']:.4f}",
                      f"{r['top1']:.1%}" if r["top1"] is not None else "-", f"{r['ppl']:.2f}",
                      f"{r['bytes'] / 1e6:.1f} MB" if r["bytes"] else "-",
                      f"{r['decode_s'] * 1e3:.2f}" if r["decode_s"] else "-")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
