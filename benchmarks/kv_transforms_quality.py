"""KV-sharing transforms distilled on the embedded model: held-out KL to the original, all on the same tokens.

Runs `shrink run gemma-3-270m --recipe ...` (the real command, in its own run directory) for:
  - single-input-kv: SwiftKV's SingleInputKV from layer k (default half the layers) with its first stage
    (new norm and Q/K/V of the later layers trained, the rest frozen), then a distill step (SwiftKV's
    optional second stage), then an ONNX export of the result and verify against the original;
  - kv-share: cross-layer KV sharing (every pair of neighbouring same-kind layers that fits, chosen by
    measured key/value similarity; AcrossKV mean initialisation), then the same distill step;
  - untransformed: the original model through the same distill step: the floor that training on these
    tokens reaches from a model that lost nothing (the teacher's top-k truncation and training noise).
Each training stage gets --tokens tokens (default 12,288, shrink's distillation default). Figures are the
steps' held-out KL against the original's cached top-k logits (measured), the KV cache and time to first
token at the long prompt the steps report (estimated, the run's target), and the verify step's KL/top-1.

    python benchmarks/kv_transforms_quality.py [--tokens 12288] [--k 9] [--work DIR] [--json out.json]

A run directory left in --work is resumed (shrink run --resume), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def recipes(tokens: int, k: int | None) -> dict[str, str]:
    k_line = f"k = {k}\n" if k is not None else ""
    distill = f'[[step]]\nname = "distill"\ntokens = {tokens}\n'
    return {
        "single-input-kv": f'[[step]]\nname = "single-input-kv"\n{k_line}tokens = {tokens}\n\n{distill}\n'
                           '[[step]]\nname = "export"\nformat = "onnx"\n\n[[step]]\nname = "verify"\n',
        "kv-share": f'[[step]]\nname = "kv-share"\n\n{distill}',
        "untransformed": distill,
    }


def run(name: str, recipe: str, work: Path, target: str) -> dict:
    run_dir = work / name
    recipe_path = work / f"{name}.toml"
    recipe_path.write_text(recipe)
    # a budget no step can miss: --target needs one, and the target is what the steps' estimates are for
    command = ["shrink", "run", "gemma-3-270m", "--recipe", str(recipe_path), "--target", target, "--budget", "10s",
               "-o", str(run_dir)]
    if (run_dir / "run.json").exists():
        command.append("--resume")
    started = time.perf_counter()
    done = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode not in (0, 1):  # 1: a verify gate missed, the report is still there
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}")
    report = json.loads((run_dir / "run.json").read_text())
    report["benchmark_seconds"] = time.perf_counter() - started
    return report


def kl(value: dict | float | None) -> float | None:
    """A held-out KL from a step's metrics (an evaluation dict or the figure itself)."""
    return value.get("kl") if isinstance(value, dict) else value


def step(report: dict, name: str) -> dict:
    return next((s["metrics"] for s in report["steps"] if s["name"] == name), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12_288, help="tokens per training stage")
    parser.add_argument("--k", type=int, default=None, help="SingleInputKV's k (default: half the layers)")
    parser.add_argument("--target", default="jetson-orin-nano", help="profile the steps' estimates are for")
    parser.add_argument("--work", type=Path, default=None, help="run directories (kept; resumed when present)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=150)
    work = args.work or Path(tempfile.mkdtemp(prefix="kv_transforms_quality-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"run directories: {work}")
    reports = {name: run(name, recipe, work, args.target) for name, recipe in recipes(args.tokens, args.k).items()}

    swift, shared, plain = (reports[n] for n in ("single-input-kv", "kv-share", "untransformed"))
    sikv, kvs = step(swift, "single-input-kv"), step(shared, "kv-share")
    rows = [
        ("SingleInputKV k=" + str(sikv.get("k")), sikv.get("held_out_after_transform"),
         sikv.get("stage_one", {}).get("eval_after"), step(swift, "distill").get("eval_after"),
         f"TTFT {sikv['ttft_s_estimated']['before'] * 1e3:.1f} -> {sikv['ttft_s_estimated']['after'] * 1e3:.1f} ms"),
        (f"KV sharing {kvs.get('groups')}", kvs.get("held_out_after_sharing"), None, step(shared, "distill").get("eval_after"),
         f"KV {kvs['kv_cache_bytes_estimated']['before'] / 1e6:.1f} -> {kvs['kv_cache_bytes_estimated']['after'] / 1e6:.1f} MB"),
        ("untransformed", step(plain, "distill").get("eval_before"), None, step(plain, "distill").get("eval_after"), ""),
    ]
    table = Table(title=f"held-out KL to the original (measured), {args.tokens:,} tokens per training stage")
    for column in ("model", "after the transform", "after stage one", "after distill", f"saving ({args.target}, estimated)"):
        table.add_column(column, justify="left" if column in ("model", f"saving ({args.target}, estimated)") else "right")
    for label, *kls, saving in rows:
        table.add_row(label, *("-" if kl(v) is None else f"{kl(v):.4f}" for v in kls), saving)
    console.print(table)
    verify = step(swift, "verify")
    if verify:
        console.print(f"SingleInputKV ONNX artifact vs the original (measured): {json.dumps(verify, default=str)[:400]}")
    for name, report in reports.items():
        console.print(f"{name}: {report['benchmark_seconds'] / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "rows": rows, "reports": reports}, indent=2, default=str))


if __name__ == "__main__":
    main()
