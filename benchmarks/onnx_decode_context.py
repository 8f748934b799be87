"""ONNX Runtime decode time per token against the number of cached positions (measured).

For each ONNX directory written by `shrink export -f onnx` and each context length, prefills that many
token ids, then times --steps single-token decode steps through the KV cache (the graph's past_*
inputs fed back from its present_* outputs, as `shrink bench` does) and prints the median. A graph that
copies its cache per step grows with the context far faster than one that only reads it; compare
directories within one run, on a quiet machine.

    python benchmarks/onnx_decode_context.py DIR [DIR ...] [--contexts 1,128,512,1024] [--steps 24] [--threads N] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.export.onnx_runtime import OnnxRunner


def decode_ms(runner: OnnxRunner, context: int, steps: int) -> float:
    """Median ms of one decode step after `context` cached positions (token ids 2.., any in the vocabulary)."""
    vocab = runner.layout["vocab_size"]
    _, cache = runner.step([2 + i % (vocab - 2) for i in range(context)], runner.empty_cache())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, cache = runner.step([5], cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--contexts", default="1,128,512,1024")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    for directory in args.directories:
        runner = OnnxRunner(directory, args.threads)
        runner.step([2], runner.empty_cache())  # warm-up: page-in and kernel selection
        rows.append({"artifact": str(directory), "decode_ms": {c: decode_ms(runner, c, args.steps) for c in contexts}})
    table = Table(title=f"ONNX Runtime decode, ms per token (measured, median of {args.steps} steps)")
    table.add_column("artifact")
    for c in contexts:
        table.add_column(f"after {c}", justify="right")
    for row in rows:
        table.add_row(row["artifact"], *(f"{row['decode_ms'][c]:.2f}" for c in contexts))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "steps": args.steps, "kind": "measured"}, indent=2))


if __name__ == "__main__":
    main()
