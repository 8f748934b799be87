"""QAD learning rate against grid: the held-out KL of the fake-quantized student after PTQ and after QAD
at each learning rate, on the embedded Gemma 3 270M, measured in PyTorch.

    python benchmarks/qad_lr.py [--formats int8,int4,ternary] [--lrs 1e-6,3e-6,1e-5,3e-5,1e-4]
                                [--tokens 6144] [--calibration max] [--json sweep.json]

Why: a fine grid (Q8_0) got worse under the learning rate that recovers the 4-bit grids (AWQ PTQ KL
0.069 -> 0.165 after QAD at 1e-5), so the default QAD learning rate depends on the grid
(compress/quant/run.py: QAD_LR). This script measures the curve those defaults are read from. Each
point is a fresh PTQ student (the same calibration) distilled for --tokens tokens; the KL is on the
held-out sequences of the quantize command, and no keep-the-PTQ-weights rule is applied here.
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
from shrink.compress.quant.run import QuantizeSettings, qad_lr, quantize_model
from shrink.model import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int8,int4,ternary")
    parser.add_argument("--lrs", default="1e-6,3e-6,1e-5,3e-5,1e-4")
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--calibration", default="max")  # fast; the curve's shape is what is read
    parser.add_argument("--json")
    args = parser.parse_args()
    console = Console(stderr=True)
    teacher = load("gemma-3-270m")
    split = prepare(teacher, None, seq_len=128)
    rows = []
    checkpoints = Path(tempfile.mkdtemp(prefix="shrink-qad-lr-"))
    for family in args.formats.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            student = dataclasses.replace(teacher, model=copy.deepcopy(teacher.model))
            settings = QuantizeSettings(format=family, runtime="gguf", calibration=args.calibration, qad=True, tokens=args.tokens,
                                        lr=lr)
            started = time.perf_counter()
            report = quantize_model(student, teacher, split, settings, checkpoints / f"{family}-{lr:g}",
                                    status=lambda message: console.print(f"{family} lr {lr:g}: {message}"))
            rows.append({"format": family, "grid": report["grid"], "lr": lr, "default_lr": qad_lr(report["grid"]),
                         "tokens": report["qad"]["tokens"], "ptq_kl": report["ptq"]["kl"],
                         "qad_kl": report["qad"]["after"]["kl"], "seconds": time.perf_counter() - started})
            console.print(rows[-1])
            del student
    table = Table(title=f"gemma-3-270m: held-out KL to the original after PTQ ({args.calibration}) and after QAD "
                        f"({args.tokens:,} tokens), measured in PyTorch", title_justify="left")
    for column in ("format", "grid", "lr", "PTQ KL", "QAD KL", "change"):
        table.add_column(column, justify="right")
    for r in rows:
        mark = " (default)" if r["lr"] == r["default_lr"] else ""
        table.add_row(r["format"], r["grid"], f"{r['lr']:g}{mark}", f"{r['ptq_kl']:.4f}", f"{r['qad_kl']:.4f}",
                      f"{r['qad_kl'] / r['ptq_kl'] - 1:+.1%}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
