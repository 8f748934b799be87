"""Vocabulary trimming on the embedded Gemma 3 270M: what it costs the text and what it buys.

    python benchmarks/vocab_trim.py [--sizes 16384] [--quant q8_0] [--tokens 8192] [--target jetson-orin-nano]
                                    [--threads 2] [--work DIR] [--json results.json]

For each kept size, the vocabulary is ranked on the teacher-written calibration text (the text `shrink`
writes when no --data is given; 4 of every 5 documents counted, the 5th held out) and the model trimmed
(compress/vocab.py). Printed per size:
- coverage (measured): the share of the held-out text's original tokens the trimmed tokenizer produces
  unchanged (same token over the same characters), and the share of held-out documents tokenized
  identically; the original's probability on removed tokens over held-out positions;
- decode time per token: estimated by the roofline on --target and on `host`, and measured in llama.cpp
  here (--threads threads), for GGUF exports (--quant) of the original and of the trimmed model;
- tokenizer parity of the trimmed GGUF in llama.cpp against the trimmed Hugging Face tokenizer;
- KL(original || model) on held-out text in the trimmed ids, the original read over the kept tokens
  (vocabmap.kept_view: a removed token's probability goes to the first piece it is spelled with), before
  and after --tokens of distillation, in PyTorch (top-k KL, as the trainer reports it) and for the GGUF
  exports in llama.cpp (full KL over the kept vocabulary), with top-1 agreement.
Every figure is labelled measured or estimated; timings on a shared machine vary, medians are quoted.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.compress.data import prepare, teacher_texts
from shrink.compress.vocab import expected_counts, split_texts, trim_vocabulary
from shrink.export.bench import bench
from shrink.export.gguf import export_gguf
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from shrink.export.workflow import export_artifact
from shrink.flows.steps import Hooks, distill, distill_config
from shrink.flows.vocab import decode_estimates
from shrink.model import load, save_loaded
from shrink.vocabmap import kept_view, outside_mass, trim_of

MODEL = "gemma-3-270m"
EVAL_SEQUENCES = 8  # held-out sequences (x seq_len tokens) compared in llama.cpp


def timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    print(f"  {label}: {time.perf_counter() - start:.0f} s measured", flush=True)
    return result


def gguf_decode(path: Path, threads: int) -> dict:
    result = bench(path, threads=threads, prompt_len=64, gen_len=32, repeats=3)
    return {"decode_s_measured": result.decode.median_s, "decode_s_q1_measured": result.decode.q1_s,
            "decode_s_q3_measured": result.decode.q3_s,
            "decode_s_host_estimated": result.estimate.tpot_s if result.estimate else None,
            "bytes": path.stat().st_size}


def in_llama_cpp(original, trim, path: Path, sequences) -> dict:
    metrics = compare(TorchRunner(kept_view(original.model, trim)), LlamaCppRunner(path, sequences.shape[1] + 8),
                      sequences.tolist())
    return {"kl_measured": metrics.mean_kl, "top1_measured": metrics.top1_agreement}


def model_counts(original, texts, work: Path):
    """The model's expected token counts on the counted calibration text, computed once per work folder."""
    import torch

    path = work / "expected-counts.pt"
    if not path.is_file():
        counts = timed("expected counts", expected_counts, original.model, original.tokenizer, split_texts(texts)[0])
        torch.save(counts, path)
    return torch.load(path, weights_only=True)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="Default: the embedded model; a tiny directory checks the script.")
    parser.add_argument("--sizes", default="16384")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--tokens", type=int, default=8192, help="Distillation tokens; 0: the trimmed model as sliced.")
    parser.add_argument("--lr", type=float, default=1e-5,
                        help="Distillation peak learning rate (shrink's default 1e-4, tuned for pruned students, took the "
                             "trimmed model from KL 0.107 to 0.598 in 8 steps: it is near its teacher already).")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--target", default="jetson-orin-nano")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("vocab-trim-work"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    console = Console(width=220)

    print(f"Loading {args.model} and its teacher-written calibration text", flush=True)
    original = load(args.model)
    texts = teacher_texts(original)
    full_gguf = args.work / f"original-{args.quant}.gguf"
    if not full_gguf.is_file():
        timed(f"GGUF export of the original ({args.quant})", export_gguf, original, full_gguf, args.quant)
    before = timed("llama.cpp decode, original", gguf_decode, full_gguf, args.threads)
    results = {"model": args.model, "quant": args.quant, "target": args.target, "threads": args.threads,
               "calibration_documents": len(texts), "original": before, "sizes": []}

    for size in (int(s) for s in args.sizes.split(",")):
        print(f"Trimming to {size:,} tokens", flush=True)
        directory = args.work / f"trimmed-{size}"
        if (directory / "config.json").is_file():
            trimmed = load(str(directory))
            trim = trim_of(trimmed.model)
            selection = json.loads((args.work / f"trimmed-{size}.json").read_text())
        else:
            trimmed, trim, selection = timed("trim", trim_vocabulary, original, texts, size=size,
                                             expected=model_counts(original, texts, args.work))
            save_loaded(trimmed, directory)
            (args.work / f"trimmed-{size}.json").write_text(json.dumps(selection))
            trimmed = load(str(directory))  # as a user's next command reads it (HF tokenizer + GGUF sidecar)
        split = prepare(original, None, seq_len=args.seq_len, tokenizer=trimmed.tokenizer)
        held = split.evaluation[:EVAL_SEQUENCES]
        mass = timed("outside mass", outside_mass, original.model, trim, held)
        estimates = decode_estimates(original.spec, trimmed.spec, args.target, args.quant)
        host = decode_estimates(original.spec, trimmed.spec, "host", args.quant)

        small_gguf = args.work / f"trimmed-{size}-{args.quant}.gguf"
        exported = timed(f"GGUF export of the trimmed model ({args.quant}) with verify", export_artifact, trimmed, "gguf",
                         small_gguf, quant=args.quant)
        parity = next(c for c in exported.verdict.checks if c.name == "tokenizer parity")
        after = timed("llama.cpp decode, trimmed", gguf_decode, small_gguf, args.threads)
        again = timed("llama.cpp decode, original again", gguf_decode, full_gguf, args.threads)  # alternated: the
        before_again = again["decode_s_measured"]  # machine's load drifts between runs
        gguf_before = timed("llama.cpp KL, trimmed", in_llama_cpp, original, trim, small_gguf, held)

        if args.tokens:
            student = load(str(directory))
            config = distill_config(args.tokens, args.seq_len, lr=args.lr)
            report = timed(f"distillation ({args.tokens:,} tokens, lr {args.lr:g})", distill, student, original, split,
                           config, args.work / f"distill-{size}-{args.tokens}-{args.lr:g}.checkpoints", Hooks())
            distilled_gguf = args.work / f"distilled-{size}-{args.tokens}-{args.lr:g}-{args.quant}.gguf"
            timed("GGUF export of the distilled model", export_gguf, student, distilled_gguf, args.quant)
            gguf_after = timed("llama.cpp KL, distilled", in_llama_cpp, original, trim, distilled_gguf, held)
        else:  # --tokens 0: the trimmed model as sliced
            report = SimpleNamespace(eval_before={"kl": None}, eval_after={"kl": None}, steps=0, tokens=0,
                                     tokens_per_second=None)
            gguf_after = gguf_before
        results["sizes"].append({
            "kept_vocab": trim.size, "selection": selection, "outside_mass_measured": mass,
            "decode_target_estimated": estimates, "decode_host_estimated": host, "trimmed": after,
            "original_decode_s_measured_again": before_again,
            "distill_lr": args.lr,
            "tokenizer_parity": asdict(parity),
            "kl_pytorch_topk_measured": {"before": report.eval_before["kl"], "after": report.eval_after["kl"]},
            "llama_cpp": {"before_distillation": gguf_before, "after_distillation": gguf_after},
            "distill": {"steps": report.steps, "tokens": report.tokens,
                        "tokens_per_second_measured": report.tokens_per_second},
        })

    table = Table(title=f"Vocabulary trimming of {args.model} ({args.quant} GGUF; llama.cpp on {args.threads} threads here)",
                  title_justify="left")
    for column in ("kept", "held-out tokens unchanged", "docs unchanged", "orig. mass removed",
                   f"decode {args.target} (est.)", "decode here (meas.)", "decode here (est.)",
                   "KL llama.cpp before -> after", "top-1 before -> after", "parity"):
        table.add_column(column, justify="right")
    table.add_row(f"{original.spec.vocab_size:,} (original)", "100%", "100%", "0",
                  f"{results['sizes'][0]['decode_target_estimated']['tpot_s_before_estimated'] * 1e3:.2f} ms"
                  if results["sizes"] else "-",
                  ms(before["decode_s_measured"]) + (f" / {ms(results['sizes'][0]['original_decode_s_measured_again'])}"
                                                     if results["sizes"] else ""),
                  ms(results["sizes"][0]["decode_host_estimated"]["tpot_s_before_estimated"]) if results["sizes"] else "-",
                  "-", "-", "-")
    for row in results["sizes"]:
        held_out = row["selection"]["held_out"]
        b, a = row["llama_cpp"]["before_distillation"], row["llama_cpp"]["after_distillation"]
        table.add_row(f"{row['kept_vocab']:,}", f"{held_out['token_coverage']:.2%}", f"{held_out['documents_unchanged']:.0%}",
                      f"{row['outside_mass_measured']['mean']:.4f}",
                      f"{row['decode_target_estimated']['tpot_s_after_estimated'] * 1e3:.2f} ms",
                      ms(row["trimmed"]["decode_s_measured"]), ms(row["decode_host_estimated"]["tpot_s_after_estimated"]),
                      f"{b['kl_measured']:.4f} -> {a['kl_measured']:.4f}",
                      f"{b['top1_measured']:.1%} -> {a['top1_measured']:.1%}",
                      "pass" if row["tokenizer_parity"]["passed"] else "FAIL")
    console.print(table)
    for row in results["sizes"]:
        kl = row["kl_pytorch_topk_measured"]
        distilled = (f"PyTorch top-k KL (measured) {kl['before']:.4f} -> {kl['after']:.4f} after {row['distill']['tokens']:,} "
                     f"tokens at lr {row['distill_lr']:g}" if row["distill"]["tokens"] else "not distilled (--tokens 0)")
        console.print(f"{row['kept_vocab']:,} tokens: {distilled}; calibration-token coverage "
                      f"{row['selection']['calibration_token_coverage']:.2%} (measured); held-out sizes "
                      f"{row['selection']['held_out']['held_out_tokens']:,} tokens / {row['selection']['held_out']['held_out_documents']} "
                      f"documents; tokenizer parity: {row['tokenizer_parity']['detail']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
