"""Peak memory of distilling the 60%-width Gemma 3 270M: full-vocabulary logits and the teacher in memory
(as benchmarks/prune_distill.py measured it for the README, 7.96 GB) against the sliced loss with the
teacher gone, at the same batch and sequence length, with the loss of every step side by side.

    python benchmarks/distill_memory.py [--steps 24] [--chunk 64] [--ways before,sliced-ckpt] [--work DIR]
                                        [--json out.json]

The student is the width variant `benchmarks/prune_distill.py --targets 0.6` builds (activation
importance, the default rule's shape), distilled with the same settings (batch 4 x 128 tokens, lr 1e-4,
held-out evaluation before and after). Each way runs in a fresh process that reads the student and the
teacher's cached top-k from disk:
- before: the code of commit --before (full-vocabulary logits in the loss), the teacher loaded and held
  and the student's tokenizer kept, as the README's run had them;
- full: this tree with --logit-chunk 0 (full logits), teacher and tokenizer held;
- sliced: this tree's default (the loss over slices of --chunk positions), no teacher, no tokenizer;
- sliced-ckpt: sliced plus activation checkpointing.
Peak resident memory is sampled from /proc every 50 ms while the trainer runs (as prune_distill.py
does) and read from the kernel's high-water mark (VmHWM) for the whole process. Every figure is measured
on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BEFORE = "f618127"  # the last commit with full-vocabulary logits in the loss (the README's 7.96 GB)
# way -> (code, teacher loaded and held, student's tokenizer kept, DistillConfig settings beyond the shared ones)
WAYS = {
    "before": ("commit", True, True, {}),
    "full": ("tree", True, True, {"logit_chunk": 0}),
    "sliced": ("tree", False, False, {}),
    "sliced-ckpt": ("tree", False, False, {"activation_checkpointing": True}),
}


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def prepare_inputs(work: Path) -> None:
    """The student and the cached top-k on disk (skipped when `work` already holds them)."""
    if (work / "inputs.safetensors").is_file():
        return
    from safetensors.torch import save_file

    from shrink.compress.data import prepare
    from shrink.compress.distill.teacher import teacher_topk
    from shrink.compress.importance import cached_score
    from shrink.compress.search import Budget, apply, default_plan, feasible
    from shrink.model import load, save_loaded

    teacher = load("gemma-3-270m")
    split = prepare(teacher, seq_len=128)
    importance = cached_score(teacher, split.calibration)
    ranking = importance.layers.argsort(descending=True).tolist()
    plan = default_plan(feasible(teacher.spec, ranking, "width", Budget(params=0.6)), teacher.spec)
    student = apply(plan, teacher, importance)
    save_loaded(student, work / "student")
    (train_values, train_indices) = teacher_topk(teacher.model, split.train)
    (eval_values, eval_indices) = teacher_topk(teacher.model, split.evaluation)
    save_file({"train": split.train.contiguous(), "evaluation": split.evaluation.contiguous(),
               "train_values": train_values, "train_indices": train_indices,
               "eval_values": eval_values, "eval_indices": eval_indices}, str(work / "inputs.safetensors"))
    (work / "shape.txt").write_text(plan.label)


def child(way: str, work: Path, steps: int, chunk: int) -> None:
    """One distillation in this process; prints its figures as one JSON line."""
    sys.path.insert(0, str(Path(__file__).parent))
    from prune_distill import PeakRSS
    from safetensors.torch import load_file

    from shrink.compress.distill.trainer import DistillConfig, distill
    from shrink.model import load

    code, hold_teacher, keep_tokenizer, settings = WAYS[way]
    teacher = load("gemma-3-270m") if hold_teacher else None  # held, as benchmarks/prune_distill.py held it
    student = load(str(work / "student"))
    if not keep_tokenizer:
        student.tokenizer = None  # training never reads it (262,144 entries: ~0.26 GB resident)
    data = load_file(str(work / "inputs.safetensors"))
    if code == "tree" and "logit_chunk" not in settings:
        settings = {**settings, "logit_chunk": chunk}
    config = DistillConfig(lr=1e-4, steps=steps, batch_size=4, checkpoint_every=10 ** 9, **settings)
    with PeakRSS() as memory:
        report = distill(student.model, data["train"], (data["train_values"], data["train_indices"]), config,
                         work / f"run-{way}", data["evaluation"], (data["eval_values"], data["eval_indices"]))
    print(json.dumps({"way": way, "settings": settings, "teacher_held": teacher is not None,
                      "tokenizer_held": student.tokenizer is not None,
                      "losses": report.losses, "eval_before": report.eval_before, "eval_after": report.eval_after,
                      "tokens_per_s": report.tokens_per_second, "peak_rss_in_trainer": memory.peak,
                      "peak_rss_process": _hwm(), "batch": config.batch_size,
                      "seq_len": int(data["train"].shape[1])}))


def _before_tree(work: Path, commit: str) -> Path:
    """The package as it was at `commit` (git archive), importable as `shrink` from the returned path."""
    root = work / f"source-{commit}"
    if not (root / "shrink" / "__init__.py").is_file():
        (root / "shrink").mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parent.parent
        archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root / "shrink")], input=archive, check=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--chunk", type=int, default=64, help="positions per slice of the sliced loss")
    parser.add_argument("--ways", default="before,sliced-ckpt", help=f"of {', '.join(WAYS)}")
    parser.add_argument("--before", default=BEFORE, help="the commit whose code the 'before' way runs")
    parser.add_argument("--work", type=Path, default=None, help="keeps the student and top-k between runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=sorted(WAYS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="shrink-distill-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, work, args.steps, args.chunk)
        return
    prepare_inputs(work)
    results = {}
    for way in args.ways.split(","):
        for old in (work / f"run-{way}").glob("checkpoint*"):
            subprocess.run(["rm", "-rf", str(old)], check=True)
        env = dict(os.environ)
        if WAYS[way][0] == "commit":
            env["PYTHONPATH"] = str(_before_tree(work, args.before))
        out = subprocess.run([sys.executable, __file__, "--child", way, "--work", str(work), "--steps", str(args.steps),
                              "--chunk", str(args.chunk)], check=True, capture_output=True, text=True, env=env).stdout
        results[way] = json.loads(out.strip().splitlines()[-1])
        r = results[way]
        code = f"code of {args.before}" if WAYS[way][0] == "commit" else "this tree"
        print(f"{way} ({code}, settings {r['settings']}, teacher held {r['teacher_held']}, student tokenizer held "
              f"{r['tokenizer_held']}): peak RSS measured "
              f"{r['peak_rss_in_trainer'] / 1e9:.2f} GB in the trainer, {r['peak_rss_process'] / 1e9:.2f} GB for the whole "
              f"process; {r['tokens_per_s']:.0f} tokens/s measured; held-out KL {r['eval_before']['kl']:.4f} -> "
              f"{r['eval_after']['kl']:.4f}", flush=True)
    print(f"student: {(work / 'shape.txt').read_text()}; batch {r['batch']} x {r['seq_len']} tokens, {args.steps} steps")
    ways = list(results)
    if len(ways) > 1:
        first = ways[0]
        print("step  " + "  ".join(f"{w:>14}" for w in ways) + "   (losses, measured)")
        for step in range(len(results[first]["losses"])):
            print(f"{step + 1:4d}  " + "  ".join(f"{results[w]['losses'][step]:14.9f}" for w in ways))
        for other in ways[1:]:
            worst = max(abs(a - b) / abs(a) for a, b in zip(results[first]["losses"], results[other]["losses"]))
            print(f"{other} against {first}: largest relative difference of a step's loss {worst:.2e}; held-out KL "
                  f"after {results[first]['eval_after']['kl']:.6f} vs {results[other]['eval_after']['kl']:.6f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
