"""Width vs depth vs random pruning of the embedded Gemma 3 270M, before and after the same distillation.

    python benchmarks/prune_distill.py [--targets 0.6,0.4] [--variants width,depth,random] [--steps 48]
                                       [--lr 1e-4] [--export] [--json results.json]

For each target (a fraction of the non-embedding parameters) and variant:
- width: the uniform FFN / heads / hidden shape `shrink prune --params P` picks, by activation importance;
- depth: the layers with the highest Block Influence, as `shrink prune --params P --axis depth`;
- random: the width variant's shape with random importance scores (the baseline importance must beat);
then held-out KL to the teacher and perplexity (teacher-written text, seq 128) before and after the
same distillation (steps x batch 4 x 128 tokens), the loop's tokens/s and its peak resident memory.
With --export, the best student after distillation is exported to GGUF q8_0, verified against itself
in llama.cpp, and benched. Every figure printed is measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from shrink.compress.data import prepare
from shrink.compress.distill.evaluate import evaluate
from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.distill.trainer import DistillConfig, distill
from shrink.compress.importance import Importance, cached_score
from shrink.compress.search import Budget, apply, default_plan, feasible
from shrink.model import load


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms from /proc)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def random_importance(like: Importance, seed: int = 0) -> Importance:
    g = torch.Generator().manual_seed(seed)

    def rand(t):
        return torch.rand(t.shape, generator=g)

    return replace(like, ffn=[rand(t) for t in like.ffn], heads=[rand(t) for t in like.heads],
                   hidden=rand(like.hidden), layers=rand(like.layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.6,0.4")
    parser.add_argument("--variants", default="width,depth,random")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=160)
    teacher = load("gemma-3-270m")
    split = prepare(teacher, seq_len=128)
    train_topk, eval_topk = teacher_topk(teacher.model, split.train), teacher_topk(teacher.model, split.evaluation)
    importance = cached_score(teacher, split.calibration)
    ranking = importance.layers.argsort(descending=True).tolist()
    teacher_eval = evaluate(teacher.model, split.evaluation, *eval_topk)
    config = DistillConfig(lr=args.lr, steps=args.steps, batch_size=4, checkpoint_every=10 ** 9)
    tokens = args.steps * 4 * split.train.shape[1]
    console.print(f"teacher: held-out perplexity {teacher_eval.perplexity:.2f} on {split.evaluation.numel():,} tokens; "
                  f"distillation budget {tokens:,} tokens ({args.steps} steps x 4 x {split.train.shape[1]}), lr {args.lr:g}")
    rows, best = [], None
    workdir = Path(tempfile.mkdtemp(prefix="shrink-bench-"))
    for fraction in (float(x) for x in args.targets.split(",")):
        width_plan = default_plan(feasible(teacher.spec, ranking, "width", Budget(params=fraction)), teacher.spec)
        for variant in args.variants.split(","):
            if variant == "depth":
                plan, scores = default_plan(feasible(teacher.spec, ranking, "depth", Budget(params=fraction)), teacher.spec), importance
            else:
                plan, scores = width_plan, importance if variant == "width" else random_importance(importance)
            student = apply(plan, teacher, scores)
            before = evaluate(student.model, split.evaluation, *eval_topk)
            with PeakRSS() as memory:
                report = distill(student.model, split.train, train_topk, config, workdir / f"{variant}-{fraction}",
                                 split.evaluation, eval_topk)
            after = report.eval_after
            row = {"target": fraction, "variant": variant, "shape": plan.label,
                   "non_embedding_fraction": plan.figures["non_embedding_params"] / teacher.spec.param_counts().non_embedding,
                   "params": plan.figures["params"], "kl_before": before.kl, "ppl_before": before.perplexity,
                   "kl_after": after["kl"], "ppl_after": after["perplexity"], "tokens": report.tokens,
                   "tokens_per_s": report.tokens_per_second, "peak_rss_bytes": memory.peak}
            rows.append(row)
            console.print(row)
            if best is None or row["kl_after"] < best[0]["kl_after"]:
                best = (row, student)
            else:
                del student
    table = Table(title=f"gemma-3-270m pruned and distilled ({tokens:,} tokens each); all figures measured here", title_justify="left")
    for column in ("target", "variant", "shape", "non-emb kept", "params", "KL before", "KL after", "ppl before",
                   "ppl after", "tok/s", "peak RSS"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['target']:.0%}", r["variant"], r["shape"], f"{r['non_embedding_fraction']:.1%}", f"{r['params']:,}",
                      f"{r['kl_before']:.3f}", f"{r['kl_after']:.3f}", f"{r['ppl_before']:.1f}", f"{r['ppl_after']:.1f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_bytes'] / 1e9:.2f} GB")
    console.print(table)
    console.print(f"teacher perplexity {teacher_eval.perplexity:.2f}")
    result = {"teacher_ppl": teacher_eval.perplexity, "tokens": tokens, "lr": args.lr, "rows": rows}
    if args.export and best is not None:
        from shrink.export.bench import bench
        from shrink.export.workflow import export_artifact

        path = workdir / "best-q8_0.gguf"
        exported = export_artifact(best[1], "gguf", path, quant="q8_0")
        timing = bench(path, threads=2, prompt_len=128, gen_len=32, repeats=3)
        m = exported.verdict.metrics
        result["export"] = {"variant": best[0]["variant"], "target": best[0]["target"], "bytes": path.stat().st_size,
                            "top1": m.top1_agreement, "mean_kl": m.mean_kl, "passed": exported.verdict.passed,
                            "decode_ms_per_token": timing.decode.median_s * 1e3,
                            "estimated_ms_per_token_host": timing.estimate.tpot_s * 1e3}
        console.print(f"best student ({best[0]['variant']} at {best[0]['target']:.0%}) as GGUF q8_0: "
                      f"{path.stat().st_size / 1e6:.1f} MB, verify {'pass' if exported.verdict.passed else 'FAIL'} "
                      f"(top-1 {m.top1_agreement:.2%}, KL {m.mean_kl:.4f} vs its PyTorch weights), decode "
                      f"{timing.decode.median_s * 1e3:.2f} ms/token measured, {timing.estimate.tpot_s * 1e3:.2f} estimated")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
