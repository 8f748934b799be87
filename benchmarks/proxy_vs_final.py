"""The planner's quality proxy against the KL its planned recipes end at: does the proxy rank candidates right?

On the embedded Gemma 3 270M and a llama.cpp target, takes --count candidates of the planner (prune shapes
x weight formats, flows/candidates.py), measures their proxy twice -- as the planner now does (each prune
shape after --proxy-steps distillation steps, each format after PTQ with the run's calibration, AWQ) and as
it did before (right after pruning, max-calibrated PTQ) -- then executes each candidate's planned recipe
(flows/plan.recipe_for: prune + distill, quantize with AWQ and QAD, GGUF export, verify; its verify gate
dropped so every run reports) and reads the final mean KL to the original on the verify prompts (measured).
Prints both proxies beside the final KL and Spearman's rank correlation of each with it.

    python benchmarks/proxy_vs_final.py [--work DIR] [--distill-tokens 12288] [--qad-tokens 12288] [--json out.json]

Each run directory in --work is resumed and the proxies already measured are kept there (proxies.json), so an
interrupted benchmark continues where it stopped. About an hour on 2 quiet cores at the default token counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from shrink.compress.data import prepare
from shrink.compress.importance import cached_score
from shrink.flows import defaults
from shrink.flows.candidates import TargetBudget, enumerate_candidates, measure_proxies
from shrink.flows.plan import RunSettings, recipe_for
from shrink.flows.recipe import VerifyStep
from shrink.flows.run import REPORT, run_recipe
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload
from shrink.model import load

MODEL = "gemma-3-270m"
# (kept share, axis, format family): unpruned and pruned, both axes, 8- and 4-bit and FP4, so that the
# shape and the format parts of the proxy both have to rank; on a llama.cpp target the planner refuses the
# depth cuts of Gemma 3 (out of its window pattern), which leaves six
CHOSEN = [(1.0, "-", "int4"), (1.0, "-", "mxfp4"), (0.8, "width", "int8"), (0.8, "depth", "int8"),
          (0.6, "width", None), (0.6, "depth", None), (0.6, "width", "int4"), (0.8, "width", "int4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="jetson-orin-nano")
    parser.add_argument("--work", type=Path, default=None, help="run directories (kept; resumed when present)")
    parser.add_argument("--distill-tokens", type=int, default=defaults.DISTILL_TOKENS)
    parser.add_argument("--qad-tokens", type=int, default=defaults.QAD_TOKENS)
    parser.add_argument("--proxy-steps", type=int, default=defaults.PROXY_STEPS)
    parser.add_argument("--count", type=int, default=len(CHOSEN), help="how many of the listed candidates to run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=150, stderr=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="proxy_vs_final-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"run directories: {work}")

    loaded = load(MODEL)
    split = prepare(loaded, None, seq_len=defaults.SEQ_LEN)
    importance = cached_score(loaded, split.calibration)
    profile = get_profile(args.target)
    everything = enumerate_candidates(loaded, importance, profile, Workload(), TargetBudget(tpot_s=10.0))
    by_key = {(c.keep, c.axis, c.format): c for c in everything if c.rejected is None}
    refused = [key for key in CHOSEN if key not in by_key]
    if refused:  # the planner never proposes them on this target (a depth cut out of Gemma 3's GGUF pattern)
        console.print(f"not candidates on {args.target}: {refused}")
    chosen = [by_key[key] for key in CHOSEN if key in by_key][:args.count]
    saved = work / "proxies.json"  # the proxies of an interrupted benchmark are not measured again
    proxies = json.loads(saved.read_text()) if saved.is_file() else {}
    for name, steps, calibration in (("now", args.proxy_steps, defaults.CALIBRATION), ("before", 0, "max")):
        missing = [c for c in chosen if c.label not in proxies.get(name, {})]  # only what no earlier run measured
        if not missing:
            continue
        started = time.perf_counter()
        measured = copy.deepcopy(missing)
        measure_proxies(measured, MODEL, importance, split, steps, calibration, lambda m: console.print(m))
        proxies[name] = {**proxies.get(name, {}), **{c.label: c.predicted_kl for c in measured}}
        proxies[f"{name}_seconds"] = proxies.get(f"{name}_seconds", 0.0) + time.perf_counter() - started
        saved.write_text(json.dumps(proxies, indent=2))

    settings = RunSettings(distill_tokens=args.distill_tokens, qad_tokens=args.qad_tokens, bench=False)
    finals = {}
    for candidate in chosen:
        run_dir = work / candidate.label.replace(" ", "_").replace(",", "").replace("%", "")
        steps = [(name, VerifyStep() if name == "verify" else config) for name, config in recipe_for(candidate, settings)]
        started = time.perf_counter()
        report = run_recipe(MODEL, steps, run_dir, resume=(run_dir / REPORT).exists())
        verify = next(s["metrics"] for s in report["steps"] if s["name"] == "verify")
        finals[candidate.label] = {"kl": verify["metrics"]["mean_kl"], "top1": verify["metrics"]["top1_agreement"],
                                   "seconds": time.perf_counter() - started}
        console.print(f"{candidate.label}: final KL {finals[candidate.label]['kl']:.4f} (measured)")

    labels = [c.label for c in chosen]
    final = [finals[label]["kl"] for label in labels]
    table = Table(title=f"{MODEL} on {profile.name}: proxy (measured, held-out slice) vs final KL to the original "
                        f"(measured, verify prompts) after distill {args.distill_tokens:,} / QAD {args.qad_tokens:,} tokens")
    for column in ("candidate", "proxy now", "proxy before", "final KL", "final top-1"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for label in labels:
        table.add_row(label, f"{proxies['now'][label]:.4f}", f"{proxies['before'][label]:.4f}",
                      f"{finals[label]['kl']:.4f}", f"{finals[label]['top1']:.1%}")
    Console(width=150).print(table)
    correlation = {name: spearmanr([proxies[name][label] for label in labels], final).statistic
                   for name in ("now", "before")}
    Console(width=150).print(f"Spearman rank correlation with the final KL over {len(labels)} candidates: proxy now "
                             f"{correlation['now']:.3f} ({args.proxy_steps} recovery steps, {defaults.CALIBRATION} "
                             f"calibration; {proxies['now_seconds'] / 60:.1f} min), proxy before {correlation['before']:.3f} "
                             f"(right after pruning, max calibration; {proxies['before_seconds'] / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps({"proxies": proxies, "finals": finals, "spearman": correlation,
                                         "settings": vars(args) | {"work": str(work), "json": str(args.json)}},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
