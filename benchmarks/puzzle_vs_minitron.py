"""Puzzle against uniform Minitron pruning on the embedded Gemma 3 270M, at one estimated budget.

    python benchmarks/puzzle_vs_minitron.py [--target jetson-orin-nano] [--block-share 0.6]
        [--other-target h100-sxm] [--bld-steps 60] [--tokens 12288] [--json out.json]

The budget is the time per output token (estimated on --target) that leaves the blocks --block-share of
the parent's block time (0.6: about 40% less). Puzzle: blockwise distillation of every variant, replace-one-
block KL, the mixed-integer choice under the budget, assembly. Minitron: the uniform width shape and the
uniform depth shape `shrink prune --budget` picks for the same estimated budget. Each student is then
distilled on the same --tokens of teacher-written text and its held-out KL to the parent measured.
Also printed: BLD cost (tokens, time, peak RSS), the replace-one-block KL table, and the solver's choice
for the same scores under a time-to-first-token limit at the same block share on --target and on
--other-target. Times are measured on this machine;
budgets and costs are roofline estimates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from prune_distill import PeakRSS  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from shrink.compress.data import prepare  # noqa: E402
from shrink.compress.importance import cached_score  # noqa: E402
from shrink.compress.puzzle import solve  # noqa: E402
from shrink.compress.puzzle.library import library  # noqa: E402
from shrink.compress.pruning import prune_to_budget  # noqa: E402
from shrink.compress.search import Budget  # noqa: E402
from shrink.flows.puzzle import PuzzleSettings, search, unkeyed  # noqa: E402
from shrink.flows.steps import Hooks, distill, distill_config, evaluate_against  # noqa: E402
from shrink.compress.distill.teacher import teacher_topk  # noqa: E402
from shrink.export.workflow import export_artifact, verify_artifact  # noqa: E402
from shrink.hardware.profiles import get_profile  # noqa: E402
from shrink.hardware.roofline import Workload, estimate  # noqa: E402
from shrink.model import load  # noqa: E402


def budget_for(spec, target: str, share: float, phase: str = "decode_s") -> float:
    """The limit on `phase` (decode_s: time per token, prefill_s: time to first token) that leaves the
    blocks `share` of the parent's block time on `target` (estimated)."""
    profile = get_profile(target)
    fixed, _ = solve.costs(spec, library(spec), profile, Workload())
    e = estimate(spec, profile, Workload())
    parent = e.tpot_s if phase == "decode_s" else e.ttft_s
    return getattr(fixed, phase) + share * (parent - getattr(fixed, phase))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="jetson-orin-nano")
    parser.add_argument("--other-target", default="h100-sxm")
    parser.add_argument("--block-share", type=float, default=0.6)
    parser.add_argument("--bld-steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=12_288)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="Where trained variants and scores are kept (a rerun resumes from them).")
    parser.add_argument("--no-artifact", action="store_true", help="Skip the Puzzle student's ONNX export and verify.")
    args = parser.parse_args()
    console = Console(stderr=True)
    hooks = Hooks(status=lambda message: console.log(message))

    parent = load("gemma-3-270m")
    split = prepare(parent, seq_len=128)
    topk = (teacher_topk(parent.model, split.train), teacher_topk(parent.model, split.evaluation))
    budget = budget_for(parent.spec, args.target, args.block_share)
    profile = get_profile(args.target)
    results: dict = {"target": args.target, "budget_s": budget, "block_share": args.block_share,
                     "parent_tpot_s": estimate(parent.spec, profile, Workload()).tpot_s, "students": {}}
    work = args.work or Path(tempfile.mkdtemp(prefix="puzzle-bench-"))
    settings = PuzzleSettings(target=args.target, budget_s=budget, bld_steps=args.bld_steps, distill_tokens=0)
    began = time.perf_counter()
    with PeakRSS() as rss:
        child, report = search(parent, split, settings, work, hooks)
    results["puzzle_search"] = {"seconds": time.perf_counter() - began, "peak_rss_bytes": rss.peak,
                                "bld_tokens_per_variant": args.bld_steps * 4 * 128,
                                "calibration_tokens": split.calibration.numel(),
                                "score_tokens": min(4, split.evaluation.shape[0]) * 128, **report}
    # Batch-1 decode is bandwidth-bound on every profile, so its costs are proportional across targets;
    # prefill is compute-bound and the attention/FFN balance differs by target: the same scores under a
    # time-to-first-token limit show where the choice follows the hardware.
    kl = unkeyed(report["replace_one_block_kl"])
    results["ttft_choices"] = {}
    for target in (args.target, args.other_target):
        fixed, table = solve.costs(parent.spec, library(parent.spec), get_profile(target), Workload())
        limit = solve.Limits(prefill_s=budget_for(parent.spec, target, args.block_share, "prefill_s"))
        results["ttft_choices"][target] = solve.solve(kl, table, fixed, limit)[0].to_dict()

    importance = cached_score(parent, split.calibration)
    students = {"puzzle": child}
    for axis in ("width", "depth"):
        pruned, shape = prune_to_budget(parent, importance, split, Budget(latency_s=budget, profile=profile), axis)
        students[f"minitron-{axis}"] = pruned
        results["students"][f"minitron-{axis}"] = {"shape": shape["chosen"]}
    config = distill_config(tokens=args.tokens)
    for name, student in students.items():
        entry = results["students"].setdefault(name, {})
        entry["tpot_s_estimated"] = estimate(student.spec, profile, Workload()).tpot_s
        entry["kl_before"] = evaluate_against(student.model, split, topk[1])["kl"]
        began = time.perf_counter()
        done = distill(student, parent, split, config, work / f"distill-{name}", hooks, topk=topk)
        entry.update(kl_after=done.eval_after["kl"], top1_after=done.eval_after.get("top1"),
                     distill_seconds=time.perf_counter() - began, tokens=done.tokens)
    if not args.no_artifact:  # the Puzzle student as users get it: an ONNX graph verified in ONNX Runtime
        began = time.perf_counter()
        exported = export_artifact(students["puzzle"], "onnx", work / "puzzle-onnx")
        against_parent = verify_artifact(exported.artifact, "gemma-3-270m")
        results["artifact"] = {"path": str(exported.artifact), "seconds": time.perf_counter() - began,
                               "verify_vs_student": exported.verdict.to_dict(), "vs_parent": against_parent.to_dict()}
    _print(console, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def _print(console: Console, results: dict) -> None:
    kl = results["puzzle_search"]["replace_one_block_kl"]
    layers = sorted({int(k.split("|")[0]) for k in kl})
    variants = list(dict.fromkeys(k.split("|")[1] for k in kl))
    table = Table(title="Replace-one-block KL (measured)")
    table.add_column("layer")
    for v in variants:
        table.add_column(v.replace("attention:", "attn ").replace("ffn:", "ffn "), justify="right")
    for i in layers:
        table.add_row(str(i), *(f"{kl[f'{i}|{v}']:.3f}" for v in variants))
    console.print(table)
    chosen = results["puzzle_search"]["solutions"][0]["layers"]
    console.print(f"{results['target']}, time per token: " + ", ".join(f"{l['attention']}/{l['ffn']}" for l in chosen))
    for target, choice in results["ttft_choices"].items():
        console.print(f"{target}, time to first token: " + ", ".join(f"{l['attention']}/{l['ffn']}" for l in choice["layers"]))
    search = results["puzzle_search"]
    console.print(f"Puzzle search: {search['seconds']:.0f} s, peak RSS {search['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"(measured), {search['bld_tokens_per_variant']:,} BLD tokens per variant")
    summary = Table(title=f"At {results['budget_s'] * 1e3:.3f} ms/token on {results['target']} (estimated; parent "
                          f"{results['parent_tpot_s'] * 1e3:.3f} ms)")
    for column in ("student", "tpot (est.)", "KL before", "KL after (measured)", "distill s"):
        summary.add_column(column, justify="right")
    for name, s in results["students"].items():
        summary.add_row(name, f"{s['tpot_s_estimated'] * 1e3:.3f} ms", f"{s['kl_before']:.3f}", f"{s['kl_after']:.3f}",
                        f"{s['distill_seconds']:.0f}")
    console.print(summary)
    if "artifact" in results:
        art = results["artifact"]
        parity = art["verify_vs_student"]["metrics"]
        parent = art["vs_parent"]["metrics"]
        console.print(f"Puzzle student as ONNX ({art['path']}, {art['seconds']:.0f} s): verify against the student "
                      f"{'PASS' if art['verify_vs_student']['passed'] else 'FAIL'} (top-1 {parity['top1_agreement']:.2%}, "
                      f"KL {parity['mean_kl']:.5f}, measured in ONNX Runtime); against the parent top-1 "
                      f"{parent['top1_agreement']:.2%}, KL {parent['mean_kl']:.3f} (measured)")


if __name__ == "__main__":
    main()
