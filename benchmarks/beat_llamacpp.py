"""Shrink's GGUF choice against llama.cpp's own quantizer, on this machine (`host`), at budgets of 50%,
65% and 80% of the F16 export's measured decode time.

For each reference model: every llama.cpp file type of flows/gguf_search.py's list is made by llama.cpp's
quantizer, with and without an importance matrix, timed here and scored (KL to the reference on 3 x 128
held-out positions). Per budget, "llama.cpp best" is the lowest KL among those outputs whose measured
time meets the budget; "shrink" is what `shrink run --target host --budget X` would choose (the same
search with its mixtures, lowest KL within the budget), re-timed with `shrink bench`'s settings to
confirm it meets the budget on measurement, and verified on the verify prompts.

References (the embedded model was dequantized from a Q4_K_M file, so requantizing it to a K-quant is
unrealistically exact):
- original: the embedded Gemma 3 270M as shipped;
- off-grid: the same function with its hidden, FFN and value channels permuted (norms, embedding and
  every projection permuted alike: identical logits), so no weight block holds the values of one
  block of the Q4_K_M file any more.

    python benchmarks/beat_llamacpp.py                    # both references, about 20 minutes on 2 cores
    python benchmarks/beat_llamacpp.py --reference off-grid --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from shrink.compress.data import prepare
from shrink.export.bench import bench
from shrink.export.llamacpp_quantize import quantize_gguf
from shrink.export.workflow import verify_against
from shrink.flows.candidates import TargetBudget
from shrink.flows.gguf_quantize import budget_fits, prepare_search, target_cost, write_choice
from shrink.flows.gguf_search import make_file_types, make_layer_upgrades, make_mixtures, make_vocabulary_moves
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload
from shrink.model import load

SHARES = (0.5, 0.65, 0.8)


def off_grid(loaded):
    """A copy computing the same logits with hidden, FFN and per-head value channels permuted."""
    model = copy.deepcopy(loaded.model)
    spec, text = loaded.spec, model.model
    g = torch.Generator().manual_seed(0)
    hidden = torch.randperm(spec.hidden_size, generator=g)
    with torch.no_grad():
        text.embed_tokens.weight.copy_(text.embed_tokens.weight[:, hidden])
        text.norm.weight.copy_(text.norm.weight[hidden])
        for layer in text.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                         layer.post_feedforward_layernorm):
                norm.weight.copy_(norm.weight[hidden])
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                linear.weight.copy_(linear.weight[:, hidden])
            for linear in (attn.o_proj, mlp.down_proj):
                linear.weight.copy_(linear.weight[hidden, :])
            ffn = torch.randperm(mlp.gate_proj.weight.shape[0], generator=g)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[ffn])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[ffn])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, ffn])
            head_dim = attn.head_dim
            value = torch.randperm(head_dim, generator=g)  # one order for every KV head: each query head reads one
            kv_heads = attn.v_proj.weight.shape[0] // head_dim
            rows = torch.cat([h * head_dim + value for h in range(kv_heads)])
            attn.v_proj.weight.copy_(attn.v_proj.weight[rows])
            q_heads = attn.o_proj.weight.shape[1] // head_dim
            columns = torch.cat([h * head_dim + value for h in range(q_heads)])
            attn.o_proj.weight.copy_(attn.o_proj.weight[:, columns])
    twin = copy.copy(loaded)
    twin.model = model
    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.no_grad():
        drift = (model(ids).logits - loaded.model(ids).logits).abs().max().item()
    assert drift < 1e-3, f"the permuted copy is not the same function (max |delta logit| {drift})"
    return twin


def measure(name, loaded, split, folder, log):
    profile, workload = get_profile("host"), Workload()
    cost = target_cost(loaded.spec, profile, workload)
    search = prepare_search(loaded, split, folder, cost, lambda c: True, status=log)
    f16 = bench(search.source, prompt_len=128, gen_len=32, repeats=3).decode.median_s
    log(f"{name}: F16 decode {f16 * 1e3:.2f} ms/token (measured)")
    make_file_types(search, plain=True)
    alone, base = make_vocabulary_moves(search)
    rows = []
    for share in SHARES:
        budget = TargetBudget(tpot_s=share * f16)
        search.fits = budget_fits(budget)
        for option in search.options:
            option.fits = search.fits(option.cost)
        make_mixtures(search, alone, base)
        make_layer_upgrades(search)
        for option in search.options:
            option.fits = search.fits(option.cost)
        llama = [o for o in search.options if o.fits and not o.overrides and o.file_type != "F16"]
        llama_best = min(llama, key=lambda o: o.kl) if llama else None
        chosen = search.confirmed()  # what run_search returns: the winner timed again
        row = {"reference": name, "share": share, "budget_s": budget.tpot_s, "f16_s": f16,
               "llama_best": llama_best.to_dict() if llama_best else None, "shrink": None}
        if chosen is not None:
            chosen.path = quantize_gguf(search.source, folder / f"chosen-{share}.gguf", chosen.file_type,
                                        overrides=chosen.overrides, imatrix=search.imatrix if chosen.imatrix else None)
            write_choice(chosen, loaded, folder / f"artifact-{share}.gguf")
            timed = bench(folder / f"artifact-{share}.gguf", prompt_len=128, gen_len=32, repeats=3).decode.median_s
            verdict = verify_against(folder / f"artifact-{share}.gguf", loaded, chosen.weights)
            row["shrink"] = {**chosen.to_dict(), "retimed_s": timed, "verify_kl": verdict.metrics.mean_kl,
                             "verify_top1": verdict.metrics.top1_agreement}
        rows.append(row)
        log(_line(row))
    return rows, [o.to_dict() for o in search.options]


def _line(row):
    def part(option, key="kl"):
        if option is None:
            return "none within budget"
        return f"{option['label']}: {option['cost']['tpot_s'] * 1e3:.2f} ms, KL {option[key]:.4f}"
    shrink = row["shrink"]
    text = (f"{row['reference']} {row['share']:.0%} ({row['budget_s'] * 1e3:.2f} ms): llama.cpp best "
            f"{part(row['llama_best'])} | shrink {part(shrink)}")
    if shrink:
        text += (f", re-timed {shrink['retimed_s'] * 1e3:.2f} ms, verify KL {shrink['verify_kl']:.4f} "
                 f"top-1 {shrink['verify_top1']:.1%}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", choices=("original", "off-grid", "both"), default="both")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f}s] {message}", flush=True)

    original = load("gemma-3-270m")
    split = prepare(original, None, seq_len=128)  # the teacher-written text, cached
    references = {"original": lambda: original, "off-grid": lambda: off_grid(original)}
    names = list(references) if args.reference == "both" else [args.reference]
    results = {"rows": [], "options": {}}
    with tempfile.TemporaryDirectory(prefix="shrink-beat-") as folder:
        for name in names:
            rows, options = measure(name, references[name](), split, Path(folder) / name, log)
            results["rows"] += rows
            results["options"][name] = options
    print("\nreference | budget | llama.cpp best within budget (measured) | shrink's choice (measured) | re-timed | verify")
    for row in results["rows"]:
        print(_line(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
